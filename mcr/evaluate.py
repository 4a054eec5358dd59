"""Evaluate a trained run: cross-modal retrieval with the paper's protocols (mcr.eval.protocols).

    python -m mcr.evaluate --checkpoint runs/default                  (its newest checkpoint)
    python -m mcr.evaluate --checkpoint runs/mimic --split test --protocol 5x200
    python -m mcr.evaluate --checkpoint runs/default --split test --task zero-shot      (docs/evaluation.md)
    python -m mcr.evaluate --checkpoint runs/default --split test --task linear-probe

The evaluation is training's own (mcr.eval.embedding.evaluate: same data, tokenizer, batches
and autocast), so on the validation split it reproduces the figures training logged last.
The tokenizer is the run folder's own (the folder that holds checkpoints/). A checkpoint with
non-finite weights (a diverged run) is refused: one line, exit status 2.
"""
import json
import os

from mcr import cli, run
from mcr.config import DEVICE_KINDS
from mcr.data.registry import DATASETS
from mcr.engine import autocast_dtype
from mcr.eval import downstream
from mcr.eval.embedding import evaluate, format_results

PROTOCOLS = ("full", "5x200")


def positive_int(text):
    value = int(text)
    if value < 1:
        raise ValueError(text)
    return value


positive_int.__name__ = "positive integer"  # argparse's message: "invalid positive integer value"


def build_parser():
    p = cli.Parser(prog="python -m mcr.evaluate", description=__doc__, formatter_class=cli.HelpFormatter)
    p.add_argument("--checkpoint", required=True, help="checkpoint folder, or a run folder (its newest intact one)")
    p.add_argument("--task", choices=downstream.TASKS, default="retrieval",
                   help="retrieval (--protocol), zero-shot classification, or linear probe of the image encoder")
    p.add_argument("--split", choices=("train", "val", "test"), default="val", help="split to evaluate")
    p.add_argument("--size", type=positive_int, default=None,
                   help="number of pairs of --data synthetic (default: the run's --val-size)")
    p.add_argument("--protocol", choices=PROTOCOLS, default="full",
                   help="full: R@K, ranks and label P@K over the whole split; 5x200: P@K by class")
    p.add_argument("--per-class", type=positive_int, default=200,
                   help="5x200 and zero-shot accuracy: studies per class")
    p.add_argument("--seed", type=int, default=0,
                   help="5x200 and zero-shot accuracy: selection seed; linear probe: seed of the label subsets")
    p.add_argument("--data", choices=DATASETS, default=None, help="evaluate on another dataset than the run's")
    p.add_argument("--data-root", default="", help="its root folder (with --data)")
    p.add_argument("--data-options", default="", help="its reader options (with --data)")
    p.add_argument("--device", default="auto", help=f"one of {', '.join(DEVICE_KINDS)}")
    p.add_argument("--num-workers", type=int, default=0, help="DataLoader worker processes")
    p.add_argument("--output", default="", help="JSON file to write (default: eval_<split>[_5x200].json, "
                                                 "zero_shot_<split>.json, linear_probe_<split>.json in the "
                                                 "checkpoint folder)")
    downstream.add_arguments(p, positive_int)
    return p


def main(argv=None):
    """Console entry point (mcr-evaluate): results of one protocol on one split."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.data and args.data != "synthetic" and not os.path.isdir(args.data_root):
            raise run.InputError(f"--data {args.data} needs --data-root DIR (an existing folder)")
        if args.output and not os.path.isdir(os.path.dirname(os.path.abspath(args.output))):
            raise run.InputError(f"--output {args.output!r}: its folder does not exist")
        if args.random_init is not None and args.random_init < 0:  # every task's floor
            raise ValueError(f"--random-init {args.random_init}: expected a seed >= 0")
        if args.task != "retrieval":
            downstream.check_arguments(args)
        model, cfg, tokenizer, device, path = run.load_trained(args.checkpoint, args.device)
        if args.task == "retrieval":
            if args.data:
                cfg.data, cfg.data_root, cfg.data_options = args.data, args.data_root, args.data_options
            dataset = run.build_dataset(cfg, args.split, args.size or cfg.val_size)
    except (ValueError, FileNotFoundError) as err:
        cli.fail(parser.prog, err)
    if args.task != "retrieval":
        return downstream.run_task(args, model, cfg, tokenizer, device, path)
    if args.random_init is not None:  # the retrieval floor: the run's model, untrained
        model = downstream.prepare_model(args, model, cfg, tokenizer, device, path)[0].eval()
    results = evaluate(model, dataset, run.collate_for(cfg, tokenizer), device, autocast_dtype(cfg.precision, device),
                       protocol=args.protocol, per_class=args.per_class, seed=args.seed, num_workers=args.num_workers)
    print(f"checkpoint {path}, {cfg.data} split {args.split}, protocol {args.protocol}, {len(dataset)} pairs")
    print(format_results(results, args.protocol))
    suffix = "" if args.protocol == "full" else f"_{args.protocol}"
    output = args.output or os.path.join(path, f"eval_{args.split}{suffix}.json")
    with open(output, "w") as f:
        json.dump({"checkpoint": path, "data": cfg.data, "split": args.split, "protocol": args.protocol,
                   "pairs": len(dataset), "random_init": args.random_init, **results}, f, indent=1)
    print(f"wrote {output}")
    return results


if __name__ == "__main__":
    main()
