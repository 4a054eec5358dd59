"""`blockwise` backend of flash_attention: torch's fused scaled_dot_product_attention CPU kernel
(flash-style, the [Lq, Lk] scores never stored whole) with this op's semantics on top.

* Keys the mask excludes are zeroed in k and v first, so NaN or inf there never reaches an
  output (0 · NaN would); NaN in an attended key, value or query still gives NaN (the kernel
  returns zeros for a query row holding NaN or inf: such rows are set to NaN, as SDPA's math
  backend gives).
* A query row with no key to attend attends every (zeroed) key instead, and its output is
  set to zero afterwards: no 0/0, and no gradient flows from it.
* With a right-padding mask and Lq == Lk the padded query rows are zero, as the reference.
* The kernel is called directly (aten's _scaled_dot_product_flash_attention_for_cpu and its
  backward, in a custom op): it returns lse (return_lse, no gradient), and backward keeps the
  output with its zero rows, the tensor the next layer keeps too, instead of a second copy.

`blockwise` backend of flash_attention_varlen: the packed sequences right-padded to the longest,
the same kernel with their key padding mask, the rows packed again.
"""
import torch

from mcr_kernels import reference

NEG_INF = float("-inf")


def flash_attention(q, k, v, *, key_padding_mask=None, softmax_scale=None, causal=False,
                    return_lse=False):
    """`blockwise` backend of mcr_kernels.flash_attention (same arguments and results)."""
    Lq, Lk = q.shape[-2], k.shape[-2]
    if Lq == 0 or Lk == 0:  # aten's CPU flash kernel divides by zero on an empty sequence (SIGFPE)
        return reference.flash_attention(q, k, v, key_padding_mask=key_padding_mask, softmax_scale=softmax_scale,
                                         causal=causal, return_lse=return_lse)
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
    allowed = None  # bool, broadcastable to [B, H, Lq, Lk]
    if key_padding_mask is not None:
        ignored_keys = ~key_padding_mask[:, None, :, None]
        k, v = k.masked_fill(ignored_keys, 0), v.masked_fill(ignored_keys, 0)
        allowed = key_padding_mask[:, None, None, :]
    if causal:  # bottom-right aligned, as flash-attn
        below = torch.ones(Lq, Lk, dtype=torch.bool, device=q.device).tril(diagonal=Lk - Lq)
        allowed = below if allowed is None else allowed & below
    bias = zero_rows = None
    if allowed is not None:
        zero_rows = ~allowed.any(dim=-1, keepdim=True)  # [B or 1, 1, Lq, 1]: no key to attend
        if key_padding_mask is not None and Lq == Lk:
            padded = ~key_padding_mask & reference.is_right_padding(key_padding_mask)
            zero_rows = zero_rows | padded[:, None, :, None]
        bias = torch.zeros(allowed.shape, dtype=q.dtype, device=q.device).masked_fill(~(allowed | zero_rows), NEG_INF)
    out, lse = sdpa_flash_cpu(q, k, v, bias, zero_rows, scale)
    if not return_lse:
        return out
    lse = lse.detach().float()
    return out, lse if zero_rows is None else lse.masked_fill(zero_rows[..., 0], NEG_INF)


def flash_attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, *,
                           softmax_scale=None, causal=False):
    """`blockwise` backend of mcr_kernels.flash_attention_varlen (same arguments and results). Causal
    attention runs padded when every sequence has as many queries as keys; otherwise (its
    bottom-right alignment differs per sequence) the reference's loop over sequences."""
    if causal and not torch.equal(cu_seqlens_q, cu_seqlens_k):
        return reference.flash_attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                                softmax_scale=softmax_scale, causal=True)
    if causal:  # one padded length for both: causal within each sequence is then plain tril
        max_seqlen_q = max_seqlen_k = max(max_seqlen_q, max_seqlen_k)
    rows_q, _ = padded_rows(cu_seqlens_q, q.shape[0], max_seqlen_q)
    rows_k, key_mask = padded_rows(cu_seqlens_k, k.shape[0], max_seqlen_k)
    B = cu_seqlens_q.shape[0] - 1
    pad = lambda t, rows, L: reference.pad_input(t, rows, B, L).transpose(1, 2)  # [B, H, L, Dh]
    out = flash_attention(pad(q, rows_q, max_seqlen_q), pad(k, rows_k, max_seqlen_k), pad(v, rows_k, max_seqlen_k),
                          key_padding_mask=key_mask, softmax_scale=softmax_scale, causal=causal)
    return out.transpose(1, 2).reshape(B * max_seqlen_q, *q.shape[1:])[rows_q]


def padded_rows(cu_seqlens, total, max_seqlen):
    """(rows int64 [total]: each packed token's row in the [B * max_seqlen] right-padded layout,
    mask bool [B, max_seqlen]: True at real tokens) of the sequences cu_seqlens [B + 1] delimits;
    no host sync."""
    cu = cu_seqlens.long()
    token = torch.arange(total, device=cu.device)
    seq = torch.searchsorted(cu[1:], token, right=True)  # the sequence each packed token is in
    rows = seq * max_seqlen + token - cu[seq]
    mask = torch.arange(max_seqlen, device=cu.device) < (cu[1:] - cu[:-1])[:, None]
    return rows, mask


def seq_major(out):
    """out [B, H, L, D] laid out as [B, L, H, D] in memory (copied only when it is not): the
    layout whose transpose(1, 2).reshape(B, L, H * D) every caller does is then a view."""
    return out.transpose(1, 2).contiguous().transpose(1, 2)


@torch.library.custom_op("mcr_kernels::sdpa_flash_cpu", mutates_args=())
def sdpa_flash_cpu(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None,
                   zero_rows: torch.Tensor | None, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(out [B, H, Lq, D] in q's dtype, [B, Lq, H, D] in memory, NaN in the rows of queries
    holding NaN or inf, with zero_rows zeroed; the
    kernel's lse [B, H, Lq]) of torch's flash attention CPU kernel; bias: 0 / -inf added to
    the scores, [B or 1, 1, Lq, Lk] in q's dtype; zero_rows bool [B or 1, 1, Lq, 1]."""
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, False, attn_mask=bias,
                                                                          scale=scale)
    out = out.masked_fill(~q.isfinite().all(dim=-1, keepdim=True), float("nan"))  # the kernel gives 0 there
    out = seq_major(out if zero_rows is None else out.masked_fill(zero_rows, 0.0))
    return out, lse.contiguous()


@sdpa_flash_cpu.register_fake
def _(q, k, v, bias, zero_rows, scale):
    B, H, Lq, D = q.shape
    lse_dtype = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
    return q.new_empty(B, Lq, H, D).transpose(1, 2), q.new_empty(B, H, Lq, dtype=lse_dtype)


def _setup_context(ctx, inputs, output):
    q, k, v, bias, zero_rows, scale = inputs
    ctx.save_for_backward(q, k, v, *output, bias, zero_rows)  # out with its zero rows: see _backward
    ctx.scale = scale


def _backward(ctx, grad, _grad_lse):
    """The kernel's backward; a zeroed row's output gradient is zeroed, and then its out (zeros
    here, not the kernel's) enters nothing: rowsum(dO * O) and dO Vᵀ are both 0 for that row."""
    q, k, v, out, lse, bias, zero_rows = ctx.saved_tensors
    if zero_rows is not None:
        grad = grad.masked_fill(zero_rows, 0.0)
    d_q, d_k, d_v = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        grad, q, k, v, out, lse, 0.0, False, attn_mask=bias, scale=ctx.scale)
    return d_q, d_k, d_v, None, None, None


sdpa_flash_cpu.register_autograd(_backward, setup_context=_setup_context)
