"""Training end to end on the synthetic corpus: the CLI, checkpoints, resume, the library
entry `train(cfg)`, and `python -m mcr.evaluate` reproducing training's figures."""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys

import pytest
import torch
import yaml
from safetensors.torch import load_file

from mcr import checkpoint, engine, evaluate, run
from mcr.config import PRESETS, TrainConfig, config_from_dict
from mcr.data.tokenizer import load_tokenizer, shipped_tokenizer
from mcr.run import LOCK_FILE, InputError, check_inputs, load_trained, lock_run_folder, release_run_folder
from mcr.train import main


def test_cli_smoke_writes_metrics_checkpoint_and_results(tmp_path, run_args):
    results = main(run_args(tmp_path, "--max-steps", "4", "--eval-every", "2", "--save-every", "2"))
    assert {"i2t", "t2i"} == set(results)
    assert 0 < results["i2t"]["chance_P@K"] < 100
    assert 0 <= results["i2t"]["R@1"] <= 100
    lines = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert {line["kind"] for line in lines} == {"train", "val"}
    assert all(torch.isfinite(torch.tensor(line["loss"])) for line in lines if line["kind"] == "train")
    assert checkpoint.latest_checkpoint(tmp_path).endswith("step_00000004")
    assert os.path.isdir(tmp_path / "tokenizer")
    assert json.load(open(tmp_path / "final.json"))["step"] == 4
    assert config_from_dict(yaml.safe_load(open(tmp_path / "config.yaml"))).batch_size == 8


@pytest.mark.parametrize("variant", ["dual-stream", "abm"])
def test_cli_runs_each_variant(tmp_path, variant, run_args):
    main(run_args(tmp_path, "--max-steps", "2", "--eval-every", "0", "--variant", variant))
    assert checkpoint.read_state(checkpoint.latest_checkpoint(tmp_path))["variant"] == variant


def test_resume_continues_exactly(tmp_path, run_args, killed_after):
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    main(run_args(full, "--max-steps", "6", "--save-every", "3", "--eval-every", "0", "--keep-checkpoints", "5"))
    killed_after(full, resumed, 3)
    main(run_args(resumed, "--max-steps", "6", "--save-every", "3", "--eval-every", "0", "--resume"))
    a = load_file(full / "checkpoints" / "step_00000006" / "model.safetensors")
    b = load_file(resumed / "checkpoints" / "step_00000006" / "model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)


def test_evaluate_cli_reproduces_the_final_validation_of_training(tmp_path, capsys, run_args):
    main(run_args(tmp_path, "--max-steps", "2", "--eval-every", "0", "--precision", "bf16"))
    path = checkpoint.latest_checkpoint(tmp_path)
    results = evaluate.main(["--checkpoint", str(tmp_path)])
    assert "i2t" in capsys.readouterr().out
    final = json.load(open(tmp_path / "final.json"))
    logged = [json.loads(line) for line in open(tmp_path / "metrics.jsonl") if '"val"' in line][-1]
    for direction in ("i2t", "t2i"):
        assert results[direction] == final[direction]  # the same path: same data, batches, autocast
        for key, value in results[direction].items():
            assert logged[f"{direction}_{key}"] == value
    assert json.load(open(os.path.join(path, "eval_val.json")))["i2t"] == final["i2t"]


def test_checkpoint_from_another_config_is_refused(tmp_path, capsys, run_args):
    main(run_args(tmp_path, "--max-steps", "2", "--eval-every", "0"))
    with pytest.raises(SystemExit) as exit_info:
        main(run_args(tmp_path, "--max-steps", "4", "--eval-every", "0", "--resume", "--vit-depth", "2"))
    assert exit_info.value.code == 2
    assert "vit_depth: checkpoint 1 vs now 2" in capsys.readouterr().err


def test_train_builds_the_preset_and_variant_of_its_config(tmp_path, monkeypatch):
    """train(TrainConfig(...)) without the CLI: the paper-shaped abm model, the paper recipe."""
    seen = {}

    def fake_fit(cfg, model, runner, optimizer, *args, **kwargs):
        seen.update(cfg=cfg, model=model, optimizer=optimizer)
        return {}

    monkeypatch.setattr(engine, "fit", fake_fit)
    run.train(TrainConfig(preset="paper", model={"variant": "abm"}, out_dir=str(tmp_path), device="cpu"))
    cfg, model = seen["cfg"], seen["model"]
    assert model.cfg.variant == "abm" and model.cfg.vit_width == PRESETS["paper"].vit_width == 768
    assert len(model.vit.blocks) == 12 and model.bert.config.num_hidden_layers == 12
    assert cfg.batch_size == 256 and cfg.loss_contrastive == 0.1 and cfg.epochs == 50
    assert seen["optimizer"].param_groups[0]["lr"] == 1.5e-4


def test_interrupted_checkpoint_write_keeps_the_previous(tmp_path, run_args):
    main(run_args(tmp_path, "--max-steps", "2", "--eval-every", "0"))
    os.makedirs(tmp_path / "checkpoints" / ".step_00000009.tmp123")  # a write killed midway
    assert checkpoint.latest_checkpoint(tmp_path).endswith("step_00000002")


def test_missing_checkpoint_is_reported(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        evaluate.main(["--checkpoint", str(tmp_path / "missing")])
    assert exit_info.value.code == 2 and "does not exist" in capsys.readouterr().err


def test_a_diverging_run_stops_with_one_line_and_keeps_the_last_good_checkpoint(tmp_path, capsys, run_args):
    main(run_args(tmp_path, "--max-steps", "2", "--save-every", "2", "--eval-every", "0"))
    good = checkpoint.latest_checkpoint(tmp_path)
    good_weights = (tmp_path / "checkpoints" / os.path.basename(good) / "model.safetensors").read_bytes()
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:  # a finite but absurd learning rate: NaN within two steps
        main(run_args(tmp_path, "--max-steps", "8", "--save-every", "2", "--eval-every", "2", "--log-every", "1",
                      "--lr", "1e30", "--resume"))
    message = str(exit_info.value.code)
    assert exit_info.value.code != 0 and "training diverged" in message and good in message
    assert "\n" not in message
    assert checkpoint.latest_checkpoint(tmp_path) == good
    assert checkpoint.step_folders(tmp_path) == [os.path.basename(good)]
    assert (tmp_path / "checkpoints" / os.path.basename(good) / "model.safetensors").read_bytes() == good_weights
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert all(torch.isfinite(torch.tensor(row["loss"])) for row in rows if row["kind"] == "train")
    assert json.load(open(tmp_path / "final.json"))["step"] == 2  # the good run's results stay


def test_a_run_diverging_before_any_checkpoint_saves_none(tmp_path, run_args):
    with pytest.raises(SystemExit) as exit_info:
        main(run_args(tmp_path, "--max-steps", "6", "--save-every", "1", "--eval-every", "0", "--lr", "1e30"))
    assert "training diverged" in str(exit_info.value.code)
    for name in checkpoint.step_folders(tmp_path):  # the step-1 save may hold huge but finite weights, never NaN
        weights = load_file(tmp_path / "checkpoints" / name / "model.safetensors")
        assert all(t.isfinite().all() for t in weights.values() if t.is_floating_point()), name


def test_evaluate_refuses_a_checkpoint_with_non_finite_weights(tmp_path, capsys, run_args):
    from safetensors.torch import save_file

    main(run_args(tmp_path, "--max-steps", "2", "--eval-every", "0"))
    model_file = os.path.join(checkpoint.latest_checkpoint(tmp_path), "model.safetensors")
    weights = load_file(model_file)
    name = next(n for n in weights if "patch_embed" in n)
    weights[name] = torch.full_like(weights[name], float("nan"))
    save_file(weights, model_file)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        evaluate.main(["--checkpoint", str(tmp_path)])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "non-finite weights" in err and len(err.strip().splitlines()) == 1
    assert not list(tmp_path.glob("checkpoints/*/eval_*.json"))


def test_resume_takes_the_model_from_the_run_folder(tmp_path, capsys, run_args):
    main(run_args(tmp_path, "--max-steps", "2", "--eval-every", "0"))
    flags = run_args(tmp_path, "--max-steps", "3", "--eval-every", "0", "--resume")
    others = flags[flags.index("--train-size"):]
    main(others)
    assert "resumed from" in capsys.readouterr().out
    first, last = (config_from_dict(checkpoint.read_state(tmp_path / "checkpoints" / f"step_0000000{k}")["config"])
                   for k in (2, 3))
    assert last.model == first.model and last.model.vit_width == 32


# Careless and hostile uses of a run folder and of the CLIs, kept as regression tests:
# nothing written before is lost, one process writes a run folder at a time, a resumed run
# logs each step once, every bad input ends in
# status 2 and one line before any work, a broken checkpoint is named and passed over.

STEPS = ["--eval-every", "0", "--keep-checkpoints", "5"]


@pytest.fixture(scope="module")
def base_run(tmp_path_factory, run_args):
    """A finished tiny run: checkpoints at steps 2 and 4."""
    out = tmp_path_factory.mktemp("base") / "run"
    main(run_args(out, "--max-steps", "4", "--save-every", "2", *STEPS))
    return out


def test_evaluate_random_init_scores_the_untrained_model(base_run, tmp_path):
    """Retrieval's floor: --random-init SEED scores the run's model as built after
    torch.manual_seed(SEED), the same for the same seed, not the trained weights."""
    trained = evaluate.main(["--checkpoint", str(base_run), "--output", str(tmp_path / "t.json")])
    floors = [evaluate.main(["--checkpoint", str(base_run), "--random-init", "3", "--output",
                             str(tmp_path / f"r{i}.json")]) for i in range(2)]
    assert floors[0] == floors[1] and floors[0] != trained
    assert json.load(open(tmp_path / "r0.json"))["random_init"] == 3
    assert json.load(open(tmp_path / "t.json"))["random_init"] is None


def copy_run(base, tmp_path):
    dst = tmp_path / "run"
    shutil.copytree(base, dst)
    return dst


def snapshot(folder):
    """{relative path: bytes} of every file under `folder`."""
    return {os.path.relpath(os.path.join(d, n), folder): open(os.path.join(d, n), "rb").read()
            for d, _, names in os.walk(folder) for n in names}


def exit_message(capsys, fn, *args):
    with pytest.raises(SystemExit) as exit_info:
        fn(*args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    return err


# --- a run folder is never reused by accident -----------------------------------------------

@pytest.mark.hostile
@pytest.mark.parametrize("extra", [[], ["--no-resume"]])
def test_a_run_folder_needs_resume_or_overwrite(base_run, tmp_path, capsys, extra, run_args):
    run = copy_run(base_run, tmp_path)
    before = snapshot(run)
    err = exit_message(capsys, main, run_args(run, "--max-steps", "6", *extra))
    assert "holds checkpoints up to step_00000004: pass --resume to continue it, or --overwrite" in err
    assert snapshot(run) == before


@pytest.mark.hostile
def test_resume_with_a_value_is_refused_not_read_as_false(base_run, tmp_path, capsys, run_args):
    run = copy_run(base_run, tmp_path)
    before = snapshot(run)
    for value in ("maybe", "y"):
        assert "unrecognized arguments: " + value in exit_message(capsys, main, run_args(run, "--resume", value))
    assert snapshot(run) == before


@pytest.mark.hostile
def test_overwrite_starts_over_and_keeps_other_files(base_run, tmp_path, run_args):
    run = copy_run(base_run, tmp_path)
    (run / "notes.txt").write_text("mine")
    main(run_args(run, "--max-steps", "1", "--overwrite", *STEPS))
    assert sorted(os.listdir(run / "checkpoints")) == ["latest", "step_00000001"]
    assert [json.loads(line)["step"] for line in open(run / "metrics.jsonl")] == [1, 1]  # train, val
    assert (run / "notes.txt").read_text() == "mine"


def killed_at_second_rename(monkeypatch, root, name):
    """os.replace that dies when the new copy of `name` is renamed into place."""
    real_replace = os.replace

    def replace(src, dst):
        if os.path.basename(str(dst)) == name and ".tmp" in os.path.basename(str(src)):
            raise KeyboardInterrupt("killed")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)


@pytest.mark.hostile
def test_a_kill_while_saving_a_step_again_loses_nothing(base_run, tmp_path, monkeypatch):
    """A resumed, finished run saving its last step again, killed at the rename: the old
    copy is put back at the next start, never deleted."""
    run = copy_run(base_run, tmp_path)
    root, name = run / "checkpoints", "step_00000004"
    weights = load_file(root / name / "model.safetensors")
    model = torch.nn.Linear(2, 2)
    killed_at_second_rename(monkeypatch, root, name)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save_checkpoint(str(run), 4, model, model.state_dict(), {"state": {}, "param_groups": []},
                                   {"config": {}}, keep=5)
    monkeypatch.undo()
    assert not (root / name).exists() and any(n.startswith(f".{name}.old") for n in os.listdir(root))
    checkpoint.remove_stale_temporaries(str(run))
    assert checkpoint.newest_intact(str(run)) == str(root / name)
    torch.testing.assert_close(load_file(root / name / "model.safetensors"), weights, rtol=0, atol=0)
    assert not [n for n in os.listdir(root) if n.startswith(".")]


@pytest.mark.hostile
def test_resuming_a_finished_run_does_not_rewrite_its_checkpoint(base_run, tmp_path, run_args):
    run = copy_run(base_run, tmp_path)
    inode = os.stat(run / "checkpoints" / "step_00000004").st_ino
    main(run_args(run, "--max-steps", "4", "--resume", *STEPS))
    assert os.stat(run / "checkpoints" / "step_00000004").st_ino == inode


# --- one writer per run folder ---------------------------------------------------------------

def hold_lock(run):
    """A live process other than this one holding `run`'s lock, as a trainer would."""
    code = ("import sys, time; from mcr.run import lock_run_folder; lock = lock_run_folder(sys.argv[1]); "
            "print('held', flush=True); time.sleep(120)")
    holder = subprocess.Popen([sys.executable, "-c", code, str(run)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline() == "held\n"
    return holder


@pytest.mark.hostile
def test_a_second_writer_exits_2_naming_the_holder(base_run, tmp_path, capsys, run_args):
    run = copy_run(base_run, tmp_path)
    holder = hold_lock(run)
    try:
        before = snapshot(run)
        for extra in (["--resume"], ["--overwrite"]):
            err = exit_message(capsys, main, run_args(run, "--max-steps", "6", *extra, *STEPS))
            assert f"is in use: pid {holder.pid} on {socket.gethostname()} since 20" in err
        assert snapshot(run) == before                      # the holder's run is left alone
    finally:
        holder.kill()
        holder.wait()


@pytest.mark.hostile
def test_a_lock_left_by_a_killed_trainer_is_taken_over_and_released_on_exit(base_run, tmp_path, capsys, run_args):
    run = copy_run(base_run, tmp_path)
    holder = hold_lock(run)
    os.kill(holder.pid, signal.SIGKILL)                     # kill -9: the lock file stays, its flock goes
    holder.wait()
    assert (run / LOCK_FILE).read_text().startswith(f"pid {holder.pid} ")
    main(run_args(run, "--max-steps", "6", "--resume", *STEPS))
    err = capsys.readouterr().err
    assert f"taking over the lock of pid {holder.pid} " in err
    assert not (run / LOCK_FILE).exists()                   # released when training ended
    release_run_folder(lock_run_folder(str(run)))          # and free to take
    assert "taking over" not in capsys.readouterr().err


# --- a resumed run logs each step once --------------------------------------------------------

def logged_steps(run):
    """{kind: [steps in log order]} of run/metrics.jsonl."""
    steps = {}
    for line in open(run / "metrics.jsonl"):
        row = json.loads(line)
        steps.setdefault(row["kind"], []).append(row["step"])
    return steps


def strictly_increasing(steps):
    return all(a < b for a, b in zip(steps, steps[1:]))


@pytest.mark.hostile
@pytest.mark.parametrize("state_records_rows", [True, False])
def test_a_run_resumed_after_a_kill_logs_each_step_once(base_run, tmp_path, capsys, state_records_rows, run_args):
    """Killed after step 4 was logged with the newest checkpoint at step 2: the resume drops
    the rows of steps 3-4 (and the final validation) before it logs them again. A checkpoint
    that does not record its log rows is cut back by step."""
    run = copy_run(base_run, tmp_path)
    shutil.rmtree(run / "checkpoints" / "step_00000004")
    os.remove(run / "checkpoints" / "latest")
    os.remove(run / "final.json")
    if not state_records_rows:
        state_file = run / "checkpoints" / "step_00000002" / "state.json"
        state = json.loads(state_file.read_text())
        del state["log_rows"]
        state_file.write_text(json.dumps(state))
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "kind": "tr')                  # a row torn by the kill
    main(run_args(run, "--max-steps", "4", "--resume", *STEPS))
    assert "removed 3 metrics.jsonl rows logged after step_00000002" in capsys.readouterr().err
    assert logged_steps(run) == logged_steps(base_run) == {"train": [2, 4], "val": [4]}


@pytest.mark.hostile
def test_a_finished_run_resumed_logs_its_final_validation_once(base_run, tmp_path, run_args):
    run = copy_run(base_run, tmp_path)
    main(run_args(run, "--max-steps", "4", "--resume", *STEPS))
    main(run_args(run, "--max-steps", "6", "--save-every", "2", "--resume", *STEPS))
    steps = logged_steps(run)
    assert steps == {"train": [2, 4, 6], "val": [6]} and all(map(strictly_increasing, steps.values()))


@pytest.mark.hostile
def test_a_resume_without_a_checkpoint_starts_the_log_over(base_run, tmp_path, run_args):
    run = copy_run(base_run, tmp_path)
    shutil.rmtree(run / "checkpoints")
    main(run_args(run, "--max-steps", "2", "--resume", *STEPS))
    assert logged_steps(run) == {"train": [2], "val": [2]}


# --- latest missing or broken, a corrupt checkpoint -----------------------------------------

def break_run(run, how):
    root = run / "checkpoints"
    if how == "latest missing":
        os.remove(root / "latest")
    elif how == "latest dangling":
        (root / "latest").write_text("step_00000099\n")
    elif how == "latest garbage":
        (root / "latest").write_bytes(b"\x00\xff garbage")
    elif how == "truncated weights":
        path = root / "step_00000004" / "model.safetensors"
        path.write_bytes(path.read_bytes()[:-100])
        return str(path)
    elif how == "garbage state":
        (root / "step_00000004" / "state.json").write_text("{not json")
        return str(root / "step_00000004" / "state.json")
    elif how == "truncated optimizer header":
        (root / "step_00000004" / "optimizer.safetensors").write_bytes(b"\x10\x00")
        return str(root / "step_00000004" / "optimizer.safetensors")
    return None


@pytest.mark.hostile
@pytest.mark.parametrize("how", ["latest missing", "latest dangling", "latest garbage"])
def test_resume_finds_the_newest_checkpoint_without_latest(base_run, tmp_path, capsys, how):
    run = copy_run(base_run, tmp_path)
    break_run(run, how)
    assert checkpoint.newest_intact(str(run)) == str(run / "checkpoints" / "step_00000004")
    assert "using the newest intact one, step_00000004" in capsys.readouterr().err


@pytest.mark.hostile
@pytest.mark.parametrize("how", ["truncated weights", "garbage state", "truncated optimizer header"])
def test_a_corrupt_checkpoint_is_named_and_passed_over(base_run, tmp_path, capsys, how):
    run = copy_run(base_run, tmp_path)
    bad_file = break_run(run, how)
    with pytest.raises(ValueError, match=bad_file):
        checkpoint.check_intact(str(run / "checkpoints" / "step_00000004"))
    assert checkpoint.newest_intact(str(run)) == str(run / "checkpoints" / "step_00000002")
    assert f"checkpoint {run / 'checkpoints' / 'step_00000004'} is corrupt" in capsys.readouterr().err
    # evaluating that checkpoint itself: status 2 and the file's name; the run folder: the intact one
    assert bad_file in exit_message(capsys, evaluate.main, ["--checkpoint", str(run / "checkpoints" / "step_00000004")])
    results = evaluate.main(["--checkpoint", str(run)])
    assert "step_00000002" in capsys.readouterr().out and "i2t" in results


@pytest.mark.hostile
def test_resume_passes_over_a_corrupt_latest_and_cleans_killed_saves(base_run, tmp_path, capsys, run_args):
    """One resume with a truncated newest checkpoint, a dangling `latest` and the temporary
    folder of a killed save: continues from step 2, says so, removes the leftover."""
    run = copy_run(base_run, tmp_path)
    bad_file = break_run(run, "truncated weights")
    (run / "checkpoints" / "latest").write_text("step_00000099\n")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = run / "checkpoints" / f".step_00000006.tmp{dead.pid}"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half")
    main(run_args(run, "--max-steps", "4", "--save-every", "2", "--resume", *STEPS))
    out, err = capsys.readouterr()
    assert bad_file in err and "resumed from" in out and "step_00000002 at step 2" in out
    assert f"removed {stale}" in err and not stale.exists()
    assert checkpoint.read_state(checkpoint.newest_intact(str(run)))["step"] == 4
    torch.testing.assert_close(load_file(run / "checkpoints" / "step_00000004" / "model.safetensors"),
                               load_file(base_run / "checkpoints" / "step_00000004" / "model.safetensors"),
                               rtol=0, atol=0)


# --- every value checked before any work ----------------------------------------------------

@pytest.mark.hostile
@pytest.mark.parametrize("argv, message", [
    (["--batch-size", "-8"], "--batch-size must be >= 1, got -8"),
    (["--batch-size", "0"], "--batch-size must be >= 1, got 0"),
    (["--device", "tpu"], "--device 'tpu' is not one of: auto, cpu, cuda, cuda:N"),
    (["--max-steps", "0"], "--max-steps must be >= 1"),
    (["--keep-checkpoints", "0"], "--keep-checkpoints must be >= 1"),
])
def test_bad_sizes_and_devices_exit_2_before_any_work(tmp_path, capsys, argv, message, run_args):
    assert message in exit_message(capsys, main, run_args(tmp_path / "run", *argv))
    assert not (tmp_path / "run").exists()


@pytest.mark.hostile
def test_bad_paths_exit_2_before_any_work(tmp_path, capsys, run_args):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    assert "is a file, not a folder" in exit_message(capsys, main, run_args(a_file))
    run = tmp_path / "run"
    for flags, message in [(["--image-weights", str(tmp_path / "vit.pth")], "--image-weights"),
                           (["--text-weights", str(tmp_path / "bert")], "--text-weights"),
                           (["--tokenizer", str(tmp_path / "tok")], "--tokenizer"),
                           (["--data", "openi", "--data-root", str(tmp_path / "nowhere")], "--data-root")]:
        assert message in exit_message(capsys, main, run_args(run, *flags))
    if not torch.cuda.is_available():
        assert "no CUDA device is available" in exit_message(capsys, main, run_args(run, "--device", "cuda"))
    assert not run.exists()


@pytest.mark.hostile
def test_library_entry_checks_a_config_changed_after_it_was_built(tmp_path):
    cfg = TrainConfig(out_dir=str(tmp_path / "r"))
    cfg.batch_size = -8
    with pytest.raises(InputError, match="--batch-size must be >= 1, got -8"):
        check_inputs(cfg)


@pytest.mark.hostile
@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root writes anywhere")
def test_unwritable_out_dir_is_refused(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        with pytest.raises(InputError, match="not a writable folder"):
            check_inputs(TrainConfig(out_dir=str(locked / "run")))
    finally:
        locked.chmod(0o700)


@pytest.mark.hostile
def test_bad_evaluate_values_exit_2(base_run, tmp_path, capsys):
    for argv, message in [(["--protocol", "7x100"], "invalid choice: '7x100'"),
                          (["--per-class", "0"], "invalid positive integer value: '0'"),
                          (["--device", "tpu"], "--device 'tpu'"),
                          (["--output", str(tmp_path / "no" / "x.json")], "its folder does not exist"),
                          (["--random-init", "-1"], "--random-init -1: expected a seed >= 0")]:
        assert message in exit_message(capsys, evaluate.main, ["--checkpoint", str(base_run), *argv])


# --- evaluate reads the checkpoint's own tokenizer ------------------------------------------

@pytest.mark.hostile
def test_evaluate_uses_the_tokenizer_of_the_checkpoints_own_run_folder(base_run, tmp_path, monkeypatch):
    """A run trained with --out-dir run (relative), moved, and evaluated from a folder where
    run/tokenizer is another run's: the checkpoint's own run folder wins."""
    moved = copy_run(base_run, tmp_path)
    state_file = os.path.join(checkpoint.newest_intact(str(moved)), "state.json")
    state = json.load(open(state_file))
    state["config"]["out_dir"] = "run"
    with open(state_file, "w") as f:
        json.dump(state, f)
    elsewhere = tmp_path / "elsewhere"
    shipped_tokenizer().save_pretrained(str(elsewhere / "run" / "tokenizer"))  # another vocabulary
    monkeypatch.chdir(elsewhere)
    _, _, tokenizer, _, _ = load_trained(str(moved))
    own = load_tokenizer(str(moved / "tokenizer")).get_vocab()
    assert tokenizer.get_vocab() == own != shipped_tokenizer().get_vocab()


# --- the shipped vocabulary makes default runs repeatable ------------------------------------

@pytest.mark.hostile
def test_two_runs_with_the_default_tokenizer_give_the_same_figures(tmp_path, run_args):
    tiny = [a for a in run_args(tmp_path / "a") if a not in ("--vocab-size", "200")]
    flags = ["--max-steps", "2", *STEPS]
    first = main(tiny + flags)
    second = main([a if a != str(tmp_path / "a") else str(tmp_path / "b") for a in tiny] + flags)
    assert first == second
    assert load_tokenizer(str(tmp_path / "a" / "tokenizer")).get_vocab() == \
        load_tokenizer(str(tmp_path / "b" / "tokenizer")).get_vocab()
    assert len(load_tokenizer(str(tmp_path / "a" / "tokenizer"))) == 569
