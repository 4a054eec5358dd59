"""Pool the runs of several studies (experiments/study.py outputs, e.g. seeds 0-2 of one study, 3-5
of another) into one table, and for each --pair ROW:REFERENCE the ratio ROW / REFERENCE seed by seed (each seed
draws its own corpus, so two rows of one seed share data and held-out pairs), the ratio of the
means and its 90% bootstrap interval (study.paired_ratio).

    python experiments/pool_studies.py --out DIR --costs A/costs.json --pair default:dual-stream \
        A/study.json B/study.json          # writes DIR/pooled.md and DIR/pooled.json
"""
import argparse
import json
from pathlib import Path

from study import RATIO_KEYS, markdown_table, paired_ratio, summarize, write_json, write_text


def pooled_runs(sources, rows):
    """{row: {seed: figures}} over the sources; a later source's seed replaces an earlier one's."""
    runs = {row: {} for row in rows}
    for source in sources:
        study_runs = json.loads(Path(source).read_text())["runs"]
        for row in rows:
            runs[row].update(study_runs.get(row, {}))
    return runs


def seed_table(runs, row, reference):
    """Markdown lines: per figure, row / reference seed by seed, ratio of means, interval."""
    seeds = sorted(set(runs[row]) & set(runs[reference]))
    lines = ["| figure | " + " | ".join(f"seed {s}" for s in seeds) + " | ratio of means | 90% bootstrap |",
             "|---|" + "---|" * (len(seeds) + 2)]
    ratios = {}
    for key in RATIO_KEYS:
        r = paired_ratio(runs, row, reference, key)
        ratios[key] = {"per_seed": r["per_seed"], "ratio_of_means": r["ratio_of_means"],
                       "bootstrap_90": r["bootstrap"]}
        low, high = r["bootstrap"]
        lines.append(f"| {key} | " + " | ".join(f"{x:.2f}" for x in r["per_seed"])
                     + f" | {r['ratio_of_means']:.2f} | {low:.2f}–{high:.2f} |")
    return lines, ratios


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("sources", nargs="+", help="study.json files, pooled in this order")
    parser.add_argument("--out", required=True, help="folder for pooled.md and pooled.json")
    parser.add_argument("--costs", required=True, help="costs.json whose step time and activation the table shows")
    parser.add_argument("--pair", action="append", required=True, metavar="ROW:REFERENCE",
                        help="a row and the row it is divided by; repeatable")
    args = parser.parse_args(argv)
    pairs = [tuple(p.split(":", 1)) for p in args.pair]
    if any(len(p) != 2 or not all(p) for p in pairs):
        parser.error(f"--pair expects ROW:REFERENCE, got {args.pair}")
    rows = list(dict.fromkeys(name for pair in pairs for name in pair))
    runs = pooled_runs(args.sources, rows)
    costs = json.loads(Path(args.costs).read_text())
    lines = [markdown_table(summarize(runs, costs, rows))]
    ratios = {}
    for row, reference in pairs:
        table, ratios[f"{row}:{reference}"] = seed_table(runs, row, reference)
        lines += [""] + ([] if len(pairs) == 1 else [f"{row} / {reference}:", ""]) + table
    Path(args.out).mkdir(parents=True, exist_ok=True)
    write_text(Path(args.out) / "pooled.md", "\n".join(lines) + "\n")
    write_json(Path(args.out) / "pooled.json", {"runs": runs, "ratios": ratios})
    print("\n".join(lines))


if __name__ == "__main__":
    main()
