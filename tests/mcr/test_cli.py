"""Configuration and CLI: presets resolved wherever a config is built, every flag explained,
bad values refused with status 2 before any work, --config / --print-config round trip,
imports inside mcr flow one way."""
import ast
import dataclasses
import pathlib
import subprocess
import sys

import pytest
import yaml

import mcr
from mcr import cli, evaluate
from mcr.config import (
    PRESETS,
    TRAINING_PRESETS,
    VARIANTS,
    ModelConfig,
    TrainConfig,
    config_from_dict,
    config_to_dict,
    model_sections,
)


def test_a_config_built_anywhere_takes_its_preset():
    cfg = TrainConfig(preset="paper", model={"variant": "abm"}, out_dir="x")
    assert cfg.model == dataclasses.replace(PRESETS["paper"], variant="abm")
    assert cfg.model.vit_width == 768 and cfg.batch_size == 256 and cfg.loss_contrastive == 0.1
    small = TrainConfig(batch_size=16)
    assert small.model == PRESETS["small"] and small.batch_size == 16 and small.max_minutes == 8.5
    # a value given explicitly wins over the preset, even when it is the small preset's value
    assert TrainConfig(preset="paper", batch_size=32).batch_size == 32


def test_dual_stream_takes_no_unmasked_steps_from_the_preset(tmp_path):
    """The baseline reconstructs at every step, from the flags, a --config file or a dict."""
    assert cli.parse_train_args([]).unmasked_every == TRAINING_PRESETS["small"]["unmasked_every"] > 0
    assert cli.parse_train_args(["--variant", "dual-stream"]).unmasked_every == 0
    assert cli.parse_train_args(["--variant", "dual-stream", "--unmasked-every", "2"]).unmasked_every == 2
    path = tmp_path / "dual.yaml"
    path.write_text(yaml.safe_dump({"model": {"variant": "dual-stream"}}))
    assert cli.parse_train_args(["--config", str(path)]).unmasked_every == 0
    assert TrainConfig(model={"variant": "dual-stream"}).unmasked_every == 0
    assert TrainConfig(model={"variant": "dual-stream"}, unmasked_every=3).unmasked_every == 3


def test_every_preset_sets_every_field_left_to_it():
    left = {f.name for f in dataclasses.fields(TrainConfig) if f.default is None and f.name != "model"}
    for name, recipe in TRAINING_PRESETS.items():
        assert set(recipe) == left, name
    assert set(TRAINING_PRESETS) == set(PRESETS)


def test_head_activation_choices_are_what_the_head_accepts():
    from mcr_kernels import ProjectionHead

    for activation in dataclasses.fields(ModelConfig)[[f.name for f in dataclasses.fields(ModelConfig)]
                                                      .index("head_activation")].metadata["choices"]:
        ProjectionHead(4, 3, 5, activation)


def help_text(capsys, *argv):
    with pytest.raises(SystemExit) as exit_info:
        cli.parse_train_args([*argv, "--help"])
    assert exit_info.value.code == 0
    return capsys.readouterr().out


def test_every_flag_has_help_and_the_default_after_the_preset(capsys):
    text = help_text(capsys)
    sections = [(cls, prefix) for _, cls, prefix in model_sections()]
    for cls, prefix in ((TrainConfig, ""), (ModelConfig, ""), *sections):
        for f in dataclasses.fields(cls):
            if f.type is not ModelConfig and "prefix" not in f.metadata:
                assert f.metadata["help"], f.name
                assert "--" + (prefix + f.name).replace("_", "-") in text, f.name
    flat = " ".join(text.split())
    assert "--memory-slots INT mpma: slots S of MA-CMF's learned cross-modal memory (default: 16)" in flat
    assert "--local-scale-learnable, --no-local-scale-learnable" in flat
    assert "{" + ",".join(VARIANTS) + "}" in text and "{auto,bf16,fp32}" in text
    assert {"mcr", "dual-stream", "abm", "mpma", "reclf"} <= set(VARIANTS)
    assert "--resume, --no-resume" in text
    paper = " ".join(help_text(capsys, "--preset", "paper").split())
    assert "global batch, split evenly over torchrun's processes (default: 256)" in paper
    assert "ViT width (embedding dim) (default: 768)" in paper


def test_evaluate_flags_have_help(capsys):
    with pytest.raises(SystemExit):
        evaluate.main(["--help"])
    text = capsys.readouterr().out
    for action in evaluate.build_parser()._actions:
        assert action.help, action.dest
    assert "{full,5x200}" in text


@pytest.mark.parametrize("argv, message", [
    (["--variant", "nope"],
     "argument --variant: invalid choice: 'nope' (choose from " + ", ".join(f"'{v}'" for v in VARIANTS) + ")"),
    (["--preset", "huge"], "argument --preset: invalid choice: 'huge'"),
    (["--precision", "fp16"], "argument --precision: invalid choice: 'fp16'"),
    (["--data", "foo"], "argument --data: invalid choice: 'foo'"),
    (["--head-activation", "swish"], "argument --head-activation: invalid choice: 'swish'"),
    (["--compile-backend", "tvm"], "argument --compile-backend: invalid choice"),
    (["--resume", "maybe"], "unrecognized arguments: maybe"),
    (["--batch-size", "-8"], "--batch-size must be >= 1, got -8"),
    (["--image-size", "40"], "--image-size 40 must be a multiple of --patch-size 16"),
    (["--resume", "--overwrite"], "--resume and --overwrite exclude each other"),
    (["--data", "mimic-cxr"], "--data mimic-cxr needs --data-root DIR"),
    (["--image-mask-ratio", "1.5"], "--image-mask-ratio must be in (0, 1)"),
])
def test_bad_values_exit_2_with_one_line(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.parse_train_args(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err


def test_bad_values_from_the_shell_exit_2_before_any_work(tmp_path):
    """The console entry itself: nothing is written, the message names the flag."""
    out = tmp_path / "run"
    done = subprocess.run([sys.executable, "-m", "mcr.train", "--variant", "nope", "--out-dir", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 2 and "'mcr', 'dual-stream', 'abm'" in done.stderr
    assert not out.exists()


def test_print_config_round_trips_through_config(tmp_path, capsys):
    argv = ["--preset", "paper", "--variant", "abm", "--batch-size", "48", "--no-image-conditioned-mrm",
            "--out-dir", str(tmp_path / "r")]
    with pytest.raises(SystemExit) as exit_info:
        cli.parse_train_args([*argv, "--print-config"])
    assert exit_info.value.code == 0
    printed = capsys.readouterr().out
    path = tmp_path / "c.yaml"
    path.write_text(printed)
    with pytest.raises(SystemExit):
        cli.parse_train_args(["--config", str(path), "--print-config"])
    assert capsys.readouterr().out == printed
    cfg = cli.parse_train_args(["--config", str(path)])
    assert cfg == cli.parse_train_args(argv)
    assert cfg.model.variant == "abm" and cfg.batch_size == 48 and cfg.model.vit_width == 768
    assert not cfg.model.image_conditioned_mrm
    # flags override the file
    assert cli.parse_train_args(["--config", str(path), "--batch-size", "64"]).batch_size == 64


def test_config_file_errors_name_the_file(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text("batch_size: 8\nbatch_sise: 9\n")
    with pytest.raises(SystemExit) as exit_info:
        cli.parse_train_args(["--config", str(path)])
    assert exit_info.value.code == 2
    assert f"--config {path}: unknown config fields ['batch_sise']" in capsys.readouterr().err


def test_config_dict_round_trip_and_old_checkpoints():
    cfg = TrainConfig(preset="paper", model={"variant": "dual-stream", "vit_depth": 2})
    assert config_from_dict(yaml.safe_load(yaml.safe_dump(config_to_dict(cfg)))) == cfg
    old = config_to_dict(TrainConfig())
    old["variant"] = old["model"].pop("variant")  # state.json before variant moved into the model
    old["variant"] = "abm"
    assert config_from_dict(old).model.variant == "abm"


def mcr_imports():
    """{module: set of mcr modules it imports (anywhere in the file)} for the mcr package."""
    root = pathlib.Path(mcr.__file__).parent
    graph = {}
    for path in root.rglob("*.py"):
        name = ".".join(path.relative_to(root.parent).with_suffix("").parts).removesuffix(".__init__")
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                deps |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module:
                deps.add(node.module)
                deps |= {f"{node.module}.{a.name}" for a in node.names}
        graph[name] = deps
    return {m: {d for d in deps if d in graph and d != m} for m, deps in graph.items()}


def test_no_import_cycle_inside_mcr():
    graph = mcr_imports()
    state = {}

    def visit(module, path):
        state[module] = "open"
        for dep in sorted(graph[module]):
            if state.get(dep) == "open":
                cycle = path[path.index(dep):] + [dep]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if dep not in state:
                visit(dep, path + [dep])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert graph["mcr.engine"] and "mcr.run" in graph["mcr.train"]  # the walk saw real imports


def test_nothing_imports_the_clis():
    for module, deps in mcr_imports().items():
        assert not deps & {"mcr.train", "mcr.evaluate", "mcr.prepare"}, module


def test_variant_section_flags_set_the_nested_config(tmp_path, capsys):
    """The variant settings live in ModelConfig.local / .mpma / .reclf; their flags keep their
    flat names, --print-config writes them nested, and a flat config.yaml (written before the
    sections) still reads."""
    cfg = cli.parse_train_args(["--variant", "mpma", "--memory-slots", "3", "--local-attn-scale", "2.5",
                                "--srm-mix", "0.25", "--local-scale-learnable"])
    assert (cfg.model.mpma.memory_slots, cfg.model.local.attn_scale, cfg.model.reclf.srm_mix) == (3, 2.5, 0.25)
    assert cfg.model.local.scale_learnable and cfg.model.mpma.memory_depth == 1
    with pytest.raises(SystemExit) as exit_info:
        cli.parse_train_args(["--memory-slots", "3", "--print-config"])
    assert exit_info.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["mpma"] == {"memory_slots": 3, "memory_depth": 1} and "memory_slots" not in printed["model"]
    flat = {**printed, "model": {k: v for k, v in printed["model"].items() if k not in ("local", "mpma", "reclf")}}
    flat["model"].update(memory_slots=5, local_agg_scale=7.0, irm_hidden=8)
    path = tmp_path / "old.yaml"
    path.write_text(yaml.safe_dump(flat))
    cfg = cli.parse_train_args(["--config", str(path)])
    assert (cfg.model.mpma.memory_slots, cfg.model.local.agg_scale, cfg.model.reclf.irm_hidden) == (5, 7.0, 8)
    with pytest.raises(SystemExit) as exit_info:
        cli.parse_train_args(["--memory-slots", "0"])
    assert exit_info.value.code == 2
    assert "--memory-slots must be >= 1, got 0" in capsys.readouterr().err
