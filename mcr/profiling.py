"""Deterministic cost proxies of one training step, measurable on a CPU.

- activation bytes saved for backward (saved-tensor hooks; parameters excluded, each
  storage counted once), per sample;
- FLOPs of forward + backward (torch.utils.flop_counter), per sample.
They compare variants (MCR vs dual-stream, MbA vs AbM) without a GPU; wall time and peak
memory on a GPU are in benchmarks/bench_train_step.py.
"""
import torch
from torch.utils.flop_counter import FlopCounterMode


def saved_activation_bytes(model, batch):
    """Bytes of distinct non-parameter tensors autograd saves for one forward of `model(batch)`."""
    param_ptrs = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = {}

    def pack(t):
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in param_ptrs and ptr not in seen:
            seen[ptr] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        losses = model(batch)
    del losses
    return sum(seen.values())


def step_flops(model, batch, weights=None):
    """FLOPs of forward + backward of the weighted loss sum on `batch`."""
    weights = weights or {"contrastive": 0.1, "mim": 1.0, "mrm": 1.0}
    counter = FlopCounterMode(display=False)
    with counter:
        losses = model(batch)
        sum(weights[k] * v for k, v in losses.items()).backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def step_costs(model, batch):
    """{"activation_bytes_per_sample", "flops_per_sample"} of one training step on `batch`."""
    batch_size = batch["image"].shape[0]
    torch.manual_seed(0)
    act = saved_activation_bytes(model, batch)
    torch.manual_seed(0)
    flops = step_flops(model, batch)
    return {"activation_bytes_per_sample": act / batch_size, "flops_per_sample": flops / batch_size}
