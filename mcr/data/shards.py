"""Preprocessed shards: memory-mapped numpy arrays + a JSON manifest with checksums.

Layout of a shard folder (one set of files per split):

    manifest.json                 dataset, image_size, label_names, per split: count,
                                  valid count, the reader's skip summary, and per file: size,
                                  sha256, and the CRC-32 of each 1 MiB block
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

Integrity (docs/data.md): opening a split checks every file's size, the CRC-32 blocks of the
small files (valid, text, offsets, labels: read whole anyway), the images file's header block
and `sample_blocks` random blocks of it; every other images block is checked the first time
a sample in it is read (once per run: the checked-block map is shared with DataLoader
workers). CRC-32 catches any flipped byte (every error burst up to 32 bits), so no sample is
returned from a changed block. check="full" re-hashes every file (sha256) on open instead.
"""
import hashlib
import io
import json
import multiprocessing
import os
import sys
import zlib

import numpy as np
import torch
from tqdm import tqdm

from mcr.data.common import Sample, Summary, UnreadableImage

FORMAT, VERSION, READABLE_VERSIONS = "mcr-shards", 2, (1, 2)  # v1: no block checksums
MANIFEST = "manifest.json"
PARTS = ("images", "valid", "text", "text_offsets", "labels")
BLOCK_BYTES = 1 << 20
CHECKS = ("sizes", "blocks", "full")


class ShardError(ValueError):
    """Shard files that differ from their manifest, or a shard folder that cannot take the
    requested preparation; the message names the files and what to run."""


def part_path(out_dir, split, part):
    return os.path.join(out_dir, f"{split}.{part}." + ("bin" if part == "text" else "npy"))


def split_files(out_dir, split):
    """Every file prepare writes for `split` (the only ones --overwrite deletes)."""
    return [part_path(out_dir, split, part) for part in PARTS] + [os.path.join(out_dir, f"{split}.progress.json")]


def digests(path, block_bytes=BLOCK_BYTES):
    """{"sha256": hex of the whole file, "block_bytes": B, "crc32": [CRC-32 of each B-byte block]}."""
    h, crcs = hashlib.sha256(), []
    with open(path, "rb") as f:
        while chunk := f.read(block_bytes):
            h.update(chunk)
            crcs.append(zlib.crc32(chunk))
    return {"sha256": h.hexdigest(), "block_bytes": block_bytes, "crc32": crcs}


def check_blocks(data, info, path, blocks):
    """Raise ShardError unless the given blocks of `data` (bytes or uint8 array of the whole
    file) match the manifest's CRC-32s; info: the file's manifest entry."""
    size = info["block_bytes"]
    for b in blocks:
        if zlib.crc32(data[b * size:(b + 1) * size]) != info["crc32"][b]:
            raise ShardError(f"{path}: bytes {b * size}-{min((b + 1) * size, info['bytes']) - 1} (block {b}) differ "
                             f"from what mcr.prepare wrote (CRC-32 mismatch); run python -m mcr.prepare --verify "
                             f"{os.path.dirname(path) or '.'} and prepare this split again (or copy it again)")


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
    if manifest.get("format") != FORMAT or manifest.get("version") not in READABLE_VERSIONS:
        raise ShardError(f"{path} is not an {FORMAT} manifest of version {READABLE_VERSIONS}")
    return manifest


def check_target(out_dir, splits, source, image_size, overwrite):
    """Raise ShardError when preparing `splits` of `source` at `image_size` into out_dir would
    mix them with shards of another source or size (without --overwrite, or with
    --overwrite naming only some of the splits there)."""
    manifest = read_manifest(out_dir) if os.path.isdir(out_dir) else None
    if manifest is None or (manifest["source"] == source and manifest["image_size"] == image_size):
        return
    held = f"{out_dir} holds shards of {manifest['source']} at {manifest['image_size']} px"
    if not overwrite:
        raise ShardError(f"{held}; use --overwrite or another --out")
    others = sorted(set(manifest["splits"]) - set(splits))
    if others:
        raise ShardError(f"{held}: --overwrite --splits {','.join(splits)} would leave {others} beside "
                         f"{image_size} px shards of {source}; name every split or use another --out")


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


def write_split(dataset, out_dir, split, *, source, chunk=512, workers=None, progress=True, block_bytes=BLOCK_BYTES):
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
            raise ShardError(f"{out_dir}: an unfinished {split!r} split was started with other settings "
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
        files[part] = {"name": os.path.basename(path), "bytes": os.path.getsize(path), **digests(path, block_bytes)}
    os.remove(state_path)
    return {"count": n, "valid": n - len(state["failed"]), "summary": summary, "files": files}


def prepare(open_split, out_dir, splits, *, source, image_size, overwrite=False, **kwargs):
    """Write the shards of every split (open_split(split) -> dataset), resuming unfinished
    ones and skipping finished ones; returns the manifest.

    overwrite: prepare `splits` again. Only the files prepare writes for them are deleted
    (split_files); the other splits stay, with their manifest entries."""
    check_target(out_dir, splits, source, image_size, overwrite)
    os.makedirs(out_dir, exist_ok=True)
    manifest = read_manifest(out_dir)
    if manifest is not None and overwrite:
        for split in splits:
            manifest["splits"].pop(split, None)
        if not manifest["splits"]:
            manifest = None
    if manifest is None:
        manifest = {"format": FORMAT, "version": VERSION, "source": source, "image_size": image_size,
                    "label_names": None, "splits": {}}
    if overwrite:  # the manifest forgets the splits before their files go: a crash leaves no dangling entry
        _write_json(os.path.join(out_dir, MANIFEST), manifest)
        for path in (p for split in splits for p in split_files(out_dir, split)):
            if os.path.isfile(path):
                os.remove(path)
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
    """Raise ShardError naming every shard file whose size (and sha256) differs from the manifest."""
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
            elif checksums and digests(path)["sha256"] != info["sha256"]:
                bad.append(f"{info['name']} (sha256 mismatch)")
    if bad:
        raise ShardError(f"shards in {out_dir} failed verification: {', '.join(bad)}")
    return manifest


# --- reading -------------------------------------------------------------------------

class ShardDataset:
    """One split of a shard folder as Samples (valid rows only, in prepared order).

    check: "blocks" (default; see the module docstring: sizes, small files and sampled image
    blocks on open, every image block before its first sample is returned), "full" (sha256
    of every file on open), or "sizes" (file sizes only). A mismatch raises ShardError.
    """

    def __init__(self, out_dir, split, image_size=None, check="blocks", sample_blocks=8):
        if not out_dir or not os.path.isdir(out_dir):
            raise FileNotFoundError(f"shard directory {out_dir!r} does not exist")
        if check not in CHECKS:
            raise ValueError(f"check must be one of {CHECKS}, got {check!r}")
        manifest = verify(out_dir, [split], checksums=check == "full")
        if split not in manifest["splits"]:
            raise ValueError(f"{out_dir} has no prepared {split!r} split (has {sorted(manifest['splits'])})")
        if image_size is not None and image_size != manifest["image_size"]:
            raise ValueError(f"shards in {out_dir} hold {manifest['image_size']} px images, the model wants "
                             f"{image_size}: run mcr.prepare --image-size {image_size}")
        entry = manifest["splits"][split]
        files = entry["files"]
        blocks = check == "blocks" and all("crc32" in info for info in files.values())
        if check == "blocks" and not blocks:
            print(f"warning: {out_dir} was prepared without block checksums (an older mcr): opening checks "
                  f"sizes only; run python -m mcr.prepare --verify {out_dir}", file=sys.stderr)

        def read(part):  # a whole small file, its blocks checked
            path = part_path(out_dir, split, part)
            with open(path, "rb") as f:
                data = f.read()
            if blocks:
                check_blocks(data, files[part], path, range(len(files[part]["crc32"])))
            return data

        self.name, self.image_size = f"shards {split}", manifest["image_size"]
        self.label_names = tuple(manifest["label_names"])
        self.images_path = part_path(out_dir, split, "images")
        self._images = self._file = self._checked = None  # mapped on first use, in each process
        self.rows = np.flatnonzero(np.load(io.BytesIO(read("valid"))))
        self.offsets = np.load(io.BytesIO(read("text_offsets")))
        self.labels_all = np.load(io.BytesIO(read("labels")))
        self.text = read("text")
        self.summary = Summary(f"shards {split}")
        self.summary.kept = len(self.rows)
        for reason, n in entry["summary"]["skipped"].items():
            self.summary.skipped[reason] = n
        self.crc = files["images"] if blocks else None
        if self.crc is not None:
            n = len(self.crc["crc32"])
            # shared memory: a block checked in one DataLoader worker is not hashed again by the next
            self.checked = torch.zeros(n, dtype=torch.bool).share_memory_()
            sampled = np.random.default_rng().choice(n, min(sample_blocks, n), replace=False)
            for b in sorted({0, *sampled.tolist()}):  # block 0 holds the .npy header
                self._check_block(b)

    @property
    def images(self):
        """uint8 [N, S, S], memory-mapped on first use (in each DataLoader worker)."""
        if self._images is None:
            self._images = np.load(self.images_path, mmap_mode="r")
        return self._images

    @property
    def file(self):
        """The images file as uint8 [bytes], memory-mapped (header included), for the block checks."""
        if self._file is None:
            self._file = np.memmap(self.images_path, np.uint8, "r")
        return self._file

    def _check_block(self, b):
        check_blocks(self.file, self.crc, self.images_path, [b])
        self.checked[b] = True

    def _check_row(self, r):
        if self._checked is None:  # a numpy view of the shared map: cheaper to index than the tensor
            self._checked = self.checked.numpy()
        row_bytes = self.image_size * self.image_size
        first = self.images.offset + int(r) * row_bytes
        for b in range(first // self.crc["block_bytes"], (first + row_bytes - 1) // self.crc["block_bytes"] + 1):
            if not self._checked[b]:
                self._check_block(b)

    def __getstate__(self):  # workers started with spawn re-map the files instead of copying them
        return {**self.__dict__, "_images": None, "_file": None, "_checked": None}

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
        if self.crc is not None:
            self._check_row(r)
        return Sample(np.array(self.images[r]), self.report(i), self.labels_all[r])

    def __repr__(self):
        return f"ShardDataset({self.name}, {len(self)} pairs, image_size={self.image_size})"
