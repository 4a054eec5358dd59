"""`blockwise` backend of local_matching: PyTorch over blocks of (images, reports) of at most
BLOCK_ELEMENTS attention entries [images, reports, Lt, Li], each block recomputed in backward
with explicit gradient formulas (any device). Formulas: docs/local_matching.md.
"""
import torch

from mcr_kernels._local_matching_inputs import compute_dtype, kernel_mode, prepare

NORM_EPS = 1e-12            # F.normalize's: a row of norm below it is divided by NORM_EPS
BLOCK_ELEMENTS = 1 << 21    # attention entries [images, reports, Lt, Li] per block

def _block(v, region, w, word, weights, attn_scale, agg_scale, mode, attn, word_scale):
    """One block, forward: (P [bi, bt, Lt, Li], the word softmax of attn "words_then_regions"
    (None for "regions"), a [bi, bt, Lt, Li], c [bi, bt, Lt, E], |c|, |c| clamped, s,
    score [bi, bt], or s at the valid words [bi, bt, Lt] for mode "none")."""
    if attn == "regions":
        P = None
        S = attn_scale * torch.einsum("ile,jke->ijkl", v, w)
    else:
        X = word_scale * torch.einsum("ile,jke->ijkl", v, w)
        valid_word = word[None, :, :, None] > 0
        P = torch.softmax(X.masked_fill_(~valid_word, torch.finfo(X.dtype).min), dim=2)
        P.masked_fill_(~valid_word, 0)         # invalid words: P = 0, even beside a NaN
        S = attn_scale * P
    valid_region = region[:, None, None, :] > 0
    a = torch.softmax(S.masked_fill_(~valid_region, torch.finfo(S.dtype).min), dim=-1)
    a.mul_(region[:, None, None, :])           # an image without a valid region: a = 0
    c = torch.einsum("ijkl,ile->ijke", a, v)
    length = c.norm(dim=-1)
    norm = length.clamp(min=NORM_EPS)
    s = torch.einsum("ijke,jke->ijk", c, w) / norm
    if mode == "none":
        score = s                              # w = 0, so s = 0, off the valid words
    elif mode == "lse":
        z = (agg_scale * s).masked_fill_(weights[None] == 0, torch.finfo(s.dtype).min)
        score = torch.logsumexp(z, dim=-1) / agg_scale * (weights.sum(1) > 0)
    else:
        score = (s * weights).sum(-1)
    return P, a, c, length, norm, s, score


def _block_ranges(B_i, B_t, Lt, Li):
    """(image slice, report slice) pairs covering [B_i, B_t], each with <= BLOCK_ELEMENTS
    attention entries (at least one pair)."""
    bt = max(1, min(B_t, BLOCK_ELEMENTS // (Lt * Li)))
    bi = max(1, min(B_i, BLOCK_ELEMENTS // (bt * Lt * Li)))
    return [(slice(i, i + bi), slice(j, j + bt)) for i in range(0, B_i, bi) for j in range(0, B_t, bt)]


@torch.library.custom_op("mcr_kernels::local_matching_blockwise", mutates_args=())
def local_matching_blockwise(v: torch.Tensor, region: torch.Tensor, w: torch.Tensor,
                             word: torch.Tensor, weights: torch.Tensor, attn_scale: float,
                             agg_scale: float, mode: str, attn: str,
                             word_scale: float) -> torch.Tensor:
    """scores of prepare()'d inputs, block by block: [B_i, B_t] for mode "lse" or "linear"
    (Σ weights s), [B_i, B_t, Lt] for "none"; attn "regions" or "words_then_regions"."""
    scores = _empty_scores(v, w, mode)
    for rows, cols in _block_ranges(v.shape[0], w.shape[0], w.shape[1], v.shape[1]):
        scores[rows, cols] = _block(v[rows], region[rows], w[cols], word[cols], weights[cols],
                                    attn_scale, agg_scale, mode, attn, word_scale)[-1]
    return scores


def _empty_scores(v, w, mode):
    return v.new_empty(v.shape[0], *w.shape[:2] if mode == "none" else w.shape[:1])


@local_matching_blockwise.register_fake
def _(v, region, w, word, weights, attn_scale, agg_scale, mode, attn, word_scale):
    return _empty_scores(v, w, mode)


@torch.library.custom_op("mcr_kernels::local_matching_blockwise_backward", mutates_args=())
def local_matching_blockwise_backward(
        grad: torch.Tensor, v: torch.Tensor, region: torch.Tensor, w: torch.Tensor,
        word: torch.Tensor, weights: torch.Tensor, scores: torch.Tensor, attn_scale: float,
        agg_scale: float, mode: str, attn: str,
        word_scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(d v, d w, d weights) of local_matching_blockwise, each block recomputed.

    With g_k = ∂score/∂s_k (softmax of agg_scale·s over valid words for lse, weights_k for
    linear, the valid words' grad itself for none):
    dc = g (w − s ĉ) / |c|, dS = a ⊙ (dc vᵀ − (dc·c)), dv = aᵀ dc + τ dSᵀ w,
    dw = τ dS v + g ĉ, d weights = Σ_i grad s (linear aggregates only). For attn
    "words_then_regions" the region logits are τ P, P = softmax over words of σ w vᵀ
    (σ = word_scale): dP = τ dS, dX = P ⊙ (dP − Σ_k P_k dP_k) (over the report's words, per
    region), and σ dXᵀ w, σ dX v replace τ dSᵀ w, τ dS v. dc [bi, bt, Lt, E] is never formed:
    with α = g / |c|, dc vᵀ = α (w vᵀ − (s / |c|) c vᵀ), dc·c = α s (|c|clamped − |c|² /
    |c|clamped) (0 unless |c| is clamped), aᵀ dc = (α a)ᵀ w − (α s / |c| a)ᵀ c and
    g ĉ = (g / |c|) c, so every elementwise step is on [bi, bt, Lt, Li] or smaller."""
    d_v, d_w, d_weights = torch.zeros_like(v), torch.zeros_like(w), torch.zeros_like(weights)
    grad = grad.to(v.dtype)
    for rows, cols in _block_ranges(v.shape[0], w.shape[0], w.shape[1], v.shape[1]):
        vb, wb, ub, gb = v[rows], w[cols], weights[cols], grad[rows, cols]
        P, a, c, length, norm, s, score = _block(vb, region[rows], wb, word[cols], ub, attn_scale,
                                                 agg_scale, mode, attn, word_scale)
        if mode == "none":
            g = gb * (ub > 0)
        elif mode == "lse":
            g = gb[..., None] * torch.exp(agg_scale * (s - score[..., None])) * (ub > 0)
        else:
            g = gb[..., None] * ub
            d_weights[cols] += torch.einsum("ij,ijk->jk", gb, s)
        alpha = g / norm
        s_over_norm = s / norm
        dc_dot_c = alpha * s * (norm - length * length / norm)
        c_v = torch.einsum("ijke,ile->ijkl", c, vb)
        dc_v = torch.einsum("ile,jke->ijkl", vb, wb).sub_(s_over_norm[..., None] * c_v)
        dS = dc_v.mul_(alpha[..., None]).sub_(dc_dot_c[..., None]).mul_(a)
        if attn == "regions":
            d_dots, dots_scale = dS, attn_scale     # w vᵀ enters the logits as τ w vᵀ
        else:
            dP = dS.mul_(attn_scale)
            d_dots, dots_scale = dP.sub_((P * dP).sum(2, keepdim=True)).mul_(P), word_scale
        alpha_a = a * alpha[..., None]
        d_v[rows] += (torch.einsum("ijkl,jke->ile", alpha_a.add(d_dots, alpha=dots_scale), wb)
                      - torch.einsum("ijkl,ijke->ile", alpha_a.mul_(s_over_norm[..., None]), c))
        d_w[cols] += (dots_scale * torch.einsum("ijkl,ile->jke", d_dots, vb)
                      + torch.einsum("ijk,ijke->jke", alpha, c))
    return d_v, d_w, d_weights


@local_matching_blockwise_backward.register_fake
def _(grad, v, region, w, word, weights, scores, attn_scale, agg_scale, mode, attn, word_scale):
    return torch.empty_like(v), torch.empty_like(w), torch.empty_like(weights)


def _blockwise_setup(ctx, inputs, output):
    v, region, w, word, weights, ctx.attn_scale, ctx.agg_scale, ctx.mode, ctx.attn, ctx.word_scale = inputs
    ctx.save_for_backward(v, region, w, word, weights, output)


def _blockwise_grads(ctx, grad):
    d_v, d_w, d_weights = local_matching_blockwise_backward(grad, *ctx.saved_tensors, ctx.attn_scale,
                                                            ctx.agg_scale, ctx.mode, ctx.attn,
                                                            ctx.word_scale)
    return (d_v, None, d_w, None, d_weights if ctx.mode == "linear" else None,
            None, None, None, None, None)


local_matching_blockwise.register_autograd(_blockwise_grads, setup_context=_blockwise_setup)


def local_matching(img, img_mask, txt, txt_mask, *, attn_scale=4.0, agg="lse", agg_scale=5.0,
                   word_weights=None, attn="regions", word_scale=1.0):
    """`blockwise` backend of mcr_kernels.local_matching (same arguments and result)."""
    inputs = prepare(img, img_mask, txt, txt_mask, agg, word_weights, compute_dtype(img.dtype))
    return local_matching_blockwise(*inputs, attn_scale, agg_scale, kernel_mode(agg), attn,
                                    word_scale)
