"""Plain PyTorch reference implementations of every mcr_kernels op.

They define the semantics and are the test oracle of the fused kernels: keep them
simple and obviously right, never fast. Input validation lives in the public ops
(the public ops of mcr_kernels); these functions assume valid inputs.
"""

import torch
import torch.nn.functional as F

# --- patch dropping -------------------------------------------------------------------

def random_keep_indices(batch_size, num_tokens, num_keep, *, device=None, generator=None):
    """MAE random masking indices: (ids_keep int64 [B, K], ids_restore int64 [B, N])."""
    noise = torch.rand(batch_size, num_tokens, device=device, generator=generator)
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    return ids_shuffle[:, :num_keep].contiguous(), ids_restore


def gather_tokens(x, ids_keep):
    """x [B, N, D], ids_keep [B, K] -> [B, K, D], out[b, j] = x[b, ids_keep[b, j]]."""
    return torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def restore_tokens(x_kept, ids_restore, mask_token):
    """x_kept [B, K, D], ids_restore [B, N], mask_token [D] -> [B, N, D]."""
    B, K, D = x_kept.shape
    N = ids_restore.shape[1]
    fill = mask_token.to(x_kept.dtype).expand(B, max(N - K, 0), D)
    full = torch.cat([x_kept, fill], dim=1)
    return torch.gather(full, 1, ids_restore.unsqueeze(-1).expand(-1, -1, D))


# --- attention ------------------------------------------------------------------------

def is_right_padding(key_padding_mask):
    """0-dim bool tensor: every row of the bool mask [B, L] is a prefix of Trues (no host sync)."""
    lengths = key_padding_mask.sum(dim=1, keepdim=True)
    positions = torch.arange(key_padding_mask.shape[1], device=key_padding_mask.device)
    return ((positions < lengths) == key_padding_mask).all()


def flash_attention(q, k, v, *, key_padding_mask=None, softmax_scale=None, causal=False,
                    return_lse=False):
    """Softmax attention in float32 (float64 for float64). q [B, H, Lq, Dh], k/v [B, H, Lk, Dh].

    key_padding_mask [B, Lk] bool, True = attend. A query row with no key to attend
    gives zeros (lse = -inf). When the mask is a right-padding prefix and Lq == Lk, the
    padded query rows are zeros too. Returns out (dtype of q) and, if asked, lse float32
    [B, H, Lq].
    """
    Lq, Lk = q.shape[-2], k.shape[-2]
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
    if key_padding_mask is not None:  # masked keys and values are ignored, NaN or not
        attend = key_padding_mask[:, None, :, None]
        k, v = torch.where(attend, k, 0), torch.where(attend, v, 0)
    dtype = torch.promote_types(q.dtype, torch.float32)
    scores = torch.matmul(q.to(dtype), k.to(dtype).transpose(-1, -2)) * scale
    allowed = torch.ones(Lq, Lk, dtype=torch.bool, device=q.device)
    if causal:  # bottom-right aligned, as flash-attn
        allowed = torch.ones_like(allowed).tril(diagonal=Lk - Lq)
    allowed = allowed.expand(q.shape[0], 1, Lq, Lk)
    if key_padding_mask is not None:
        allowed = allowed & key_padding_mask[:, None, None, :]
    scores = scores.masked_fill(~allowed, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.where(allowed, torch.exp(scores - lse.unsqueeze(-1)), 0.0)  # NaN stays NaN
    out = torch.matmul(probs, v.to(dtype))
    if key_padding_mask is not None and Lq == Lk:  # padded query rows, if the mask is right-padding
        padded_rows = ~key_padding_mask[:, None, :] & is_right_padding(key_padding_mask)
        out = out.masked_fill(padded_rows.unsqueeze(-1), 0.0)
        lse = lse.masked_fill(padded_rows, float("-inf"))
    out = out.to(q.dtype)
    return (out, lse) if return_lse else out


def flash_attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                           *, softmax_scale=None, causal=False):
    """Packed attention: q [total_q, H, Dh], k/v [total_k, H, Dh], cu_seqlens int32 [B+1]."""
    out = torch.zeros_like(q)
    bounds_q, bounds_k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    for i in range(len(bounds_q) - 1):
        q0, q1, k0, k1 = bounds_q[i], bounds_q[i + 1], bounds_k[i], bounds_k[i + 1]
        if q1 == q0:
            continue
        seq = flash_attention(q[q0:q1].transpose(0, 1)[None], k[k0:k1].transpose(0, 1)[None],
                              v[k0:k1].transpose(0, 1)[None], softmax_scale=softmax_scale,
                              causal=causal)
        out[q0:q1] = seq[0].transpose(0, 1)
    return out


def unpad_input(hidden, attention_mask):
    """hidden [B, L, ...], attention_mask [B, L] bool -> (packed [total, ...], indices int64
    [total], cu_seqlens int32 [B+1], max_seqlen int)."""
    lengths = attention_mask.sum(dim=1, dtype=torch.int32)
    indices = torch.nonzero(attention_mask.flatten(), as_tuple=False).flatten()
    cu_seqlens = F.pad(torch.cumsum(lengths, 0, dtype=torch.int32), (1, 0))
    packed = hidden.reshape(-1, *hidden.shape[2:])[indices]
    return packed, indices, cu_seqlens, int(lengths.max()) if lengths.numel() else 0


def pad_input(packed, indices, batch_size, seqlen):
    """Inverse of unpad_input: packed [total, ...] -> [B, L, ...], zeros at padding."""
    out = packed.new_zeros(batch_size * seqlen, *packed.shape[1:])
    out[indices] = packed
    return out.view(batch_size, seqlen, *packed.shape[1:])


# --- MbA alignment --------------------------------------------------------------------

ACTIVATIONS = {
    "gelu": lambda h: F.gelu(h),
    "gelu_tanh": lambda h: F.gelu(h, approximate="tanh"),
    "relu": F.relu,
    "none": lambda h: h,
}


def mba_pool(tokens, mask, weight1, bias1, weight2=None, bias2=None, *, activation="gelu",
             pool="mean", normalize_tokens=False):
    """Map every token, then pool: tokens [B, L, D], mask [B, L] bool or None -> [B, E].

    y = act(x W1ᵀ + b1) W2ᵀ + b2 (or x W1ᵀ + b1 without a second layer), optionally
    L2-normalized per token, then masked mean or max over L. Rows with no counted
    token give zeros. Computed in the dtype of tokens.
    """
    if mask is None:
        mask = torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)
    m = mask.unsqueeze(-1)
    tokens = torch.where(m, tokens, 0)  # masked tokens are ignored, NaN or not
    h = F.linear(tokens, weight1, bias1)
    y = F.linear(ACTIVATIONS[activation](h), weight2, bias2) if weight2 is not None else h
    if normalize_tokens:
        y = F.normalize(y, dim=-1)
    if pool == "mean":
        return masked_mean(y, mask)
    pooled = y.masked_fill(~m, float("-inf")).amax(dim=1)
    return torch.where(m.any(dim=1), pooled, torch.zeros_like(pooled))


def gather_features(image_emb, text_emb):
    """All ranks' embeddings concatenated in rank order, differentiable (torch.distributed)."""
    import torch.distributed.nn as dist_nn

    return torch.cat(dist_nn.all_gather(image_emb), 0), torch.cat(dist_nn.all_gather(text_emb), 0)


def infonce_loss(image_emb, text_emb, logit_scale, *, logit_bias=None, normalize=True,
                 gather=False, local_loss=True):
    """Symmetric InfoNCE (CLIP): mean of image->text and text->image cross-entropy.

    image_emb, text_emb [B, E]; logit_scale is already exponentiated (scalar tensor).
    gather=True takes negatives from every rank (open_clip semantics): with local_loss
    the local rows are scored against all columns, else the full global matrix.
    Computed in float32, or float64 for float64 embeddings (the dtype of the loss).
    """
    dtype = torch.promote_types(image_emb.dtype, torch.float32)
    img, txt = image_emb.to(dtype), text_emb.to(dtype)
    if normalize:
        img, txt = F.normalize(img, dim=-1), F.normalize(txt, dim=-1)
    offset = 0
    if gather:
        import torch.distributed as dist

        all_img, all_txt = gather_features(img, txt)
        if local_loss:
            offset = img.shape[0] * dist.get_rank()
            logits_i, logits_t = img @ all_txt.T, txt @ all_img.T
        else:
            logits_i = all_img @ all_txt.T
            logits_t = logits_i.T
    else:
        logits_i = img @ txt.T
        logits_t = logits_i.T
    scale = logit_scale.to(dtype)
    logits_i, logits_t = scale * logits_i, scale * logits_t
    if logit_bias is not None:
        logits_i, logits_t = logits_i + logit_bias.to(dtype), logits_t + logit_bias.to(dtype)
    labels = torch.arange(logits_i.shape[0], device=img.device) + offset
    return (F.cross_entropy(logits_i, labels) + F.cross_entropy(logits_t, labels)) / 2


def masked_mean(tokens, mask):
    """tokens [B, L, D], mask [B, L] bool (True = counted) or None -> [B, D]; rows with no
    counted token give zeros; masked tokens are ignored, NaN or not."""
    if mask is None:
        mask = torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)
    m = mask.unsqueeze(-1)
    count = m.sum(1).clamp(min=1).to(tokens.dtype)
    return torch.where(m, tokens, 0).sum(1) / count



# --- fused linear cross-entropy -------------------------------------------------------

def linear_cross_entropy(hidden, weight, bias, labels, *, ignore_index=-100, reduction="mean"):
    """CE(hidden Wᵀ + b, labels) with the full [N, V] logits in float32: hidden [N, D],
    weight [V, D], bias [V] or None, labels int64 [N]. "mean" divides by the non-ignored rows
    (0 when every row is ignored), "sum" adds them."""
    counted = (labels != ignore_index)[:, None]
    logits = F.linear(torch.where(counted, hidden, 0), weight, bias).float()  # ignored rows: no gradient, NaN or not
    total = F.cross_entropy(logits, labels, ignore_index=ignore_index, reduction="sum")
    if reduction == "sum":
        return total
    return total / (labels != ignore_index).sum().clamp(min=1)


# --- local matching (word-to-region, GLoRIA-style) ------------------------------------

LOCAL_AGGS = ("lse", "mean", "weighted", "none")
LOCAL_ATTNS = ("regions", "words_then_regions")


def local_matching(img, img_mask, txt, txt_mask, *, attn_scale=4.0, agg="lse", agg_scale=5.0,
                   word_weights=None, attn="regions", word_scale=1.0):
    """Word-to-region matching score of every image with every report -> [B_i, B_t]
    ([B_i, B_t, Lt]: the matching of every word, for agg="none").

    img [B_i, Li, E], txt [B_t, Lt, E]; masks [B, L] bool (True = valid) or None (all valid);
    word_weights [B_t, Lt] (agg="weighted"). One pair at a time over its valid rows only:
    v, w = L2-normalized image / word rows, a = softmax(attn_scale w vᵀ) over regions
    (attn="words_then_regions": softmax(attn_scale P) over regions, P = softmax(word_scale
    w vᵀ) over the words of each region), c = a v, s_k = cos(c_k, w_k), then the aggregate
    of s over words (or s itself, 0 at the invalid words). A report without a valid word (or
    with zero total weight) scores 0; an image without a valid region gives c = 0, so s = 0.
    Computed in float32 (float64 for float64 inputs).
    """
    dtype = torch.promote_types(img.dtype, torch.float32)
    img, txt = img.to(dtype), txt.to(dtype)
    per_word = agg == "none"
    scores = img.new_zeros(img.shape[0], txt.shape[0], *txt.shape[1:2] if per_word else ())
    for i in range(img.shape[0]):
        v = F.normalize(img[i] if img_mask is None else img[i][img_mask[i]], dim=-1)
        for j in range(txt.shape[0]):
            keep = torch.ones(txt.shape[1], dtype=torch.bool, device=txt.device) if txt_mask is None else txt_mask[j]
            w = F.normalize(txt[j][keep], dim=-1)
            if w.shape[0] == 0:
                continue
            if v.shape[0] == 0:
                s = torch.zeros(w.shape[0], dtype=img.dtype, device=img.device)
            else:
                if attn == "regions":
                    logits = attn_scale * w @ v.T
                else:
                    logits = attn_scale * torch.softmax(word_scale * w @ v.T, dim=0)
                a = torch.softmax(logits, dim=-1)
                s = (F.normalize(a @ v, dim=-1) * w).sum(-1)
            if per_word:
                scores[i, j] = torch.zeros(txt.shape[1], dtype=dtype, device=txt.device).masked_scatter(keep, s)
            elif agg == "lse":
                scores[i, j] = torch.logsumexp(agg_scale * s, 0) / agg_scale
            elif agg == "mean":
                scores[i, j] = s.mean()
            else:
                u = word_weights[j][keep].to(dtype)
                if u.sum() > 0:
                    scores[i, j] = (u * s).sum() / u.sum()
    return scores


# --- GELU MLP -------------------------------------------------------------------------

def gelu_mlp(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, *, approximate="none", norm_weight=None,
             norm_bias=None, norm_eps=None):
    """x [..., D] -> fc2(gelu(fc1(x))) [..., D_out], of LayerNorm(x) when norm_eps is given;
    autograd saves x, (LayerNorm(x),) fc1(.) and gelu(fc1(.))."""
    if norm_eps is not None:
        x = F.layer_norm(x, x.shape[-1:], norm_weight, norm_bias, norm_eps).to(fc1_weight.dtype)
    return F.linear(F.gelu(F.linear(x, fc1_weight, fc1_bias), approximate=approximate), fc2_weight, fc2_bias)


# --- LayerNorm + linear ------------------------------------------------------------------

def layer_norm_linear(x, norm_weight, norm_bias, weight, bias, *, eps=1e-5):
    """x [..., D] -> F.linear(LayerNorm(x), weight, bias) [..., D_out]; autograd saves x and
    LayerNorm(x)."""
    return F.linear(F.layer_norm(x, x.shape[-1:], norm_weight, norm_bias, eps).to(weight.dtype), weight, bias)
