"""The training CLI end to end on the synthetic corpus: smoke, checkpoints, resume, errors."""
import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file

from mcr import checkpoint, evaluate
from mcr.train import main, parse_args, train

TINY_FLAGS = ["--image-size", "32", "--vit-width", "32", "--vit-depth", "1", "--vit-heads", "2",
              "--decoder-width", "32", "--decoder-depth", "1", "--decoder-heads", "2", "--text-width", "32",
              "--text-depth", "1", "--text-heads", "2", "--text-intermediate", "64", "--embed-dim", "16",
              "--vocab-size", "200", "--train-size", "64", "--val-size", "24", "--batch-size", "8",
              "--log-every", "2", "--warmup-steps", "2", "--pictures", "false"]


def run_args(out_dir, *extra):
    return TINY_FLAGS + ["--out-dir", str(out_dir), *extra]


def killed_after(full, resumed, step):
    """Fill `resumed` with what a run killed after `full`'s step-`step` checkpoint left."""
    name = f"step_{step:08d}"
    os.makedirs(resumed / "checkpoints")
    shutil.copytree(full / "tokenizer", resumed / "tokenizer")
    shutil.copytree(full / "checkpoints" / name, resumed / "checkpoints" / name)
    (resumed / "checkpoints" / "latest").write_text(name + "\n")


def test_cli_smoke_writes_metrics_checkpoint_and_results(tmp_path):
    results = main(run_args(tmp_path, "--max-steps", "4", "--eval-every", "2", "--save-every", "2"))
    assert {"i2t", "t2i"} == set(results)
    assert 0 <= results["i2t"]["R@1"] <= 100
    lines = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert {line["kind"] for line in lines} == {"train", "val"}
    assert all(torch.isfinite(torch.tensor(line["loss"])) for line in lines if line["kind"] == "train")
    assert checkpoint.latest_checkpoint(tmp_path).endswith("step_00000004")
    assert os.path.isdir(tmp_path / "tokenizer")
    assert json.load(open(tmp_path / "final.json"))["step"] == 4


@pytest.mark.parametrize("variant", ["dual-stream", "abm"])
def test_cli_runs_each_variant(tmp_path, variant):
    main(run_args(tmp_path, "--max-steps", "2", "--eval-every", "0", "--variant", variant))
    assert checkpoint.read_state(checkpoint.latest_checkpoint(tmp_path))["variant"] == variant


def test_resume_continues_exactly(tmp_path):
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    main(run_args(full, "--max-steps", "6", "--save-every", "3", "--eval-every", "0", "--keep-checkpoints", "5"))
    killed_after(full, resumed, 3)
    main(run_args(resumed, "--max-steps", "6", "--save-every", "3", "--eval-every", "0", "--resume"))
    a = load_file(full / "checkpoints" / "step_00000006" / "model.safetensors")
    b = load_file(resumed / "checkpoints" / "step_00000006" / "model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)


def test_checkpoint_round_trip_and_evaluate_cli(tmp_path, capsys):
    main(run_args(tmp_path, "--max-steps", "2", "--eval-every", "0"))
    path = checkpoint.latest_checkpoint(tmp_path)
    results = evaluate.main(["--checkpoint", str(tmp_path)])
    assert "i2t" in capsys.readouterr().out
    final = json.load(open(tmp_path / "final.json"))
    assert results["i2t"]["R@1"] == pytest.approx(final["i2t"]["R@1"])
    assert os.path.isfile(os.path.join(path, "eval_val.json"))


def test_checkpoint_from_another_config_is_refused(tmp_path):
    main(run_args(tmp_path, "--max-steps", "2", "--eval-every", "0"))
    with pytest.raises(ValueError, match="vit_depth"):
        main(run_args(tmp_path, "--max-steps", "4", "--eval-every", "0", "--resume", "--vit-depth", "2"))


def test_interrupted_checkpoint_write_keeps_the_previous(tmp_path):
    main(run_args(tmp_path, "--max-steps", "2", "--eval-every", "0"))
    os.makedirs(tmp_path / "checkpoints" / ".step_00000009.tmp123")  # a write killed midway
    assert checkpoint.latest_checkpoint(tmp_path).endswith("step_00000002")


@pytest.mark.parametrize("flags, message", [
    (["--preset", "huge"], "unknown --preset"),
    (["--variant", "triple"], "unknown --variant"),
    (["--image-size", "40"], "multiple of patch_size"),
])
def test_bad_flags_are_reported(flags, message, capsys):
    with pytest.raises(SystemExit):
        parse_args(flags)
    assert message in capsys.readouterr().err


def test_bad_data_and_checkpoint_paths(tmp_path):
    with pytest.raises(ValueError, match="unknown --data"):
        train(parse_args(run_args(tmp_path, "--data", "nowhere")))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        evaluate.main(["--checkpoint", str(tmp_path / "missing")])
