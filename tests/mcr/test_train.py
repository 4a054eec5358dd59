"""Training end to end on the synthetic corpus: the CLI, checkpoints, resume, the library
entry `train(cfg)`, and `python -m mcr.evaluate` reproducing training's figures."""
import json
import os

import pytest
import torch
import yaml
from safetensors.torch import load_file

from mcr import checkpoint, engine, evaluate, run
from mcr.config import PRESETS, TrainConfig, config_from_dict
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
