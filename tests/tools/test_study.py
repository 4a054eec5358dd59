"""The study runner (experiments/study.py): rows x seeds, equal-time rows, the table, resuming a
killed study."""
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

EXPERIMENTS = Path(__file__).parents[2] / "experiments"
_spec = importlib.util.spec_from_file_location("study", EXPERIMENTS / "study.py")
study_runner = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(study_runner)
main, paired_ratio, parse_rows = study_runner.main, study_runner.paired_ratio, study_runner.parse_rows

COMMON = ("--image-size 32 --vit-width 32 --vit-depth 1 --vit-heads 2 --decoder-width 32 --decoder-depth 1 "
          "--decoder-heads 2 --text-width 32 --text-depth 1 --text-heads 2 --text-intermediate 64 "
          "--embed-dim 16 --vocab-size 200 --train-size 48 --val-size 16 --batch-size 8 --log-every 1 "
          "--warmup-steps 1 --eval-every 0 --save-every 2")


def study(out, *extra):
    return main(["--out", str(out), "--seeds", "0", "1", "--steps", "3", "--common", COMMON,
                 "--finegrained-studies", "4", "--cost-batch", "4", "--row", "mcr=",
                 "--row", "dual-stream@time=--variant dual-stream", "--ratio-to", "dual-stream@time", *extra])


def test_rows_parse_and_reject_bad_names():
    assert parse_rows(["a=", "b=--variant abm --seed 3"]) == {"a": [], "b": ["--variant", "abm", "--seed", "3"]}
    for bad in (["noequals"], ["=--x"], ["a/b=--x"], ["a=", "a=--y"]):
        with pytest.raises(ValueError, match="--row"):
            parse_rows(bad)


def test_paired_ratio_pairs_seeds_and_bounds_its_interval():
    runs = {"a": {0: {"x": 2.0}, 1: {"x": 3.0}, 2: {"x": 9.0}, 7: {"x": 1.0}},
            "ref": {0: {"x": 4.0}, 1: {"x": 3.0}, 2: {"x": 6.0}, 5: {"x": 1.0}}}
    r = paired_ratio(runs, "a", "ref", "x")
    assert r["seeds"] == [0, 1, 2]                              # seeds 5 and 7 have no partner
    assert r["ratio_of_means"] == pytest.approx((2 + 3 + 9) / (4 + 3 + 6))
    assert r["per_seed"] == pytest.approx([0.5, 1.0, 1.5])
    low, high = r["bootstrap"]                                  # a resampled ratio of means is a
    assert 0.5 <= low < r["ratio_of_means"] < high <= 1.5       # weighted mean of per-seed ratios
    assert paired_ratio(runs, "ref", "ref", "x")["bootstrap"] == [1.0, 1.0]
    assert paired_ratio({"a": {0: {"x": 1.0}}, "ref": {1: {"x": 1.0}}}, "a", "ref", "x") is None
    assert paired_ratio({"a": {0: {"x": 1.0}}, "ref": {0: {"x": 0.0}}}, "a", "ref", "x") is None


def test_study_trains_tabulates_and_resumes(tmp_path):
    summary = study(tmp_path)
    assert set(summary) == {"mcr", "dual-stream@time"} and summary["mcr"]["seeds"] == 2
    costs = json.load(open(tmp_path / "costs.json"))
    expected_steps = max(1, round(3 * costs["mcr"]["step_s"] / costs["dual-stream@time"]["step_s"]))
    assert summary["dual-stream@time"]["step"][0] == expected_steps
    for key in ("i2t_R@1", "t2i_P@5", "fg_i2t_pairwise", "fg_t2i_R@1"):
        assert 0 <= summary["mcr"][key][0] <= 100
    table = (tmp_path / "study.md").read_text()
    assert "| mcr | 2 | 3 |" in table and "chance" in table
    assert "Ratio of means to dual-stream@time" in table and "\n| mcr | 2 | " in table
    assert json.load(open(tmp_path / "study.json"))["runs"]["mcr"]["0"]["step"] == 3

    # a killed study: one run lost its end (no final.json, a checkpoint at step 2), one never started
    keep = tmp_path / "mcr" / "seed0" / "final.json"
    kept_mtime = os.stat(keep).st_mtime_ns
    killed = tmp_path / "mcr" / "seed1"
    os.remove(killed / "final.json")
    os.remove(killed / "finegrained.json")
    shutil.rmtree(killed / "checkpoints" / "step_00000003")
    (killed / "checkpoints" / "latest").write_text("step_00000002\n")
    shutil.rmtree(tmp_path / "dual-stream@time" / "seed1")
    summary = study(tmp_path)
    assert summary["mcr"]["seeds"] == 2 and summary["dual-stream@time"]["seeds"] == 2
    assert os.stat(keep).st_mtime_ns == kept_mtime          # finished runs are kept
    assert "--resume" in (killed / "train.log").read_text()  # the interrupted one continued
    assert json.load(open(killed / "final.json"))["step"] == 3


def test_a_row_added_later_keeps_the_stored_costs(tmp_path):
    """A new row is timed beside the time reference and scaled to its stored time: the costs
    the @time rows trained from stay as they were."""
    study(tmp_path)
    before = json.load(open(tmp_path / "costs.json"))
    summary = study(tmp_path, "--row", "abm=--variant abm")
    after = json.load(open(tmp_path / "costs.json"))
    assert {name: after[name] for name in before} == before and "abm" in after
    assert after["abm"]["step_s"] > 0 and summary["abm"]["seeds"] == 2


def test_step_costs_time_each_rows_own_variant_model():
    """Each row is costed with its variant's own class, as training builds it."""
    row_model, train_config = study_runner.row_model, study_runner.train_config
    names = {variant: type(row_model(train_config(["--variant", variant]), 64)).__name__
             for variant in ("mcr", "mpma", "reclf", "abm", "dual-stream")}
    assert names == {"mcr": "MCR", "mpma": "MPMA", "reclf": "RECLF", "abm": "AbM", "dual-stream": "DualStream"}


def test_pool_studies_merges_seeds_across_studies(tmp_path):
    """experiments/pool_studies.py: seeds of two studies pooled; the ratio pairs seeds across them."""
    def figures(r1):
        return {"i2t_R@1": r1, "t2i_R@1": r1, "i2t_P@5": r1, "fg_i2t_R@1": r1, "fg_i2t_pairwise": r1, "step": 9}
    for name, runs in (("a", {"mcr": {"0": figures(1.0)}, "dual": {"0": figures(2.0), "1": figures(4.0)}}),
                       ("b", {"mcr": {"1": figures(3.0)}})):
        (tmp_path / f"{name}.json").write_text(json.dumps({"runs": runs}))
    (tmp_path / "costs.json").write_text("{}")
    script = EXPERIMENTS / "pool_studies.py"
    subprocess.run([sys.executable, script, "--out", tmp_path, "--costs", tmp_path / "costs.json",
                    "--pair", "mcr:dual", tmp_path / "a.json", tmp_path / "b.json"], check=True)
    table = (tmp_path / "pooled.md").read_text()
    assert "| mcr | 2 | 9 | 2.0 ± 1.4 |" in table                       # seeds 0 (a) and 1 (b)
    assert "| i2t_R@1 | 0.50 | 0.75 | 0.67 | 0.50–0.75 |" in table      # (1 + 3) / (2 + 4)
    ratios = json.load(open(tmp_path / "pooled.json"))["ratios"]["mcr:dual"]
    assert ratios["t2i_R@1"]["per_seed"] == [0.5, 0.75]


# --- every argument checked before any work; a stored run reused only when it matches --------

def exit_message(capsys, argv):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    return err


def tiny_study_args(out, *extra):
    return ["--out", str(out), "--seeds", "0", "--steps", "2", "--common", COMMON, "--finegrained-studies", "4",
            "--cost-batch", "4", "--row", "mcr=", *extra]


@pytest.mark.parametrize("extra, message", [
    (["--seeds", "0", "0"], "--seeds must be distinct"),
    (["--row", "seeded=--seed 3"], "--row seeded sets --seed: the study sets it for every run (use --seeds)"),
    (["--row", "seeded=--se 3"], "--row seeded sets --seed"),
    (["--row", "moved=--out-dir elsewhere"], "--row moved sets --out-dir"),
    (["--row", "long=--max-steps 9"], "--row long sets --max-steps"),
    (["--row", "again=--resume"], "--row again sets --resume"),
    (["--common", "--seed 1"], "--common sets --seed"),
    (["--row", "typo=--vit-deepth 2"], "--row typo: unrecognized arguments: --vit-deepth 2"),
    (["--row", "costs.json=--variant abm"], "--row name 'costs.json' is taken by the study's own file costs.json"),
    (["--row", "study.md.tmp1=--variant abm"], "is taken by the study's own file study.md"),
    (["--row", "x" * 300 + "="], "--row must be NAME=FLAGS with NAME of 1-64 letters"),
    (["--row", "a b=--variant abm"], "--row must be NAME=FLAGS"),
    (["--time-reference", "nope"], "--time-reference 'nope' is not a row (rows: mcr)"),
    (["--ratio-to", "nope"], "--ratio-to 'nope' is not a row (rows: mcr)"),
    (["--threads", "-1"], "--threads must be >= 0"),
    (["--jobs", "0"], "--jobs must be >= 1"),
])
def test_bad_arguments_exit_2_before_any_work(tmp_path, capsys, extra, message):
    out = tmp_path / "study"
    assert message in exit_message(capsys, tiny_study_args(out, *extra))
    assert not out.exists()                                  # no cost measured, no run started


def test_an_out_that_is_a_file_exits_2(tmp_path, capsys):
    (tmp_path / "file").write_text("mine")
    err = exit_message(capsys, tiny_study_args(tmp_path / "file"))
    assert f"--out '{tmp_path / 'file'}' is a file, not a folder" in err
    assert (tmp_path / "file").read_text() == "mine"


def test_a_stored_run_is_reused_only_when_its_settings_match(tmp_path, capsys):
    """--steps, a row's flags or --common changed: the stored run (and cost) is named and the
    study stops before any work; --rerun-changed trains it again and keeps the old one aside."""
    main(tiny_study_args(tmp_path))
    run = tmp_path / "mcr" / "seed0"
    record = json.loads((run / "study-run.json").read_text())
    assert record["config"]["max_steps"] == 2 and record["config"]["seed"] == 0
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    main(tiny_study_args(tmp_path))                          # the same study again: everything reused
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file() and p.name != "study.json"} == {
        p: b for p, b in before.items() if p.name != "study.json"}

    err = exit_message(capsys, tiny_study_args(tmp_path, "--steps", "3"))
    assert f"run {run} was trained with other settings: max_steps 2 (now 3)" in err and "--rerun-changed" in err
    changed_row = tiny_study_args(tmp_path)
    changed_row[changed_row.index("mcr=")] = "mcr=--vit-depth 2"
    err = exit_message(capsys, changed_row)
    assert "the cost of row mcr" in err and "model.vit_depth 1 (now 2)" in err
    changed_common = tiny_study_args(tmp_path)
    changed_common[changed_common.index(COMMON)] = COMMON.replace("--embed-dim 16", "--embed-dim 8")
    assert "model.embed_dim 16 (now 8)" in exit_message(capsys, changed_common)
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before   # nothing touched

    summary = main(tiny_study_args(tmp_path, "--steps", "3", "--rerun-changed"))
    assert summary["mcr"]["step"][0] == 3
    assert json.loads((tmp_path / "mcr" / "seed0.changed-1" / "final.json").read_text())["step"] == 2


def alive(pid):
    """Whether process `pid` runs (a zombie left for a reaper does not)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(") ")[2][0]
    except FileNotFoundError:
        return False
    return state not in "ZX"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the kernel's parent-death signal is Linux's")
def test_a_trainer_dies_with_its_study_killed_by_sigkill(tmp_path):
    out = tmp_path / "study"
    runner = subprocess.Popen([sys.executable, EXPERIMENTS / "study.py", *tiny_study_args(out, "--steps", "5000")],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    lock = out / "mcr" / "seed0" / "run.lock"
    deadline = time.time() + 240
    while not (lock.exists() and lock.read_text().startswith("pid ")) and runner.poll() is None:
        assert time.time() < deadline, "the study's trainer never took its run folder's lock"
        time.sleep(0.2)
    trainer = int(lock.read_text().split()[1])
    runner.kill()
    runner.wait()
    try:
        deadline = time.time() + 30
        while alive(trainer) and time.time() < deadline:
            time.sleep(0.2)
        assert not alive(trainer)
    finally:
        if alive(trainer):
            os.kill(trainer, signal.SIGKILL)
