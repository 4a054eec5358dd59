"""Fused linear + cross-entropy: the loss of a vocabulary projection without its logits.

    loss = linear_cross_entropy(hidden, weight, bias, labels)   # hidden [N, D], weight [V, D]

Equals F.cross_entropy(F.linear(hidden, weight, bias).float(), labels, ...) but holds one
chunk of rows' float32 logits at a time, and only a log-sum-exp per row from forward to
backward (which recomputes each chunk's logits). Signature, backends, limits and how it
works: docs/linear_cross_entropy.md.
"""
import torch

from mcr_kernels import backend, reference
from mcr_kernels._validate import FLOAT_DTYPES, check_size, check_tensor
from mcr_kernels.blockwise import linear_cross_entropy as _blockwise

REDUCTIONS = ("mean", "sum")


def linear_cross_entropy(hidden, weight, bias, labels, *, ignore_index=-100, reduction="mean"):
    """Cross-entropy of the logits hidden Wᵀ + b against labels; a float32 scalar.

    hidden [N, D] and weight [V, D] of one float dtype, bias [V] or None, labels int64 [N]
    (values in [0, V) or ignore_index); under autocast the three are cast to its dtype.
    reduction "mean" divides by the number of non-ignored rows (a loss of 0, with zero
    gradients, when every row is ignored; F.cross_entropy gives NaN there), "sum" adds the
    rows' losses. Logits and softmax are float32.
    """
    check_tensor("hidden", hidden, ndim=2, dtypes=FLOAT_DTYPES)
    if torch.is_autocast_enabled(hidden.device.type):  # the projection follows autocast, as F.linear
        dtype = torch.get_autocast_dtype(hidden.device.type)
        hidden, weight = hidden.to(dtype), weight.to(dtype)
        bias = bias.to(dtype) if bias is not None else None
    check_tensor("weight", weight, ndim=2, dtypes=(hidden.dtype,), device=hidden.device)
    check_size("weight", weight, 1, hidden.shape[1], "hidden.shape[1] (model width)")
    if weight.shape[0] == 0:
        raise ValueError(f"weight must have at least one row (the vocabulary), got shape {tuple(weight.shape)}")
    if bias is not None:
        check_tensor("bias", bias, ndim=1, dtypes=(hidden.dtype,), device=hidden.device)
        check_size("bias", bias, 0, weight.shape[0], "weight.shape[0] (vocabulary)")
    check_tensor("labels", labels, ndim=1, dtypes=(torch.int64,), device=hidden.device)
    check_size("labels", labels, 0, hidden.shape[0], "hidden.shape[0] (rows)")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if not torch.compiler.is_compiling():  # a host sync; skipped inside compiled graphs
        bad = (labels != ignore_index) & ((labels < 0) | (labels >= weight.shape[0]))
        if bool(bad.any()):
            raise ValueError(f"labels must be in [0, {weight.shape[0]}) or ignore_index={ignore_index}, "
                             f"got {labels[bad][:5].tolist()}")
    _, fn = backend.resolve("linear_cross_entropy", hidden.device)
    return fn(hidden, weight, bias, labels, ignore_index=ignore_index, reduction=reduction)


backend.register("linear_cross_entropy", "reference", reference.linear_cross_entropy)
backend.register("linear_cross_entropy", "blockwise", _blockwise.linear_cross_entropy)

if backend.HAS_TRITON:  # a broken kernel file raises here: never a silent fallback
    from mcr_kernels.triton import linear_cross_entropy as _triton

    backend.register("linear_cross_entropy", "triton", _triton.linear_cross_entropy)
