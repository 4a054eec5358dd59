"""`cpu` backend of flash_attention: torch's fused scaled_dot_product_attention CPU kernel
(flash-style, the [Lq, Lk] scores never stored whole) with this op's semantics on top.

* Keys the mask excludes are zeroed in k and v first, so NaN or inf there never reaches an
  output (0 · NaN would); NaN in an attended key, value or query still gives NaN.
* A query row with no key to attend attends every (zeroed) key instead, and its output is
  set to zero afterwards: no 0/0, and no gradient flows from it.
* With a right-padding mask and Lq == Lk the padded query rows are zero, as the reference.
* lse (return_lse) is computed beside the kernel from the scores ([B, H, Lq, Lk] float32,
  without gradient): SDPA's public API does not return it.
"""
import torch
import torch.nn.functional as F

from mcr_kernels import reference


def flash_attention(q, k, v, *, key_padding_mask=None, softmax_scale=None, causal=False,
                    return_lse=False):
    """`cpu` backend of mcr_kernels.flash_attention (same arguments and results)."""
    Lq, Lk = q.shape[-2], k.shape[-2]
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
    allowed = None  # bool, broadcastable to [B, H, Lq, Lk]
    if key_padding_mask is not None:
        ignored_keys = ~key_padding_mask[:, None, :, None]
        k, v = k.masked_fill(ignored_keys, 0), v.masked_fill(ignored_keys, 0)
        allowed = key_padding_mask[:, None, None, :]
    if causal:  # bottom-right aligned, as flash-attn
        below = torch.ones(Lq, Lk, dtype=torch.bool, device=q.device).tril(diagonal=Lk - Lq)
        allowed = below if allowed is None else allowed & below
    if allowed is None:
        out = F.scaled_dot_product_attention(q, k, v, scale=scale)
        zero_rows = None
    else:
        zero_rows = ~allowed.any(dim=-1, keepdim=True)  # [B or 1, 1, Lq, 1]: no key to attend
        if key_padding_mask is not None and Lq == Lk:
            padded = ~key_padding_mask & reference.is_right_padding(key_padding_mask)
            zero_rows = zero_rows | padded[:, None, :, None]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed | zero_rows, scale=scale)
        out = out.masked_fill(zero_rows, 0.0)
    if not return_lse:
        return out
    with torch.no_grad():
        scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
        if allowed is not None:
            scores = scores.masked_fill(~allowed | zero_rows, float("-inf"))
        lse = torch.logsumexp(scores, dim=-1)
    return out, lse
