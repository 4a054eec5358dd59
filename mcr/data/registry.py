"""`--data NAME --data-root DIR --data-options K=V;K=V` -> a dataset of one split.

    synthetic   the embedded corpus (size = --train-size / --val-size)
    mimic-cxr   MIMIC-CXR-JPG v2 root (mcr.data.mimic)
    openi       IU X-ray / NLMCXR root (mcr.data.openi)
    shards      a folder written by `python -m mcr.prepare` (mcr.data.shards)

Options (real datasets): views=PA,AP | views=all; images=one|all; sections=findings,impression;
fallback=last|none; uncertain=0 (MIMIC CheXpert -1 -> this value); reports=PATH (MIMIC
reports zip or folder); split_seed=0 (OpenI). Example: --data-options "views=PA;images=all".
"""
from mcr.data.reports import FALLBACKS

DATASETS = ("synthetic", "mimic-cxr", "openi", "shards")


def one_of(*allowed):
    def parse(value):
        if value not in allowed:
            raise ValueError(f"expected one of {', '.join(allowed)}")
        return value
    return parse


OPTIONS = {
    "views": lambda v: None if v == "all" else tuple(x.strip() for x in v.split(",") if x.strip()),
    "images": one_of("one", "all"),
    "sections": lambda v: tuple(x.strip().lower() for x in v.split(",") if x.strip()),
    "fallback": one_of(*FALLBACKS),
    "uncertain": float,
    "reports": str,
    "split_seed": int,
}
_ONLY = {"uncertain": "mimic-cxr", "reports": "mimic-cxr", "split_seed": "openi"}


def parse_options(text, dataset=None):
    """'views=PA,AP;images=all' -> reader keyword arguments; ValueError names bad keys."""
    out = {}
    for item in filter(None, (s.strip() for s in (text or "").split(";"))):
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or key not in OPTIONS:
            raise ValueError(f"bad --data-options item {item!r}; expected KEY=VALUE with KEY in {sorted(OPTIONS)}")
        if dataset and _ONLY.get(key, dataset) != dataset:
            raise ValueError(f"--data-options {key} applies to {_ONLY[key]} only, not {dataset}")
        try:
            out[{"images": "images_per_study"}.get(key, key)] = OPTIONS[key](value.strip())
        except ValueError as err:
            raise ValueError(f"bad --data-options value {item!r}: {err}") from None
    return out


def open_dataset(name, root, split, image_size, options="", size=None, seed=0, verbose=True):
    """The dataset of one split (records with .image uint8 [S, S], .report, .labels)."""
    if name not in DATASETS:
        raise ValueError(f"unknown --data {name!r}; datasets are {DATASETS}")
    if name == "synthetic":
        from mcr.data.synthetic import SyntheticCXR

        return SyntheticCXR(size, split=split, image_size=image_size, seed=seed)
    if not root:
        raise ValueError(f"--data {name} needs --data-root DIR")
    if name == "shards":
        if options:
            raise ValueError("--data-options do not apply to --data shards (they were fixed at prepare time)")
        from mcr.data.shards import ShardDataset

        dataset = ShardDataset(root, split, image_size)
    elif name == "mimic-cxr":
        from mcr.data.mimic import MimicCXR

        dataset = MimicCXR(root, split, image_size, **parse_options(options, name))
    else:
        from mcr.data.openi import OpenI

        dataset = OpenI(root, split, image_size, **parse_options(options, name))
    if verbose:
        print(dataset.summary)
    return dataset
