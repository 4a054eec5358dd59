"""torchrun: 2 CPU processes (gloo) train the same model as 1 process on the same global
batch, replicated (DDP) or sharded (--fsdp); only rank 0 writes; a 2-process run resumes
from a killed run's checkpoint; --compile."""
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from mcr import checkpoint
from mcr.run import load_trained
from mcr.train import main

STEPS = ["--max-steps", "3", "--eval-every", "0", "--lr", "3e-3"]


def torchrun(nproc, args):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "mcr.train", *args]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


def final_weights(out_dir):
    return load_file(os.path.join(checkpoint.latest_checkpoint(out_dir), "model.safetensors"))


def assert_same_weights(a, b, atol):
    assert a.keys() == b.keys()
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst <= atol, f"largest parameter difference {worst:.2e} > {atol:.0e}"


@pytest.mark.parametrize("variant", [[], ["--variant", "reclf"]], ids=["mcr", "reclf"])
def test_two_processes_train_the_one_process_model(tmp_path, run_args, variant):
    """reclf: its local loss's group (the whole batch of 8) spans both ranks' rows."""
    one, two = tmp_path / "one", tmp_path / "two"
    main(run_args(one, *STEPS, *variant, "--save-every", "1", "--keep-checkpoints", "5"))
    out = torchrun(2, run_args(two, *STEPS, *variant, "--save-every", "1", "--keep-checkpoints", "5",
                               "--tokenizer", str(one / "tokenizer")))
    assert "processes=2" in out and out.count("final validation") == 1  # rank 0 alone reports
    # same global batch, masks and negatives: equal up to float summation order ...
    a, b = final_weights(one), final_weights(two)
    assert_same_weights(a, b, atol=1e-4)
    # ... while two steps of training moved the parameters far more than that
    step1 = load_file(one / "checkpoints" / "step_00000001" / "model.safetensors")
    assert max((a[k] - step1[k]).abs().max().item() for k in a) > 1e-3
    assert sorted(os.listdir(two / "checkpoints")) == ["latest", "step_00000001", "step_00000002",
                                                      "step_00000003"]


def test_two_processes_resume_a_killed_one_process_run(tmp_path, run_args, killed_after):
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    main(run_args(full, "--max-steps", "4", "--save-every", "2", "--eval-every", "0", "--keep-checkpoints", "3"))
    killed_after(full, resumed, 2)
    out = torchrun(2, run_args(resumed, "--max-steps", "4", "--save-every", "2", "--eval-every", "0", "--resume"))
    assert "saved with 1 processes, now 2" in out
    assert_same_weights(final_weights(full), final_weights(resumed), atol=1e-4)


def train_log(out_dir):
    return [json.loads(line) for line in open(out_dir / "metrics.jsonl") if '"train"' in line]


def test_fsdp_continues_a_one_process_run_exactly(tmp_path, run_args, killed_after):
    """Sharded training resumes a 1-process checkpoint, trains what 1 process trains (loss and
    parameters), logs the global loss, and writes full weights that load unsharded."""
    full, sharded = tmp_path / "full", tmp_path / "sharded"
    args = ["--max-steps", "4", "--save-every", "2", "--eval-every", "0", "--lr", "3e-3", "--keep-checkpoints", "3"]
    main(run_args(full, *args))
    killed_after(full, sharded, 2)
    out = torchrun(2, run_args(sharded, *args, "--resume", "--fsdp"))
    assert "processes=2 FSDP" in out and "saved with 1 processes, now 2" in out
    a, b = final_weights(full), final_weights(sharded)
    assert_same_weights(a, b, atol=1e-4)
    step2 = load_file(full / "checkpoints" / "step_00000002" / "model.safetensors")
    assert max((a[k] - step2[k]).abs().max().item() for k in a) > 1e-3
    want, got = train_log(full)[-1], train_log(sharded)[-1]
    assert got["step"] == want["step"] == 4
    for key in ("loss", "contrastive", "mim", "mrm", "grad_norm", "temperature"):
        assert got[key] == pytest.approx(want[key], rel=1e-4), key
    state = checkpoint.read_state(checkpoint.latest_checkpoint(sharded))
    assert state["fsdp"] and state["world_size"] == 2
    model, *_ = load_trained(str(sharded))
    assert model.logit_scale.shape == (1,)


def test_batch_not_divisible_by_processes_is_refused(tmp_path, run_args):
    cmd_args = run_args(tmp_path, "--max-steps", "1", "--batch-size", "7")
    with pytest.raises(AssertionError, match="divisible"):
        torchrun(2, cmd_args)


def test_compile_runs_the_model_with_our_ops(tmp_path, run_args):
    torch._dynamo.reset()
    results = main(run_args(tmp_path, "--max-steps", "2", "--eval-every", "0", "--compile",
                            "--compile-backend", "aot_eager"))
    assert {"i2t", "t2i"} == set(results)


def test_resume_after_a_kill_continues(tmp_path, run_args):
    """SIGKILL a run after its first checkpoints; --resume picks the newest complete one."""
    import signal
    import time

    args = run_args(tmp_path, "--max-steps", "400", "--save-every", "2", "--eval-every", "0",
                    "--keep-checkpoints", "2")
    proc = subprocess.Popen([sys.executable, "-m", "mcr.train", *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 1200  # a busy shared machine: a tiny step can take a minute
    while checkpoint.latest_checkpoint(tmp_path) in (None, str(tmp_path / "checkpoints" / "step_00000002")):
        assert proc.poll() is None, "the run ended before it could be killed"
        if time.time() > deadline:
            proc.kill()
            pytest.fail("no second checkpoint within 20 minutes")
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = checkpoint.read_state(checkpoint.latest_checkpoint(tmp_path))["step"]
    assert 4 <= killed_at < 400
    main(run_args(tmp_path, "--max-steps", str(killed_at + 2), "--save-every", "2", "--eval-every", "0",
                  "--resume"))
    assert checkpoint.read_state(checkpoint.latest_checkpoint(tmp_path))["step"] == killed_at + 2
