"""Convert MIMIC-CXR-JPG or OpenI into memory-mapped shards that training reads without
decoding (see mcr.data.shards for the format and docs/data.md for the loader benchmark).

    python -m mcr.prepare --data mimic-cxr --data-root /data/mimic-cxr-jpg --out /data/mimic-224
    python -m mcr.train --data shards --data-root /data/mimic-224 --preset paper
    python -m mcr.prepare --verify /data/mimic-224

Resumable: rerunning the same command continues an interrupted split from its last chunk
and skips finished ones. Every file's sha256 and per-block CRC-32s are recorded in
manifest.json; the sha256s are checked after writing and by --verify. --overwrite deletes
only the files prepare wrote for the named splits and keeps the other splits.
Exit status: 0 done, 1 shards failed verification or could not be written, 2 bad arguments.
"""
import argparse
import os
import re
import sys
import time

from mcr.cli import HelpFormatter, Parser
from mcr.data import shards
from mcr.data.registry import open_dataset, parse_options

DATASETS = ("mimic-cxr", "openi")
SPLITS = ("train", "val", "test")


def split_list(text):
    """'train,val' -> ['train', 'val'] (argparse type of --splits)."""
    splits = [s.strip() for s in text.split(",") if s.strip()]
    bad = [s for s in splits if s not in SPLITS]
    if bad or not splits:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a comma-separated subset of {','.join(SPLITS)}")
    return list(dict.fromkeys(splits))


def at_least(low):
    """argparse type: an int >= low."""
    def parse(text):
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < low:
            raise argparse.ArgumentTypeError(f"{text!r}: expected an integer >= {low}")
        return value
    return parse


TEMPORARY = re.compile(r"^(?P<name>.+\.json)\.tmp(?P<pid>\d+)$")  # shards' atomic JSON writes


def remove_stale_temporaries(out_dir):
    """Delete the <file>.json.tmpPID files that a killed mcr.prepare left in out_dir (a
    process interrupted between writing and renaming one); a live process's stay.
    Returns the names removed."""
    removed = []
    for name in sorted(os.listdir(out_dir)) if os.path.isdir(out_dir) else ():
        match = TEMPORARY.match(name)
        if match and not process_alive(int(match["pid"])):
            os.remove(os.path.join(out_dir, name))
            removed.append(name)
    return removed


def process_alive(pid):
    """Whether process `pid` runs (on this machine)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)  # signal 0: nothing is sent, only looked up
    except (ProcessLookupError, OverflowError):
        return False
    except PermissionError:  # another user's process
        return True
    return True


def open_pending_splits(args, parser):
    """{split: dataset} for the splits this run will write (all named ones with --overwrite,
    else those the manifest has not finished), opened before any file is touched: a source
    that cannot be read (a missing CSV column, a missing file) is a parser error (exit 2)."""
    manifest = None
    if os.path.isdir(args.out) and not args.overwrite:
        try:
            manifest = shards.read_manifest(args.out)
        except (shards.ShardError, ValueError) as err:
            parser.error(f"--out: {err}")
    done = set(manifest["splits"]) if manifest else set()
    try:
        return {split: open_dataset(args.data, args.data_root, split, args.image_size, args.data_options,
                                    verbose=False)
                for split in args.splits if split not in done}
    except (ValueError, FileNotFoundError) as err:
        parser.error(f"--data {args.data} --data-root {args.data_root}: {err}")


def build_parser():
    parser = Parser(prog="python -m mcr.prepare", description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--data", choices=DATASETS, help="source dataset (required unless --verify)")
    parser.add_argument("--data-root", default="", help="root folder of the source dataset")
    parser.add_argument("--data-options", default="", help='reader options, e.g. "views=PA,AP;images=all" '
                                                           "(docs/data.md lists them)")
    parser.add_argument("--out", default="", help="shard folder to write (required unless --verify)")
    parser.add_argument("--image-size", type=at_least(16), default=224, help="square side of the stored images (px)")
    parser.add_argument("--splits", type=split_list, default=",".join(SPLITS),
                        help=f"comma-separated splits to prepare, a subset of {','.join(SPLITS)}")
    parser.add_argument("--workers", type=at_least(0), default=0, help="decoding processes (0 = all cores)")
    parser.add_argument("--chunk", type=at_least(1), default=1024, help="rows between resume points")
    parser.add_argument("--overwrite", action="store_true",
                        help="prepare the named splits again: delete only their shard files; other splits stay")
    parser.add_argument("--verify", metavar="DIR", default="",
                        help="only re-hash every file of the shard folder DIR against its manifest")
    return parser


def main(argv=None):
    """The CLI; returns the exit status (0 done, 1 verification or writing failed; bad
    arguments exit 2 through argparse before any work)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.verify:
        if not os.path.isdir(args.verify):
            parser.error(f"--verify: {args.verify!r} is not a directory")
        try:
            manifest = shards.verify(args.verify)
        except (shards.ShardError, FileNotFoundError) as err:
            print(f"mcr.prepare: {err}", file=sys.stderr)
            return 1
        counts = ", ".join(f"{split} {entry['valid']}" for split, entry in manifest["splits"].items())
        print(f"{args.verify}: all files match their checksums ({counts} samples)")
        return 0

    if not args.data or not args.out:
        parser.error("--data and --out are required (or --verify DIR)")
    if not args.data_root or not os.path.isdir(args.data_root):
        parser.error(f"--data-root: {args.data_root!r} is not a directory (the {args.data} root is needed)")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        parser.error(f"--out: {args.out!r} exists and is not a directory")
    try:
        parse_options(args.data_options, args.data)
    except ValueError as err:
        parser.error(str(err))
    source = {"data": args.data, "data_root": os.path.abspath(args.data_root), "data_options": args.data_options}
    try:
        shards.check_target(args.out, args.splits, source, args.image_size, args.overwrite)
    except shards.ShardError as err:
        parser.error(f"--out: {err}")

    datasets = open_pending_splits(args, parser)
    for name in remove_stale_temporaries(args.out):
        print(f"removed {os.path.join(args.out, name)} (left by an interrupted mcr.prepare)", file=sys.stderr)

    started = time.time()
    try:
        manifest = shards.prepare(
            lambda split: datasets[split], args.out, args.splits, source=source, image_size=args.image_size,
            overwrite=args.overwrite, workers=args.workers or None, chunk=args.chunk)
        shards.verify(args.out, args.splits)
    except shards.ShardError as err:
        print(f"mcr.prepare: {err}", file=sys.stderr)
        return 1
    print(f"wrote {args.out} in {time.time() - started:.0f} s, checksums verified:")
    for split in args.splits:
        entry = manifest["splits"][split]
        print(f"  {split}: {entry['valid']} samples; skipped {entry['summary']['skipped'] or 'none'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
