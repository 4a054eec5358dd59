"""mcr_kernels.compile_check: one real compile for sm_90 (no GPU needed), the parsers of ptxas and
cuobjdump output, the launch-fit arithmetic, and that every COMPILE_SPECS entry builds a source.

The compiles run in a subprocess without TRITON_INTERPRET (conftest sets it for this process,
and the kernel modules pick interpreter-only configs under it).
"""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

pytest.importorskip("triton")
from mcr_kernels import compile_check  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

PTXAS_LOG = """ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function '_attn_bwd_dq' for 'sm_90a'
ptxas info    : Function properties for _attn_bwd_dq
    0 bytes stack frame, 32 bytes spill stores, 40 bytes spill loads
ptxas info    : Used 255 registers, used 1 barriers, 1024 bytes smem, 524 bytes cmem[0]
"""

CUOBJDUMP = """
Fatbin elf code:
================
arch = sm_80
code version = [1,8]

Resource usage:
 Common:
  GLOBAL:28 CONSTANT[4]:224
 Function _ZN3mcr12gather_rowsIfEEvPKT_:
  REG:18 STACK:0 SHARED:0 LOCAL:0 CONSTANT[0]:408 TEXTURE:0 SURFACE:0 SAMPLER:0

Fatbin elf code:
================
arch = sm_90
 Function _ZN3mcr12gather_rowsIfEEvPKT_:
  REG:20 STACK:8 SHARED:16 LOCAL:4 CONSTANT[0]:408 TEXTURE:0 SURFACE:0 SAMPLER:0
"""


def run_check(*args):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, "-m", "mcr_kernels.compile_check", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)


def test_parse_ptxas():
    assert compile_check.parse_ptxas(PTXAS_LOG) == dict(registers=255, static_shared=1024, stack=0,
                                                        spill_stores=32, spill_loads=40)
    with pytest.raises(ValueError, match="no resource line"):
        compile_check.parse_ptxas("ptxas fatal : Unresolved extern function")


def test_parse_cuobjdump():
    rows = compile_check.parse_cuobjdump(CUOBJDUMP)
    assert rows == [(80, "_ZN3mcr12gather_rowsIfEEvPKT_", dict(REG=18, STACK=0, SHARED=0, LOCAL=0)),
                    (90, "_ZN3mcr12gather_rowsIfEEvPKT_", dict(REG=20, STACK=8, SHARED=16, LOCAL=4))]


def test_blocks_per_sm():
    # 8 warps x 255 registers: 256 per thread allocated, 8192 per warp, 8 warps per SM -> 1 block
    assert compile_check.blocks_per_sm(90, 8, 255, 0) == 1
    # 4 warps x 32 registers: 1024 per warp -> 64 warps by registers, 16 blocks; 64 KiB shared -> 2 (sm_80: 164 KiB)
    assert compile_check.blocks_per_sm(80, 4, 32, 64 * 1024) == 2
    assert compile_check.blocks_per_sm(90, 4, 32, 64 * 1024) == 3
    # over a limit: cannot launch
    assert compile_check.blocks_per_sm(90, 4, 256, 0) == 0                  # > 255 registers
    assert compile_check.blocks_per_sm(80, 4, 64, 164 * 1024) == 0          # > 163 KiB per block on sm_80
    assert compile_check.blocks_per_sm(90, 4, 64, 164 * 1024) == 1          # fits sm_90's 227 KiB
    assert compile_check.blocks_per_sm(90, 1, 16, 0) == 32                  # the 32-block cap


def test_every_spec_builds_and_lists():
    """Every COMPILE_SPECS entry names all constexprs of its kernel (a missing one fails here)."""
    result = run_check("--list")
    assert result.returncode == 0, result.stderr[-2000:]
    listed = result.stdout.splitlines()
    for module in ("attention", "mba", "patch_drop"):
        assert any(line.startswith(module + ".") for line in listed), module
    assert any("_attn_bwd_dq sm_90 fp32" in line for line in listed)


def test_compile_one_kernel_for_sm90():
    result = run_check("--subset", "--kernel", "_gather_rows_kernel", "--arch", "90", "--no-cuda", "--json", "-")
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout)
    assert report["environment"]["triton"]
    (row,) = report["rows"]
    assert (row["kernel"], row["arch"], row["dtype"], row["error"]) == ("_gather_rows_kernel", 90, "bf16", "")
    assert 8 <= row["registers"] <= 255 and row["spill_stores"] == row["spill_loads"] == 0
    assert row["shared"] == 0 and row["fits"] and row["blocks_per_sm"] >= 1
    assert "BLOCK_D=1024" in row["config"]


def test_refuses_the_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    result = subprocess.run([sys.executable, "-m", "mcr_kernels.compile_check", "--list"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode != 0 and "unset TRITON_INTERPRET" in result.stderr


def test_interrupt_with_jobs_stops_promptly_and_reports_incomplete(tmp_path):
    """SIGINT to the parent (timeout -s INT) during a --jobs 2 run: the workers are terminated,
    the rows so far are kept, exit 1 (incomplete) within seconds; it used to hang."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)  # cold: the attention compiles take seconds each
    args = ["--kernel", "_attn_fwd", "--dtype", "fp32", "--jobs", "2", "--no-cuda"]
    # SIGINT back to its default in the child: a shell's background job (CI under nohup ... &) ignores
    # it, and Python started with it ignored never raises KeyboardInterrupt
    command = [sys.executable, "-X", "faulthandler", "-m", "mcr_kernels.compile_check", *args]
    proc = subprocess.Popen(command, cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    first = proc.stdout.readline()  # one configuration compiled: the pool is busy
    assert first.startswith("[1/"), first
    proc.send_signal(signal.SIGINT)  # the parent alone, as `timeout -s INT` does
    start = time.perf_counter()
    try:
        out, _ = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGABRT)  # faulthandler prints where the parent hangs
        time.sleep(2)
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        raise AssertionError(f"compile_check --jobs 2 did not stop within 60 s of SIGINT:\n{out[-4000:]}") from None
    assert time.perf_counter() - start < 5, "the workers' compiles were waited for"
    assert proc.returncode == 1 and "interrupted after" in out and "INCOMPLETE" in out, out[-2000:]


def test_a_variant_compiles_only_for_the_archs_its_launcher_uses_it_on():
    from mcr_kernels.triton import local_matching as lm

    jobs = [job for spec in lm.COMPILE_SPECS if spec["kernel"] is lm._bwd_img_kernel
            for job in compile_check.expand("local_matching", spec)]
    tensor_core = {(job["arch"], job["constexprs"]["BLOCK_L"]) for job in jobs if job["constexprs"]["PREC"] == "tf32"}
    assert tensor_core == {(90, 128), (80, 64)}  # sm_80 cannot hold the 128 x 128 backward with tf32
    exact = {(job["arch"], job["constexprs"]["BLOCK_L"]) for job in jobs if job["constexprs"]["PREC"] == "ieee"}
    assert exact == {(80, 128), (90, 128)}
