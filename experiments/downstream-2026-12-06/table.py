"""The table of the downstream study from its raw JSON files (written by run.sh):

    python experiments/downstream-2026-12-06/table.py experiments/downstream-2026-12-06/raw > table.md

One row per pretraining (mean ± std over the seeds found, their number beside), the checks
below it. Files: <name>-seed<s>-zero-shot.json, <name>-seed<s>-linear-probe.json.
"""
import glob
import json
import os
import re
import sys

import numpy as np

ROWS = (("default", "MCR, the default (2,000 steps)"),
        ("dual-stream-at-time", "dual-stream at equal wall time (1,054 steps)"),
        ("dual-stream", "dual-stream at equal steps (2,000)"),
        ("abm", "AbM (2,000 steps)"),
        ("mpma", "mpma, our form, local groups of 16 (2,000 steps)"),
        ("mpma-every-pair", "mpma, every pair as local negatives (`--local-group-size 0`)"),
        ("reclf", "reclf, our form, local groups of 16 (2,000 steps)"),
        ("reclf-every-pair", "reclf, every pair as local negatives (`--local-group-size 0`)"),
        ("reclf-matchings", "reclf, reasoning over the matchings (`--reasoning-over matchings`)"),
        ("reclf-matchings-unmasked", "reclf over the matchings, contrastive-only (`--unmasked-tuning 1`)"),
        ("random-init", "randomly initialised, not trained (floor)"))
FRACTIONS = ("1%", "10%", "100%")


def collect(raw):
    """{name: {seed: {"zero-shot": {...}, "linear-probe": {...}}}} of the files in `raw`."""
    found = {}
    for path in sorted(glob.glob(os.path.join(raw, "*.json"))):
        match = re.fullmatch(r"(.+)-seed(\d+)-(zero-shot|linear-probe)\.json", os.path.basename(path))
        if match:
            name, seed, task = match.groups()
            with open(path) as f:
                found.setdefault(name, {}).setdefault(int(seed), {})[task] = json.load(f)
    return found


def figures(runs):
    """{column: [value per seed]} of one row (seeds with both tasks only)."""
    out = {}
    for seed in sorted(runs):
        both = runs[seed]
        if len(both) < 2:
            continue
        zs, lp = both["zero-shot"], both["linear-probe"]["fractions"]
        values = {"zs_auroc": zs["mean_auroc"], "zs_acc": zs.get("accuracy"), "zs_chance": zs.get("chance_accuracy"),
                  **{f"lp_{f}": lp[f]["mean_auroc"] for f in FRACTIONS},
                  "seconds": both["zero-shot"]["seconds"] + both["linear-probe"]["seconds"]}
        for key, value in values.items():
            out.setdefault(key, []).append(value)
    return out


def cell(values, digits=3):
    if not values:
        return "–"
    return f"{np.mean(values):.{digits}f} ± {np.std(values):.{digits}f}"


def main(raw):
    found = collect(raw)
    rows = {name: figures(found.get(name, {})) for name, _ in ROWS}
    lines = ["| pretraining | seeds | zero-shot AUROC (chance 0.5) | 5-class accuracy % (chance) | "
             "linear probe AUROC 1% | 10% | 100% (chance 0.5) |", "|---|---|---|---|---|---|---|"]
    for name, title in ROWS:
        row = rows[name]
        n = len(row.get("zs_auroc", []))
        chance = f" ({np.mean(row['zs_chance']):.1f})" if row.get("zs_chance") else ""
        lines.append(f"| {title} | {n} | {cell(row.get('zs_auroc'))} | {cell(row.get('zs_acc'), 1)}{chance} | "
                     + " | ".join(cell(row.get(f"lp_{f}")) for f in FRACTIONS) + " |")
    classes = [c for name, _ in ROWS for runs in [found.get(name, {})] for seed in runs
               for c in runs[seed].get("zero-shot", {}).get("auroc", {})]
    classes = list(dict.fromkeys(classes))
    if classes:
        lines += ["", "Zero-shot AUROC by class (chance 0.5), mean over the seeds:", "",
                  "| pretraining | " + " | ".join(classes) + " |", "|---|" + "---|" * len(classes)]
        for name, title in ROWS:
            runs = [found[name][seed]["zero-shot"]["auroc"] for seed in sorted(found.get(name, {}))
                    if "zero-shot" in found[name][seed]]
            if runs:
                lines.append(f"| {title} | " + " | ".join(
                    f"{np.mean([r[c] for r in runs if c in r]):.3f}" if any(c in r for r in runs) else "–"
                    for c in classes) + " |")
    lines += ["", "Checks (means over the seeds above):"]

    def mean(name, key):
        values = rows[name].get(key)
        return float(np.mean(values)) if values else None

    def check(text, value, target, higher=True):
        if value is None or target is None:
            lines.append(f"- {text}: not measured (runs missing)")
            return
        margin = value - target if higher else target - value  # > 0: met with room to spare
        lines.append(f"- {text}: {value:.3f}, target {target:.3f}, {'met' if margin >= 0 else 'NOT met'} "
                     f"(margin {margin:+.3f})")

    floor = mean("random-init", "lp_1%")
    check("default linear probe AUROC at 1% ≥ random-init + 0.15", mean("default", "lp_1%"),
         None if floor is None else floor + 0.15)
    check("default zero-shot mean AUROC ≥ 0.75", mean("default", "zs_auroc"), 0.75)
    check("default zero-shot AUROC ≥ dual-stream at equal wall time", mean("default", "zs_auroc"),
         mean("dual-stream-at-time", "zs_auroc"))
    check("default linear probe AUROC at 1% ≥ dual-stream at equal wall time", mean("default", "lp_1%"),
         mean("dual-stream-at-time", "lp_1%"))
    for variant in ("mpma", "reclf"):
        check(f"{variant} linear probe AUROC at 1% ≥ random-init + 0.15", mean(variant, "lp_1%"),
              None if floor is None else floor + 0.15)
    check("evaluation of one default checkpoint (zero-shot + linear probe, s) ≤ 120", mean("default", "seconds"),
         120.0, higher=False)
    print("\n".join(lines))


if __name__ == "__main__":
    if len(sys.argv) != 2 or not os.path.isdir(sys.argv[1]):
        sys.exit("usage: table.py RAW_FOLDER (the folder of the raw JSON files)")
    main(sys.argv[1])
