"""Argument checks shared by the public ops: each error names the argument."""
import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def check_tensor(name, t, *, ndim=None, dtypes=None, device=None):
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dims, got shape {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        raise ValueError(f"{name} must have dtype in {[str(d) for d in dtypes]}, got {t.dtype}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} must be on {device} like the other inputs, got {t.device}")


def check_size(name, t, dim, expected, what):
    if t.shape[dim] != expected:
        raise ValueError(f"{name} dim {dim} must equal {what} = {expected}, got shape {tuple(t.shape)}")


def check_index_range(name, ids, upper):
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= upper):
        raise ValueError(f"{name} has values outside [0, {upper}): "
                         f"min {int(ids.min())}, max {int(ids.max())}")


def check_cu_seqlens(name, cu_seqlens, total, max_name, max_seqlen):
    """cu_seqlens [B+1] starts at 0, never decreases and ends at total; max_seqlen bounds every
    length (one host sync)."""
    bounds = cu_seqlens.tolist()
    if not bounds or bounds[0] != 0:
        raise ValueError(f"{name} must start at 0, got {bounds[:4]}")
    lengths = [b - a for a, b in zip(bounds, bounds[1:])]
    if any(n < 0 for n in lengths):
        raise ValueError(f"{name} must not decrease, got {bounds}")
    if bounds[-1] != total:
        raise ValueError(f"{name} must end at the packed length {total}, got {bounds[-1]}")
    if lengths and max(lengths) > max_seqlen:
        raise ValueError(f"{max_name} must be >= the longest sequence {max(lengths)}, got {max_seqlen}")
