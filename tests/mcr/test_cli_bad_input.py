"""Bad input to every CLI: config values of the wrong type or out of range (from YAML and
flags), junk config files, missing and unusable weights. Each exits with status 2 and one
line naming the field, flag or file, without a traceback and before anything is written."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
import yaml
from safetensors.torch import save_file

from mcr import cli
from mcr.config import TrainConfig


def refused(capsys, argv):
    """stderr of cli.parse_train_args(argv), which must exit with status 2 and one line."""
    with pytest.raises(SystemExit) as exit_info:
        cli.parse_train_args(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1, err
    return err


@pytest.mark.parametrize("text, message", [
    ("batch_size: eight", "--batch-size expects an integer, got 'eight' (str)"),
    ('lr: "fast"', "--lr expects a finite number, got 'fast' (str)"),
    ("model: 5", "model expects a mapping of ModelConfig fields (field: value), got 5 (int)"),
    ("model: [vit_depth]", "model expects a mapping of ModelConfig fields"),
    ("max_steps: 1e400", "--max-steps expects an integer, got '1e400' (str)"),  # YAML 1.1 reads it as text
    ("max_steps: 1.0e+400", "--max-steps expects an integer, got inf"),
    ("max_steps: 100000000000000000000000", "--max-steps expects an integer, got 100000000000000000000000 "
                                            "(out of range)"),
    ("out_dir: 12", "--out-dir expects a string, got 12"),
    ('pictures: "no"', "--pictures expects true or false, got 'no' (str)"),
    ("pictures: 1", "--pictures expects true or false, got 1"),
    ("batch_size: 8.5", "--batch-size expects an integer, got 8.5"),
    ("batch_size: true", "--batch-size expects an integer, got True"),
    ("lr: .nan", "--lr expects a finite number, got nan"),
    ("lr: .inf", "--lr expects a finite number, got inf"),
    ("grad_clip: -.inf", "--grad-clip expects a finite number, got -inf"),
    ("model: {vit_depth: 2.5}", "--vit-depth expects an integer, got 2.5"),
    ("model: {init_temperature: .nan}", "--init-temperature expects a finite number, got nan"),
    ("vit_width: wide", "--vit-width expects an integer, got 'wide' (str)"),
    ("preset: [small]", "--preset expects a string, got ['small'] (list)"),
    ("1: 2", "unknown config fields [1]"),
    ("- batch_size", "expected a mapping of field: value, got list"),
    ("batch_size: [", "while parsing a flow"),
])
def test_config_file_values_are_checked_before_any_work(tmp_path, capsys, text, message):
    path = tmp_path / "c.yaml"
    path.write_text(text + "\n")
    assert f"--config {path}: {message}" in refused(capsys, ["--config", str(path), "--out-dir", str(tmp_path / "r")])
    assert not (tmp_path / "r").exists()


def test_config_file_that_is_not_utf8_is_named(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_bytes(b"lr: \xff\n")
    assert f"--config {path}: not UTF-8 text" in refused(capsys, ["--config", str(path)])


@pytest.mark.parametrize("argv, message", [
    (["--lr", "inf"], "--lr expects a finite number, got inf"),
    (["--lr", "nan"], "--lr expects a finite number, got nan"),
    (["--max-minutes=-inf"], "--max-minutes expects a finite number, got -inf"),
    (["--srm-mix", "nan"], "--srm-mix expects a finite number, got nan"),
    (["--seed", "99999999999999999999"], "--seed expects an integer, got 99999999999999999999 (out of range)"),
])
def test_non_finite_and_overflowing_flags_are_refused(capsys, argv, message):
    assert message in refused(capsys, argv)


def test_integral_floats_and_yaml_booleans_are_read_as_their_field_type(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("batch_size: 8.0\npictures: no\nlr: 1\nmodel: {vit_depth: 2.0}\n")
    cfg = cli.parse_train_args(["--config", str(path)])
    assert cfg.batch_size == 8 and type(cfg.batch_size) is int
    assert cfg.pictures is False and type(cfg.lr) is float and cfg.model.vit_depth == 2
    assert yaml.safe_load(yaml.safe_dump(cfg.batch_size)) == 8


def test_library_configs_check_types_too():
    with pytest.raises(ValueError, match=r"--batch-size expects an integer, got '8' \(str\)"):
        TrainConfig(batch_size="8")
    with pytest.raises(ValueError, match="--lr expects a finite number, got nan"):
        TrainConfig(lr=float("nan"))
    with pytest.raises(ValueError, match="--text-mask-replace expects true or false"):
        TrainConfig(model={"text_mask_replace": "no"})
    import numpy as np

    cfg = TrainConfig(batch_size=np.int64(8), lr=np.float32(0.5), model={"vit_depth": np.int64(2)})
    assert (type(cfg.batch_size), type(cfg.lr), type(cfg.model.vit_depth)) == (int, float, int)


# --- every CLI over a table of bad inputs, as a user runs it ------------------------------

class Payload:
    """A pickled object that is not a tensor: weights_only loading must refuse it."""

    def __reduce__(self):
        return (print, ("unpickled!",))


def bert_folder(path, config):
    """A folder with config.json (a dict, or raw text) and no weights yet."""
    os.makedirs(path)
    with open(os.path.join(path, "config.json"), "w") as f:
        f.write(config if isinstance(config, str) else json.dumps(config))
    return path


@pytest.fixture(scope="module")
def bad(tmp_path_factory, tiny_run_module):
    """{placeholder: path} of the bad inputs the table names (and a good run to point at)."""
    from timm.models.vision_transformer import VisionTransformer
    from transformers import BertConfig, BertModel

    from mcr.data.fake import make_mimic_tree
    from mcr.data.tokenizer import train_wordpiece

    root = tmp_path_factory.mktemp("bad")
    p = {"tmp": str(root), "run": str(tiny_run_module)}
    (root / "list.yaml").write_text("- batch_size\n")
    (root / "types.yaml").write_text("batch_size: eight\npictures: \"no\"\n")
    (root / "model.yaml").write_text("model: 5\n")
    (root / "latin1.yaml").write_bytes(b"out_dir: caf\xe9\n")
    (root / "garbage.safetensors").write_bytes(b"\x00garbage" * 8)
    (root / "image.png").write_bytes(b"not a PNG")
    torch.save({"model": {"w": torch.zeros(1)}, "args": Payload()}, root / "pickled.pth")
    save_file({"w": torch.zeros(2)}, root / "not-a-vit.safetensors")
    vit = VisionTransformer(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=2, num_classes=0)
    save_file({k: v.contiguous() for k, v in vit.state_dict().items()}, root / "vit.safetensors")
    bert_folder(root / "bert-no-config", "{}") and os.remove(root / "bert-no-config" / "config.json")
    bert_folder(root / "bert-bad-json", "{not json")
    bert_folder(root / "gpt2", {"model_type": "gpt2", "n_embd": 32})
    bert_folder(root / "bert-no-weights", BertConfig(hidden_size=32, num_attention_heads=2).to_dict())
    bert_folder(root / "bert-garbage", BertConfig(hidden_size=32, num_attention_heads=2).to_dict())
    shutil.copy(root / "garbage.safetensors", root / "bert-garbage" / "model.safetensors")
    bert_folder(root / "bert-pickled", BertConfig(hidden_size=32, num_attention_heads=2).to_dict())
    shutil.copy(root / "pickled.pth", root / "bert-pickled" / "pytorch_model.bin")
    tok = train_wordpiece([f"FINDINGS: finding number {i}. IMPRESSION: normal." for i in range(50)], 90)
    tok.save_pretrained(root / "bert")
    BertModel(BertConfig(vocab_size=len(tok), hidden_size=48, num_hidden_layers=3, num_attention_heads=3,
                         intermediate_size=96)).save_pretrained(root / "bert")
    mimic = make_mimic_tree(str(root / "mimic"), image_size=48)
    path = os.path.join(mimic, "mimic-cxr-2.0.0-metadata.csv")
    with open(path) as f:
        lines = f.read().splitlines()
    with open(path, "w") as f:
        f.write("\n".join(line.rsplit(",", 1)[0] for line in lines) + "\n")  # no ViewPosition
    p["mimic"] = mimic
    return p


@pytest.fixture(scope="module")
def tiny_run_module(tmp_path_factory):
    """A run folder trained for one step (what evaluate, plot and retrieve are pointed at)."""
    from mcr.train import main

    out = tmp_path_factory.mktemp("run")
    main(["--image-size", "32", "--vit-width", "32", "--vit-depth", "1", "--vit-heads", "2", "--decoder-width", "32",
          "--decoder-depth", "1", "--decoder-heads", "2", "--text-width", "32", "--text-depth", "1", "--text-heads",
          "2", "--text-intermediate", "64", "--embed-dim", "16", "--train-size", "16", "--val-size", "8",
          "--batch-size", "8", "--max-steps", "1", "--eval-every", "0", "--no-pictures", "--out-dir", str(out)])
    return out


TRAIN = ["mcr.train", "--out-dir", "{out}"]
ROWS = [
    # mcr.train: config files and values
    (TRAIN + ["--config", "{tmp}/nowhere.yaml"], "--config {tmp}/nowhere.yaml"),
    (TRAIN + ["--config", "{tmp}/list.yaml"], "expected a mapping of field: value"),
    (TRAIN + ["--config", "{tmp}/types.yaml"], "--batch-size expects an integer, got 'eight'"),
    (TRAIN + ["--config", "{tmp}/model.yaml"], "model expects a mapping of ModelConfig fields"),
    (TRAIN + ["--config", "{tmp}/latin1.yaml"], "not UTF-8 text"),
    (TRAIN + ["--lr", "nan"], "--lr expects a finite number, got nan"),
    (TRAIN + ["--lr", "inf"], "--lr expects a finite number, got inf"),
    (TRAIN + ["--batch-size", "8.5"], "argument --batch-size: invalid int value: '8.5'"),
    (TRAIN + ["--preset", "huge"], "argument --preset: invalid choice"),
    # mcr.train: pretrained weights
    (TRAIN + ["--text-weights", "{tmp}/nowhere"], "--text-weights '{tmp}/nowhere' does not exist"),
    (TRAIN + ["--text-weights", "{tmp}/bert-no-config"], "has no config.json"),
    (TRAIN + ["--text-weights", "{tmp}/bert-bad-json"], "not a readable JSON config"),
    (TRAIN + ["--text-weights", "{tmp}/gpt2"], "model_type 'gpt2', not a BERT model"),
    (TRAIN + ["--text-weights", "{tmp}/bert-no-weights"], "has no *.safetensors or pytorch_model*.bin"),
    (TRAIN + ["--text-weights", "{tmp}/bert-garbage"], "is not a readable .safetensors file"),
    (TRAIN + ["--text-weights", "{tmp}/bert-pickled"], "is not a weights-only checkpoint"),
    (TRAIN + ["--text-weights", "{tmp}/bert", "--tokenizer", "{tmp}/bert", "--text-depth", "2"],
     "--text-depth 2 contradicts --text-weights {tmp}/bert (config.json), which has 3"),
    (TRAIN + ["--text-weights", "{tmp}/bert"], "needs the tokenizer it was trained with"),
    (TRAIN + ["--image-weights", "{tmp}/nowhere.pth"], "--image-weights '{tmp}/nowhere.pth' does not exist"),
    (TRAIN + ["--image-weights", "{tmp}/garbage.safetensors"], "is not a readable .safetensors file"),
    (TRAIN + ["--image-weights", "{tmp}/pickled.pth"], "is not a weights-only checkpoint"),
    (TRAIN + ["--image-weights", "{tmp}/not-a-vit.safetensors"], "not a timm or MAE ViT checkpoint"),
    (TRAIN + ["--image-weights", "{tmp}/vit.safetensors", "--vit-width", "64"],
     "--vit-width 64 contradicts --image-weights {tmp}/vit.safetensors, which has 48"),
    # mcr.train: data
    (TRAIN + ["--data", "mimic-cxr", "--data-root", "{tmp}/nowhere"], "--data-root"),
    (TRAIN + ["--data", "mimic-cxr", "--data-root", "{mimic}"], "no column 'ViewPosition'"),
    # mcr.evaluate
    (["mcr.evaluate", "--checkpoint", "{tmp}/nowhere"], "does not exist"),
    (["mcr.evaluate", "--checkpoint", "{tmp}"], "holds no intact checkpoint"),
    (["mcr.evaluate", "--checkpoint", "{run}", "--size", "0"], "argument --size"),
    (["mcr.evaluate", "--checkpoint", "{run}", "--data", "openi", "--data-root", "{tmp}/nowhere"], "--data openi"),
    (["mcr.evaluate", "--checkpoint", "{run}", "--output", "{tmp}/nowhere/e.json"], "--output"),
    (["mcr.evaluate", "--checkpoint", "{run}", "--data", "mimic-cxr", "--data-root", "{mimic}"],
     "no column 'ViewPosition'"),
    # mcr.prepare
    (["mcr.prepare", "--data", "mimic-cxr", "--data-root", "{tmp}/nowhere", "--out", "{out}"], "--data-root"),
    (["mcr.prepare", "--data", "mimic-cxr", "--data-root", "{mimic}", "--out", "{out}"], "no column 'ViewPosition'"),
    (["mcr.prepare", "--verify", "{tmp}/nowhere"], "--verify"),
    (["mcr.prepare", "--data", "openi", "--data-root", "{mimic}", "--out", "{out}", "--image-size", "8"],
     "--image-size"),
    # mcr.plot
    (["mcr.plot", "{tmp}/nowhere"], "has no metrics.jsonl"),
    (["mcr.plot", "{run}", "--size", "-1"], "--size must be >= 0"),
    (["mcr.plot", "{run}", "--out", "{tmp}/list.yaml"], "is not a folder"),
    # mcr.retrieve
    (["mcr.retrieve", "--checkpoint", "{tmp}/nowhere", "--report", "effusion"], "--checkpoint"),
    (["mcr.retrieve", "--checkpoint", "{run}", "--image", "{tmp}/nowhere.png"], "--image"),
    (["mcr.retrieve", "--checkpoint", "{run}", "--image", "{tmp}/image.png"], "--image"),
    (["mcr.retrieve", "--checkpoint", "{run}", "--report", ""], "--report must be a non-empty text"),
    (["mcr.retrieve", "--checkpoint", "{run}", "--report", "effusion", "--k", "0"], "--k must be >= 1"),
    (["mcr.retrieve", "--checkpoint", "{run}", "--report", "effusion", "--gallery", "{tmp}/nowhere"],
     "--gallery"),
]


def run_cli(module, argv):
    """(exit status, stdout + stderr, stderr) of `python -m <module> argv` run in this process
    (the module's main; an exception it lets out fails the test with its traceback)."""
    import importlib
    import io
    from contextlib import redirect_stderr, redirect_stdout

    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        try:
            status = importlib.import_module(module).main(argv)
            status = status if isinstance(status, int) else 0
        except SystemExit as stop:
            status = stop.code
    return status, out.getvalue() + err.getvalue(), err.getvalue()


def check_refused(bad, status, output, stderr, message):
    assert "Traceback" not in output and status == 2, output
    error_lines = [line for line in stderr.splitlines() if ": error: " in line]
    assert len(error_lines) == 1 and message.format(**bad) in error_lines[0], stderr
    assert "unpickled!" not in output
    assert not os.path.exists(bad["out"])


@pytest.mark.parametrize("argv, message", ROWS)
def test_each_cli_refuses_bad_input_with_one_line_and_status_2(bad, tmp_path, monkeypatch, argv, message):
    bad = {**bad, "out": str(tmp_path / "out")}  # each row's own: nothing may be written there
    monkeypatch.chdir(tmp_path)  # nor by default into the repository
    module, *argv = [a.format(**bad) for a in argv]
    check_refused(bad, *run_cli(module, argv), message)


ENTRY_ROWS = [next(row for row in ROWS if isinstance(row, tuple) and row[0][0] == module and "{run}" not in row[0])
              for module in ("mcr.train", "mcr.evaluate", "mcr.prepare", "mcr.plot", "mcr.retrieve")]


@pytest.mark.parametrize("argv, message", ENTRY_ROWS + [ROWS[12]])
def test_the_console_entry_points_exit_2_without_a_traceback(bad, tmp_path, argv, message):
    """A few rows as the shell runs them: `python -m` and its exit status."""
    bad = {**bad, "out": str(tmp_path / "out")}
    argv = [a.format(**bad) for a in argv]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-m", *argv], capture_output=True, text=True, timeout=600, env=env,
                          cwd=tmp_path)
    check_refused(bad, done.returncode, done.stdout + done.stderr, done.stderr, message)
