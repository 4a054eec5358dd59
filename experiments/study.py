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
from their last checkpoint (--resume). A run is reused only when the settings it records
(OUT/NAME/seedK/study-run.json: its flags and their resolved config) are those the study
would train now, and a stored cost only when its row's flags are; otherwise the study says
which differ and stops, or with --rerun-changed trains (or times) it again, the old run
kept beside it as seedK.changed-N. The training processes stay in the study's process
group and, on Linux, are killed by the kernel when the study process ends (kill -9
included); mcr.train's run-folder lock turns away a second writer anyway. Every flag is
checked before any cost measurement or run: one line, exit status 2. After training, each
run is also scored on the fine-grained protocol (mcr.eval.finegrained). OUT/study.json holds
every run's figures and OUT/study.md the table: retrieval both ways (R@1/5/10, P@5 with chance), fine-grained R@1
and pairwise accuracy, steps, step time and activation bytes per sample (masked steps;
unmasked-tuning steps are counted as their share of the steps) with ratios to dual-stream,
and each row's ratio of means to the --ratio-to row (default dual-stream) over the seeds both
ran, with a 90% bootstrap interval over those seed pairs.
"""
import argparse
import contextlib
import ctypes
import dataclasses
import functools
import io
import json
import os
import random
import re
import shlex
import signal
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import torch

from mcr.cli import Parser

COLUMNS = (  # (key in a run's flat figures, header)
    ("i2t_R@1", "i2t R@1"), ("i2t_R@5", "i2t R@5"), ("i2t_R@10", "i2t R@10"), ("i2t_P@5", "i2t P@5"),
    ("t2i_R@1", "t2i R@1"), ("t2i_R@5", "t2i R@5"), ("t2i_R@10", "t2i R@10"), ("t2i_P@5", "t2i P@5"),
    ("fg_i2t_R@1", "FG i2t R@1"), ("fg_i2t_pairwise", "FG i2t pair"),
    ("fg_t2i_R@1", "FG t2i R@1"), ("fg_t2i_pairwise", "FG t2i pair"),
)
RATIO_KEYS = ("i2t_R@1", "t2i_R@1", "i2t_P@5", "fg_i2t_R@1", "fg_i2t_pairwise")
STUDY_FILES = ("costs.json", "study.json", "study.md")  # OUT's own files, beside one folder per row
RUN_RECORD = "study-run.json"  # in each run folder: the flags it was trained with, resolved
ROW_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+@-]{0,63}")
NOT_COMPARED = ("out_dir", "resume", "overwrite")  # config fields that differ between two tries of one run


def parse_rows(specs):
    """['NAME=FLAGS', ...] -> {name: [flags]} in order. A NAME is a folder name of at most 64
    letters, digits and ._+@- (not starting with one of those four), unique, not one of the
    study's own files (STUDY_FILES)."""
    rows = {}
    for spec in specs:
        name, sep, flags = spec.partition("=")
        name = name.strip()
        if not sep or not ROW_NAME.fullmatch(name):
            raise ValueError(f"--row must be NAME=FLAGS with NAME of 1-64 letters, digits and ._+@- (starting with "
                             f"a letter or digit), got {spec[:80]!r}")
        if any(name == f or name.startswith(f + ".") for f in STUDY_FILES):
            raise ValueError(f"--row name {name!r} is taken by the study's own file {name.split('.tmp')[0]}")
        if name in rows:
            raise ValueError(f"--row name {name!r} given twice")
        rows[name] = shlex.split(flags)
    return rows


def train_config(flags, label="--row"):
    """The TrainConfig `python -m mcr.train FLAGS` would train with; ValueError starting with
    `label` for flags it refuses (its one-line message) or that make it print and exit."""
    from mcr.cli import parse_train_args

    said = io.StringIO()
    try:
        with contextlib.redirect_stderr(said), contextlib.redirect_stdout(io.StringIO()):
            return parse_train_args(flags)
    except SystemExit:
        message = said.getvalue().strip().rpartition("error: ")[2].removesuffix(" (see --help)")
        raise ValueError(f"{label}: {message or 'flags that make mcr.train print and exit (--help, --print-config)'}"
                         ) from None


def study_flags(run_dir, seed, steps):
    """The flags the study sets for each run (rows may not)."""
    return ["--out-dir", run_dir, "--seed", str(seed), "--max-steps", str(steps), "--max-minutes", "0"]


def check_row_flags(flags, label):
    """ValueError unless mcr.train accepts `flags` after the study's own and they leave the
    study's settings (folder, seed, steps, no time limit, resume) alone."""
    first = train_config([*study_flags("/study/a", 0, 1), "--no-resume", "--no-overwrite", *flags], label)
    for field in ("resume", "overwrite"):
        if getattr(first, field):
            raise ValueError(f"{label} sets --{field}: the study resumes its own runs")
    second = train_config([*study_flags("/study/b", 1, 2), "--max-minutes", "1", *flags], label)
    for field, flag, instead in (("out_dir", "--out-dir", "--out"), ("seed", "--seed", "--seeds"),
                                 ("max_steps", "--max-steps", "--steps or NAME@time"),
                                 ("max_minutes", "--max-minutes", "--steps")):
        if getattr(first, field) == getattr(second, field):
            raise ValueError(f"{label} sets {flag}: the study sets it for every run (use {instead})")


def comparable(cfg):
    """A resolved config as flat {field: value}, without the fields two tries of a run may differ in."""
    from mcr.config import config_to_dict

    values = config_to_dict(cfg)
    flat = {k: v for k, v in values.items() if k not in NOT_COMPARED and k != "model"}
    flat.update({f"model.{k}": v for k, v in values["model"].items()})
    return json.loads(json.dumps(flat))  # as a record reads back: lists, not tuples


def differences(then, now):
    """'field then (now now), ...' for the fields where two comparable() dicts differ, or ''."""
    keys = sorted(k for k in set(then) | set(now) if then.get(k) != now.get(k))
    return ", ".join(f"{k} {then.get(k)!r} (now {now.get(k)!r})" for k in keys)


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


class StudyError(ValueError):
    """The study cannot go on as asked (a stored run or cost no longer matches); exit status 2."""


_LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None
PR_SET_PDEATHSIG = 1


def _die_with(study_pid):
    """preexec_fn of a training process: the kernel kills it when the study process ends
    (Linux prctl PR_SET_PDEATHSIG; kill -9 of the study included)."""
    if _LIBC is not None:
        _LIBC.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != study_pid:  # the study ended before the prctl
            os._exit(1)


class Study:
    def __init__(self, args):
        """Every check of the arguments, before anything is written or measured (ValueError)."""
        self.args = args
        self.rows = parse_rows(args.row)
        self.common = shlex.split(args.common)
        self.out = args.out
        if len(set(args.seeds)) != len(args.seeds) or min(args.seeds) < 0:
            raise ValueError(f"--seeds must be distinct and >= 0, got {' '.join(map(str, args.seeds))}")
        for name, value, minimum in (("--steps", args.steps, 1), ("--jobs", args.jobs, 1),
                                     ("--threads", args.threads, 0), ("--cost-batch", args.cost_batch, 1),
                                     ("--finegrained-studies", args.finegrained_studies, 1)):
            if value < minimum:
                raise ValueError(f"{name} must be >= {minimum}, got {value}")
        if args.time_reference and args.time_reference not in self.rows:
            raise ValueError(f"--time-reference {args.time_reference!r} is not a row (rows: {', '.join(self.rows)})")
        if args.ratio_to is not None and args.ratio_to not in self.rows:
            raise ValueError(f"--ratio-to {args.ratio_to!r} is not a row (rows: {', '.join(self.rows)})")
        self.ratio_to = args.ratio_to or ("dual-stream" if "dual-stream" in self.rows else None)
        self.time_reference = args.time_reference or next(iter(self.rows))
        if os.path.exists(self.out) and not os.path.isdir(self.out):
            raise ValueError(f"--out {self.out!r} is a file, not a folder")
        existing = os.path.abspath(self.out)
        while not os.path.exists(existing):
            existing = os.path.dirname(existing)
        if not os.access(existing, os.W_OK | os.X_OK):
            raise ValueError(f"--out {self.out!r}: {existing!r} is not a writable folder")
        check_row_flags(self.common, "--common")
        for name, flags in self.rows.items():
            check_row_flags([*self.common, *flags], f"--row {name}")

    def run_dir(self, name, seed):
        return os.path.join(self.out, name, f"seed{seed}")

    def run_flags(self, name, seed, steps):
        return [*study_flags(self.run_dir(name, seed), seed, steps), *self.common, *self.rows[name]]

    def steps_of(self, name, costs):
        """The row's training steps; None for an @time row while a cost it needs is not known."""
        if not name.endswith("@time"):
            return self.args.steps
        ref = self.time_reference
        if ref not in costs or name not in costs:
            return None
        return max(1, round(self.args.steps * costs[ref]["step_s"] / costs[name]["step_s"]))

    def recorded(self, run_dir):
        """comparable() settings a run folder was trained with: its RUN_RECORD, else (a run of
        an older study) its config.yaml without the vocabulary size, which is the tokenizer's;
        {} for a folder that holds nothing, None for one whose settings are unknown."""
        import yaml

        from mcr.config import config_from_dict

        if not os.path.isdir(run_dir) or not os.listdir(run_dir):
            return {}
        record = os.path.join(run_dir, RUN_RECORD)
        if os.path.isfile(record):
            with open(record) as f:
                return json.load(f)["config"]
        config = os.path.join(run_dir, "config.yaml")
        if os.path.isfile(config):
            with open(config) as f:
                return {**comparable(config_from_dict(yaml.safe_load(f))), "model.vocab_size": None}
        return None

    def check_runs(self, jobs):
        """StudyError naming the runs among `jobs` [(name, seed, steps)] whose folders were
        trained with other settings than they would be now; with --rerun-changed they are
        moved aside (seedK.changed-N) to be trained again."""
        changed = []
        for name, seed, steps in jobs:
            run_dir = self.run_dir(name, seed)
            then = self.recorded(run_dir)
            if then == {}:
                continue
            now = comparable(train_config(self.run_flags(name, seed, steps)))
            if then is None:
                changed.append((run_dir, f"it holds files but no {RUN_RECORD} or config.yaml"))
                continue
            if then.get("model.vocab_size", 0) is None:  # an older study's run: its config.yaml's own
                now["model.vocab_size"] = None
            if then != now:
                changed.append((run_dir, differences(then, now)))
        if changed and (self.args.report_only or not self.args.rerun_changed):
            (run_dir, why), more = changed[0], len(changed) - 1
            raise StudyError(f"run {run_dir} was trained with other settings: {why}"
                             + (f" (and {more} more runs)" if more else "")
                             + "; pass --rerun-changed to train them again (each old run kept as seedK.changed-N), "
                               "or choose another --out")
        for run_dir, why in changed:
            aside = next(f"{run_dir}.changed-{n}" for n in range(1, 10**6)
                         if not os.path.exists(f"{run_dir}.changed-{n}"))
            os.replace(run_dir, aside)
            print(f"{run_dir}: trained with other settings ({why}); moved to {aside}, training it again",
                  file=sys.stderr)

    def check_costs(self, costs):
        """The stored costs whose row flags differ from now: a StudyError naming them, or with
        --rerun-changed they are dropped (measured again). Costs stored without their flags
        (older studies) are kept."""
        changed = {}
        for name, cost in costs.items():
            if name in self.rows and "flags" in cost:
                try:
                    then = comparable(train_config(shlex.split(cost["flags"]), f"row {name} in costs.json"))
                except ValueError as err:
                    raise StudyError(str(err)) from None
                why = differences(then, comparable(train_config([*self.common, *self.rows[name]])))
                if why:
                    changed[name] = why
        if changed and (self.args.report_only or not self.args.rerun_changed):
            name, why = next(iter(changed.items()))
            raise StudyError(f"the cost of row {name} in {os.path.join(self.out, 'costs.json')} was measured with "
                             f"other flags: {why}" + (f" (and {len(changed) - 1} more rows)" if len(changed) > 1
                                                      else "")
                             + "; pass --rerun-changed to measure and train them again, or choose another --out")
        for name in changed:
            print(f"costs.json: row {name} was timed with other flags ({changed[name]}); timing it again",
                  file=sys.stderr)
            del costs[name]

    def train_one(self, name, seed, steps, threads):
        """Train (or resume, or skip) one run in a subprocess; returns its folder."""
        run_dir = self.run_dir(name, seed)
        if os.path.isfile(os.path.join(run_dir, "final.json")):
            return run_dir
        os.makedirs(run_dir, exist_ok=True)
        flags = self.run_flags(name, seed, steps)
        record = os.path.join(run_dir, RUN_RECORD)
        if os.listdir(run_dir):  # an earlier attempt: continue it (from scratch when it saved no checkpoint)
            flags.append("--resume")
        if not os.path.isfile(record):
            write_json(record, {"flags": self.run_flags(name, seed, steps), "config": comparable(train_config(flags))})
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
        with open(os.path.join(run_dir, "train.log"), "a") as log:
            log.write(f"\n$ python -m mcr.train {shlex.join(flags)}\n")
            log.flush()
            done = subprocess.run([sys.executable, "-m", "mcr.train", *flags], stdout=log, stderr=subprocess.STDOUT,
                                  env=env, preexec_fn=functools.partial(_die_with, os.getpid()))
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
        ref = self.time_reference
        rows = {name: self.rows[name] for name in ([ref] if ref in stored else []) + names}
        costs = step_costs(rows, self.common, vocab_size(self.common), self.args.cost_batch)
        if ref in stored:
            scale = stored[ref]["step_s"] / costs.pop(ref)["step_s"]
            for cost in costs.values():
                cost["step_s"] *= scale
        for name, cost in costs.items():
            cost["flags"] = shlex.join([*self.common, *self.rows[name]])
        return costs

    def run(self):
        args = self.args
        costs_path = os.path.join(self.out, "costs.json")
        if os.path.isfile(costs_path):
            with open(costs_path) as f:
                costs = json.load(f)
        else:
            costs = {}
        self.check_costs(costs)
        pairs = ([(name, seed) for name in self.rows for seed in args.seeds] if args.order == "rows"
                 else [(name, seed) for seed in args.seeds for name in self.rows])
        known = [(name, seed, self.steps_of(name, costs)) for name, seed in pairs]
        self.check_runs([job for job in known if job[2] is not None])  # before the cost measurement
        missing = [name for name in self.rows if name not in costs]
        if not args.report_only and missing:
            os.makedirs(self.out, exist_ok=True)
            costs.update(self.measure_costs(missing, costs))
            write_json(costs_path, costs)
        jobs = [(name, seed, self.steps_of(name, costs)) for name, seed in pairs]
        self.check_runs([job for job, before in zip(jobs, known) if before[2] is None and job[2] is not None])
        jobs = [job for job in jobs if job[2] is not None]  # --report-only: @time rows never timed
        threads = args.threads or max(1, (os.cpu_count() or 1) // args.jobs)
        os.makedirs(self.out, exist_ok=True)
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
        ratios = ratio_table(runs, self.rows, self.ratio_to) if self.ratio_to else ""
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
    parser = Parser(prog="python experiments/study.py", description=__doc__,
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
    parser.add_argument("--ratio-to", default=None,
                        help="the row every other row's figures are divided by, seed by seed (default: the row "
                             "named dual-stream, if any)")
    parser.add_argument("--cost-batch", type=int, default=32, help="batch of the step-time measurement (default 32)")
    parser.add_argument("--finegrained-studies", type=int, default=300,
                        help="queries of the fine-grained protocol (default 300)")
    parser.add_argument("--report-only", action="store_true",
                        help="tabulate finished runs; train and time nothing (no cost columns unless measured before)")
    parser.add_argument("--rerun-changed", action="store_true",
                        help="train (and time) again the runs and costs stored with other settings than now; the "
                             "old run folder is kept as seedK.changed-N (default: stop and say which differ)")
    args = parser.parse_args(argv)
    try:
        study = Study(args)
    except ValueError as err:  # checked before any work
        parser.error(str(err))
    try:
        return study.run()
    except StudyError as err:  # a stored run or cost that no longer matches, before training or timing it
        parser.error(str(err))


if __name__ == "__main__":
    main()
