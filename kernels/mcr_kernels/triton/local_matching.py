"""Triton backend of local_matching: one program per (image, report) pair; nothing of size
[B_i, B_t, Lt, Li] is ever stored.

Forward, grid (B_i, B_t): the image's normalized rows v [Li, E] stay in one tile; for each
block of BLOCK_T words, S = τ w vᵀ, softmax over the valid regions, c = a v,
s = (c·w) / |c|, folded into the pair's aggregate (an online log-sum-exp per word lane, or
the weighted sum), or stored per word (agg="none"). Backward recomputes the same blocks in two kernels without atomics:
grid (B_t, word blocks) loops over every image for d w and d weights; grid (B_i,) loops over
every (report, word block) for d v. Saved for backward: the inputs and scores.
Li and E must fit one tile that fits the device (tile_fits); the front end runs larger
inputs, float64 ones (the kernels compute in float32) and attn="words_then_regions" (its
word softmax needs every word of a report per region, which a word block does not hold) on
the `blockwise` backend (launches).
"""
import os

import torch
import triton
import triton.language as tl

from mcr_kernels import backend
from mcr_kernels._local_matching_inputs import kernel_mode, prepare

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
BLOCK_T = 16
NUM_WARPS = 8
MAX_TILE_AREA = 128 * 128  # BLOCK_L x BLOCK_E; 256 x 128 needs 272 KiB of shared memory in forward already
# shared memory per block of the larger backward kernel at a 128 x 128 tile, from the compile
# check (sm_80 and sm_90 alike): tensor-core (tf32) products, exact ones; at 64 x 128 it is
# 120 / 81 KiB, within every sm_80+ device's opt-in limit
_BACKWARD_SHARED_128 = {True: 221_312, False: 148_504}


def tile_fits(block_l, block_e, tensor_cores, device):
    """Whether the kernels can launch with one [block_l, block_e] image tile on `device`: at
    most MAX_TILE_AREA, and at 128 x 128 the backward's shared memory within the device's
    per-block opt-in limit (an A100's 163 KiB holds the exact one only, an H100's 227 KiB both)."""
    area = block_l * block_e
    if area > MAX_TILE_AREA:
        return False
    if area < MAX_TILE_AREA or device.type != "cuda":
        return True
    return _BACKWARD_SHARED_128[tensor_cores] <= backend.shared_memory_per_block(device)


@triton.jit
def _load_image(V, REGION, i, Li, E, svb, svl, sve, srb, srl, BLOCK_L: tl.constexpr,
                BLOCK_E: tl.constexpr):
    """v [BLOCK_L, BLOCK_E] (zeros past Li, E) and which of its rows are valid regions."""
    offs_l = tl.arange(0, BLOCK_L)
    offs_e = tl.arange(0, BLOCK_E)
    lmask = offs_l < Li
    v = tl.load(V + i * svb + offs_l[:, None] * svl + offs_e[None, :] * sve,
                mask=lmask[:, None] & (offs_e < E)[None, :], other=0.0)
    region_ok = tl.load(REGION + i * srb + offs_l * srl, mask=lmask, other=0.0) > 0
    return v, region_ok


@triton.jit
def _word_block(v, region_ok, W, WTS, j, t0, Lt, E, swb, swt, swe, sub, sut, attn_scale,
                BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr, PREC: tl.constexpr):
    """Forward of one (image, report, word block): w, weights u (0 past Lt), a, c, |c|, s."""
    offs_t = t0 + tl.arange(0, BLOCK_T)
    offs_e = tl.arange(0, BLOCK_E)
    tmask = offs_t < Lt
    w = tl.load(W + j * swb + offs_t[:, None] * swt + offs_e[None, :] * swe,
                mask=tmask[:, None] & (offs_e < E)[None, :], other=0.0)
    u = tl.load(WTS + j * sub + offs_t * sut, mask=tmask, other=0.0)
    S = tl.dot(w, tl.trans(v), input_precision=PREC) * attn_scale
    S = tl.where(region_ok[None, :], S, float("-inf"))
    m = tl.max(S, axis=1)
    m = tl.where(m == float("-inf"), 0.0, m)          # no valid region: a = 0
    p = tl.exp(S - m[:, None])
    den = tl.sum(p, axis=1)
    a = p / tl.where(den > 0, den, 1.0)[:, None]
    c = tl.dot(a, v, input_precision=PREC)
    norm = tl.maximum(tl.sqrt(tl.sum(c * c, axis=1)), 1e-12)
    s = tl.sum(c * w, axis=1) / norm
    return w, u, a, c, norm, s


@triton.jit
def _word_block_grads(v, w, u, a, c, norm, s, G, score, attn_scale, agg_scale, LSE: tl.constexpr,
                      PREC: tl.constexpr):
    """Backward of one word block: g = G ∂score/∂s, ĉ, dc = g (w − s ĉ) / |c|, and
    dS = a ⊙ (dc vᵀ − dc·c) (the gradient of the pre-softmax τ-scaled logits, unscaled)."""
    if LSE:
        g = tl.where(u > 0, tl.exp(agg_scale * (s - score)), 0.0) * G
    else:
        g = u * G
    c_hat = c / norm[:, None]
    dc = (g / norm)[:, None] * (w - s[:, None] * c_hat)
    da = tl.dot(dc, tl.trans(v), input_precision=PREC)
    dS = a * (da - tl.sum(dc * c, axis=1)[:, None])
    return g, c_hat, dc, dS


@triton.jit
def _fwd_kernel(V, REGION, W, WTS, OUT, Li, Lt, E, attn_scale, agg_scale,
                svb, svl, sve, srb, srl, swb, swt, swe, sub, sut, sob, soj, sot,
                LSE: tl.constexpr, PER_WORD: tl.constexpr, PREC: tl.constexpr, BLOCK_T: tl.constexpr,
                BLOCK_L: tl.constexpr, BLOCK_E: tl.constexpr):
    """OUT[i, j] = the score of image i with report j (PER_WORD: OUT[i, j, k] = word k's
    matching, 0 at the invalid words); grid (B_i, B_t)."""
    i = tl.program_id(0).to(tl.int64)
    j = tl.program_id(1).to(tl.int64)
    v, region_ok = _load_image(V, REGION, i, Li, E, svb, svl, sve, srb, srl, BLOCK_L, BLOCK_E)
    m_lane = tl.full([BLOCK_T], float("-inf"), dtype=tl.float32)  # per word lane: running max
    acc = tl.zeros([BLOCK_T], dtype=tl.float32)                    # and sum (or weighted sum)
    for t0 in range(0, Lt, BLOCK_T):
        w, u, a, c, norm, s = _word_block(v, region_ok, W, WTS, j, t0, Lt, E, swb, swt, swe, sub, sut,
                                          attn_scale, BLOCK_T, BLOCK_E, PREC)
        if PER_WORD:
            offs_t = t0 + tl.arange(0, BLOCK_T)
            tl.store(OUT + i * sob + j * soj + offs_t * sot, s, mask=offs_t < Lt)  # w = 0, so s = 0, off the words
        elif LSE:
            z = tl.where(u > 0, agg_scale * s, float("-inf"))
            m_new = tl.maximum(m_lane, z)
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            acc = acc * tl.exp(m_lane - m_safe) + tl.exp(z - m_safe)
            m_lane = m_new
        else:
            acc += u * s
    if not PER_WORD:
        if LSE:
            m = tl.max(m_lane, axis=0)
            m = tl.where(m == float("-inf"), 0.0, m)
            total = tl.sum(acc * tl.exp(m_lane - m), axis=0)
            has_word = total != 0          # not `total > 0`: a NaN total (a NaN word) stays NaN
            score = tl.where(has_word, (m + tl.log(tl.where(has_word, total, 1.0))) / agg_scale, 0.0)
        else:
            score = tl.sum(acc, axis=0)
        tl.store(OUT + i * sob + j * soj, score)


@triton.jit
def _load_grad(GRAD, SCORES, i, j, t0, Lt, sgi, sgj, sgt, LSE: tl.constexpr, PER_WORD: tl.constexpr,
               BLOCK_T: tl.constexpr):
    """The incoming gradient of pair (i, j) (PER_WORD: of its words t0 .. t0 + BLOCK_T) and its
    score (used by LSE only)."""
    if PER_WORD:
        offs_t = t0 + tl.arange(0, BLOCK_T)
        G = tl.load(GRAD + i * sgi + j * sgj + offs_t * sgt, mask=offs_t < Lt, other=0.0)
    else:
        G = tl.load(GRAD + i * sgi + j * sgj)
    score = 0.0
    if LSE:
        score = tl.load(SCORES + i * sgi + j * sgj)
    return G, score


@triton.jit
def _bwd_txt_kernel(V, REGION, W, WTS, GRAD, SCORES, DW, DU, B_i, Li, Lt, E, attn_scale, agg_scale,
                    svb, svl, sve, srb, srl, swb, swt, swe, sub, sut, sgi, sgj, sgt,
                    LSE: tl.constexpr, PER_WORD: tl.constexpr, PREC: tl.constexpr, BLOCK_T: tl.constexpr,
                    BLOCK_L: tl.constexpr, BLOCK_E: tl.constexpr):
    """d w and d weights of one (report, word block), over every image; grid (B_t, cdiv(Lt, BLOCK_T)).
    DW, DU are contiguous like W, WTS; GRAD and SCORES share the strides sgi, sgj (, sgt)."""
    j = tl.program_id(0).to(tl.int64)
    t0 = tl.program_id(1) * BLOCK_T
    acc_dw = tl.zeros([BLOCK_T, BLOCK_E], dtype=tl.float32)
    acc_du = tl.zeros([BLOCK_T], dtype=tl.float32)
    for i in range(0, B_i):
        v, region_ok = _load_image(V, REGION, i, Li, E, svb, svl, sve, srb, srl, BLOCK_L, BLOCK_E)
        w, u, a, c, norm, s = _word_block(v, region_ok, W, WTS, j, t0, Lt, E, swb, swt, swe, sub, sut,
                                          attn_scale, BLOCK_T, BLOCK_E, PREC)
        G, score = _load_grad(GRAD, SCORES, i, j, t0, Lt, sgi, sgj, sgt, LSE, PER_WORD, BLOCK_T)
        g, c_hat, dc, dS = _word_block_grads(v, w, u, a, c, norm, s, G, score, attn_scale, agg_scale,
                                             LSE, PREC)
        acc_dw += attn_scale * tl.dot(dS, v, input_precision=PREC) + g[:, None] * c_hat
        acc_du += G * s
    offs_t = t0 + tl.arange(0, BLOCK_T)
    offs_e = tl.arange(0, BLOCK_E)
    tmask = offs_t < Lt
    tl.store(DW + j * Lt * E + offs_t[:, None] * E + offs_e[None, :], acc_dw,
             mask=tmask[:, None] & (offs_e < E)[None, :])
    tl.store(DU + j * Lt + offs_t, acc_du, mask=tmask)


@triton.jit
def _bwd_img_kernel(V, REGION, W, WTS, GRAD, SCORES, DV, B_t, Li, Lt, E, attn_scale, agg_scale,
                    svb, svl, sve, srb, srl, swb, swt, swe, sub, sut, sgi, sgj, sgt,
                    LSE: tl.constexpr, PER_WORD: tl.constexpr, PREC: tl.constexpr, BLOCK_T: tl.constexpr,
                    BLOCK_L: tl.constexpr, BLOCK_E: tl.constexpr):
    """d v of one image, over every (report, word block); grid (B_i,). DV is contiguous like V."""
    i = tl.program_id(0).to(tl.int64)
    v, region_ok = _load_image(V, REGION, i, Li, E, svb, svl, sve, srb, srl, BLOCK_L, BLOCK_E)
    acc_dv = tl.zeros([BLOCK_L, BLOCK_E], dtype=tl.float32)
    for j in range(0, B_t):
        for t0 in range(0, Lt, BLOCK_T):
            G, score = _load_grad(GRAD, SCORES, i, j, t0, Lt, sgi, sgj, sgt, LSE, PER_WORD, BLOCK_T)
            w, u, a, c, norm, s = _word_block(v, region_ok, W, WTS, j, t0, Lt, E, swb, swt, swe, sub,
                                              sut, attn_scale, BLOCK_T, BLOCK_E, PREC)
            g, c_hat, dc, dS = _word_block_grads(v, w, u, a, c, norm, s, G, score, attn_scale,
                                                 agg_scale, LSE, PREC)
            acc_dv += tl.dot(tl.trans(a), dc, input_precision=PREC)
            acc_dv += attn_scale * tl.dot(tl.trans(dS), w, input_precision=PREC)
    offs_l = tl.arange(0, BLOCK_L)
    offs_e = tl.arange(0, BLOCK_E)
    tl.store(DV + i * Li * E + offs_l[:, None] * E + offs_e[None, :], acc_dv,
             mask=(offs_l < Li)[:, None] & (offs_e < E)[None, :])


def _tiles(v):
    return dict(BLOCK_T=BLOCK_T, BLOCK_L=max(16, triton.next_power_of_2(v.shape[1])),
                BLOCK_E=max(16, triton.next_power_of_2(v.shape[2])))


def _launch_options(allow_tf32):
    options = {} if _INTERPRET else {"num_warps": NUM_WARPS}
    return dict(PREC="tf32" if allow_tf32 else "ieee", **options)


@torch.library.custom_op("mcr_kernels::local_matching_pairs", mutates_args=())
def local_matching_pairs(v: torch.Tensor, region: torch.Tensor, w: torch.Tensor, weights: torch.Tensor,
                         attn_scale: float, agg_scale: float, mode: str,
                         allow_tf32: bool) -> torch.Tensor:
    """scores float32 of prepare()'d float32 inputs (v [B_i, Li, E], region [B_i, Li],
    w [B_t, Lt, E], weights [B_t, Lt]): [B_i, B_t] for mode "lse" or "linear", [B_i, B_t, Lt]
    for "none"; allow_tf32: tensor-core products (16-bit inputs)."""
    B_i, Li, E = v.shape
    Lt = w.shape[1]
    out = _empty_scores(v, w, mode)
    _fwd_kernel[(B_i, w.shape[0])](v, region, w, weights, out, Li, Lt, E, attn_scale, agg_scale,
                                   *v.stride(), *region.stride(), *w.stride(), *weights.stride(),
                                   *_pair_word_strides(out), **_mode_options(mode, v, allow_tf32))
    return out


def _empty_scores(v, w, mode):
    return v.new_empty(v.shape[0], *w.shape[:2] if mode == "none" else w.shape[:1], dtype=torch.float32)


def _pair_word_strides(t):
    """(pair i, pair j, word) strides of scores [B_i, B_t] (word stride 0) or [B_i, B_t, Lt]."""
    return (*t.stride(), 0) if t.dim() == 2 else t.stride()


def _mode_options(mode, v, allow_tf32):
    return dict(LSE=mode == "lse", PER_WORD=mode == "none", **_tiles(v), **_launch_options(allow_tf32))


@local_matching_pairs.register_fake
def _(v, region, w, weights, attn_scale, agg_scale, mode, allow_tf32):
    return _empty_scores(v, w, mode)


@torch.library.custom_op("mcr_kernels::local_matching_pairs_backward", mutates_args=())
def local_matching_pairs_backward(grad: torch.Tensor, v: torch.Tensor, region: torch.Tensor,
                                  w: torch.Tensor, weights: torch.Tensor, scores: torch.Tensor,
                                  attn_scale: float, agg_scale: float, mode: str,
                                  allow_tf32: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(d v, d w, d weights) of local_matching_pairs, every pair's blocks recomputed."""
    B_i, Li, E = v.shape
    B_t, Lt, _ = w.shape
    grad = grad.float().contiguous()
    scores = scores.contiguous()
    d_v, d_w = torch.empty_like(v), torch.empty_like(w)
    d_weights = torch.empty(B_t, Lt, dtype=torch.float32, device=v.device)
    args = (Li, Lt, E, attn_scale, agg_scale, *v.stride(), *region.stride(), *w.stride(),
            *weights.stride(), *_pair_word_strides(grad))
    options = _mode_options(mode, v, allow_tf32)
    _bwd_txt_kernel[(B_t, triton.cdiv(Lt, BLOCK_T))](v, region, w, weights, grad, scores, d_w,
                                                     d_weights, B_i, *args, **options)
    _bwd_img_kernel[(B_i,)](v, region, w, weights, grad, scores, d_v, B_t, *args, **options)
    return d_v, d_w, d_weights


@local_matching_pairs_backward.register_fake
def _(grad, v, region, w, weights, scores, attn_scale, agg_scale, mode, allow_tf32):
    return torch.empty_like(v), torch.empty_like(w), weights.new_empty(weights.shape, dtype=torch.float32)


def _pairs_setup(ctx, inputs, output):
    v, region, w, weights, ctx.attn_scale, ctx.agg_scale, ctx.mode, ctx.allow_tf32 = inputs
    ctx.save_for_backward(v, region, w, weights, output)


def _pairs_grads(ctx, grad):
    d_v, d_w, d_weights = local_matching_pairs_backward(grad, *ctx.saved_tensors, ctx.attn_scale,
                                                        ctx.agg_scale, ctx.mode, ctx.allow_tf32)
    return d_v, None, d_w, d_weights if ctx.mode == "linear" else None, None, None, None, None


local_matching_pairs.register_autograd(_pairs_grads, setup_context=_pairs_setup)


def launches(img, attn):
    """Whether the kernels run img [B_i, Li, E] with attention order attn: attn "regions" (the
    kernels have no word softmax), not float64, and its tile fits the device."""
    tiles = _tiles(img)
    return (attn == "regions" and img.dtype != torch.float64
            and tile_fits(tiles["BLOCK_L"], tiles["BLOCK_E"], img.dtype != torch.float32, img.device))


def local_matching(img, img_mask, txt, txt_mask, *, attn_scale=4.0, agg="lse", agg_scale=5.0,
                   word_weights=None, attn="regions", word_scale=1.0):
    """`triton` backend of mcr_kernels.local_matching (same arguments and result) for inputs it
    launches on (launches; word_scale is unused, as attn must be "regions")."""
    if attn != "regions":
        raise ValueError(f'the triton kernels compute attn="regions" only, got attn={attn!r}')
    v, region, w, _, weights = prepare(img, img_mask, txt, txt_mask, agg, word_weights, torch.float32)
    return local_matching_pairs(v, region, w, weights, attn_scale, agg_scale, kernel_mode(agg),
                                img.dtype != torch.float32)


# --- compile check ------------------------------------------------------------------------
# What the launchers above pass, for python -m mcr_kernels.compile_check: float32 prepared
# inputs (contiguous, so the innermost strides are 1), the aggregates and the per-word
# matchings, exact and tensor-core
# products, at the largest tile each arch launches (tile_fits): 128 x 128 (the benchmark's
# Li = 98, E = 128), except tensor-core products on sm_80, whose largest is 64 x 128.
_SIGNATURE = dict(V="*fp32", REGION="*fp32", W="*fp32", WTS="*fp32", OUT="*fp32", GRAD="*fp32",
                  SCORES="*fp32", DW="*fp32", DU="*fp32", DV="*fp32", attn_scale="fp32", agg_scale="fp32")
_VARIANTS = [dict(sve=1, srl=1, swe=1, sut=1, LSE=lse, PER_WORD=per_word, PREC=prec, BLOCK_T=BLOCK_T,
                  BLOCK_L=block_l, BLOCK_E=128, num_warps=NUM_WARPS, archs=archs)
             for lse, per_word in ((True, False), (False, False), (False, True))
             for prec, block_l, archs in (("ieee", 128, (80, 90)), ("tf32", 128, (90,)), ("tf32", 64, (80,)))]


def _innermost_score_stride(prefix):
    """The variants with the scores' innermost stride (word for PER_WORD, else report) = 1."""
    return [dict(v, **{prefix + ("t" if v["PER_WORD"] else "j"): 1}) for v in _VARIANTS]


COMPILE_SPECS = [
    dict(kernel=kernel, dtypes=("fp32",), signature=_SIGNATURE, divisible=("E", "svl", "swt"),
         variants=_innermost_score_stride(prefix))
    for kernel, prefix in ((_fwd_kernel, "so"), (_bwd_txt_kernel, "sg"), (_bwd_img_kernel, "sg"))
]
