"""Pictures of a run: training curves, MAE reconstructions, a retrieval grid (PNG files).

    python -m mcr.plot runs/default                      # curves.png, reconstructions.png, retrieval.png
    python -m mcr.plot runs/a runs/b --out runs          # each run's pictures + curves_overlay.png
    python -m mcr.plot runs/default --curves-only        # curves.png alone, no checkpoint needed

curves.png comes from metrics.jsonl; the model pictures from the run's newest intact
checkpoint, over the validation split (mcr.eval.pictures draws them).
"""
import argparse
import os

from mcr.eval import pictures


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m mcr.plot", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run folder(s) written by mcr.train")
    parser.add_argument("--out", default="",
                        help="folder for curves_overlay.png when several runs are given (default: the first run)")
    parser.add_argument("--curves-only", action="store_true",
                        help="draw curves.png only (no checkpoint loaded, no model pictures)")
    parser.add_argument("--split", default="val", help="split the model pictures are drawn from (val or test)")
    parser.add_argument("--size", type=int, default=0,
                        help="pairs of that split (synthetic data; 0 = the run's validation size)")
    args = parser.parse_args(argv)
    if pictures.Figure is None:
        parser.exit(1, 'mcr.plot needs matplotlib: pip install "mcr[plot]"\n')
    for run_dir in args.runs:
        if not os.path.isfile(os.path.join(run_dir, "metrics.jsonl")):
            parser.error(f"RUN_DIR {run_dir!r} has no metrics.jsonl (not a run folder written by mcr.train)")
    if args.size < 0:
        parser.error(f"--size must be >= 0, got {args.size}")
    if args.out and not os.path.isdir(args.out):
        parser.error(f"--out {args.out!r} is not a folder")
    written = []
    for run_dir in args.runs:
        if args.curves_only:
            written.append(pictures.save_png(pictures.curves_figure([run_dir]), os.path.join(run_dir, "curves.png")))
        else:
            written += pictures.write_pictures(run_dir, args.split, args.size)
    if len(args.runs) > 1:
        written.append(pictures.save_png(pictures.curves_figure(args.runs),
                                         os.path.join(args.out or args.runs[0], "curves_overlay.png")))
    for path in written:
        print(f"wrote {path}")
    return written


if __name__ == "__main__":
    main()
