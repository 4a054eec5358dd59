"""Retrieval and step-cost table of this round from the runs' final.json copies in raw/ and
costs-1thread.json (both beside this file):

    python experiments/variants-2026-12-07/table.py > experiments/variants-2026-12-07/table.md

Rows: mean ± std over the seeds found (their number beside). Retrieval is each run's final
validation on the 1,000 held-out pairs (chance R@1 0.1%); the floor's is `python -m mcr.evaluate
--checkpoint DEFAULT_RUN --random-init SEED` on the same pairs.
"""
import glob
import json
import os
import re

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROWS = (("default", "MCR, the default", "default"),
        ("dual-stream", "dual-stream at equal steps", "dual-stream"),
        ("dual-stream-at-time", "dual-stream at MCR's wall time (1,054 steps)", "dual-stream"),
        ("abm", "AbM", None),
        ("mpma", "mpma, groups of 16 (the default)", "mpma"),
        ("mpma-every-pair", "mpma, every pair (`--local-group-size 0`)", "mpma-every-pair"),
        ("reclf", "reclf, groups of 16 (the default)", "reclf"),
        ("reclf-every-pair", "reclf, every pair (`--local-group-size 0`)", "reclf-every-pair"),
        ("random-init", "randomly initialised, not trained (floor)", None))
COLUMNS = (("i2t", "R@1"), ("i2t", "R@10"), ("i2t", "P@5"), ("t2i", "R@1"), ("t2i", "P@5"))


def main():
    found = {}
    for path in sorted(glob.glob(os.path.join(HERE, "raw", "*-final.json"))):
        name, seed = re.fullmatch(r"(.+)-seed(\d+)-final\.json", os.path.basename(path)).groups()
        with open(path) as f:
            found.setdefault(name, {})[int(seed)] = json.load(f)
    with open(os.path.join(HERE, "costs-1thread.json")) as f:
        costs = json.load(f)
    lines = ["| pretraining (2,000 steps unless named) | seeds | " + " | ".join(f"{d} {m}" for d, m in COLUMNS)
             + " | step vs dual-stream | activation bytes vs dual-stream |",
             "|---|---|" + "---|" * (len(COLUMNS) + 2)]
    for name, title, cost in ROWS:
        runs = found.get(name, {})
        cells = []
        for direction, metric in COLUMNS:
            values = [run[direction][metric] for run in runs.values()]
            cells.append(f"{np.mean(values):.1f} ± {np.std(values):.1f}" if values else "–")
        step = f"{costs[cost]['step_vs_dual']:.2f}" if cost else "–"
        act = f"{costs[cost]['activation_vs_dual']:.2f}" if cost else "–"
        lines.append(f"| {title} | {len(runs)} | " + " | ".join(cells) + f" | {step} | {act} |")
    print("\n".join(lines))
    print(f"\nCosts: `costs-1thread.json` ({costs['measured']}); AbM's were not measured in this round.")
    print("Chance: R@1 0.1%; P@5 7.3, 9.0 and 8.1% for the corpora of seeds 0, 1 and 2.")


if __name__ == "__main__":
    main()
