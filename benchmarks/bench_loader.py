"""Loader throughput: samples/s from raw JPEGs (the MIMIC-CXR reader) vs memory-mapped
shards (mcr.prepare), on this machine's CPU.

    python benchmarks/bench_loader.py            # 3000 studies of 224x280 JPEGs + 300 of 1024x1280
    python benchmarks/bench_loader.py --quick    # 300 + 40, seconds

A fake MIMIC-CXR-JPG tree is written to a temporary folder (synthetic radiographs, one
frontal JPEG per study), prepared into 224-px shards, and both are read one shuffled
epoch at a time (batch 64, or a quarter of a small corpus) through a torch DataLoader: records only (decode + resize vs
a memory-mapped slice) and with the training Collate (tokenizer, normalisation). Files are
in the page cache for both (they were just written): this measures CPU cost, not disk.

Shard integrity (mcr.data.shards): the time to open a split with each check ("sizes",
"blocks" = the default: small files, header and 8 sampled image blocks; "full" = sha256 of
every file), and the records-only epoch rate with the default block check in its first
epoch (every image block hashed once as it is first read), in a later epoch (blocks already
checked) and with sizes only. Rates are wall samples/s and, without workers, samples per
CPU-second of this process (robust to other load on a shared machine).
Results: benchmarks/results/bench_loader-<cpu>-<date>.{json,csv}.
"""
import argparse
import os
import pathlib
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from _common import environment, print_table, write_results  # noqa: E402

from mcr.data import shards  # noqa: E402
from mcr.data.batching import Collate  # noqa: E402
from mcr.data.fake import make_mimic_tree  # noqa: E402
from mcr.data.mimic import MimicCXR  # noqa: E402
from mcr.data.shards import ShardDataset  # noqa: E402
from mcr.data.tokenizer import train_wordpiece  # noqa: E402
from mcr.engine import batches_for_epoch  # noqa: E402

IMAGE_SIZE, BATCH = 224, 64


def as_list(records):
    return records


def epoch_rate(dataset, collate, workers, epoch=0):
    """(wall samples/s, samples per CPU-second of this process) of one shuffled epoch (after a
    warm-up batch that starts the workers)."""
    batches = batches_for_epoch(len(dataset), min(BATCH, max(1, len(dataset) // 4)), seed=0, epoch=epoch)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=batches, collate_fn=collate, num_workers=workers,
                                         persistent_workers=False)
    it = iter(loader)
    next(it)
    start, cpu, n = time.perf_counter(), time.process_time(), 0
    for batch in it:
        n += len(batch) if isinstance(batch, list) else batch["image"].shape[0]
    return n / (time.perf_counter() - start), n / max(time.process_time() - cpu, 1e-9)


def open_ms(out, check, repeats=5):
    """Median (wall ms, CPU ms) of opening the train split with `check`."""
    times = []
    for _ in range(repeats):
        start, cpu = time.perf_counter(), time.process_time()
        ShardDataset(out, "train", IMAGE_SIZE, check=check)
        times.append(((time.perf_counter() - start) * 1e3, (time.process_time() - cpu) * 1e3))
    return statistics.median(t[0] for t in times), statistics.median(t[1] for t in times)


def bench_corpus(root, studies, source_size, workers_list, tokenizer):
    rows = []
    t0 = time.perf_counter()
    make_mimic_tree(root, image_size=source_size, studies=[("train", [("PA", "")], "full", True)] * studies)
    jpeg_bytes = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(os.path.join(root, "files"))
                     for f in fs if f.endswith(".jpg"))
    print(f"wrote {studies} studies of {source_size}x{source_size * 5 // 4} JPEGs "
          f"({jpeg_bytes / studies / 1e3:.0f} kB each) in {time.perf_counter() - t0:.0f} s")
    t0 = time.perf_counter()
    raw = MimicCXR(root, "train", IMAGE_SIZE)
    index_s = time.perf_counter() - t0
    out = os.path.join(root, "shards")
    t0 = time.perf_counter()
    shards.prepare(lambda s: raw, out, ["train"], source={"bench": root}, image_size=IMAGE_SIZE, progress=False)
    prepare_s = time.perf_counter() - t0
    tokenizer = tokenizer or train_wordpiece(raw.reports, 2048)
    collate = Collate(tokenizer, 128)
    label = f"{source_size}x{source_size * 5 // 4} jpeg"
    common = {"studies": studies, "source": label, "index_studies_per_s": studies / index_s,
              "prepare_images_per_s": studies / prepare_s,
              "images_file_mb": os.path.getsize(shards.part_path(out, "train", "images")) / 1e6}
    for check in shards.CHECKS:
        common[f"open_ms_{check}"], common[f"open_cpu_ms_{check}"] = open_ms(out, check)
    print(f"  {label:>15} open ms (wall / CPU): " + ", ".join(
        f"{c} {common[f'open_ms_{c}']:.1f} / {common[f'open_cpu_ms_{c}']:.1f}" for c in shards.CHECKS))

    def measure(name, check, dataset, with_collate, workers, epoch=0):
        rate, cpu_rate = epoch_rate(dataset, collate if with_collate else as_list, workers, epoch)
        rows.append({**common, "reader": name, "check": check, "workers": workers, "collate": with_collate,
                     "samples_per_s": rate, "samples_per_cpu_s": cpu_rate if workers == 0 else None})
        print(f"  {label:>15} {name:>8} {check:>20} workers={workers} collate={with_collate!s:>5}: "
              f"{rate:9.0f} samples/s" + (f", {cpu_rate:9.0f} per CPU-s" if workers == 0 else ""))

    for workers in workers_list:
        for with_collate in (False, True):
            measure("raw jpeg", "", raw, with_collate, workers)
            # a fresh dataset: its first epoch hashes every image block once
            measure("shards", "blocks, first epoch", ShardDataset(out, "train", IMAGE_SIZE), with_collate, workers)
        checked = ShardDataset(out, "train", IMAGE_SIZE)
        epoch_rate(checked, as_list, workers)
        measure("shards", "blocks, later epoch", checked, False, workers, epoch=1)
        measure("shards", "sizes", ShardDataset(out, "train", IMAGE_SIZE, check="sizes"), False, workers)
    return rows, tokenizer


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small corpora (a smoke test)")
    parser.add_argument("--studies", type=int, default=3000, help="studies of 224-px-wide JPEGs")
    parser.add_argument("--large-studies", type=int, default=300, help="studies of 1024-px-wide JPEGs")
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args(argv)
    if args.quick:
        args.studies, args.large_studies = 300, 40
    workers_list = sorted({0, min(2, os.cpu_count() or 1), os.cpu_count() or 1})
    rows, tokenizer = [], None
    with tempfile.TemporaryDirectory(prefix="bench_loader_") as tmp:
        for studies, size in ((args.studies, 224), (args.large_studies, 1024)):
            if studies:
                new, tokenizer = bench_corpus(os.path.join(tmp, str(size)), studies, size, workers_list, tokenizer)
                rows += new
    print_table(rows, ["source", "studies", "reader", "check", "workers", "collate", "samples_per_s",
                       "samples_per_cpu_s"])
    if not args.no_write and not args.quick:
        paths = write_results("bench_loader", rows, {"cpu_count": os.cpu_count(), "image_size": IMAGE_SIZE,
                                                     "batch_size": BATCH, "load_average": os.getloadavg()})
        print("wrote", *paths)
    return rows


if __name__ == "__main__":
    print(environment())
    main()
