"""What the downstream tasks of `python -m mcr.evaluate` share (--task zero-shot and
linear-probe): their flags and the checks of them, the labelled splits (the embedded
corpus with its finding labels, or mcr.data.labelled's CSV reader), the content-keyed
feature cache, and the untrained model of the random-initialisation floor.
"""
import json
import os
import sys
import time

import torch

from mcr import engine, run
from mcr.config import config_to_dict
from mcr.data.labelled import DEFAULT_CSVS, open_labelled, parse_labelled_options
from mcr.eval import linear_probe, zero_shot
from mcr.eval.gallery import file_sha256

TASKS = ("retrieval", "zero-shot", "linear-probe")
DEFAULT_CACHE = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "mcr", "features")


def positive_float(text):
    value = float(text)
    if not value > 0:
        raise ValueError(text)
    return value


positive_float.__name__ = "positive number"


def add_arguments(parser, positive_int):
    """The flags of the downstream tasks (each with its help line)."""
    g = parser.add_argument_group("zero-shot and linear-probe tasks (docs/evaluation.md)")
    g.add_argument("--labelled-root", default="",
                   help="folder of a labelled-images CSV set (mcr.data.labelled; default: the embedded corpus "
                        "with its finding labels)")
    g.add_argument("--labelled-options", default="",
                   help='its reader options, e.g. "train=train.csv;test=valid.csv;uncertain=ones;missing=zeros"')
    g.add_argument("--prompts", default="",
                   help=f"zero-shot prompt set: one of {', '.join(zero_shot.PROMPT_SETS)} or a JSON file "
                        "(default: synthetic on the embedded corpus, chexpert on a labelled set)")
    g.add_argument("--pooling", choices=linear_probe.POOLINGS, default="joint",
                   help="linear probe features: the CLS token, the mean of the patch tokens, or the MbA joint "
                        "embedding")
    g.add_argument("--probe-train-size", type=positive_int, default=5000,
                   help="linear probe: training pairs of the embedded corpus (its train split)")
    g.add_argument("--draws", type=positive_int, default=3,
                   help="linear probe: draws of the 1%% and 10%% label subsets (mean and std over them)")
    g.add_argument("--probe-c", type=positive_float, default=1.0,
                   help="linear probe: inverse L2 strength C of LogisticRegression (standardized features)")
    g.add_argument("--cache-dir", default=DEFAULT_CACHE,
                   help="folder of the feature cache (keyed by checkpoint checksum, data and pooling)")
    g.add_argument("--random-init", type=int, default=None, metavar="SEED",
                   help="evaluate the checkpoint's model built after torch.manual_seed(SEED) and not trained "
                        "(the random-initialisation floor)")


def check_arguments(args):
    """One-line ValueError naming the flag for a bad value of the downstream flags."""
    if args.labelled_root:
        if not os.path.isdir(args.labelled_root):
            raise ValueError(f"--labelled-root {args.labelled_root!r}: not a folder")
        if args.split not in ("train", "test"):
            raise ValueError(f"--split {args.split}: a labelled set has the splits train and test")
        if args.task == "linear-probe" and args.split != "test":
            raise ValueError("--split: the linear probe trains on train and scores test; give --split test")
        parse_labelled_options(args.labelled_options)
        for split in ("train", "test") if args.task == "linear-probe" else (args.split,):
            if not os.path.isfile(labelled_csv(args, split)):
                raise ValueError(f"--labelled-options: the {split} CSV {labelled_csv(args, split)!r} does not exist")
    elif args.labelled_options:
        raise ValueError("--labelled-options needs --labelled-root")
    if args.data:
        raise ValueError(f"--data: the {args.task} task reads the embedded corpus or --labelled-root")
    if args.task == "linear-probe" and args.split == "train" and not args.labelled_root:
        raise ValueError("--split train: the linear probe trains on train; score it on val or test")
    existing = os.path.abspath(args.cache_dir)
    while not os.path.exists(existing):  # the folder, or the nearest parent that would hold it
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing) or not os.access(existing, os.W_OK):
        raise ValueError(f"--cache-dir {args.cache_dir!r}: not a writable folder ({existing} is in the way)")
    if args.task == "zero-shot":
        zero_shot.load_prompts(args.prompts or ("chexpert" if args.labelled_root else "synthetic"))


def labelled_split(cfg, args, split, size):
    """(dataset, its description for the cache key): the embedded corpus of the run's seed
    (`size` pairs), or split "train"/"test" of --labelled-root."""
    if args.labelled_root:
        dataset = open_labelled(args.labelled_root, split, cfg.model.image_size, args.labelled_options)
        csv_digest = file_sha256(labelled_csv(args, split))
        return dataset, {"labelled_root": os.path.realpath(args.labelled_root), "split": split,
                         "options": args.labelled_options, "csv_sha256": csv_digest,
                         "image_size": cfg.model.image_size}
    dataset = run.build_dataset(cfg, split, size)
    return dataset, {"data": "synthetic", "split": split, "size": len(dataset), "seed": cfg.seed,
                     "image_size": cfg.model.image_size}


def labelled_csv(args, split):
    """The CSV file of `split` under --labelled-root."""
    name = parse_labelled_options(args.labelled_options).get(split, DEFAULT_CSVS[split])
    return name if os.path.isabs(name) else os.path.join(args.labelled_root, name)


def prepare_model(args, model, cfg, tokenizer, device, path):
    """(model, what identifies its weights for the cache): the trained checkpoint (its
    model.safetensors checksum) or, with --random-init, the untrained model of that seed."""
    if args.random_init is None:
        return model, {"checkpoint_sha256": file_sha256(os.path.join(path, "model.safetensors"))}
    torch.manual_seed(args.random_init)
    untrained = run.build_model(cfg.model, tokenizer).to(device)
    return untrained, {"random_init": args.random_init, "model": config_to_dict(cfg)["model"]}


def features(args, model, weights, cfg, tokenizer, device, dataset, data_key, pooling):
    """Cached image_features of `dataset` (see linear_probe.cached)."""
    key = {"weights": weights, "data": data_key, "pooling": pooling}
    collate = run.collate_for(cfg, tokenizer)
    amp = engine.autocast_dtype(cfg.precision, device)
    return linear_probe.cached(args.cache_dir, key, lambda: linear_probe.image_features(
        model, dataset, collate, device, pooling, amp))


def run_zero_shot(args, model, cfg, tokenizer, device, path):
    """--task zero-shot: results dict (and the sampled ids beside the output)."""
    started = time.time()
    model, weights = prepare_model(args, model, cfg, tokenizer, device, path)
    dataset, data_key = labelled_split(cfg, args, args.split, args.size or cfg.val_size)
    image_emb, labels = features(args, model, weights, cfg, tokenizer, device, dataset, data_key, "joint")
    classes = zero_shot.load_prompts(args.prompts or ("chexpert" if args.labelled_root else "synthetic"))
    class_emb = zero_shot.class_embeddings(model, classes, run.collate_for(cfg, tokenizer), device,
                                           cfg.model.image_size, amp_dtype=engine.autocast_dtype(cfg.precision, device))
    results = zero_shot.zero_shot(image_emb, labels.numpy(), dataset.label_names, class_emb, classes,
                                  per_class=args.per_class, seed=args.seed)
    if "sample" in results and args.labelled_root:  # name the sampled images, not only their positions
        results["sample"]["paths"] = [os.path.relpath(dataset.paths[i], os.path.realpath(args.labelled_root))
                                      for i in results["sample"]["indices"]]
    results.update(images=len(dataset), seconds=time.time() - started)
    print(zero_shot.format_results(results))
    return results


def run_linear_probe(args, model, cfg, tokenizer, device, path):
    """--task linear-probe: results dict."""
    started = time.time()
    model, weights = prepare_model(args, model, cfg, tokenizer, device, path)
    train_set, train_key = labelled_split(cfg, args, "train", args.probe_train_size)
    test_set, test_key = labelled_split(cfg, args, args.split, args.size or cfg.val_size)
    train_x, train_y = features(args, model, weights, cfg, tokenizer, device, train_set, train_key, args.pooling)
    test_x, test_y = features(args, model, weights, cfg, tokenizer, device, test_set, test_key, args.pooling)
    names = list(test_set.label_names)
    results = linear_probe.linear_probe(train_x.numpy(), train_y.numpy(), test_x.numpy(), test_y.numpy(), names,
                                        draws=args.draws, seed=args.seed, C=args.probe_c)
    linear_probe.warn_missing_labels(names, results)
    print(linear_probe.format_results(results))
    return {"pooling": args.pooling, "probe_c": args.probe_c, "train_images": len(train_set),
            "test_images": len(test_set), "fractions": results, "seconds": time.time() - started}


def run_task(args, model, cfg, tokenizer, device, path):
    """Run --task zero-shot or linear-probe, write its JSON; returns the results."""
    task = run_zero_shot if args.task == "zero-shot" else run_linear_probe
    results = task(args, model, cfg, tokenizer, device, path)
    data = args.labelled_root or "synthetic"
    stem = f"{args.task.replace('-', '_')}_{args.split}"
    output = args.output or os.path.join(path, f"{stem}.json")
    header = {"checkpoint": path, "task": args.task, "data": data, "split": args.split,
              "random_init": args.random_init}
    sample = results.pop("sample", None)
    if sample is not None:
        sample_path = os.path.splitext(output)[0] + "_sample.json"
        with open(sample_path, "w") as f:
            json.dump({**header, **sample}, f)
        results["sample_file"] = os.path.basename(sample_path)
    with open(output, "w") as f:
        json.dump({**header, **results}, f, indent=1)
    print(f"wrote {output}", file=sys.stderr)
    return results
