"""Every script under experiments/ still imports (so none rots silently) and the study runner
answers --help. A script runs with its own folder first on sys.path and reaches the runner
(experiments/study.py) through experiments/, as `python experiments/<study>/<script>.py` does."""
import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

EXPERIMENTS = Path(__file__).parents[2] / "experiments"
SCRIPTS = sorted(EXPERIMENTS.rglob("*.py"))


def test_experiments_hold_the_study_runner_and_its_scripts():
    names = {p.relative_to(EXPERIMENTS).as_posix() for p in SCRIPTS}
    assert {"study.py", "pool_studies.py", "study-2026-12-06-2000/masked_views.py",
            "study-2026-12-06-2000/costs_round10.py", "study-2026-12-03-sincos/grad_probe.py"} <= names


@pytest.mark.parametrize("path", SCRIPTS, ids=lambda p: p.relative_to(EXPERIMENTS).as_posix())
def test_every_experiment_script_imports(path, monkeypatch):
    monkeypatch.syspath_prepend(str(EXPERIMENTS))
    monkeypatch.syspath_prepend(str(path.parent))
    name = "experiment_" + "_".join(path.relative_to(EXPERIMENTS).with_suffix("").parts).replace("-", "_")
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, name, module)
    spec.loader.exec_module(module)  # a script that works at import time (not under __main__) fails here


@pytest.mark.parametrize("script", ["study.py", "pool_studies.py"])
def test_runners_answer_help(script):
    done = subprocess.run([sys.executable, EXPERIMENTS / script, "--help"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "--out" in done.stdout


def test_the_library_imports_no_experiment():
    library = Path(__file__).parents[2] / "mcr"
    imports = re.compile(r"^\s*(from|import)\s+(study|pool_studies|experiments)\b", re.MULTILINE)
    assert [p for p in library.rglob("*.py") if imports.search(p.read_text())] == []
