"""The inputs every fused local_matching backend computes on (blockwise, Triton)."""
import torch
import torch.nn.functional as F


def prepare(img, img_mask, txt, txt_mask, agg, word_weights, dtype):
    """The fused backends' inputs, differentiable in img, txt and word_weights:
    v [B_i, Li, E], w [B_t, Lt, E] normalized rows; region [B_i, Li] and word [B_t, Lt]
    validity (1/0); weights [B_t, Lt]: agg="lse" and "none" word validity, "mean" 1/n on the
    n valid words, "weighted" u / Σu on the valid words (all 0 where Σu = 0; so a valid word
    can weigh 0, and the word softmax of attn="words_then_regions" reads word). All in dtype,
    contiguous.
    Masked-out regions, words and word weights are zeros, whatever they held (NaN or inf)."""
    if img_mask is not None:
        img = torch.where(img_mask[..., None], img, 0)
    if txt_mask is not None:
        txt = torch.where(txt_mask[..., None], txt, 0)
        if word_weights is not None:
            word_weights = torch.where(txt_mask, word_weights, 0)
    v = F.normalize(img.to(dtype), dim=-1).contiguous()
    w = F.normalize(txt.to(dtype), dim=-1).contiguous()
    region = img.new_ones(img.shape[:2], dtype=dtype) if img_mask is None else img_mask.to(dtype)
    valid = txt.new_ones(txt.shape[:2], dtype=dtype) if txt_mask is None else txt_mask.to(dtype)
    if agg in ("lse", "none"):
        weights = valid
    elif agg == "mean":
        weights = valid / valid.sum(1, keepdim=True).clamp(min=1)
    else:
        u = word_weights.to(dtype) * valid
        total = u.sum(1, keepdim=True)
        weights = u / torch.where(total > 0, total, 1.0) * (total > 0)
    return v, region.contiguous(), w, valid.contiguous(), weights.contiguous()


def compute_dtype(dtype):
    """float32 for 16- and 32-bit inputs, float64 for float64."""
    return torch.promote_types(dtype, torch.float32)


def kernel_mode(agg):
    """The fused kernels' aggregation mode of an agg: "lse", "none", or "linear" (mean, weighted)."""
    return agg if agg in ("lse", "none") else "linear"
