"""Convert MIMIC-CXR-JPG or OpenI into memory-mapped shards that training reads without
decoding (see mcr.data.shards for the format and docs/data.md for the loader benchmark).

    python -m mcr.prepare --data mimic-cxr --data-root /data/mimic-cxr-jpg --out /data/mimic-224
    python -m mcr.train --data shards --data-root /data/mimic-224 --preset paper
    python -m mcr.prepare --verify /data/mimic-224

Resumable: rerunning the same command continues an interrupted split from its last chunk
and skips finished ones. Every file's sha256 is recorded in manifest.json and checked
after writing (and by --verify).
"""
import argparse
import os
import sys
import time

from mcr.data import shards
from mcr.data.registry import open_dataset


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m mcr.prepare", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", choices=("mimic-cxr", "openi"), help="source dataset")
    parser.add_argument("--data-root", default="", help="root folder of the source dataset")
    parser.add_argument("--data-options", default="", help='reader options, e.g. "views=PA,AP;images=all"')
    parser.add_argument("--out", default="", help="shard folder to write")
    parser.add_argument("--image-size", type=int, default=224, help="square side of the stored images (px)")
    parser.add_argument("--splits", default="train,val,test", help="comma-separated splits")
    parser.add_argument("--workers", type=int, default=0, help="decoding processes (0 = all cores)")
    parser.add_argument("--chunk", type=int, default=1024, help="rows between resume points")
    parser.add_argument("--overwrite", action="store_true", help="discard existing shards of these splits")
    parser.add_argument("--verify", metavar="DIR", default="", help="only re-check the checksums of DIR")
    args = parser.parse_args(argv)

    if args.verify:
        manifest = shards.verify(args.verify)
        counts = ", ".join(f"{split} {entry['valid']}" for split, entry in manifest["splits"].items())
        print(f"{args.verify}: all files match their checksums ({counts} samples)")
        return manifest
    if not args.data or not args.out:
        parser.error("--data and --out are required (or --verify DIR)")
    if args.image_size < 16:
        parser.error(f"--image-size must be >= 16, got {args.image_size}")
    splits = [s.strip() for s in args.splits.split(",") if s.strip()]
    source = {"data": args.data, "data_root": os.path.abspath(args.data_root), "data_options": args.data_options}
    started = time.time()
    manifest = shards.prepare(
        lambda split: open_dataset(args.data, args.data_root, split, args.image_size, args.data_options,
                                   verbose=False),
        args.out, splits, source=source, image_size=args.image_size,
        overwrite=args.overwrite, workers=args.workers or None, chunk=args.chunk)
    shards.verify(args.out, splits)
    print(f"wrote {args.out} in {time.time() - started:.0f} s, checksums verified:")
    for split in splits:
        entry = manifest["splits"][split]
        print(f"  {split}: {entry['valid']} samples; skipped {entry['summary']['skipped'] or 'none'}")
    return manifest


if __name__ == "__main__":
    sys.exit(0 if main() is not None else 1)
