"""Labelled images from a CSV: an image path column and one column per label, the layout
of CheXpert's train.csv / valid.csv (and of any classification set written that way).

    Path,Sex,Age,Frontal/Lateral,AP/PA,No Finding,...,Atelectasis,Cardiomegaly,...
    CheXpert-v1.0-small/valid/patient64541/study1/view1_frontal.jpg,Male,73,Frontal,AP,,...,1.0,-1.0,...

A label cell is 1 (positive), 0 (negative), -1 (uncertain) or blank (not mentioned); the
policies turn them into float32 labels, NaN where a label is unknown (left out of that
label's metrics):
  uncertain=zeros  -1 -> 0 (CheXpert's U-Zeros, the default)
  uncertain=ones   -1 -> 1 (U-Ones)
  uncertain=ignore -1 -> NaN
  missing=zeros    blank -> 0 (the default: CheXpert's labeller leaves a finding it did not
                   see mentioned blank, and its evaluations read that as negative)
  missing=ignore   blank -> NaN
Options (`--labelled-options`, ';'-separated): train=CSV, test=CSV (paths under the root),
path_column=Path, path_template={} (e.g. "stage_2_train_images/{}.png" for RSNA's
patientId), labels=A,B (default: every column whose cells are all label values, not all blank),
uncertain=..., missing=.... Rows naming the same image (RSNA's one row per box) are merged:
a label is positive if any row says so. Image paths are relative to the root; a path that
leaves it, a missing file and an unreadable image are skipped and counted (Summary).
"""
import math
import os

import numpy as np

from mcr.data.common import ImageReportDataset, Summary, UnreadableImage, check_image, read_csv

UNCERTAIN_POLICIES = {"zeros": 0.0, "ones": 1.0, "ignore": math.nan}
MISSING_POLICIES = {"zeros": 0.0, "ignore": math.nan}
LABEL_VALUES = {"1": 1.0, "1.0": 1.0, "0": 0.0, "0.0": 0.0, "-1": -1.0, "-1.0": -1.0}
OPTION_KEYS = ("train", "test", "path_column", "path_template", "labels", "uncertain", "missing")
DEFAULT_CSVS = {"train": "train.csv", "test": "valid.csv"}  # CheXpert's file names


def parse_labelled_options(text):
    """'train=train.csv;test=valid.csv;uncertain=ones' -> dict; ValueError names a bad item."""
    out = {}
    for item in filter(None, (s.strip() for s in (text or "").split(";"))):
        key, sep, value = (part.strip() for part in item.partition("="))
        if not sep or key not in OPTION_KEYS:
            raise ValueError(f"--labelled-options: bad item {item!r}; expected KEY=VALUE with KEY in "
                             f"{', '.join(OPTION_KEYS)}")
        out[key] = value
    for key, allowed in (("uncertain", UNCERTAIN_POLICIES), ("missing", MISSING_POLICIES)):
        if key in out and out[key] not in allowed:
            raise ValueError(f"--labelled-options {key}={out[key]}: expected one of {', '.join(allowed)}")
    if "path_template" in out and "{}" not in out["path_template"]:
        raise ValueError(f"--labelled-options path_template={out['path_template']}: needs a {{}} for the path cell")
    return out


def inside_root(root, relative):
    """The real path of `relative` under `root`, or None when it leaves the root (absolute,
    '..', or a symbolic link pointing outside)."""
    if not relative or os.path.isabs(relative):
        return None
    real_root = os.path.realpath(root)
    path = os.path.realpath(os.path.join(real_root, relative))
    return path if os.path.commonpath([real_root, path]) == real_root else None


def label_columns(rows, header, path_column):
    """The columns (other than the path's) whose non-blank cells are all label values."""
    return [name for name in header if name != path_column
            and any(row[name] for row in rows) and all(row[name] in LABEL_VALUES or not row[name] for row in rows)]


class LabelledImages(ImageReportDataset):
    """The images of one CSV with float32 labels [C] (NaN = unknown); reports are empty.

    root: the folder the image paths are relative to; csv: the CSV file (absolute, or
    relative to root); label_names: the label columns (default: detected, label_columns).
    """

    def __init__(self, root, csv, image_size, *, path_column="Path", path_template="{}", label_names=None,
                 uncertain="zeros", missing="zeros", name=None):
        if not root or not os.path.isdir(root):
            raise FileNotFoundError(f"labelled images root {root!r} is not a folder")
        if uncertain not in UNCERTAIN_POLICIES:
            raise ValueError(f"uncertain must be one of {', '.join(UNCERTAIN_POLICIES)}, got {uncertain!r}")
        if missing not in MISSING_POLICIES:
            raise ValueError(f"missing must be one of {', '.join(MISSING_POLICIES)}, got {missing!r}")
        csv_path = csv if os.path.isabs(csv) else os.path.join(root, csv)
        if not os.path.isfile(csv_path):
            raise FileNotFoundError(f"labels CSV {csv_path!r} does not exist")
        rows = read_csv(csv_path, required=(path_column, *(label_names or ())))
        header = list(rows[0]) if rows else []
        label_names = list(label_names or label_columns(rows, header, path_column))
        if not label_names:
            raise ValueError(f"{csv_path}: no label column (cells 1, 0, -1 or blank) besides {path_column!r}")
        name = name or os.path.basename(csv_path)
        summary = Summary(name)
        policy = {1.0: 1.0, 0.0: 0.0, -1.0: UNCERTAIN_POLICIES[uncertain]}
        blank = MISSING_POLICIES[missing]
        merged, order = {}, []
        for row in rows:
            cells = [row[c] for c in label_names]
            bad = [c for c, v in zip(label_names, cells) if v and v not in LABEL_VALUES]
            if bad:
                summary.skip(f"label cell not 1, 0, -1 or blank (column {bad[0]!r})", row[path_column])
                continue
            labels = np.array([policy[LABEL_VALUES[v]] if v else blank for v in cells], dtype=np.float32)
            relative = path_template.format(row[path_column]) if row[path_column] else ""
            if relative in merged:  # another row for the same image: positive if any row says so
                merged[relative] = np.fmax(merged[relative], labels)
                continue
            merged[relative] = labels
            order.append(relative)
        entries = []
        for relative in order:
            path = inside_root(root, relative)
            if path is None:
                summary.skip("image path outside the root", relative)
            elif not os.path.isfile(path):
                summary.skip("missing image file", relative)
            else:
                try:
                    check_image(path)
                except UnreadableImage:
                    summary.skip("unreadable image", relative)
                    continue
                entries.append((path, "", merged[relative]))
        summary.kept = len(entries)
        super().__init__(entries, image_size, label_names, summary, name)


def open_labelled(root, split, image_size, options=""):
    """The LabelledImages of one split ("train" or "test") from --labelled-root and
    --labelled-options (see the module docstring)."""
    opts = parse_labelled_options(options)
    if split not in DEFAULT_CSVS:
        raise ValueError(f"labelled images: split must be train or test, got {split!r}")
    labels = [s.strip() for s in opts["labels"].split(",") if s.strip()] if "labels" in opts else None
    dataset = LabelledImages(root, opts.get(split, DEFAULT_CSVS[split]), image_size,
                             path_column=opts.get("path_column", "Path"),
                             path_template=opts.get("path_template", "{}"), label_names=labels,
                             uncertain=opts.get("uncertain", "zeros"), missing=opts.get("missing", "zeros"),
                             name=f"labelled {split}")
    print(dataset.summary)
    return dataset
