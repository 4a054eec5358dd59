"""Local (word-to-region) matching of every image with every report, GLoRIA-style.

    scores = local_matching(img, img_mask, txt, txt_mask)      # [B_i, Li, E], [B_t, Lt, E] -> [B_i, B_t]

For image i and report j: v, w = the L2-normalized valid rows of img[i] and txt[j];
a = softmax over regions of attn_scale · w vᵀ; c = a v; s_k = cos(c_k, w_k); the score
aggregates s over the valid words ("lse", "mean" or "weighted" by word_weights).
Written eagerly this holds [B_i, B_t, Lt, Li] tensors; no backend here does:

* `cpu`: PyTorch over blocks of (images, reports) of at most BLOCK_ELEMENTS attention
  entries, each block recomputed in backward with explicit gradient formulas (any device);
* `triton`: one program per (image, report) pair (mcr_kernels/triton/local_matching.py).

Formulas, backends and limits: docs/local_matching.md.
"""
import torch
import torch.nn.functional as F

from mcr_kernels import backend, reference
from mcr_kernels._validate import FLOAT_DTYPES, check_size, check_tensor

AGGS = reference.LOCAL_AGGS
NORM_EPS = 1e-12            # F.normalize's: a row of norm below it is divided by NORM_EPS
BLOCK_ELEMENTS = 1 << 21    # attention entries [images, reports, Lt, Li] per block of `cpu`


def local_matching(img, img_mask, txt, txt_mask, *, attn_scale=4.0, agg="lse", agg_scale=5.0,
                   word_weights=None):
    """Word-to-region matching score of every image with every report.

    img [B_i, Li, E] and txt [B_t, Lt, E] (float; same dtype and device); img_mask [B_i, Li],
    txt_mask [B_t, Lt] bool (True = valid) or None (all valid). agg: "lse" (log Σ_k
    exp(agg_scale s_k) / agg_scale), "mean", or "weighted" (Σ u_k s_k / Σ u_k with u =
    word_weights [B_t, Lt], non-negative). A report with no valid word (or zero total
    weight) scores 0. Returns scores [B_i, B_t]: float32, or float64 for float64 inputs.
    Differentiable in img, txt and word_weights.
    """
    check_tensor("img", img, ndim=3, dtypes=FLOAT_DTYPES)
    check_tensor("txt", txt, ndim=3, dtypes=(img.dtype,), device=img.device)
    check_size("txt", txt, 2, img.shape[2], "img.shape[2] (embedding width)")
    for name, t in (("img", img), ("txt", txt)):
        if 0 in t.shape:
            raise ValueError(f"{name} must have no empty dimension, got shape {tuple(t.shape)}")
    for name, mask, t in (("img_mask", img_mask, img), ("txt_mask", txt_mask, txt)):
        if mask is not None:
            check_tensor(name, mask, ndim=2, dtypes=(torch.bool,), device=img.device)
            check_size(name, mask, 0, t.shape[0], f"{name[:3]}.shape[0] (batch)")
            check_size(name, mask, 1, t.shape[1], f"{name[:3]}.shape[1] (length)")
    if agg not in AGGS:
        raise ValueError(f"agg must be one of {AGGS}, got {agg!r}")
    if not agg_scale > 0:
        raise ValueError(f"agg_scale must be > 0, got {agg_scale}")
    if agg == "weighted":
        if word_weights is None:
            raise ValueError('agg="weighted" needs word_weights [B_t, Lt]')
        check_tensor("word_weights", word_weights, ndim=2, dtypes=FLOAT_DTYPES, device=img.device)
        check_size("word_weights", word_weights, 0, txt.shape[0], "txt.shape[0] (reports)")
        check_size("word_weights", word_weights, 1, txt.shape[1], "txt.shape[1] (words)")
        if not torch.compiler.is_compiling() and bool((word_weights < 0).any()):
            raise ValueError("word_weights must be non-negative")
    elif word_weights is not None:
        raise ValueError(f'word_weights is only used with agg="weighted", got agg={agg!r}')
    _, fn = backend.resolve("local_matching", img.device)
    return fn(img, img_mask, txt, txt_mask, attn_scale=float(attn_scale), agg=agg,
              agg_scale=float(agg_scale), word_weights=word_weights)


def prepare(img, img_mask, txt, txt_mask, agg, word_weights, dtype):
    """The fused backends' inputs, differentiable in img, txt and word_weights:
    v [B_i, Li, E], w [B_t, Lt, E] normalized rows; region [B_i, Li] validity (1/0);
    weights [B_t, Lt]: agg="lse" word validity (1/0), "mean" 1/n on the n valid words,
    "weighted" u / Σu on the valid words (all 0 where Σu = 0). All in dtype, contiguous."""
    v = F.normalize(img.to(dtype), dim=-1).contiguous()
    w = F.normalize(txt.to(dtype), dim=-1).contiguous()
    region = img.new_ones(img.shape[:2], dtype=dtype) if img_mask is None else img_mask.to(dtype)
    valid = txt.new_ones(txt.shape[:2], dtype=dtype) if txt_mask is None else txt_mask.to(dtype)
    if agg == "lse":
        weights = valid
    elif agg == "mean":
        weights = valid / valid.sum(1, keepdim=True).clamp(min=1)
    else:
        u = word_weights.to(dtype) * valid
        total = u.sum(1, keepdim=True)
        weights = u / torch.where(total > 0, total, 1.0) * (total > 0)
    return v, region.contiguous(), w, weights.contiguous()


def compute_dtype(dtype):
    """float32 for 16- and 32-bit inputs, float64 for float64."""
    return torch.promote_types(dtype, torch.float32)


# --- native: blocks of (images, reports) in PyTorch ------------------------------------------

def _block(v, region, w, weights, attn_scale, agg_scale, lse):
    """One block, forward: (a [bi, bt, Lt, Li], c [bi, bt, Lt, E], |c| clamped, s, score [bi, bt])."""
    S = attn_scale * torch.einsum("ile,jke->ijkl", v, w)
    valid_region = region[:, None, None, :] > 0
    a = torch.softmax(S.masked_fill_(~valid_region, torch.finfo(S.dtype).min), dim=-1)
    a.mul_(region[:, None, None, :])           # an image without a valid region: a = 0
    c = torch.einsum("ijkl,ile->ijke", a, v)
    norm = c.norm(dim=-1).clamp_(min=NORM_EPS)
    s = torch.einsum("ijke,jke->ijk", c, w) / norm
    if lse:
        z = (agg_scale * s).masked_fill_(weights[None] == 0, torch.finfo(s.dtype).min)
        score = torch.logsumexp(z, dim=-1) / agg_scale * (weights.sum(1) > 0)
    else:
        score = (s * weights).sum(-1)
    return a, c, norm, s, score


def _block_ranges(B_i, B_t, Lt, Li):
    """(image slice, report slice) pairs covering [B_i, B_t], each with <= BLOCK_ELEMENTS
    attention entries (at least one pair)."""
    bt = max(1, min(B_t, BLOCK_ELEMENTS // (Lt * Li)))
    bi = max(1, min(B_i, BLOCK_ELEMENTS // (bt * Lt * Li)))
    return [(slice(i, i + bi), slice(j, j + bt)) for i in range(0, B_i, bi) for j in range(0, B_t, bt)]


@torch.library.custom_op("mcr_kernels::local_matching_blockwise", mutates_args=())
def local_matching_blockwise(v: torch.Tensor, region: torch.Tensor, w: torch.Tensor,
                             weights: torch.Tensor, attn_scale: float, agg_scale: float,
                             lse: bool) -> torch.Tensor:
    """scores [B_i, B_t] of prepare()'d inputs, block by block."""
    scores = v.new_empty(v.shape[0], w.shape[0])
    for rows, cols in _block_ranges(v.shape[0], w.shape[0], w.shape[1], v.shape[1]):
        scores[rows, cols] = _block(v[rows], region[rows], w[cols], weights[cols], attn_scale,
                                    agg_scale, lse)[-1]
    return scores


@local_matching_blockwise.register_fake
def _(v, region, w, weights, attn_scale, agg_scale, lse):
    return v.new_empty(v.shape[0], w.shape[0])


@torch.library.custom_op("mcr_kernels::local_matching_blockwise_backward", mutates_args=())
def local_matching_blockwise_backward(
        grad: torch.Tensor, v: torch.Tensor, region: torch.Tensor, w: torch.Tensor,
        weights: torch.Tensor, scores: torch.Tensor, attn_scale: float, agg_scale: float,
        lse: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(d v, d w, d weights) of local_matching_blockwise, each block recomputed.

    With g_k = ∂score/∂s_k (softmax of agg_scale·s over valid words for lse, else weights_k):
    dc = g (w − s ĉ) / |c|, dS = a ⊙ (dc vᵀ − (dc·c)), dv = aᵀ dc + τ dSᵀ w,
    dw = τ dS v + g ĉ, d weights = Σ_i grad s (linear aggregates only)."""
    d_v, d_w, d_weights = torch.zeros_like(v), torch.zeros_like(w), torch.zeros_like(weights)
    grad = grad.to(v.dtype)
    for rows, cols in _block_ranges(v.shape[0], w.shape[0], w.shape[1], v.shape[1]):
        vb, wb, ub, gb = v[rows], w[cols], weights[cols], grad[rows, cols]
        a, c, norm, s, score = _block(vb, region[rows], wb, ub, attn_scale, agg_scale, lse)
        if lse:
            g = torch.exp(agg_scale * (s - score[..., None])) * (ub > 0)
        else:
            g = ub.expand_as(s)
            d_weights[cols] += torch.einsum("ij,ijk->jk", gb, s)
        g = gb[..., None] * g
        c_hat = c / norm[..., None]
        dc = (g / norm)[..., None] * (wb - s[..., None] * c_hat)
        dS = torch.einsum("ijke,ile->ijkl", dc, vb).sub_((dc * c).sum(-1, keepdim=True)).mul_(a)
        d_v[rows] += torch.einsum("ijkl,ijke->ile", a, dc) + attn_scale * torch.einsum("ijkl,jke->ile", dS, wb)
        d_w[cols] += attn_scale * torch.einsum("ijkl,ile->jke", dS, vb) + torch.einsum("ijk,ijke->jke", g, c_hat)
    return d_v, d_w, d_weights


@local_matching_blockwise_backward.register_fake
def _(grad, v, region, w, weights, scores, attn_scale, agg_scale, lse):
    return torch.empty_like(v), torch.empty_like(w), torch.empty_like(weights)


def _blockwise_setup(ctx, inputs, output):
    v, region, w, weights, ctx.attn_scale, ctx.agg_scale, ctx.lse = inputs
    ctx.save_for_backward(v, region, w, weights, output)


def _blockwise_grads(ctx, grad):
    d_v, d_w, d_weights = local_matching_blockwise_backward(grad, *ctx.saved_tensors, ctx.attn_scale,
                                                            ctx.agg_scale, ctx.lse)
    return d_v, None, d_w, None if ctx.lse else d_weights, None, None, None


local_matching_blockwise.register_autograd(_blockwise_grads, setup_context=_blockwise_setup)


def blockwise(img, img_mask, txt, txt_mask, *, attn_scale=4.0, agg="lse", agg_scale=5.0,
              word_weights=None):
    """`cpu` backend of local_matching (same arguments and result)."""
    inputs = prepare(img, img_mask, txt, txt_mask, agg, word_weights, compute_dtype(img.dtype))
    return local_matching_blockwise(*inputs, attn_scale, agg_scale, agg == "lse")


backend.register("local_matching", "reference", reference.local_matching)
backend.register("local_matching", "cpu", blockwise)

if backend.HAS_TRITON:  # a broken kernel file raises here: never a silent fallback
    from mcr_kernels.triton import local_matching as triton_local_matching

    backend.register("local_matching", "triton", triton_local_matching.local_matching)
