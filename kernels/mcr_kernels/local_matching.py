"""Local (word-to-region) matching of every image with every report, GLoRIA-style.

    scores = local_matching(img, img_mask, txt, txt_mask)      # [B_i, Li, E], [B_t, Lt, E] -> [B_i, B_t]

For image i and report j: v, w = the L2-normalized valid rows of img[i] and txt[j];
a = softmax over regions of attn_scale · w vᵀ (attn="words_then_regions", GLoRIA's order:
of attn_scale · P, P = softmax over words of word_scale · w vᵀ); c = a v; s_k = cos(c_k, w_k);
the score aggregates s over the valid words ("lse", "mean" or "weighted" by word_weights), or
is s itself ("none": one matching per word, for a model that relates the matchings).
Written eagerly this holds [B_i, B_t, Lt, Li] tensors; no backend here does:

* `blockwise`: PyTorch over blocks of (images, reports) of at most BLOCK_ELEMENTS attention
  entries, each block recomputed in backward with explicit gradient formulas (any device;
  mcr_kernels/blockwise/local_matching.py);
* `triton`: one program per (image, report) pair (mcr_kernels/triton/local_matching.py);
  float64 inputs, images whose tile cannot launch and attn="words_then_regions" (the word
  softmax needs every word of a report per region) run `blockwise` instead.

Formulas, backends and limits: docs/local_matching.md.
"""
import torch

from mcr_kernels import backend, reference
from mcr_kernels._validate import FLOAT_DTYPES, check_size, check_tensor
from mcr_kernels.blockwise import local_matching as _blockwise

AGGS = reference.LOCAL_AGGS
ATTNS = reference.LOCAL_ATTNS


def local_matching(img, img_mask, txt, txt_mask, *, attn_scale=4.0, agg="lse", agg_scale=5.0,
                   word_weights=None, attn="regions", word_scale=1.0):
    """Word-to-region matching score of every image with every report.

    img [B_i, Li, E] and txt [B_t, Lt, E] (float; same dtype and device); img_mask [B_i, Li],
    txt_mask [B_t, Lt] bool (True = valid) or None (all valid). agg: "lse" (log Σ_k
    exp(agg_scale s_k) / agg_scale), "mean", or "weighted" (Σ u_k s_k / Σ u_k with u =
    word_weights [B_t, Lt], non-negative), or "none" (every word's matching s_k, 0 at the
    invalid words). attn: "regions" (a softmax over the regions of attn_scale · w vᵀ) or
    "words_then_regions" (GLoRIA's order: a softmax over the report's valid words of
    word_scale · w vᵀ for each region, then over the regions of attn_scale times that);
    word_scale > 0 matters only for the latter. A report with no valid word (or zero total
    weight) scores 0. Returns scores [B_i, B_t] ([B_i, B_t, Lt] for "none"): float32, or
    float64 for float64 inputs. Differentiable in img, txt and word_weights.
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
    if attn not in ATTNS:
        raise ValueError(f"attn must be one of {ATTNS}, got {attn!r}")
    if not word_scale > 0:
        raise ValueError(f"word_scale must be > 0, got {word_scale}")
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
    name, fn = backend.resolve("local_matching", img.device)
    if name == "triton" and not _triton.launches(img, attn):
        fn = _blockwise.local_matching
    return fn(img, img_mask, txt, txt_mask, attn_scale=float(attn_scale), agg=agg,
              agg_scale=float(agg_scale), word_weights=word_weights, attn=attn,
              word_scale=float(word_scale))


backend.register("local_matching", "reference", reference.local_matching)
backend.register("local_matching", "blockwise", _blockwise.local_matching)

if backend.HAS_TRITON:  # a broken kernel file raises here: never a silent fallback
    from mcr_kernels.triton import local_matching as _triton

    backend.register("local_matching", "triton", _triton.local_matching)
