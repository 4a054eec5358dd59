"""Retrieval and step-cost table of this round: its runs' final.json copies in raw/, beside the
MCR, dual-stream, reclf (reasoning over the words) and floor rows of the previous round
(../variants-2026-12-07/raw), and costs-1thread.json:

    python experiments/reclf-reasoning-2026-12-07/table.py > experiments/reclf-reasoning-2026-12-07/table.md

Rows: mean ± std over the seeds found (their number beside); retrieval is each run's final
validation on the 1,000 held-out pairs (chance R@1 0.1%).
"""
import glob
import json
import os
import re

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
PREVIOUS = os.path.join(HERE, "..", "variants-2026-12-07", "raw")
ROWS = (("default", "MCR, the default", "default"),
        ("dual-stream", "dual-stream at equal steps", "dual-stream"),
        ("reclf", "reclf, reasoning over the words (the default)", "reclf"),
        ("reclf-matchings", "reclf, reasoning over the matchings (`--reasoning-over matchings`)", "reclf-matchings"),
        ("reclf-matchings-unmasked", "reclf over the matchings, contrastive-only (`--unmasked-tuning 1`)",
         "reclf-matchings-unmasked"),
        ("random-init", "randomly initialised, not trained (floor)", None))
COLUMNS = (("i2t", "R@1"), ("i2t", "R@10"), ("i2t", "P@5"), ("t2i", "R@1"), ("t2i", "P@5"))


def main():
    found = {}
    for folder in (PREVIOUS, os.path.join(HERE, "raw")):
        for path in sorted(glob.glob(os.path.join(folder, "*-final.json"))):
            name, seed = re.fullmatch(r"(.+)-seed(\d+)-final\.json", os.path.basename(path)).groups()
            with open(path) as f:
                found.setdefault(name, {})[int(seed)] = json.load(f)
    with open(os.path.join(HERE, "costs-1thread.json")) as f:
        costs = json.load(f)
    lines = ["| pretraining (2,000 steps) | seeds | " + " | ".join(f"{d} {m}" for d, m in COLUMNS)
             + " | step vs dual-stream | activation bytes vs dual-stream |",
             "|---|---|" + "---|" * (len(COLUMNS) + 2)]
    for name, title, cost in ROWS:
        runs = found.get(name, {})
        cells = []
        for direction, metric in COLUMNS:
            values = [run[direction][metric] for run in runs.values()]
            cells.append(f"{np.mean(values):.1f} ± {np.std(values):.1f}" if values else "–")
        step = act = "–"
        if cost:
            row = costs[cost]
            step = f"{row['step_vs_dual']:.2f}"
            act = f"{row.get('unmasked_activation_vs_dual', row['activation_vs_dual']):.2f}"
        lines.append(f"| {title} | {len(runs)} | " + " | ".join(cells) + f" | {step} | {act} |")
    print("\n".join(lines))
    print(f"\nCosts: `costs-1thread.json` ({costs['measured']}); the contrastive-only row's activation "
          "bytes are those of its unmasked step, the only step it takes.")
    print("Chance: R@1 0.1%; P@5 7.3, 9.0 and 8.1% for the corpora of seeds 0, 1 and 2.")


if __name__ == "__main__":
    main()
