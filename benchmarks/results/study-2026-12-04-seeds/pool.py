"""Pool the default-budget studies' seeds (0-2 of study-2026-12-03, 3-5 of this folder) into one
table, and the equal-steps ratio MCR / dual-stream per seed (each seed draws its own corpus, so
the two rows of one seed share data and held-out pairs).

    python benchmarks/results/study-2026-12-04-seeds/pool.py   # writes pooled.md and pooled.json
"""
import json
import random
import statistics
from pathlib import Path

from mcr.study import markdown_table, summarize, write_json, write_text

HERE = Path(__file__).parent
SOURCES = (HERE.parent / "study-2026-12-03" / "study.json", HERE / "study.json")
ROWS = ("default", "dual-stream")


def pooled_runs():
    runs = {row: {} for row in ROWS}
    for source in SOURCES:
        study_runs = json.loads(source.read_text())["runs"]
        for row in ROWS:
            runs[row].update(study_runs[row])
    return runs


def ratio_of_means(runs, key, seeds):
    return (statistics.mean(runs["default"][s][key] for s in seeds)
            / statistics.mean(runs["dual-stream"][s][key] for s in seeds))


def bootstrap_interval(runs, key, seeds, draws=10_000, level=0.9):
    """Seeds resampled with replacement (pairs kept together): the ratio of means' interval."""
    rng = random.Random(0)
    ratios = sorted(ratio_of_means(runs, key, rng.choices(seeds, k=len(seeds))) for _ in range(draws))
    tail = int(draws * (1 - level) / 2)
    return ratios[tail], ratios[-tail - 1]


def main():
    runs = pooled_runs()
    costs = json.loads((HERE / "costs.json").read_text())
    seeds = sorted(runs["default"])
    lines = [markdown_table(summarize(runs, costs, ROWS)), "",
             "| figure | " + " | ".join(f"seed {s}" for s in seeds) + " | ratio of means | 90% bootstrap |",
             "|---|" + "---|" * (len(seeds) + 2)]
    ratios = {}
    for key in ("i2t_R@1", "t2i_R@1", "i2t_P@5", "fg_i2t_R@1", "fg_i2t_pairwise"):
        per_seed = [runs["default"][s][key] / runs["dual-stream"][s][key] for s in seeds]
        low, high = bootstrap_interval(runs, key, seeds)
        ratios[key] = {"per_seed": per_seed, "ratio_of_means": ratio_of_means(runs, key, seeds),
                       "bootstrap_90": [low, high]}
        lines.append(f"| {key} | " + " | ".join(f"{r:.2f}" for r in per_seed)
                     + f" | {ratios[key]['ratio_of_means']:.2f} | {low:.2f}–{high:.2f} |")
    write_text(HERE / "pooled.md", "\n".join(lines) + "\n")
    write_json(HERE / "pooled.json", {"runs": runs, "ratios": ratios})
    print("\n".join(lines))


if __name__ == "__main__":
    main()
