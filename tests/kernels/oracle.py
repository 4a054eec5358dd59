"""What the kernel tests share: the oracle comparison (no NaN, and max |actual - expected| within
a per-dtype tolerance relative to max(1, max |expected|)) and the parametrisation over every
backend an op registers."""
import os
import tempfile

import pytest
import torch

import mcr_kernels

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def backend_param(op):
    """pytest params, one per backend `op` registers, skipped where it cannot run on DEVICE."""
    return [pytest.param(b, marks=pytest.mark.skipif(b not in mcr_kernels.available_backends(op, DEVICE),
                                                     reason=f"{b} not available on {DEVICE}"))
            for b in mcr_kernels.registered_backends(op)]


def relative_assert_close(tolerances):
    """assert_close(actual, expected, dtype, what) with tolerances {dtype: relative tolerance}."""

    def assert_close(actual, expected, dtype, what):
        assert not actual.isnan().any(), f"{what} has NaN"
        err = (actual.double() - expected.double()).abs().max().item() if expected.numel() else 0.0
        scale = max(1.0, expected.abs().max().item() if expected.numel() else 0.0)
        assert err <= tolerances[dtype] * scale, f"{what}: max error {err:.3g} > {tolerances[dtype] * scale:.3g}"

    return assert_close


def gathered_infonce(port, backends, img, txt, scale, world=2):
    """infonce_loss(gather=True) on `world` gloo processes, each on its rows of img, txt [B, E]
    (float32 leaves, and the scalar `scale`): per rank, {(local_loss, backend): (loss, d img,
    d txt, d scale)} for every backend and both local_loss."""
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as out_dir:
        mp.spawn(_gathered_infonce_worker, args=(world, port, out_dir, backends, img, txt, scale), nprocs=world,
                 join=True)
        return [torch.load(os.path.join(out_dir, f"rank{r}.pt")) for r in range(world)]


def _gathered_infonce_worker(rank, world, port, out_dir, backends, img, txt, scale):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        b = img.shape[0] // world
        results = {}
        for local_loss in (True, False):
            for name in backends:
                inputs = [img[rank * b:(rank + 1) * b].clone().requires_grad_(),
                          txt[rank * b:(rank + 1) * b].clone().requires_grad_(),
                          torch.tensor(scale, requires_grad=True)]
                with mcr_kernels.use_backend(name, "infonce_loss"):
                    loss = mcr_kernels.infonce_loss(*inputs, gather=True, local_loss=local_loss)
                results[local_loss, name] = (loss.detach(), *torch.autograd.grad(loss, inputs))
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()

