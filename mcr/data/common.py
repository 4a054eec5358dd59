"""What the real-data readers share: the record type, image decoding, the lazy dataset
over (image path, report, labels) entries, and the summary of what was skipped and why."""
import csv
import gzip
import os
import sys
from collections import Counter
from dataclasses import dataclass

import numpy as np
from PIL import Image

# CheXpert's 14 observations, in the column order of mimic-cxr-2.0.0-chexpert.csv
CHEXPERT_LABELS = (
    "Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Enlarged Cardiomediastinum", "Fracture",
    "Lung Lesion", "Lung Opacity", "No Finding", "Pleural Effusion", "Pleural Other", "Pneumonia",
    "Pneumothorax", "Support Devices",
)


@dataclass(frozen=True)
class Sample:
    """One image-report pair, as Collate expects (same fields as synthetic.Study)."""

    image: np.ndarray   # uint8 [H, W]
    report: str
    labels: np.ndarray  # float32 [C]


class UnreadableImage(Exception):
    """An image file that PIL cannot open or decode."""


def check_image(path):
    """Cheap header check: raises UnreadableImage if the file is empty or not an image."""
    try:
        with Image.open(path) as im:
            im.size  # noqa: B018  (parsing the header is the check)
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        raise UnreadableImage(f"{path}: {err}") from err


def check_reader_args(name, root, split, splits, images_per_study):
    """The checks every reader makes before reading: the root folder exists, the split and
    images_per_study ("one" or "all") are known. name: the data set, for the message."""
    if not root or not os.path.isdir(root):
        raise FileNotFoundError(f"{name} root directory {root!r} does not exist")
    if split not in splits:
        raise ValueError(f"split must be one of {sorted(splits)}, got {split!r}")
    if images_per_study not in ("one", "all"):
        raise ValueError(f"images_per_study must be 'one' or 'all', got {images_per_study!r}")


def read_csv(path, required=()):
    """Rows of a plain or gzipped CSV as dicts of stripped strings ("" where a row is short).

    A UTF-8 byte-order mark and spaces around commas are accepted (the intent is plain); a
    missing `required` column, bytes that are not UTF-8, a broken gzip stream or a malformed
    line raise ValueError naming the file (and the column or line)."""
    opener = gzip.open if path.endswith(".gz") else open
    reader = None
    try:
        with opener(path, "rt", newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f, skipinitialspace=True)
            header = [name.strip() for name in next(reader, [])]
            missing = [name for name in required if name not in header]
            if missing:
                raise ValueError(f"{path}: no column {', '.join(map(repr, missing))} (its columns: {header})")
            return [{name: row[k].strip() if k < len(row) else "" for k, name in enumerate(header)}
                    for row in reader if row]
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not UTF-8 text ({err})") from None
    except csv.Error as err:
        raise ValueError(f"{path}, line {reader.line_num if reader else 1}: malformed CSV ({err})") from None
    except (OSError, EOFError) as err:
        raise ValueError(f"{path}: unreadable ({err})") from None


def is_plain_name(name):
    """True when `name` (built from an id read from a CSV or XML) is one path component: not
    empty, not '.' or '..', no '/', '\\' or NUL. Paths joined from plain names under a root
    cannot leave it (an absolute id or a '../' is not a plain name)."""
    return bool(name) and name not in (".", "..") and not any(c in name for c in "/\\\0")


def add_study_images(entries, summary, candidates, text, labels, images_per_study):
    """Append (path, text, labels) to entries for the study's readable images, in order;
    candidates yields (path or None if the file is missing, name for the summary). Stops
    after the first when images_per_study == "one". Returns how many were added."""
    kept = 0
    for path, name in candidates:
        if path is None:
            summary.skip("missing image file", name)
            continue
        try:
            check_image(path)
        except UnreadableImage:
            summary.skip("unreadable image", path)
            continue
        entries.append((path, text, labels))
        kept += 1
        if images_per_study == "one":
            break
    return kept


def load_image(path, size):
    """Decode to 8-bit grayscale (16-bit images scaled by their maximum), resize the shorter
    side to `size` (bilinear, antialiased) and centre-crop: uint8 [size, size]. Raises
    UnreadableImage on a corrupt file."""
    try:
        with Image.open(path) as im:
            im.draft("L", (size, size))  # JPEG: decode at a reduced scale when much larger
            if im.mode.startswith("I"):  # 16-bit PNG: scale by the image's maximum, not clip at 255
                pixels = np.asarray(im, dtype=np.float32)
                im = Image.fromarray((pixels * (255.0 / max(float(pixels.max()), 1.0)) + 0.5).astype(np.uint8))
            im = im.convert("L")
            w, h = im.size
            scale = size / min(w, h)
            nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
            im = im.resize((nw, nh), Image.BILINEAR)
            left, top = (nw - size) // 2, (nh - size) // 2
            return np.asarray(im.crop((left, top, left + size, top + size)), dtype=np.uint8)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise UnreadableImage(f"{path}: {err}") from err


class Summary:
    """Counts of kept entries and of skipped ones by reason, printed once per split."""

    def __init__(self, name):
        self.name, self.kept, self.skipped, self.notes = name, 0, Counter(), Counter()
        self.examples = {}

    def note(self, what):
        """Something kept but worth saying (e.g. a study without CheXpert labels)."""
        self.notes[what] += 1

    def skip(self, reason, example=""):
        self.skipped[reason] += 1
        self.examples.setdefault(reason, example)

    def as_dict(self):
        return {"kept": self.kept, "skipped": dict(self.skipped), "notes": dict(self.notes)}

    def __str__(self):
        parts = [f"{self.name}: {self.kept} kept"]
        for reason, n in sorted(self.skipped.items()):
            example = f" (e.g. {self.examples[reason]})" if self.examples.get(reason) else ""
            parts.append(f"{n} skipped: {reason}{example}")
        parts += [f"{n} {what}" for what, n in sorted(self.notes.items())]
        return "; ".join(parts)


class ImageReportDataset:
    """Entries (image path, report, labels float32 [C]) decoded lazily to Samples.

    An image that passed the header check but fails to decode during training is counted
    in summary.skipped["unreadable image at load time"] and replaced by the next readable
    entry, so an epoch never stops on one bad file.
    """

    def __init__(self, entries, image_size, label_names, summary, name):
        if not entries:
            raise ValueError(f"{name}: no usable image-report pairs ({summary})")
        self.paths = [e[0] for e in entries]
        self.reports = [e[1] for e in entries]
        self.labels = np.stack([e[2] for e in entries]).astype(np.float32)
        self.image_size, self.label_names, self.summary, self.name = image_size, tuple(label_names), summary, name
        self._bad = set()

    def __len__(self):
        return len(self.paths)

    def image(self, i):
        """uint8 [S, S] of entry i (raises UnreadableImage)."""
        return load_image(self.paths[i], self.image_size)

    def __getitem__(self, i):
        if not -len(self) <= i < len(self):
            raise IndexError(f"{self.name}: index {i} out of range for {len(self)} pairs")
        i %= len(self)
        for j in (k % len(self) for k in range(i, i + len(self))):
            if j in self._bad:
                continue
            try:
                return Sample(self.image(j), self.reports[j], self.labels[j])
            except UnreadableImage as err:
                self._bad.add(j)
                self.summary.skip("unreadable image at load time", self.paths[j])
                print(f"warning: {err}; using the next entry", file=sys.stderr)
        raise UnreadableImage(f"{self.name}: no readable image left")

    def __repr__(self):
        return f"{type(self).__name__}({self.name}, {len(self)} pairs, image_size={self.image_size})"
