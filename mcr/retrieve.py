"""Search with a trained run: the reports that match an image, the images that match a report.

    python -m mcr.retrieve --checkpoint runs/default --image chest.png
    python -m mcr.retrieve --checkpoint runs/default --report "Small left pleural effusion." --k 10
    python -m mcr.retrieve --checkpoint runs/default --image chest.png --gallery /archive --grid top5.png

The gallery is a split of the run's data set (train, val, test) or a folder of images (.png,
.jpg, .jpeg), each optionally with its report in a .txt file of the same name; a folder's
entries that are not readable images are skipped and counted by reason. Its embeddings are
computed once (with a progress bar) and cached in RUN/retrieval/<gallery>.safetensors, keyed
by the checksums of the checkpoint's weights and of the gallery's content: a retrained
checkpoint or a changed gallery recomputes them, and so does a cache that cannot be read
(with a warning). The search reads the cache --chunk-rows rows at a time, so its memory is
bounded whatever the gallery size (mcr.eval.gallery).
"""
import argparse
import os

from safetensors import safe_open

from mcr.data.common import UnreadableImage, load_image
from mcr.eval.gallery import (
    CHUNK_ROWS,
    SPLITS,
    FolderGallery,
    cached_embeddings,
    checkpoint_key,
    embed_query,
    open_gallery,
    run_folder,
    search_file,
)


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
        from mcr.eval import pictures

        if pictures.Figure is None:
            parser.error('--grid needs matplotlib: pip install "mcr[plot]"')
    if not os.path.exists(args.checkpoint):
        parser.error(f"--checkpoint {args.checkpoint!r} does not exist")
    return parser, args


def main(argv=None):
    """Run the search; returns [(score, gallery index)] best first."""
    from mcr.eval import pictures
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
    try:
        cache, computed, unreadable = cached_embeddings(
            model, gallery, collate, device, os.path.join(run_folder(path), "retrieval", f"{name}.safetensors"),
            {**key, **checkpoint_key(path)}, cfg.num_workers)
    except ValueError as err:
        parser.error(f"--gallery: {err}")
    if isinstance(gallery, FolderGallery):  # a split's reader printed its own summary
        for i in unreadable:
            gallery.summary.skip("unreadable image at load time", gallery.name_of(i))
        gallery.summary.kept = len(gallery) - len(unreadable)
        print(gallery.summary)
    query = embed_query(model, collate, device, image, args.report)
    scores, index = search_file(cache, "text" if image is not None else "image", query.numpy(), args.k,
                                args.chunk_rows)
    found = [(s, i) for s, i in zip(scores[0].tolist(), index[0].tolist()) if s != float("-inf")]
    scores, index = [s for s, _ in found], [i for _, i in found]
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
        labels_shown = pictures.label_text(lab, label_names)
        labels_shown = f"[{labels_shown}] " if labels_shown else ""
        shown = record.report if image is not None else item_name(gallery, args.gallery, i)
        print(f"{rank:>3}  {score:7.4f}  {item_name(gallery, args.gallery, i):<14} {labels_shown}{shown}")
    if args.grid:
        hits = [pictures.Hit(s, r.report if image is not None else r.image, lab, None)
                for s, r, lab in zip(scores, records, hit_labels)]
        query_row = pictures.Query(image if image is not None else args.report, None,
                                   os.path.basename(args.image) if image is not None else "report", hits)
        rows = ([query_row], []) if image is not None else ([], [query_row])
        fig = pictures.retrieval_figure(*rows, label_names, title=f"gallery {args.gallery}, {len(gallery)} items; "
                                        "score = cosine similarity", size=pictures.SINGLE_QUERY_SIZE)
        print(f"wrote {pictures.save_png(fig, args.grid)}")
    return list(zip(scores, index))


if __name__ == "__main__":
    main()
