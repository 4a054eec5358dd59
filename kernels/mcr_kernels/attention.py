"""Attention over kept image tokens and padded reports (public ops).

    out = flash_attention(q, k, v, key_padding_mask=mask)   # SDPA layout [B, H, L, Dh]
    out = flash_attention_varlen(q, k, v, cu_q, cu_k, max_q, max_k)   # packed [total, H, Dh]

key_padding_mask [B, Lk] bool, True = attend (HF's attention_mask convention); SDPA's
arguments (attn_mask, dropout_p, is_causal, scale) are accepted with SDPA's meaning.
Signatures, dtypes, backends, limits and an example: docs/attention.md.
"""
import torch
import torch.nn.functional as F

from mcr_kernels import backend, reference
from mcr_kernels._validate import FLOAT_DTYPES, check_cu_seqlens, check_size, check_tensor
from mcr_kernels.blockwise import attention as _blockwise_attention

unpad_input = reference.unpad_input
pad_input = reference.pad_input


def flash_attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                    enable_gqa=False, *, key_padding_mask=None, softmax_scale=None, causal=False,
                    return_lse=False):
    """Softmax attention, a drop-in for F.scaled_dot_product_attention with a padding mask.

    q [B, H, Lq, Dh], k/v [B, H, Lk, Dh]; key_padding_mask [B, Lk] bool (True = attend);
    causal: bottom-right aligned causal mask (flash-attn's). A query row with no key to
    attend gives zeros; with a right-padding mask and Lq == Lk the padded query rows are
    zeros. NaN in an attended q, k or v gives NaN in the rows that see it; masked-out keys
    and values are ignored, NaN or not. Returns out [B, H, Lq, Dh] (q's dtype), and lse
    float32 [B, H, Lq] if return_lse.

    SDPA's arguments mean what they mean in F.scaled_dot_product_attention: attn_mask bool
    (True = attend) or float (added to the scores), broadcastable to [B, H, Lq, Lk];
    is_causal top-left aligned; scale = softmax_scale. k/v may have H_kv heads with
    H % H_kv == 0 (grouped-query attention; enable_gqa is accepted and not required).
    Our kernels run key padding (key_padding_mask, or a bool attn_mask of shape
    [B, 1, 1, Lk]) and causal masks; dropout_p > 0, any other attn_mask, and is_causal
    with Lq != Lk run torch's SDPA instead (fully masked query rows still give zeros).
    """
    if scale is not None:
        if softmax_scale is not None:
            raise ValueError("pass one of scale and softmax_scale, not both")
        softmax_scale = scale
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    if attn_mask is not None and key_padding_mask is not None:
        raise ValueError("pass one of attn_mask and key_padding_mask, not both")
    check_tensor("q", q, ndim=4, dtypes=FLOAT_DTYPES)
    k, v = _repeat_kv_heads(q, k, v)
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
    if attn_mask is not None:
        attn_mask, key_padding_mask = _key_padding_of(q, k, attn_mask)
    top_left_causal = is_causal and q.shape[2] != k.shape[2]
    causal = causal or (is_causal and not top_left_causal)
    if dropout_p > 0 or attn_mask is not None or top_left_causal:
        if return_lse:
            raise ValueError("return_lse needs our kernels: no dropout_p, attn_mask only as key "
                             "padding [B, 1, 1, Lk], is_causal only with Lq == Lk")
        return _torch_sdpa(q, k, v, attn_mask, key_padding_mask, causal, top_left_causal,
                           dropout_p, softmax_scale)
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


def _repeat_kv_heads(q, k, v):
    """Grouped-query attention: k/v with H_kv heads, H % H_kv == 0, repeated to q's H heads
    (head h reads k/v head h // (H / H_kv), as SDPA's enable_gqa)."""
    if not (isinstance(k, torch.Tensor) and isinstance(v, torch.Tensor) and k.dim() == v.dim() == 4):
        return k, v  # the checks that follow name the problem
    H, H_kv = q.shape[1], k.shape[1]
    if H_kv in (0, H) or H % H_kv or v.shape[1] != H_kv:
        return k, v
    group = H // H_kv
    repeat = lambda t: t.repeat_interleave(group, dim=1)
    return repeat(k), repeat(v)


def _key_padding_of(q, k, attn_mask):
    """(attn_mask, key_padding_mask): a bool [B, 1, 1, Lk] mask becomes key_padding_mask [B, Lk]."""
    check_tensor("attn_mask", attn_mask, device=q.device,
                 dtypes=(torch.bool, torch.float16, torch.bfloat16, torch.float32, torch.float64))
    shape = (q.shape[0], q.shape[1], q.shape[2], k.shape[2])
    if attn_mask.dim() > 4 or any(m not in (1, s) for m, s in zip(attn_mask.shape[::-1], shape[::-1])):
        raise ValueError(f"attn_mask must broadcast to [B, H, Lq, Lk] = {list(shape)}, "
                         f"got shape {tuple(attn_mask.shape)}")
    if attn_mask.dtype == torch.bool and attn_mask.dim() == 4 and attn_mask.shape[1:3] == (1, 1) \
            and attn_mask.shape[0] == q.shape[0] and attn_mask.shape[3] == k.shape[2]:
        return None, attn_mask[:, 0, 0]
    return attn_mask, None


def _torch_sdpa(q, k, v, attn_mask, key_padding_mask, causal, top_left_causal, dropout_p, scale):
    """F.scaled_dot_product_attention for what our kernels don't do (dropout, arbitrary masks,
    top-left causal); every mask folded into one, fully masked query rows give zeros."""
    Lq, Lk = q.shape[2], k.shape[2]
    allowed = None
    if key_padding_mask is not None:
        allowed = key_padding_mask[:, None, None, :]
    if causal or top_left_causal:
        tri = torch.ones(Lq, Lk, dtype=torch.bool, device=q.device).tril(Lk - Lq if causal else 0)
        allowed = tri if allowed is None else allowed & tri
    if attn_mask is not None and attn_mask.dtype == torch.bool:
        allowed = attn_mask if allowed is None else allowed & attn_mask
        attn_mask = None
    mask = allowed
    if attn_mask is not None:  # additive float mask, -inf where a bool mask forbids
        mask = attn_mask.to(q.dtype)
        if allowed is not None:
            mask = mask.masked_fill(~allowed, float("-inf"))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, scale=scale)
    if allowed is not None:
        out = out.masked_fill(~allowed.any(-1, keepdim=True), 0.0)
    return out


backend.register("flash_attention", "reference", reference.flash_attention)
backend.register("flash_attention_varlen", "reference", reference.flash_attention_varlen)
backend.register("flash_attention", "blockwise", _blockwise_attention.flash_attention, devices=("cpu",))
backend.register("flash_attention_varlen", "blockwise", _blockwise_attention.flash_attention_varlen, devices=("cpu",))

if backend.HAS_TRITON:  # a broken kernel file raises here: never a silent fallback
    from mcr_kernels.triton import attention as triton_attention

    backend.register("flash_attention", "triton", triton_attention.flash_attention)
    backend.register("flash_attention_varlen", "triton", triton_attention.flash_attention_varlen)
