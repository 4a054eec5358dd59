"""Study runner: train configurations x seeds on the same data, tokenizer and recipe,
evaluate each, and tabulate mean +- std over seeds.

    python experiments/study.py --out runs/study --seeds 0 1 2 --steps 1500 \
        --row mcr= --row "dual-stream=--variant dual-stream" \
        --row "dual-stream@time=--variant dual-stream" --row "flip10=--unmasked-tuning 0.1"

A row is NAME=FLAGS: `python -m mcr.train` flags added to the common ones (--common). A row
named NAME@time trains for the steps that take the time reference row (--time-reference,
default the first row) its --steps: the step times come from one interleaved measurement of
every row in this process (robust to a busy machine, unlike wall clocks of separate runs); a
row added to a study later is timed beside the time reference and scaled to its stored time,
so the costs already stored, and the @time rows' steps, stay as they were.
Every run lives in OUT/NAME/seedK and is trained by a `python -m mcr.train` subprocess, so a
killed study resumes where it stopped: finished runs are kept, interrupted ones continue
from their last checkpoint (--resume). After training, each run is also scored on the
fine-grained protocol (mcr.eval.finegrained). OUT/study.json holds every run's figures and
OUT/study.md the table: retrieval both ways (R@1/5/10, P@5 with chance), fine-grained R@1
and pairwise accuracy, steps, step time and activation bytes per sample (masked steps;
unmasked-tuning steps are counted as their share of the steps) with ratios to dual-stream,
and each row's ratio of means to the --ratio-to row (default dual-stream) over the seeds both
ran, with a 90% bootstrap interval over those seed pairs.
"""
import argparse
import dataclasses
import json
import os
import random
import shlex
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import torch

COLUMNS = (  # (key in a run's flat figures, header)
    ("i2t_R@1", "i2t R@1"), ("i2t_R@5", "i2t R@5"), ("i2t_R@10", "i2t R@10"), ("i2t_P@5", "i2t P@5"),
    ("t2i_R@1", "t2i R@1"), ("t2i_R@5", "t2i R@5"), ("t2i_R@10", "t2i R@10"), ("t2i_P@5", "t2i P@5"),
    ("fg_i2t_R@1", "FG i2t R@1"), ("fg_i2t_pairwise", "FG i2t pair"),
    ("fg_t2i_R@1", "FG t2i R@1"), ("fg_t2i_pairwise", "FG t2i pair"),
)
RATIO_KEYS = ("i2t_R@1", "t2i_R@1", "i2t_P@5", "fg_i2t_R@1", "fg_i2t_pairwise")


def parse_rows(specs):
    """['NAME=FLAGS', ...] -> {name: [flags]} in order; names must be unique folder names."""
    rows = {}
    for spec in specs:
        name, sep, flags = spec.partition("=")
        name = name.strip()
        if not sep or not name or "/" in name or name.startswith("."):
            raise ValueError(f"--row must be NAME=FLAGS with a folder-safe NAME, got {spec!r}")
        if name in rows:
            raise ValueError(f"--row name {name!r} given twice")
        rows[name] = shlex.split(flags)
    return rows


def train_config(flags):
    from mcr.cli import parse_train_args

    return parse_train_args(flags)


def row_model(cfg, vocab_size):
    """The row's model (its variant's class, as mcr.run builds it), seeded."""
    from types import SimpleNamespace

    from mcr.run import build_model

    cfg.model = dataclasses.replace(cfg.model, vocab_size=vocab_size)
    torch.manual_seed(0)
    return build_model(cfg.model, SimpleNamespace(pad_token_id=0, mask_token_id=4))


def step_costs(rows, common, vocab_size, batch_size, repeats=12):
    """{name: {"step_s", "activation_bytes_per_sample"}}: the seconds of one training step
    (forward, backward, AdamW) of each row's model on a random batch, rows interleaved so
    that a busy machine slows all alike; masked and unmasked steps weighted by the row's
    unmasked share (config.unmasked_share). Activation bytes: autograd's saved tensors of a
    masked step."""
    from mcr.config import unmasked_share
    from mcr.engine import build_optimizer
    from mcr.profiling import random_batch, saved_activation_bytes, seeded_masks

    models, times = {}, {}
    for name, flags in rows.items():
        cfg = train_config(common + flags)
        model = row_model(cfg, vocab_size)
        batch = random_batch(cfg.model, batch_size)
        optimizer = build_optimizer(model, cfg)  # training's own AdamW (fused)
        models[name] = (cfg, model, batch, optimizer)
        times[name] = {False: [], True: []}

    def one_step(model, batch, optimizer, unmasked):
        start = time.perf_counter()
        losses = model(batch, None if unmasked else seeded_masks(model, batch), unmasked=unmasked)
        optimizer.zero_grad(set_to_none=True)
        sum(losses.values()).backward()
        optimizer.step()
        return time.perf_counter() - start

    for repeat in range(repeats + 2):  # two warm-up rounds
        for name, (cfg, model, batch, optimizer) in models.items():
            for unmasked in (False, True) if unmasked_share(cfg) > 0 else (False,):
                seconds = one_step(model, batch, optimizer, unmasked)
                if repeat >= 2:
                    times[name][unmasked].append(seconds)
    # each round's steps run back to back under the same load: a row's time is the median of
    # its per-round ratio to the first row, times the first row's median time
    def mean_step(name, r):
        share = unmasked_share(models[name][0])
        return (1 - share) * times[name][False][r] + (share * times[name][True][r] if share > 0 else 0.0)

    first = next(iter(models))
    base = statistics.median(mean_step(first, r) for r in range(repeats))
    out = {}
    for name, (_cfg, model, batch, _) in models.items():
        ratio = statistics.median(mean_step(name, r) / mean_step(first, r) for r in range(repeats))
        act = saved_activation_bytes(model, batch) / batch_size
        out[name] = {"step_s": base * ratio, "activation_bytes_per_sample": act}
    return out


class Study:
    def __init__(self, args):
        self.args = args
        self.rows = parse_rows(args.row)
        self.common = shlex.split(args.common)
        self.out = args.out
        os.makedirs(self.out, exist_ok=True)

    def run_dir(self, name, seed):
        return os.path.join(self.out, name, f"seed{seed}")

    def steps_of(self, name, costs):
        if not name.endswith("@time"):
            return self.args.steps
        ref = self.args.time_reference or next(iter(self.rows))
        return max(1, round(self.args.steps * costs[ref]["step_s"] / costs[name]["step_s"]))

    def train_one(self, name, seed, steps, threads):
        """Train (or resume, or skip) one run in a subprocess; returns its folder."""
        run_dir = self.run_dir(name, seed)
        if os.path.isfile(os.path.join(run_dir, "final.json")):
            return run_dir
        os.makedirs(run_dir, exist_ok=True)
        flags = ["--out-dir", run_dir, "--seed", str(seed), "--max-steps", str(steps), "--max-minutes", "0",
                 *self.common, *self.rows[name]]
        if os.listdir(run_dir):  # an earlier attempt: continue it (from scratch when it saved no checkpoint)
            flags.append("--resume")
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
        with open(os.path.join(run_dir, "train.log"), "a") as log:
            log.write(f"\n$ python -m mcr.train {shlex.join(flags)}\n")
            log.flush()
            done = subprocess.run([sys.executable, "-m", "mcr.train", *flags], stdout=log, stderr=subprocess.STDOUT,
                                  env=env)
        if done.returncode != 0:
            raise RuntimeError(f"run {run_dir} failed (exit {done.returncode}); see {run_dir}/train.log")
        return run_dir

    def finegrained(self, run_dir):
        """The fine-grained figures of a finished run, computed once and kept beside it."""
        path = os.path.join(run_dir, "finegrained.json")
        if os.path.isfile(path):
            with open(path) as f:
                return json.load(f)
        from mcr.data.batching import Collate
        from mcr.eval.finegrained import evaluate_finegrained
        from mcr.run import load_trained

        model, cfg, tokenizer, device, _ = load_trained(run_dir)
        collate = Collate(tokenizer, cfg.model.max_text_len, cfg.model.in_chans)
        results = evaluate_finegrained(model, collate, device, num_studies=self.args.finegrained_studies,
                                       seed=cfg.seed if cfg.data == "synthetic" else 0,
                                       image_size=cfg.model.image_size)
        write_json(path, results)
        return results

    def figures(self, run_dir):
        """One run's flat figures: final validation, fine-grained, steps and minutes."""
        with open(os.path.join(run_dir, "final.json")) as f:
            final = json.load(f)
        flat = {"step": final["step"], "minutes": final["minutes"]}
        for direction in ("i2t", "t2i"):
            flat.update({f"{direction}_{k}": v for k, v in final[direction].items()})
        fine = self.finegrained(run_dir)
        for direction in ("i2t", "t2i"):
            flat.update({f"fg_{direction}_{k}": v for k, v in fine[direction].items()})
        return flat

    def measure_costs(self, names, stored):
        """Step costs of the rows `names` from one interleaved measurement. When the time
        reference row was measured before, it is timed again beside them and their times are
        scaled to its stored one, so that stored costs, and the steps of the @time rows trained
        from them, never change when a row is added."""
        ref = self.args.time_reference or next(iter(self.rows))
        rows = {name: self.rows[name] for name in ([ref] if ref in stored else []) + names}
        costs = step_costs(rows, self.common, vocab_size(self.common), self.args.cost_batch)
        if ref in stored:
            scale = stored[ref]["step_s"] / costs.pop(ref)["step_s"]
            for cost in costs.values():
                cost["step_s"] *= scale
        return costs

    def run(self):
        args = self.args
        costs_path = os.path.join(self.out, "costs.json")
        if os.path.isfile(costs_path):
            with open(costs_path) as f:
                costs = json.load(f)
        else:
            costs = {}
        missing = [name for name in self.rows if name not in costs]
        if not args.report_only and missing:
            costs.update(self.measure_costs(missing, costs))
            write_json(costs_path, costs)
        pairs = ([(name, seed) for name in self.rows for seed in args.seeds] if args.order == "rows"
                 else [(name, seed) for seed in args.seeds for name in self.rows])
        jobs = [(name, seed, self.steps_of(name, costs)) for name, seed in pairs]
        threads = args.threads or max(1, (os.cpu_count() or 1) // args.jobs)
        if not args.report_only:
            with ThreadPoolExecutor(args.jobs) as pool:
                for future in [pool.submit(self.train_one, n, s, k, threads) for n, s, k in jobs]:
                    future.result()
        runs = {}
        for name, seed, _ in jobs:
            run_dir = self.run_dir(name, seed)
            if os.path.isfile(os.path.join(run_dir, "final.json")):
                runs.setdefault(name, {})[seed] = self.figures(run_dir)
        summary = summarize(runs, costs, self.rows)
        write_json(os.path.join(self.out, "study.json"), {"rows": {n: shlex.join(f) for n, f in self.rows.items()},
                                                           "common": args.common, "costs": costs,
                                                           "runs": runs, "summary": summary})
        table = markdown_table(summary)
        ratios = ratio_table(runs, self.rows, args.ratio_to)
        if ratios:
            table += "\n\n" + ratios
        write_text(os.path.join(self.out, "study.md"), table + "\n")
        print(table)
        return summary


def vocab_size(common):
    """The vocabulary size the runs will have (the tokenizer they load or train)."""
    from mcr.run import configured_tokenizer

    cfg = train_config(common)
    tokenizer = configured_tokenizer(cfg)
    return len(tokenizer) if tokenizer is not None else cfg.model.vocab_size


def summarize(runs, costs, rows):
    """{row: {key: (mean, std, n)}} over seeds, plus cost columns and ratios to dual-stream."""
    base = costs.get("dual-stream")
    summary = {}
    for name in rows:
        seeds = runs.get(name, {})
        row = {"seeds": len(seeds)}
        if seeds:
            for key in {k for figures in seeds.values() for k in figures}:
                values = [figures[key] for figures in seeds.values() if key in figures]
                row[key] = (statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0)
        cost = costs.get(name)
        if cost:
            row["step_ms"] = 1000 * cost["step_s"]
            row["activation_MiB"] = cost["activation_bytes_per_sample"] / 2**20
            if base:
                row["step_vs_dual"] = cost["step_s"] / base["step_s"]
                row["activation_vs_dual"] = cost["activation_bytes_per_sample"] / base["activation_bytes_per_sample"]
        summary[name] = row
    return summary


def markdown_table(summary):
    """The study table: mean +- std over seeds (n), chance levels in the header row."""
    chance = {}
    for row in summary.values():
        for key in ("i2t_chance_R@1", "i2t_chance_P@K", "fg_i2t_chance_R@1", "fg_t2i_chance_R@1"):
            if key in row:
                chance.setdefault(key, row[key][0])
    head = ["row", "seeds", "steps", *[h for _, h in COLUMNS], "step ms", "x dual", "act MiB/sample", "x dual"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for name, row in summary.items():
        cells = [name, str(row["seeds"]), f"{row['step'][0]:.0f}" if "step" in row else "-"]
        for key, _ in COLUMNS:
            cells.append(f"{row[key][0]:.1f} ± {row[key][1]:.1f}" if key in row else "-")
        for key, fmt in (("step_ms", "{:.0f}"), ("step_vs_dual", "{:.2f}"), ("activation_MiB", "{:.2f}"),
                         ("activation_vs_dual", "{:.2f}")):
            cells.append(fmt.format(row[key]) if key in row else "-")
        lines.append("| " + " | ".join(cells) + " |")
    notes = [f"chance: i2t R@1 {chance.get('i2t_chance_R@1', float('nan')):.2f}%"]
    if "i2t_chance_P@K" in chance:
        notes.append(f"P@5 (same label set) {chance['i2t_chance_P@K']:.1f}%")
    notes.append(f"FG R@1 {chance.get('fg_i2t_chance_R@1', float('nan')):.1f}%, FG pairwise 50%")
    return "\n".join(lines) + "\n\n" + "; ".join(notes) + ". Mean ± std over seeds."


def paired_ratio(runs, row, reference, key, draws=10_000, level=0.9):
    """mean(row) / mean(reference) of `key` over the seeds both rows ran, and its bootstrap
    interval: seeds drawn with replacement, a seed's two runs kept together (they share the
    corpus and the held-out pairs). runs: {row: {seed: figures}}. Returns {"seeds",
    "per_seed", "ratio_of_means", "bootstrap": [low, high]}, or None without a shared seed or
    when the reference scored 0 on one of them (the ratio is undefined there)."""
    seeds = sorted(set(runs.get(row, {})) & set(runs.get(reference, {})))
    if not seeds or any(runs[reference][s][key] == 0 for s in seeds):
        return None

    def ratio_of_means(sample):
        return (statistics.mean(runs[row][s][key] for s in sample)
                / statistics.mean(runs[reference][s][key] for s in sample))

    rng = random.Random(0)
    ratios = sorted(ratio_of_means(rng.choices(seeds, k=len(seeds))) for _ in range(draws))
    tail = int(draws * (1 - level) / 2)
    return {"seeds": seeds, "per_seed": [runs[row][s][key] / runs[reference][s][key] for s in seeds],
            "ratio_of_means": ratio_of_means(seeds), "bootstrap": [ratios[tail], ratios[-tail - 1]]}


def ratio_table(runs, rows, reference):
    """Markdown: each row's paired_ratio to `reference` for RATIO_KEYS, "-" where undefined
    ("" when no row shares a seed with it)."""
    lines = []
    for name in rows:
        seeds = sorted(set(runs.get(name, {})) & set(runs.get(reference, {})))
        if name == reference or not seeds:
            continue
        ratios = [paired_ratio(runs, name, reference, key) for key in RATIO_KEYS]
        cells = ["-" if r is None else f"{r['ratio_of_means']:.2f} ({r['bootstrap'][0]:.2f}–{r['bootstrap'][1]:.2f})"
                 for r in ratios]
        lines.append(f"| {name} | {len(seeds)} | " + " | ".join(cells) + " |")
    if not lines:
        return ""
    head = ["row", "paired seeds", *[dict(COLUMNS)[key] for key in RATIO_KEYS]]
    return "\n".join([f"Ratio of means to {reference} (90% bootstrap over the paired seeds):", "",
                      "| " + " | ".join(head) + " |", "|" + " --- |" * len(head), *lines])


def write_json(path, obj):
    write_text(path, json.dumps(obj, indent=1))


def write_text(path, text):
    """Atomic: a kill never leaves a half-written file."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python experiments/study.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="study folder (runs, costs.json, study.json, study.md)")
    parser.add_argument("--row", action="append", required=True, metavar="NAME=FLAGS",
                        help="a configuration: NAME=train flags; NAME@time trains for the time reference's time")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds of every row (default 0 1 2)")
    parser.add_argument("--steps", type=int, default=1500, help="training steps of every row not @time (default 1500)")
    parser.add_argument("--common", default="", help="train flags shared by every row, e.g. '--tokenizer DIR'")
    parser.add_argument("--time-reference", default="", help="the row whose time @time rows match (default: first)")
    parser.add_argument("--jobs", type=int, default=1,
                        help="runs trained at once; each gets cpu_count/jobs threads (default 1)")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch threads of each run (default: cpu_count / jobs)")
    parser.add_argument("--order", choices=("seeds", "rows"), default="seeds",
                        help="training order: seeds = every row's seed 0 first; rows = all seeds of a row first")
    parser.add_argument("--ratio-to", default="dual-stream",
                        help="the row every other row's figures are divided by, seed by seed (default dual-stream)")
    parser.add_argument("--cost-batch", type=int, default=32, help="batch of the step-time measurement (default 32)")
    parser.add_argument("--finegrained-studies", type=int, default=300,
                        help="queries of the fine-grained protocol (default 300)")
    parser.add_argument("--report-only", action="store_true",
                        help="tabulate finished runs; train and time nothing (no cost columns unless measured before)")
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error(f"--steps must be >= 1, got {args.steps}")
    if args.jobs < 1:
        parser.error(f"--jobs must be >= 1, got {args.jobs}")
    try:
        study = Study(args)
    except ValueError as err:
        parser.error(str(err))
    return study.run()


if __name__ == "__main__":
    main()
