"""Triton backend of linear_cross_entropy: the chunk loops of mcr_kernels/_chunked_cross_entropy.py
(logits and gradient GEMMs by torch, i.e. cuBLAS) with one Triton kernel per chunk and pass,
one program per row: forward, an online max / sum of exponentials gives the row's
log-sum-exp and loss; backward, the recomputed logits are overwritten in place with
(softmax - onehot) * scale.
"""
import os

import torch
import triton
import triton.language as tl

from mcr_kernels import _chunked_cross_entropy as chunked

_BLOCK_V = 64 if os.environ.get("TRITON_INTERPRET") == "1" else 4096


@triton.jit
def _ce_rows_kernel(LOGITS, LABELS, LOSS, LSE, V, stride_row, ignore_index, BLOCK_V: tl.constexpr):
    """One row: log-sum-exp by an online max / sum of exponentials, and the row's CE."""
    row = tl.program_id(0).to(tl.int64)
    ptr = LOGITS + row * stride_row
    label = tl.load(LABELS + row)
    valid = label != ignore_index
    m = float("-inf")
    s = 0.0
    for start in range(0, V, BLOCK_V):
        offs = start + tl.arange(0, BLOCK_V)
        x = tl.load(ptr + offs, mask=offs < V, other=float("-inf"))
        m_new = tl.maximum(m, tl.max(x, 0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), 0)
        m = m_new
    lse = m + tl.log(s)
    target = tl.load(ptr + tl.where(valid, label, 0))
    tl.store(LSE + row, lse)
    tl.store(LOSS + row, tl.where(valid, lse - target, 0.0))


@triton.jit
def _ce_grad_kernel(LOGITS, LABELS, LSE, SCALE, V, stride_row, ignore_index, BLOCK_V: tl.constexpr):
    """One row, in place: logits <- (softmax - onehot) * scale (0 on an ignored row)."""
    row = tl.program_id(0).to(tl.int64)
    ptr = LOGITS + row * stride_row
    label = tl.load(LABELS + row)
    valid = label != ignore_index
    lse = tl.load(LSE + row)
    scale = tl.load(SCALE)
    for start in range(0, V, BLOCK_V):
        offs = start + tl.arange(0, BLOCK_V)
        x = tl.load(ptr + offs, mask=offs < V, other=0.0)
        grad = tl.exp(x - lse) - tl.where(offs == label, 1.0, 0.0)
        tl.store(ptr + offs, tl.where(valid, grad * scale, 0.0), mask=offs < V)


def ce_rows_triton(logits, labels, ignore_index):
    """The blockwise backend's ce_rows_torch computed by _ce_rows_kernel."""
    rows, V = logits.shape
    loss = torch.empty(rows, dtype=torch.float32, device=logits.device)
    lse = torch.empty(rows, dtype=torch.float32, device=logits.device)
    if rows:
        _ce_rows_kernel[(rows,)](logits, labels, loss, lse, V, logits.stride(0), ignore_index, BLOCK_V=_BLOCK_V)
    return loss, lse


def ce_grad_rows_triton(logits, labels, lse, ignore_index, scale):
    """The blockwise backend's ce_grad_rows_torch computed by _ce_grad_kernel."""
    rows, V = logits.shape
    if rows:
        _ce_grad_kernel[(rows,)](logits, labels, lse.contiguous(), scale.float().reshape(1), V, logits.stride(0),
                                 ignore_index, BLOCK_V=_BLOCK_V)


@torch.library.custom_op("mcr_kernels::linear_cross_entropy_triton", mutates_args=())
def linear_cross_entropy_triton(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                                labels: torch.Tensor, ignore_index: int,
                                mean: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, per-row log-sum-exp) of the chunked linear cross-entropy (Triton rows)."""
    return chunked.chunked_forward(hidden, weight, bias, labels.contiguous(), ignore_index, mean, ce_rows_triton)


@torch.library.custom_op("mcr_kernels::linear_cross_entropy_triton_backward", mutates_args=())
def linear_cross_entropy_triton_backward(grad: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor,
                                         bias: torch.Tensor | None, labels: torch.Tensor, lse: torch.Tensor,
                                         ignore_index: int,
                                         mean: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(d hidden, d weight, d bias) of the chunked linear cross-entropy (Triton rows)."""
    return chunked.chunked_backward(grad, hidden, weight, bias, labels.contiguous(), lse, ignore_index, mean,
                                    ce_grad_rows_triton)


chunked.register(linear_cross_entropy_triton, linear_cross_entropy_triton_backward)


def linear_cross_entropy(hidden, weight, bias, labels, *, ignore_index=-100, reduction="mean"):
    """Triton backend of mcr_kernels.linear_cross_entropy (same arguments, float32 scalar)."""
    return linear_cross_entropy_triton(hidden, weight, bias, labels, ignore_index, reduction == "mean")[0]


# What the launchers pass, for python -m mcr_kernels.compile_check (sm_80 and sm_90): float32
# logits of a chunk, int64 labels; BERT's vocabulary (30,522) is no multiple of 16.
COMPILE_SPECS = [
    dict(kernel=_ce_rows_kernel, dtypes=("fp32",),
         signature=dict(LOGITS="*fp32", LABELS="*i64", LOSS="*fp32", LSE="*fp32"),
         variants=[dict(BLOCK_V=_BLOCK_V)]),
    dict(kernel=_ce_grad_kernel, dtypes=("fp32",),
         signature=dict(LOGITS="*fp32", LABELS="*i64", LSE="*fp32", SCALE="*fp32"),
         variants=[dict(BLOCK_V=_BLOCK_V)]),
]
