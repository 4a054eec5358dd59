"""Preprocessed shards: memory-mapped numpy arrays + a JSON manifest with checksums.

Layout of a shard folder (one set of files per split):

    manifest.json                 dataset, image_size, label_names, per split: count,
                                  valid count, the reader's skip summary, file sizes + sha256
    <split>.images.npy            uint8 [N, S, S]  (resized, centre-cropped grayscale)
    <split>.valid.npy             bool [N]         (False: the image failed to decode)
    <split>.text.bin              utf-8 report texts, concatenated
    <split>.text_offsets.npy      int64 [N + 1]    (text i = bytes[off[i]:off[i+1]])
    <split>.labels.npy            float32 [N, C]
    <split>.progress.json         only while writing: rows done (resume point)

Why this format (benchmarks/bench_loader.py, docs/data.md): a sample is one contiguous
slice of a memory-mapped file, so reading needs no decoding and no per-sample file open;
random access (shuffled epochs) costs the same as sequential, unlike tar streams. Text is
stored raw so a different tokenizer needs no re-preparation.
"""
import hashlib
import json
import multiprocessing
import os
import sys

import numpy as np
from tqdm import tqdm

from mcr.data.common import Sample, Summary, UnreadableImage

FORMAT, VERSION = "mcr-shards", 1
MANIFEST = "manifest.json"
PARTS = ("images", "valid", "text", "text_offsets", "labels")


def part_path(out_dir, split, part):
    return os.path.join(out_dir, f"{split}.{part}." + ("bin" if part == "text" else "npy"))


def sha256(path, block=1 << 22):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()


def _write_json(path, obj):
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_manifest(out_dir):
    path = os.path.join(out_dir, MANIFEST)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        manifest = json.load(f)
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise ValueError(f"{path} is not an {FORMAT} v{VERSION} manifest")
    return manifest


# --- writing -------------------------------------------------------------------------

_WORKER_DATASET = None


def _init_worker(dataset):
    global _WORKER_DATASET
    _WORKER_DATASET = dataset


def _decode(i):
    try:
        return i, _WORKER_DATASET.image(i), None
    except UnreadableImage as err:
        return i, None, str(err)


def write_split(dataset, out_dir, split, *, source, chunk=512, workers=None, progress=True):
    """Write (or resume writing) one split of `dataset` (an ImageReportDataset: .image(i),
    .reports, .labels, .label_names, .image_size, .summary); returns its manifest entry.

    `source` (a JSON-able dict: dataset name, root, options) must equal the one recorded
    when the split was started, else resuming is refused."""
    n, size = len(dataset), dataset.image_size
    state_path = os.path.join(out_dir, f"{split}.progress.json")
    state = {"source": source, "count": n, "image_size": size, "done": 0, "failed": {}}
    if os.path.isfile(state_path):
        with open(state_path) as f:
            saved = json.load(f)
        if {k: saved.get(k) for k in ("source", "count", "image_size")} != \
                {k: state[k] for k in ("source", "count", "image_size")}:
            raise ValueError(f"{out_dir}: an unfinished {split!r} split was started with other settings "
                             f"({saved.get('source')}, {saved.get('count')} rows, {saved.get('image_size')} px); "
                             f"use --overwrite to start again")
        state = saved
        images = np.load(part_path(out_dir, split, "images"), mmap_mode="r+")
        valid = np.load(part_path(out_dir, split, "valid"), mmap_mode="r+")
    else:
        images = np.lib.format.open_memmap(part_path(out_dir, split, "images"), "w+", np.uint8, (n, size, size))
        valid = np.lib.format.open_memmap(part_path(out_dir, split, "valid"), "w+", np.bool_, (n,))
        encoded = [r.encode("utf-8") for r in dataset.reports]
        offsets = np.zeros(n + 1, dtype=np.int64)
        offsets[1:] = np.cumsum([len(b) for b in encoded])
        with open(part_path(out_dir, split, "text"), "wb") as f:
            f.write(b"".join(encoded))
        np.save(part_path(out_dir, split, "text_offsets"), offsets)
        np.save(part_path(out_dir, split, "labels"), np.asarray(dataset.labels, dtype=np.float32))
        _write_json(state_path, state)

    workers = workers or os.cpu_count() or 1
    pool = multiprocessing.get_context("fork").Pool(workers, _init_worker, (dataset,)) if workers > 1 else None
    if pool is None:
        _init_worker(dataset)
    bar = tqdm(total=n, initial=state["done"], desc=f"prepare {split}", unit="img", disable=not progress,
               dynamic_ncols=True, mininterval=1)
    try:
        while state["done"] < n:
            lo, hi = state["done"], min(n, state["done"] + chunk)
            results = pool.imap(_decode, range(lo, hi), chunksize=16) if pool else map(_decode, range(lo, hi))
            for i, image, error in results:
                valid[i] = image is not None
                if image is not None:
                    images[i] = image
                else:
                    state["failed"][str(i)] = error
                    print(f"warning: {error}; row {i} marked invalid", file=sys.stderr)
            images.flush()
            valid.flush()
            state["done"] = hi
            _write_json(state_path, state)  # the resume point moves only after the rows are on disk
            bar.update(hi - lo)
    finally:
        bar.close()
        if pool is not None:
            pool.close()
            pool.join()
    del images, valid

    summary = dataset.summary.as_dict()
    if state["failed"]:
        summary["skipped"]["unreadable image at prepare time"] = len(state["failed"])
    files = {}
    for part in PARTS:
        path = part_path(out_dir, split, part)
        files[part] = {"name": os.path.basename(path), "bytes": os.path.getsize(path), "sha256": sha256(path)}
    os.remove(state_path)
    return {"count": n, "valid": n - len(state["failed"]), "summary": summary, "files": files}


def prepare(open_split, out_dir, splits, *, source, image_size, overwrite=False, **kwargs):
    """Write the shards of every split (open_split(split) -> dataset), resuming unfinished
    ones and skipping finished ones; returns the manifest."""
    os.makedirs(out_dir, exist_ok=True)
    manifest = None if overwrite else read_manifest(out_dir)
    if overwrite:
        for name in os.listdir(out_dir):
            if name == MANIFEST or name.split(".")[0] in splits:
                os.remove(os.path.join(out_dir, name))
    if manifest is not None and (manifest["source"] != source or manifest["image_size"] != image_size):
        raise ValueError(f"{out_dir} holds shards of {manifest['source']} at {manifest['image_size']} px; "
                         f"use --overwrite or another --out")
    manifest = manifest or {"format": FORMAT, "version": VERSION, "source": source, "image_size": image_size,
                            "label_names": None, "splits": {}}
    for split in splits:
        if split in manifest["splits"]:
            print(f"{split}: already prepared ({manifest['splits'][split]['valid']} samples), skipping")
            continue
        dataset = open_split(split)
        print(dataset.summary)
        if dataset.image_size != image_size:
            raise ValueError(f"{split}: the dataset yields {dataset.image_size} px images, expected {image_size}")
        manifest["label_names"] = list(dataset.label_names)
        manifest["splits"][split] = write_split(dataset, out_dir, split, source=source, **kwargs)
        _write_json(os.path.join(out_dir, MANIFEST), manifest)
    return manifest


def verify(out_dir, splits=None, checksums=True):
    """Raise ValueError naming every shard file whose size (and sha256) differs from the manifest."""
    manifest = read_manifest(out_dir)
    if manifest is None:
        raise FileNotFoundError(f"{out_dir!r} has no {MANIFEST}: not a prepared shard folder (run mcr.prepare)")
    bad = []
    for split, entry in manifest["splits"].items():
        if splits and split not in splits:
            continue
        for info in entry["files"].values():
            path = os.path.join(out_dir, info["name"])
            if not os.path.isfile(path):
                bad.append(f"{info['name']} (missing)")
            elif os.path.getsize(path) != info["bytes"]:
                bad.append(f"{info['name']} (size {os.path.getsize(path)} != {info['bytes']})")
            elif checksums and sha256(path) != info["sha256"]:
                bad.append(f"{info['name']} (sha256 mismatch)")
    if bad:
        raise ValueError(f"shards in {out_dir} failed verification: {', '.join(bad)}")
    return manifest


# --- reading -------------------------------------------------------------------------

class ShardDataset:
    """One split of a shard folder as Samples (valid rows only, in prepared order).

    Opening checks file sizes against the manifest; checksums=True also re-hashes them.
    """

    def __init__(self, out_dir, split, image_size=None, checksums=False):
        if not out_dir or not os.path.isdir(out_dir):
            raise FileNotFoundError(f"shard directory {out_dir!r} does not exist")
        manifest = verify(out_dir, [split], checksums)
        if split not in manifest["splits"]:
            raise ValueError(f"{out_dir} has no prepared {split!r} split (has {sorted(manifest['splits'])})")
        if image_size is not None and image_size != manifest["image_size"]:
            raise ValueError(f"shards in {out_dir} hold {manifest['image_size']} px images, the model wants "
                             f"{image_size}: run mcr.prepare --image-size {image_size}")
        entry = manifest["splits"][split]
        self.name, self.image_size = f"shards {split}", manifest["image_size"]
        self.label_names = tuple(manifest["label_names"])
        self.images_path, self._images = part_path(out_dir, split, "images"), None
        self.rows = np.flatnonzero(np.load(part_path(out_dir, split, "valid")))
        self.offsets = np.load(part_path(out_dir, split, "text_offsets"))
        self.labels_all = np.load(part_path(out_dir, split, "labels"))
        with open(part_path(out_dir, split, "text"), "rb") as f:
            self.text = f.read()
        self.summary = Summary(f"shards {split}")
        self.summary.kept = len(self.rows)
        for reason, n in entry["summary"]["skipped"].items():
            self.summary.skipped[reason] = n

    @property
    def images(self):
        """uint8 [N, S, S], memory-mapped on first use (in each DataLoader worker)."""
        if self._images is None:
            self._images = np.load(self.images_path, mmap_mode="r")
        return self._images

    def __getstate__(self):  # workers started with spawn re-map the file instead of copying it
        return {**self.__dict__, "_images": None}

    def __len__(self):
        return len(self.rows)

    def report(self, i):
        r = self.rows[i]
        return self.text[self.offsets[r]:self.offsets[r + 1]].decode("utf-8")

    @property
    def reports(self):
        return [self.report(i) for i in range(len(self))]

    @property
    def labels(self):
        return self.labels_all[self.rows]

    def __getitem__(self, i):
        r = self.rows[i]
        return Sample(np.array(self.images[r]), self.report(i), self.labels_all[r])

    def __repr__(self):
        return f"ShardDataset({self.name}, {len(self)} pairs, image_size={self.image_size})"
