"""benchmarks/bench_train_step.py --flops: the FLOP count behind the time ratios of docs/performance.md
(deterministic, so it can be asserted): MCR does less arithmetic than the plain peer of the
same model, which does less than dual-stream."""
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_flops_order_mcr_below_peer_below_dual_stream():
    result = subprocess.run([sys.executable, "benchmarks/bench_train_step.py", "--flops", "--shapes", "small:2",
                             "--no-write", "--threads", "1"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [line.split() for line in result.stdout.splitlines() if line.strip().startswith("small")]
    gflops = {row[2]: float(row[3]) for row in rows}
    assert set(gflops) == {"mcr", "peer", "dual-stream"}
    assert 0 < gflops["mcr"] < gflops["peer"] < gflops["dual-stream"], gflops
