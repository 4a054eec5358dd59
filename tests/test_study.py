"""The study runner (experiments/study.py): rows x seeds, equal-time rows, the table, resuming a
killed study."""
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

EXPERIMENTS = Path(__file__).parents[1] / "experiments"
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
