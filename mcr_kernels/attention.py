"""Attention over kept image tokens and padded reports (public ops).

    out = flash_attention(q, k, v, key_padding_mask=mask)   # SDPA layout [B, H, L, Dh]
    out = flash_attention_varlen(q, k, v, cu_q, cu_k, max_q, max_k)   # packed [total, H, Dh]

key_padding_mask [B, Lk] bool, True = attend (HF's attention_mask convention).
Signatures, dtypes, backends, limits and an example: docs/attention.md.
"""
import torch

from mcr_kernels import backend, reference
from mcr_kernels._validate import FLOAT_DTYPES, check_cu_seqlens, check_size, check_tensor

unpad_input = reference.unpad_input
pad_input = reference.pad_input


def flash_attention(q, k, v, *, key_padding_mask=None, softmax_scale=None, causal=False,
                    return_lse=False):
    """Softmax attention, a drop-in for F.scaled_dot_product_attention with a padding mask.

    q [B, H, Lq, Dh], k/v [B, H, Lk, Dh]; key_padding_mask [B, Lk] bool (True = attend).
    A query row with no key to attend gives zeros; with a right-padding mask and Lq == Lk
    the padded query rows are zeros. NaN in an attended q, k or v gives NaN in the rows
    that see it; masked-out keys and values are ignored, NaN or not. Returns out
    [B, H, Lq, Dh] (q's dtype), and lse float32 [B, H, Lq] if return_lse.
    """
    check_tensor("q", q, ndim=4, dtypes=FLOAT_DTYPES)
    check_tensor("k", k, ndim=4, dtypes=(q.dtype,), device=q.device)
    check_tensor("v", v, ndim=4, dtypes=(q.dtype,), device=q.device)
    B, H, _, Dh = q.shape
    for name, t in (("k", k), ("v", v)):
        check_size(name, t, 0, B, "q.shape[0] (batch)")
        check_size(name, t, 1, H, "q.shape[1] (heads)")
        check_size(name, t, 3, Dh, "q.shape[3] (head dim)")
    check_size("v", v, 2, k.shape[2], "k.shape[2] (key length)")
    if Dh > 256:
        raise ValueError(f"head dim must be <= 256, got {Dh}")
    if key_padding_mask is not None:
        check_tensor("key_padding_mask", key_padding_mask, ndim=2, dtypes=(torch.bool,), device=q.device)
        check_size("key_padding_mask", key_padding_mask, 0, B, "q.shape[0] (batch)")
        check_size("key_padding_mask", key_padding_mask, 1, k.shape[2], "k.shape[2] (key length)")
    _, fn = backend.resolve("flash_attention", q.device)
    return fn(q, k, v, key_padding_mask=key_padding_mask, softmax_scale=softmax_scale,
              causal=causal, return_lse=return_lse)


def flash_attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, *,
                           softmax_scale=None, causal=False):
    """Attention over packed variable-length sequences (flash-attn's convention).

    q [total_q, H, Dh], k/v [total_k, H, Dh], cu_seqlens_q/k int32 [B+1] starting at 0,
    non-decreasing, ending at total_q/total_k, max_seqlen_q/k >= every length (checked with
    one host sync, except under torch.compile). Returns [total_q, H, Dh] in q's dtype; empty
    sequences are allowed.
    """
    check_tensor("q", q, ndim=3, dtypes=FLOAT_DTYPES)
    check_tensor("k", k, ndim=3, dtypes=(q.dtype,), device=q.device)
    check_tensor("v", v, ndim=3, dtypes=(q.dtype,), device=q.device)
    check_tensor("cu_seqlens_q", cu_seqlens_q, ndim=1, dtypes=(torch.int32,), device=q.device)
    check_tensor("cu_seqlens_k", cu_seqlens_k, ndim=1, dtypes=(torch.int32,), device=q.device)
    check_size("cu_seqlens_k", cu_seqlens_k, 0, cu_seqlens_q.shape[0], "len(cu_seqlens_q)")
    if not torch.compiler.is_compiling():  # one host sync; a traced graph cannot read values
        check_cu_seqlens("cu_seqlens_q", cu_seqlens_q, q.shape[0], "max_seqlen_q", max_seqlen_q)
        check_cu_seqlens("cu_seqlens_k", cu_seqlens_k, k.shape[0], "max_seqlen_k", max_seqlen_k)
    _, fn = backend.resolve("flash_attention_varlen", q.device)
    return fn(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
              softmax_scale=softmax_scale, causal=causal)


backend.register("flash_attention", "reference", reference.flash_attention)
backend.register("flash_attention_varlen", "reference", reference.flash_attention_varlen)

if backend.HAS_TRITON:  # a broken kernel file raises here: never a silent fallback
    from mcr_kernels.triton import attention as triton_attention

    backend.register("flash_attention", "triton", triton_attention.flash_attention)
    backend.register("flash_attention_varlen", "triton", triton_attention.flash_attention_varlen)
