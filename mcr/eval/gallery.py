"""Search over an embedded gallery: the reports that match an image, the images that match a
report (mcr.retrieve is its command line).

A gallery is a split of a run's data set or a folder of images (.png, .jpg, .jpeg), each
optionally with its report in a .txt file of the same name. A folder's entries that are not
readable images (a folder or a link loop named .png, a text or empty file, a decompression
bomb) are skipped and counted by reason (mcr.data.common.Summary), as the data readers do; an
image that passes the header check but fails to decode is embedded as a row of NaN, which a
search never returns.

Its embeddings are computed once and cached in a safetensors file keyed by content: the
sha256 of the checkpoint's model.safetensors and of the gallery (a folder's images and
reports; a shard split's manifest checksums; a file reader's image files, reports and
labels; the embedded corpus's split, size and seed), so a retrained checkpoint or a gallery
rebuilt at the same path recomputes them. A cache that cannot be read is recomputed with a
warning.

The search reads the cached embeddings from the file in chunks of `chunk_rows` rows and
keeps a running top-k, so its working memory is bounded whatever the gallery size
(search_working_set_bytes: 8 rows E + 24 Q (rows + k) + 12 Q k bytes for Q queries, i.e.
8192 rows at E = 512 and one query: 32.2 MiB); the file is memory-mapped, never loaded whole.
Embedding a gallery holds its N x E embeddings (and labels) in memory once, to write the cache.
"""
import hashlib
import json
import os
import sys

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from mcr.data.common import Sample, Summary, UnreadableImage, check_image, load_image
from mcr.eval.embedding import embed

CHUNK_ROWS = 8192
EMBED_CHUNK = 1024                    # gallery items embedded per progress-bar update
SPLITS = ("train", "val", "test")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
HASH_BLOCK = 1 << 20


# --- search --------------------------------------------------------------------------------

def search_working_set_bytes(chunk_rows, dim, num_queries, k):
    """Upper bound of the arrays a search holds at once: one chunk of the gallery, float32
    [rows, E], twice (search_file's read from the file makes a copy); the chunk's scores
    and the candidates, float32 [Q, k + rows] and their negation; argpartition's int64
    order over them and the index arithmetic; the running top-k."""
    candidates = num_queries * (k + chunk_rows)
    return 8 * chunk_rows * dim + 4 * candidates * 2 + 8 * candidates * 2 + 12 * num_queries * k


def topk_chunked(queries, read_rows, num_rows, k, chunk_rows=CHUNK_ROWS):
    """Top-k inner products of queries float32 [Q, E] against a gallery of num_rows rows
    read chunk by chunk: read_rows(start, stop) -> float32 [stop - start, E].

    Returns (scores float32 [Q, k], indices int64 [Q, k]), best first; k is capped at
    num_rows. A NaN score (a row of NaN: an item that could not be read) counts as -inf.
    Memory: search_working_set_bytes(chunk_rows, E, Q, k), independent of num_rows."""
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    if queries.ndim != 2:
        raise ValueError(f"queries must be [Q, E], got shape {queries.shape}")
    if k < 1 or chunk_rows < 1:
        raise ValueError(f"k and chunk_rows must be >= 1, got k={k}, chunk_rows={chunk_rows}")
    k = min(k, num_rows)
    best_scores = np.empty((queries.shape[0], 0), np.float32)
    best_index = np.empty((queries.shape[0], 0), np.int64)
    for start in range(0, num_rows, chunk_rows):
        rows = np.asarray(read_rows(start, min(start + chunk_rows, num_rows)), dtype=np.float32)
        if rows.ndim != 2 or rows.shape[1] != queries.shape[1]:
            raise ValueError(f"gallery rows must be [*, {queries.shape[1]}], got {rows.shape}")
        with np.errstate(invalid="ignore"):  # a NaN row (an unreadable item) scores -inf: never returned first
            chunk_scores = np.nan_to_num(queries @ rows.T, nan=-np.inf)
        scores = np.concatenate([best_scores, chunk_scores], axis=1)
        top = min(k, scores.shape[1])  # a first chunk may hold fewer than k rows
        keep = np.argpartition(-scores, top - 1, axis=1)[:, :top]
        kept = best_index.shape[1]  # candidates: the kept top-k first, then this chunk's rows
        from_best = np.take_along_axis(best_index, np.clip(keep, 0, kept - 1), 1) if kept else 0
        best_index = np.where(keep < kept, from_best, start + keep - kept)
        best_scores = np.take_along_axis(scores, keep, 1)
    order = np.argsort(-best_scores, axis=1, kind="stable")
    return np.take_along_axis(best_scores, order, 1), np.take_along_axis(best_index, order, 1)


def search_file(path, name, queries, k, chunk_rows=CHUNK_ROWS):
    """topk_chunked over tensor `name` ("image" or "text", [N, E]) of a safetensors file,
    read `chunk_rows` rows at a time from the memory-mapped file."""
    with safe_open(path, framework="numpy") as f:
        rows = f.get_slice(name)
        return topk_chunked(queries, lambda a, b: rows[a:b], rows.get_shape()[0], k, chunk_rows)


# --- galleries -------------------------------------------------------------------------------

def file_sha256(path):
    """Hex sha256 of a file's bytes, read a block at a time."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(HASH_BLOCK), b""):
            h.update(block)
    return h.hexdigest()


def read_report(path):
    """The stripped text of a report file, "" when there is none or it cannot be read."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read().strip()
    except OSError:
        return ""


class FolderGallery:
    """Readable images of a folder (sorted by name) as Samples, each with the text of a
    same-named .txt file as its report ("" without one); no labels. Entries that are not
    readable images are skipped, counted by reason in `summary`."""

    label_names = ()

    def __init__(self, folder, image_size):
        self.folder, self.image_size = folder, image_size
        self.summary = Summary(f"gallery {folder}")
        self.paths = []
        for name in sorted(n for n in os.listdir(folder) if n.lower().endswith(IMAGE_SUFFIXES)):
            path = os.path.join(folder, name)
            if not os.path.isfile(path):  # a folder, a dangling link or a link loop
                self.summary.skip("not a file", name)
                continue
            try:
                check_image(path)
            except UnreadableImage:
                self.summary.skip("not a readable image", name)
                continue
            self.paths.append(path)
        self.summary.kept = len(self.paths)
        if not self.paths:
            raise ValueError(f"folder {folder!r} holds no readable {'/'.join(IMAGE_SUFFIXES)} images ({self.summary})")
        self.reports = [read_report(self.report_path(p)) for p in self.paths]

    @staticmethod
    def report_path(image_path):
        return os.path.splitext(image_path)[0] + ".txt"

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        """Sample i; raises UnreadableImage when its image does not decode."""
        return Sample(load_image(self.paths[i], self.image_size), self.reports[i], np.zeros(0, np.float32))

    def name_of(self, i):
        return os.path.basename(self.paths[i])

    def fingerprint(self):
        """sha256 over the kept images' names and contents and their reports: what the cached
        embeddings depend on."""
        files = []
        for path in self.paths:
            txt = self.report_path(path)
            files.append([os.path.basename(path), file_sha256(path), file_sha256(txt) if os.path.isfile(txt) else None])
        return hashlib.sha256(json.dumps(files).encode()).hexdigest()


def split_fingerprint(dataset, cfg, split):
    """What a split's embeddings depend on besides the checkpoint: the shard manifest's
    checksums of the split; a file reader's image checksums, reports and labels; the
    embedded corpus's generator arguments."""
    if cfg.data == "shards":
        from mcr.data.shards import read_manifest

        files = read_manifest(cfg.data_root)["splits"][split]["files"]
        return {"shards": {part: info["sha256"] for part, info in sorted(files.items())}}
    if cfg.data == "synthetic":
        return {"seed": cfg.seed, "image_size": cfg.model.image_size}
    h = hashlib.sha256()
    for path, report, labels in zip(dataset.paths, dataset.reports, dataset.labels):
        h.update(json.dumps([path, file_sha256(path), report, np.asarray(labels).tolist()]).encode())
    return {"files": h.hexdigest()}


def open_gallery(spec, cfg, size=0):
    """(dataset, cache name, key dict) of --gallery SPLIT_OR_FOLDER for a run's config."""
    from mcr.run import build_dataset

    if os.path.isdir(spec):
        gallery = FolderGallery(spec, cfg.model.image_size)
        real = os.path.realpath(spec)
        name = f"folder-{os.path.basename(real) or 'root'}-{hashlib.sha256(real.encode()).hexdigest()[:8]}"
        return gallery, name, {"folder": real, "files": gallery.fingerprint()}
    if spec not in SPLITS:
        raise ValueError(f"--gallery {spec!r} is neither a split ({', '.join(SPLITS)}) nor a folder")
    size = size or (cfg.train_size if spec == "train" else cfg.val_size)
    dataset = build_dataset(cfg, spec, size)
    return dataset, f"{cfg.data}-{spec}-{len(dataset)}", {
        "data": cfg.data, "data_root": os.path.realpath(cfg.data_root) if cfg.data_root else "",
        "data_options": cfg.data_options, "split": spec, "size": len(dataset),
        "content": split_fingerprint(dataset, cfg, spec)}


def checkpoint_key(checkpoint_path):
    """What identifies a checkpoint's weights: the sha256 of its model.safetensors."""
    return {"model_sha256": file_sha256(os.path.join(checkpoint_path, "model.safetensors"))}


def run_folder(checkpoint_path):
    """The run folder of a checkpoint folder (RUN/checkpoints/step_N -> RUN)."""
    parent = os.path.dirname(os.path.realpath(checkpoint_path))
    return os.path.dirname(parent) if os.path.basename(parent) == "checkpoints" else checkpoint_path


def read_cache(cache_path, key_text, num_rows):
    """The cache's metadata when it holds `num_rows` rows embedded under `key_text`; None
    when it is missing or stale; a warning and None when it cannot be read."""
    if not os.path.exists(cache_path):
        return None
    try:
        with safe_open(cache_path, framework="numpy") as f:
            metadata = f.metadata() or {}
            shapes = [f.get_slice(name).get_shape() for name in ("image", "text", "labels")]
    except (SafetensorError, OSError) as err:
        print(f"warning: gallery cache {cache_path} is unreadable ({err}); recomputing it", file=sys.stderr)
        return None
    if metadata.get("key") != key_text:
        return None
    if any(shape[0] != num_rows for shape in shapes) or shapes[0] != shapes[1]:
        print(f"warning: gallery cache {cache_path} holds {shapes} rows for a gallery of {num_rows}; recomputing it",
              file=sys.stderr)
        return None
    return metadata


def embed_gallery(model, dataset, collate, device, num_workers=0):
    """(image, text float32 [N, E], labels [N, C], unreadable row indices): every item of the
    gallery embedded, a chunk at a time with a progress bar; an item whose image does not
    decode is a row of NaN."""
    parts, unreadable = [], []
    with tqdm(total=len(dataset), desc="embedding gallery", unit="item") as bar:
        for start in range(0, len(dataset), EMBED_CHUNK):
            rows = list(range(start, min(start + EMBED_CHUNK, len(dataset))))
            try:
                parts.append((rows, embed(model, torch.utils.data.Subset(dataset, rows), collate, device,
                                          num_workers=num_workers)))
            except UnreadableImage:  # find the items that fail, embed the others
                readable = []
                for i in rows:
                    try:
                        dataset[i]
                        readable.append(i)
                    except UnreadableImage as err:
                        print(f"warning: {err}; left out of the search", file=sys.stderr)
                        unreadable.append(i)
                if readable:
                    parts.append((readable, embed(model, torch.utils.data.Subset(dataset, readable), collate,
                                                  device, num_workers=num_workers)))
            bar.update(len(rows))
    if not parts:
        raise ValueError(f"no item of the gallery could be read ({len(dataset)} tried)")
    _, (img, txt, lab) = parts[0]
    image = torch.full((len(dataset), img.shape[1]), float("nan"))
    text = torch.full((len(dataset), txt.shape[1]), float("nan"))
    labels = torch.zeros((len(dataset), *lab.shape[1:]))
    for rows, (img, txt, lab) in parts:
        image[rows], text[rows], labels[rows] = img, txt, lab.float()
    return image, text, labels, unreadable


def cached_embeddings(model, dataset, collate, device, cache_path, key, num_workers=0):
    """The safetensors file of the gallery's embeddings (image, text float32 [N, E], labels
    [N, C]; NaN rows: items that could not be read): reused when its stored key equals
    `key`, else computed (embed_gallery) and written atomically. Returns (path, whether it
    was computed now, the unreadable row indices)."""
    key_text = json.dumps(key, sort_keys=True)
    metadata = read_cache(cache_path, key_text, len(dataset))
    if metadata is not None:
        return cache_path, False, json.loads(metadata.get("unreadable", "[]"))
    image, text, labels, unreadable = embed_gallery(model, dataset, collate, device, num_workers)
    os.makedirs(os.path.dirname(cache_path), exist_ok=True)
    tmp = f"{cache_path}.tmp{os.getpid()}"
    save_file({"image": image.contiguous(), "text": text.contiguous(), "labels": labels.contiguous()},
              tmp, metadata={"key": key_text, "unreadable": json.dumps(unreadable)})
    os.replace(tmp, cache_path)
    return cache_path, True, unreadable


def embed_query(model, collate, device, image=None, report=None):
    """The embedding float32 [1, E] of one query, an image uint8 [S, S] or a report text,
    through mcr.eval.embedding.embed (the path the gallery took)."""
    size = model.cfg.image_size
    sample = Sample(image if image is not None else np.zeros((size, size), np.uint8), report or "",
                    np.zeros(0, np.float32))
    img, txt, _ = embed(model, [sample], collate, device)
    return img if image is not None else txt
