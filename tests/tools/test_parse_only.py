"""benchmarks/parse_only.py: a benchmark's own parser on a step's arguments, nothing run
(what gpu_proof.sh --dry-run checks each step with)."""
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]


def parse_only(*args):
    return subprocess.run([sys.executable, "benchmarks/parse_only.py", "benchmarks/bench_train_step.py", *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_arguments_the_benchmark_takes_parse_and_nothing_runs():
    result = parse_only("--shapes", "paper:64", "--repeats", "3")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "'shapes': 'paper:64'" in result.stdout and "step_ms" not in result.stdout


def test_arguments_it_does_not_take_fail_naming_them():
    result = parse_only("--presets", "paper")
    assert result.returncode == 2 and "--presets" in result.stderr
