"""Triton backend of linear_cross_entropy: the chunk loop of mcr_kernels/cpu/linear_cross_entropy.py
(logits and gradient GEMMs by torch, i.e. cuBLAS) with one Triton kernel per chunk that
computes each row's loss and overwrites the row's logits with their gradient in place
(Liger-Kernel's fused linear cross-entropy). One program per row, two passes over V:
online max / sum of exponentials -> log-sum-exp, then (softmax - onehot) * scale.
"""
import os

import torch
import triton
import triton.language as tl

from mcr_kernels.cpu import linear_cross_entropy as chunked

_BLOCK_V = 64 if os.environ.get("TRITON_INTERPRET") == "1" else 4096


@triton.jit
def _ce_rows_kernel(LOGITS, LABELS, SCALE, LOSS, V, stride_row, ignore_index,
                    COMPUTE_GRADS: tl.constexpr, BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    ptr = LOGITS + row * stride_row
    label = tl.load(LABELS + row)
    valid = label != ignore_index
    scale = tl.load(SCALE)
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
    tl.store(LOSS + row, tl.where(valid, (lse - target) * scale, 0.0))
    if COMPUTE_GRADS:
        for start in range(0, V, BLOCK_V):
            offs = start + tl.arange(0, BLOCK_V)
            x = tl.load(ptr + offs, mask=offs < V, other=0.0)
            grad = tl.exp(x - lse) - tl.where(offs == label, 1.0, 0.0)
            tl.store(ptr + offs, tl.where(valid, grad * scale, 0.0), mask=offs < V)


def ce_rows_triton(logits, labels, ignore_index, scale, compute_grads):
    """chunked.ce_rows_torch computed by _ce_rows_kernel."""
    rows, V = logits.shape
    loss = torch.empty(rows, dtype=torch.float32, device=logits.device)
    if rows:
        _ce_rows_kernel[(rows,)](logits, labels, scale.float().reshape(1), loss, V, logits.stride(0),
                                 ignore_index, COMPUTE_GRADS=compute_grads, BLOCK_V=_BLOCK_V)
    return loss.sum()


@torch.library.custom_op("mcr_kernels::linear_cross_entropy_triton", mutates_args=())
def linear_cross_entropy_triton(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                                labels: torch.Tensor, ignore_index: int, mean: bool,
                                compute_grads: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                              torch.Tensor]:
    """(loss, d hidden, d weight, d bias) of the chunked linear cross-entropy (Triton rows)."""
    return chunked.chunked_forward(hidden, weight, bias, labels.contiguous(), ignore_index, mean,
                                   compute_grads, ce_rows_triton)


linear_cross_entropy_triton.register_fake(chunked.fake_forward)
chunked.register_autograd(linear_cross_entropy_triton)


def linear_cross_entropy(hidden, weight, bias, labels, *, ignore_index=-100, reduction="mean"):
    """Triton backend of mcr_kernels.linear_cross_entropy (same arguments, float32 scalar)."""
    return chunked.run(linear_cross_entropy_triton, hidden, weight, bias, labels, ignore_index, reduction)


# What ce_rows_triton passes, for python -m mcr_kernels.compile_check (sm_80 and sm_90): float32
# logits of a chunk, int64 labels; BERT's vocabulary (30,522) is no multiple of 16.
COMPILE_SPECS = [
    dict(kernel=_ce_rows_kernel, dtypes=("fp32",),
         signature=dict(LOGITS="*fp32", LABELS="*i64", SCALE="*fp32", LOSS="*fp32"),
         variants=[dict(COMPUTE_GRADS=grads, BLOCK_V=_BLOCK_V) for grads in (True, False)]),
]
