"""Search with a trained run: the reports that match an image, the images that match a report.

    python -m mcr.retrieve --checkpoint runs/default --image chest.png
    python -m mcr.retrieve --checkpoint runs/default --report "Small left pleural effusion." --k 10
    python -m mcr.retrieve --checkpoint runs/default --image chest.png --gallery /archive --grid top5.png

The gallery is a split of the run's data set (train, val, test) or a folder of images (.png,
.jpg, .jpeg), each optionally with its report in a .txt file of the same name. Its embeddings
are computed once (with a progress bar) and cached in RUN/retrieval/<gallery>.safetensors,
keyed by the checkpoint (its path, and the size and mtime of its model.safetensors) and the
gallery (split and size, or the folder's files with their sizes and mtimes): a new or
retrained checkpoint, or a changed folder, recomputes them.

The search reads the cached embeddings from the file in chunks of --chunk-rows rows and keeps
a running top-k, so its working memory is bounded whatever the gallery size
(search_working_set_bytes: 8 rows E + 24 Q (rows + k) + 12 Q k bytes for Q queries, i.e.
8192 rows at E = 512 and one query: 32.2 MiB); the file is memory-mapped, never loaded whole.
Embedding a gallery holds its N x E embeddings (and labels) in memory once, to write the cache.
"""
import argparse
import hashlib
import json
import os

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from mcr import engine
from mcr.data.common import Sample, UnreadableImage, load_image

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
        for start in range(0, len(dataset), EMBED_CHUNK):  # mcr.engine.embed, a chunk at a time
            chunk = torch.utils.data.Subset(dataset, range(start, min(start + EMBED_CHUNK, len(dataset))))
            parts.append(engine.embed(model, chunk, collate, device, num_workers=num_workers))
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
    through mcr.engine.embed (the path the gallery took)."""
    size = model.cfg.image_size
    sample = Sample(image if image is not None else np.zeros((size, size), np.uint8), report or "",
                    np.zeros(0, np.float32))
    img, txt, _ = engine.embed(model, [sample], collate, device)
    return img if image is not None else txt


# --- the command -------------------------------------------------------------------------------

def item_name(gallery, split_name, i):
    return gallery.name_of(i) if hasattr(gallery, "name_of") else f"{split_name} #{i}"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m mcr.retrieve", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, metavar="RUN",
                        help="run folder (its latest checkpoint) or one checkpoint folder")
    query = parser.add_mutually_exclusive_group(required=True)
    query.add_argument("--image", metavar="FILE", help="query image (PNG/JPEG): retrieve reports")
    query.add_argument("--report", metavar="TEXT", help="query report text: retrieve images")
    parser.add_argument("--gallery", default="val", metavar="SPLIT_OR_FOLDER",
                        help="what to search: a split of the run's data set (train, val, test) or a folder of "
                             "images with optional same-named .txt reports (default: val)")
    parser.add_argument("--gallery-size", type=int, default=0,
                        help="pairs of a synthetic split (0 = the run's val size; train size for train)")
    parser.add_argument("--k", type=int, default=5, help="number of results (default 5)")
    parser.add_argument("--grid", default="", metavar="OUT.png",
                        help="also draw the query beside its top-k into this PNG (needs matplotlib)")
    parser.add_argument("--chunk-rows", type=int, default=CHUNK_ROWS,
                        help=f"gallery rows scored at a time; bounds the search's memory (default {CHUNK_ROWS})")
    args = parser.parse_args(argv)
    if args.k < 1:
        parser.error(f"--k must be >= 1, got {args.k}")
    if args.chunk_rows < 1:
        parser.error(f"--chunk-rows must be >= 1, got {args.chunk_rows}")
    if args.gallery_size < 0:
        parser.error(f"--gallery-size must be >= 0, got {args.gallery_size}")
    if args.report is not None and not args.report.strip():
        parser.error("--report must be a non-empty text")
    if args.image is not None and not os.path.isfile(args.image):
        parser.error(f"--image {args.image!r} is not a file")
    if args.gallery not in SPLITS and not os.path.isdir(args.gallery):
        parser.error(f"--gallery {args.gallery!r} is neither a split ({', '.join(SPLITS)}) nor a folder")
    if args.grid:
        if not args.grid.lower().endswith(".png"):
            parser.error(f"--grid {args.grid!r} must name a .png file")
        if not os.path.isdir(os.path.dirname(os.path.abspath(args.grid))):
            parser.error(f"--grid {args.grid!r}: its folder does not exist")
        from mcr import plot

        if plot.Figure is None:
            parser.error('--grid needs matplotlib: pip install "mcr[plot]"')
    if not os.path.exists(args.checkpoint):
        parser.error(f"--checkpoint {args.checkpoint!r} does not exist")
    return parser, args


def main(argv=None):
    """Run the search; returns [(score, gallery index)] best first."""
    from mcr import plot
    from mcr.run import collate_for, load_trained

    parser, args = parse_args(argv)
    try:
        model, cfg, tokenizer, device, path = load_trained(args.checkpoint)
    except (FileNotFoundError, ValueError) as err:
        parser.error(f"--checkpoint: {err}")
    image = None
    if args.image is not None:
        try:
            image = load_image(args.image, cfg.model.image_size)
        except UnreadableImage as err:
            parser.error(f"--image: {err}")
    try:
        gallery, name, key = open_gallery(args.gallery, cfg, args.gallery_size)
    except ValueError as err:
        parser.error(f"--gallery: {err}")
    if image is not None and isinstance(gallery, FolderGallery) and not any(gallery.reports):
        parser.error(f"--gallery {args.gallery!r} has no .txt reports to search for an --image query")
    collate = collate_for(cfg, tokenizer)
    cache, computed = cached_embeddings(model, gallery, collate, device,
                                        os.path.join(run_folder(path), "retrieval", f"{name}.safetensors"),
                                        {**key, **checkpoint_key(path)}, cfg.num_workers)
    query = embed_query(model, collate, device, image, args.report)
    scores, index = search_file(cache, "text" if image is not None else "image", query.numpy(), args.k,
                                args.chunk_rows)
    scores, index = scores[0].tolist(), index[0].tolist()
    label_names = getattr(gallery, "label_names", None)
    with safe_open(cache, framework="numpy") as f:
        labels = f.get_slice("labels")
        hit_labels = [labels[i:i + 1][0] for i in index]
    print(f"checkpoint {path}; gallery {args.gallery} ({len(gallery)} items, embeddings "
          f"{'computed and cached' if computed else 'from the cache'} {cache})")
    what = f"image {args.image}" if image is not None else f"report {args.report!r}"
    print(f"{what} -> top {len(index)} {'reports' if image is not None else 'images'} (cosine similarity):")
    records = [gallery[i] for i in index]
    for rank, (score, i, record, lab) in enumerate(zip(scores, index, records, hit_labels), 1):
        labels_shown = plot.label_text(lab, label_names)
        labels_shown = f"[{labels_shown}] " if labels_shown else ""
        shown = record.report if image is not None else item_name(gallery, args.gallery, i)
        print(f"{rank:>3}  {score:7.4f}  {item_name(gallery, args.gallery, i):<14} {labels_shown}{shown}")
    if args.grid:
        hits = [plot.Hit(s, r.report if image is not None else r.image, lab, None)
                for s, r, lab in zip(scores, records, hit_labels)]
        query_row = plot.Query(image if image is not None else args.report, None,
                               os.path.basename(args.image) if image is not None else "report", hits)
        rows = ([query_row], []) if image is not None else ([], [query_row])
        fig = plot.retrieval_figure(*rows, label_names, title=f"gallery {args.gallery}, {len(gallery)} items; "
                                    "score = cosine similarity", size=plot.SINGLE_QUERY_SIZE)
        print(f"wrote {plot.save_png(fig, args.grid)}")
    return list(zip(scores, index))


if __name__ == "__main__":
    main()
