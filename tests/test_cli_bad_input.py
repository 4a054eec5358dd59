"""Bad input to every CLI: config values of the wrong type or out of range (from YAML and
flags), junk config files, missing and unusable weights. Each exits with status 2 and one
line naming the field, flag or file, without a traceback and before anything is written."""

import pytest
import yaml

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
