"""How many patches each synthetic finding touches, and how often random masking hides all
of them (the corpus study of the README's "The corpus" point).

    python experiments/finding-footprints/footprints.py --studies 300 --mask-ratio 0.5

Each present finding of the first `--studies` validation studies is drawn with and without
it; the patches where a pixel changes by more than `--threshold` (of the [0, 1] range) are
its footprint. The patient jitter is held at its midpoint and the noise fields are switched
off (unittest.mock over the generator's private helpers: a study's tool, not library code),
so the difference is the finding's own. Prints, per finding group, the median footprint and
the mean probability that MAE random masking drops every patch of it.
"""
import argparse
from math import comb
from unittest import mock

import numpy as np

from mcr.data import synthetic as syn


def finding_footprints(num_studies=300, *, image_size=96, patch_size=16, threshold=0.04, split="val", seed=0):
    """{finding group: [number of patches its pixels touch, per occurrence]}."""
    flat = mock.patch.object(syn, "_smooth_noise", lambda rng, size, grid: np.full((size, size), 0.5, np.float32))
    quiet = mock.patch.object(syn, "_noise_bank", lambda size: np.zeros((2 * size, 2 * size), np.float32))
    middle = mock.patch.object(syn, "_uniform", lambda rng, lo, hi: (lo + hi) / 2)
    grid = image_size // patch_size
    counts = {}
    with flat, quiet, middle:
        for index in range(syn.SPLIT_OFFSETS[split], syn.SPLIT_OFFSETS[split] + num_studies):
            spec = syn._sample_spec(np.random.default_rng([seed, index]))
            full = syn._render(spec, np.random.default_rng(0), image_size) / 255.0
            for name in spec["findings"]:
                without = {**spec, "findings": {n: s for n, s in spec["findings"].items() if n != name}}
                if name == "support_devices":
                    without.pop("devices", None)
                if syn._PARTS[name][0] == "nodule":
                    without["nodules"] = {k: v for k, v in spec["nodules"].items() if k != syn._PARTS[name][1]}
                diff = np.abs(full - syn._render(without, np.random.default_rng(0), image_size) / 255.0)
                touched = diff.reshape(grid, patch_size, grid, patch_size).max(axis=(1, 3)) > threshold
                counts.setdefault(syn._PARTS[name][0], []).append(int(touched.sum()))
    return counts


def p_all_dropped(m, num_patches, mask_ratio):
    """Probability that MAE random masking (fixed keep count) drops all m given patches."""
    dropped = num_patches - int(num_patches * (1 - mask_ratio))
    return comb(num_patches - m, dropped - m) / comb(num_patches, dropped) if m <= dropped else 0.0


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--studies", type=int, default=300, help="validation studies drawn")
    parser.add_argument("--image-size", type=int, default=96, help="image side in pixels")
    parser.add_argument("--patch-size", type=int, default=16, help="patch side in pixels")
    parser.add_argument("--mask-ratio", type=float, default=0.5, help="share of patches MAE masking drops")
    args = parser.parse_args(argv)
    if args.studies < 1 or args.image_size % args.patch_size or not 0 <= args.mask_ratio < 1:
        parser.error("--studies must be >= 1, --image-size a multiple of --patch-size, --mask-ratio in [0, 1)")
    counts = finding_footprints(args.studies, image_size=args.image_size, patch_size=args.patch_size)
    num_patches = (args.image_size // args.patch_size) ** 2
    hidden_all = []
    for group, sizes in sorted(counts.items()):
        hidden = [p_all_dropped(m, num_patches, args.mask_ratio) for m in sizes]
        hidden_all += hidden
        print(f"{group:<18} {len(sizes):>5} findings, median {np.median(sizes):>4.0f} patches, "
              f"all hidden {100 * np.mean(hidden):5.1f}%")
    print(f"{'every finding':<18} {len(hidden_all):>5} findings, all hidden {100 * np.mean(hidden_all):5.1f}%")
    return counts


if __name__ == "__main__":
    main()
