"""Patch dropping: random keep indices, token gather, MAE restore (public ops).

    ids_keep, ids_restore = random_keep_indices(B, N, K)    # int64 [B, K], [B, N]
    x_kept = gather_tokens(x, ids_keep)                      # [B, N, D] -> [B, K, D]
    x_full = restore_tokens(x_kept, ids_restore, mask_token) # [B, K, D] -> [B, N, D]
    x_kept, mask, ids_restore = random_masking(x, 0.5)       # MAE's random_masking, CLS kept

float32, float16, bfloat16 (and float64); any D; non-contiguous inputs welcome.
Backends: triton (mcr_kernels/triton/patch_drop.py), native (mcr_kernels/native/patch_drop.py, the
C++/CUDA kernels of csrc/), reference.
Full documentation: docs/patch_drop.md.
"""
import torch

from mcr_kernels import backend, reference
from mcr_kernels._validate import FLOAT_DTYPES, check_index_range, check_size, check_tensor
from mcr_kernels.native import patch_drop as _native


def random_keep_indices(batch_size, num_tokens, num_keep, *, device=None, generator=None):
    """Uniformly random K of N token indices per row, MAE convention.

    Returns ids_keep int64 [B, K] (distinct per row) and ids_restore int64 [B, N] with
    ids_restore[b, ids_keep[b, j]] == j. Noise is drawn on `device` with `generator`.
    """
    for name, value in (("batch_size", batch_size), ("num_tokens", num_tokens), ("num_keep", num_keep)):
        if not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be a non-negative int, got {value!r}")
    if num_keep > num_tokens:
        raise ValueError(f"num_keep must be <= num_tokens = {num_tokens}, got {num_keep}")
    device = torch.device(device) if device is not None else torch.device("cpu")
    _, fn = backend.resolve("random_keep_indices", device)
    return fn(batch_size, num_tokens, num_keep, device=device, generator=generator)


def gather_tokens(x, ids_keep, *, check_indices=False):
    """out[b, j] = x[b, ids_keep[b, j]]: x [B, N, D], ids_keep int64 [B, K] -> [B, K, D].

    Differentiable in x (the backward scatters, zeros elsewhere; repeated indices add up).
    check_indices=True raises ValueError on indices outside [0, N) (a host sync).
    """
    check_tensor("x", x, ndim=3, dtypes=FLOAT_DTYPES)
    check_tensor("ids_keep", ids_keep, ndim=2, dtypes=(torch.int64,), device=x.device)
    check_size("ids_keep", ids_keep, 0, x.shape[0], "x.shape[0] (batch)")
    if check_indices:
        check_index_range("ids_keep", ids_keep, x.shape[1])
    _, fn = backend.resolve("gather_tokens", x.device)
    return fn(x, ids_keep)


def restore_tokens(x_kept, ids_restore, mask_token, *, check_indices=False):
    """Undo the drop, filling dropped slots with mask_token.

    x_kept [B, K, D], ids_restore int64 [B, N], mask_token [D] -> [B, N, D] with
    out[b, n] = x_kept[b, ids_restore[b, n]] if ids_restore[b, n] < K else mask_token.
    Differentiable in x_kept and mask_token (its grad sums over the masked slots).
    """
    check_tensor("x_kept", x_kept, ndim=3, dtypes=FLOAT_DTYPES)
    check_tensor("ids_restore", ids_restore, ndim=2, dtypes=(torch.int64,), device=x_kept.device)
    check_tensor("mask_token", mask_token, dtypes=FLOAT_DTYPES, device=x_kept.device)
    check_size("ids_restore", ids_restore, 0, x_kept.shape[0], "x_kept.shape[0] (batch)")
    if mask_token.numel() != x_kept.shape[-1]:
        raise ValueError(f"mask_token must have D = {x_kept.shape[-1]} elements, got shape "
                         f"{tuple(mask_token.shape)}")
    if ids_restore.shape[1] < x_kept.shape[1]:
        raise ValueError(f"ids_restore must have N >= K = {x_kept.shape[1]} columns, got "
                         f"{ids_restore.shape[1]}")
    if check_indices:
        check_index_range("ids_restore", ids_restore, ids_restore.shape[1])
    _, fn = backend.resolve("restore_tokens", x_kept.device)
    return fn(x_kept, ids_restore, mask_token.reshape(-1))


def random_masking(x, mask_ratio, *, num_prefix_tokens=1, generator=None):
    """MAE random masking that keeps the first num_prefix_tokens (CLS) tokens.

    x [B, P + N, D] -> x_kept [B, P + K, D] with K = int(N * (1 - mask_ratio)),
    mask [B, N] in x's dtype (1 = dropped, in the original patch order), ids_restore [B, N].
    """
    check_tensor("x", x, ndim=3, dtypes=FLOAT_DTYPES)
    if not 0.0 <= mask_ratio < 1.0:
        raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
    if not 0 <= num_prefix_tokens <= x.shape[1]:
        raise ValueError(f"num_prefix_tokens must be in [0, {x.shape[1]}], got {num_prefix_tokens}")
    B, P = x.shape[0], num_prefix_tokens
    N = x.shape[1] - P
    K = int(N * (1 - mask_ratio))
    ids_keep, ids_restore = random_keep_indices(B, N, K, device=x.device, generator=generator)
    if P:  # gather the prefix too, in the same pass: no concatenation copy
        prefix = torch.arange(P, device=x.device).expand(B, P)
        ids_keep = torch.cat([prefix, ids_keep + P], dim=1)
    mask = (ids_restore >= K).to(x.dtype)
    return gather_tokens(x, ids_keep), mask, ids_restore


backend.register("random_keep_indices", "reference", reference.random_keep_indices)
backend.register("gather_tokens", "reference", reference.gather_tokens)
backend.register("gather_tokens", "native", _native.gather_tokens)
backend.register("restore_tokens", "reference", reference.restore_tokens)
backend.register("restore_tokens", "native", _native.restore_tokens)

if backend.HAS_TRITON:  # a broken kernel file raises here: never a silent fallback
    from mcr_kernels.triton import patch_drop as triton_patch_drop

    backend.register("random_keep_indices", "triton", triton_patch_drop.random_keep_indices)
    backend.register("gather_tokens", "triton", triton_patch_drop.gather_tokens)
    backend.register("restore_tokens", "triton", triton_patch_drop.restore_tokens)
