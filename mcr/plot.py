"""Pictures of a run: training curves, MAE reconstructions, a retrieval grid (PNG files).

    python -m mcr.plot runs/default                      # curves.png, reconstructions.png, retrieval.png
    python -m mcr.plot runs/a runs/b --out runs          # each run's pictures + curves_overlay.png
    python -m mcr.plot runs/default --curves-only        # curves.png alone, no checkpoint needed

curves.png comes from metrics.jsonl; the model pictures from the run's newest intact
checkpoint, over the validation split (mcr.eval.pictures draws them). Every run folder is
checked before anything is drawn: one without metrics rows, or (for the model pictures) one
without an intact checkpoint with finite weights, is one line and exit status 2.
"""
import os

from mcr import cli
from mcr.eval import pictures


def build_parser():
    p = cli.Parser(prog="python -m mcr.plot", description=__doc__, formatter_class=cli.HelpFormatter)
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run folder(s) written by mcr.train")
    p.add_argument("--out", default="",
                   help="folder for curves_overlay.png when several runs are given (default: the first run)")
    p.add_argument("--curves-only", action="store_true",
                   help="draw curves.png only (no checkpoint loaded, no model pictures)")
    p.add_argument("--split", choices=("val", "test"), default="val", help="split the model pictures are drawn from")
    p.add_argument("--size", type=int, default=0,
                   help="pairs of that split (synthetic data; 0 = the run's validation size)")
    return p


def check_run(run_dir, need_checkpoint):
    """ValueError naming RUN_DIR unless it holds metrics rows and, if needed, an intact checkpoint."""
    from mcr import checkpoint

    try:
        pictures.read_metrics(run_dir)
    except FileNotFoundError:
        raise ValueError(f"RUN_DIR {run_dir!r} has no metrics.jsonl (not a run folder written by mcr.train)") from None
    except ValueError as err:
        raise ValueError(f"RUN_DIR {run_dir!r}: {err}") from None
    if need_checkpoint and checkpoint.newest_intact(run_dir, quiet=True) is None:
        raise ValueError(f"RUN_DIR {run_dir!r} holds no intact checkpoint to draw the model pictures from "
                         "(--curves-only draws its curves)")


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if pictures.Figure is None:
        parser.exit(1, 'mcr.plot needs matplotlib: pip install "mcr[plot]"\n')
    if args.size < 0:
        parser.error(f"--size must be >= 0, got {args.size}")
    if args.out and not os.path.isdir(args.out):
        parser.error(f"--out {args.out!r} is not a folder")
    for run_dir in args.runs:
        try:
            check_run(run_dir, need_checkpoint=not args.curves_only)
        except ValueError as err:
            parser.error(str(err))
    written = []
    for run_dir in args.runs:
        if args.curves_only:
            paths = [pictures.save_png(pictures.curves_figure([run_dir]), os.path.join(run_dir, "curves.png"))]
        else:
            try:
                paths = pictures.write_pictures(run_dir, args.split, args.size)
            except (FileNotFoundError, ValueError) as err:  # e.g. a checkpoint with non-finite weights
                cli.fail(parser.prog, f"RUN_DIR {run_dir!r}: {err}")
        written += paths
        print("\n".join(f"wrote {path}" for path in paths))
    if len(args.runs) > 1:
        path = pictures.save_png(pictures.curves_figure(args.runs),
                                 os.path.join(args.out or args.runs[0], "curves_overlay.png"))
        written.append(path)
        print(f"wrote {path}")
    return written


if __name__ == "__main__":
    main()
