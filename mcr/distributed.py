"""Processes and devices: torchrun's process group, the device of each rank, FSDP sharding,
and the few collectives the engine needs. One process (no torchrun) is world size 1 and
every function here is then a no-op or a plain value."""
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor


@dataclass
class Context:
    """Where this process stands: rank of world, its device, whether the model is sharded."""
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")
    sharded: bool = False

    @property
    def is_main(self):
        return self.rank == 0


def pick_device(name, local_rank=0):
    """torch.device of `name` (auto, cpu, cuda, cuda:N); ValueError when it is not there."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {name!r} is not one of: auto, cpu, cuda, cuda:N")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {name}: no CUDA device is available (use --device cpu or auto)")
        if device.index is None:
            device = torch.device("cuda", local_rank)
        if device.index >= torch.cuda.device_count():
            raise ValueError(f"--device {name}: only {torch.cuda.device_count()} CUDA devices")
    return device


def init_distributed(device_name):
    """Context of this process: joins torchrun's process group when WORLD_SIZE > 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = pick_device(device_name, int(os.environ.get("LOCAL_RANK", "0")))
    if world == 1:
        return Context(0, 1, device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Context(dist.get_rank(), world, device)


def finish(ctx):
    """Wait for every rank and leave the process group (world size > 1)."""
    if ctx.world > 1 and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def barrier():
    if dist.is_initialized():
        dist.barrier()


def rank0_decides(flag, ctx):
    """Rank 0's boolean, shared (a time limit must stop every rank at the same step)."""
    if ctx.world == 1:
        return flag
    decision = torch.tensor([float(flag)], device=ctx.device)
    dist.broadcast(decision, 0)
    return bool(decision.item())


def mean_over_ranks(values):
    """Average a float tensor over the ranks (in place; the value itself in one process)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(values)
        values /= dist.get_world_size()
    return values


def rank_slice(num_items, rank, world):
    """The contiguous indices of one rank's share of an evaluation split."""
    if num_items < world:
        raise ValueError(f"an evaluation split of {num_items} pairs cannot be shared by {world} processes")
    return range(rank * num_items // world, (rank + 1) * num_items // world)


def gather_in_rank_order(local):
    """A tuple of tensors from every rank, concatenated in rank order (every rank gets it)."""
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, local)
    return tuple(torch.cat(column) for column in zip(*parts))


def shard_model(model, device):
    """FSDP (fully_shard): each transformer block is a unit whose parameters, gradients and
    AdamW state are split over the ranks and gathered around its forward and backward; the
    root unit holds the rest (embeddings, heads, temperature). The blocks are the model's
    transformer_blocks()."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    for block in model.transformer_blocks():
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)


def full_value(tensor):
    """A plain tensor from a (possibly FSDP-sharded) one; a collective under FSDP."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor
