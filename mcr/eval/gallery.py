"""Search over an embedded gallery: the reports that match an image, the images that match a
report (mcr.retrieve is its command line).

A gallery is a split of a run's data set or a folder of images (.png, .jpg, .jpeg), each
optionally with its report in a .txt file of the same name. Its embeddings are computed once
and cached in a safetensors file keyed by the checkpoint (its path, and the size and mtime
of its model.safetensors) and the gallery (split and size, or the folder's files with their
sizes and mtimes).

The search reads the cached embeddings from the file in chunks of `chunk_rows` rows and
keeps a running top-k, so its working memory is bounded whatever the gallery size
(search_working_set_bytes: 8 rows E + 24 Q (rows + k) + 12 Q k bytes for Q queries, i.e.
8192 rows at E = 512 and one query: 32.2 MiB); the file is memory-mapped, never loaded whole.
Embedding a gallery holds its N x E embeddings (and labels) in memory once, to write the cache.
"""
import hashlib
import json
import os

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from mcr.data.common import Sample, load_image
from mcr.eval.embedding import embed

CHUNK_ROWS = 8192
EMBED_CHUNK = 1024                    # gallery items embedded per progress-bar update
SPLITS = ("train", "val", "test")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


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
    num_rows. Memory: search_working_set_bytes(chunk_rows, E, Q, k), independent of num_rows."""
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
        scores = np.concatenate([best_scores, queries @ rows.T], axis=1)
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

class FolderGallery:
    """Images of a folder (sorted by name) as Samples, each with the text of a same-named
    .txt file as its report ("" without one); no labels."""

    label_names = ()

    def __init__(self, folder, image_size):
        names = sorted(n for n in os.listdir(folder) if n.lower().endswith(IMAGE_SUFFIXES))
        if not names:
            raise ValueError(f"folder {folder!r} holds no {'/'.join(IMAGE_SUFFIXES)} images")
        self.folder, self.image_size = folder, image_size
        self.paths = [os.path.join(folder, n) for n in names]
        self.reports = []
        for path in self.paths:
            txt = os.path.splitext(path)[0] + ".txt"
            self.reports.append(open(txt, encoding="utf-8").read().strip() if os.path.isfile(txt) else "")

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        return Sample(load_image(self.paths[i], self.image_size), self.reports[i], np.zeros(0, np.float32))

    def name_of(self, i):
        return os.path.basename(self.paths[i])

    def fingerprint(self):
        """The files' names, sizes and mtimes: what the cached embeddings depend on."""
        files = []
        for path in self.paths:
            txt = os.path.splitext(path)[0] + ".txt"
            for p in (path, txt) if os.path.isfile(txt) else (path,):
                st = os.stat(p)
                files.append([os.path.basename(p), st.st_size, st.st_mtime_ns])
        return hashlib.sha256(json.dumps(files).encode()).hexdigest()


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
        "data_options": cfg.data_options, "split": spec, "size": len(dataset)}


def checkpoint_key(checkpoint_path):
    """What identifies a checkpoint's weights: its path and model.safetensors' size and mtime."""
    st = os.stat(os.path.join(checkpoint_path, "model.safetensors"))
    return {"checkpoint": os.path.realpath(checkpoint_path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def run_folder(checkpoint_path):
    """The run folder of a checkpoint folder (RUN/checkpoints/step_N -> RUN)."""
    parent = os.path.dirname(os.path.realpath(checkpoint_path))
    return os.path.dirname(parent) if os.path.basename(parent) == "checkpoints" else checkpoint_path


def cached_embeddings(model, dataset, collate, device, cache_path, key, num_workers=0):
    """The safetensors file of the gallery's embeddings (image, text float32 [N, E], labels
    [N, C]): reused when its stored key equals `key`, else computed with a progress bar and
    written atomically. Returns (path, whether it was computed now)."""
    key_text = json.dumps(key, sort_keys=True)
    if os.path.isfile(cache_path):
        with safe_open(cache_path, framework="numpy") as f:
            if (f.metadata() or {}).get("key") == key_text:
                return cache_path, False
    parts = []
    with tqdm(total=len(dataset), desc="embedding gallery", unit="item") as bar:
        for start in range(0, len(dataset), EMBED_CHUNK):  # mcr.eval.embedding.embed, a chunk at a time
            chunk = torch.utils.data.Subset(dataset, range(start, min(start + EMBED_CHUNK, len(dataset))))
            parts.append(embed(model, chunk, collate, device, num_workers=num_workers))
            bar.update(len(chunk))
    image, text, labels = (torch.cat(column) for column in zip(*parts))
    os.makedirs(os.path.dirname(cache_path), exist_ok=True)
    tmp = f"{cache_path}.tmp{os.getpid()}"
    save_file({"image": image.contiguous(), "text": text.contiguous(), "labels": labels.float().contiguous()},
              tmp, metadata={"key": key_text})
    os.replace(tmp, cache_path)
    return cache_path, True


def embed_query(model, collate, device, image=None, report=None):
    """The embedding float32 [1, E] of one query, an image uint8 [S, S] or a report text,
    through mcr.eval.embedding.embed (the path the gallery took)."""
    size = model.cfg.image_size
    sample = Sample(image if image is not None else np.zeros((size, size), np.uint8), report or "",
                    np.zeros(0, np.float32))
    img, txt, _ = embed(model, [sample], collate, device)
    return img if image is not None else txt
