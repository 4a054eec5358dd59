"""The examples/ scripts run end to end at tiny shapes (their --tiny flag) on CPU: each
patches its model (the counts it prints are non-empty) and its losses are finite."""
import ast
import importlib.util
import math
import pathlib

import pytest

EXAMPLES = pathlib.Path(__file__).resolve().parents[2] / "examples"


def load(name):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name,patched", [("hf_bert_mlm", "BertSelfAttention"),
                                          ("open_clip_contrastive", "MultiheadAttention"),
                                          ("timm_mae_step", "Attention")])
def test_example_runs(name, patched, capsys):
    final = load(name).main(["--tiny", "--steps", "2", "--batch-size", "4"])
    lines = capsys.readouterr().out.splitlines()
    counts = ast.literal_eval(lines[0].removeprefix("patched: "))
    assert counts[patched] >= 2, lines[0]
    losses = [float(line.split()[-1]) for line in lines[1:]]
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses) and math.isfinite(final)
