"""MbA alignment: map every token into the joint space, pool, then symmetric InfoNCE.

    pooled = mba_pool(tokens, mask, w1, b1, w2, b2)                 # [B, L, D] -> [B, E]
    mean = masked_mean(tokens, mask)                                # [B, L, D] -> [B, D] (AbM)
    loss = infonce_loss(img_emb, txt_emb, logit_scale)              # CLIP loss, scale exp'd
    loss = mba_infonce(img_tokens, img_mask, txt_tokens, txt_mask, img_head, txt_head, scale)
"""
import torch
from torch import nn

from mcr_kernels import backend, reference
from mcr_kernels._validate import FLOAT_DTYPES, check_size, check_tensor
from mcr_kernels.blockwise import mba as _blockwise_mba

ACTIVATIONS = tuple(reference.ACTIVATIONS)
POOLS = ("mean", "max")


class ProjectionHead(nn.Module):
    """Per-token map into the joint space: fc2(act(fc1(x))), or fc1(x) when hidden_dim is None."""

    def __init__(self, in_dim, out_dim, hidden_dim=None, activation="gelu"):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
        self.activation = activation if hidden_dim else "none"
        self.fc1 = nn.Linear(in_dim, hidden_dim or out_dim)
        self.fc2 = nn.Linear(hidden_dim, out_dim) if hidden_dim else None

    def forward(self, x):
        h = self.fc1(x)
        return self.fc2(reference.ACTIVATIONS[self.activation](h)) if self.fc2 is not None else h

    def pool(self, tokens, mask, *, pool="mean", normalize_tokens=False):
        """mba_pool of tokens [B, L, D] with this head's weights -> [B, E]."""
        fc2 = self.fc2
        return mba_pool(tokens, mask, self.fc1.weight, self.fc1.bias,
                        None if fc2 is None else fc2.weight, None if fc2 is None else fc2.bias,
                        activation=self.activation, pool=pool, normalize_tokens=normalize_tokens)


def mba_pool(tokens, mask, weight1, bias1, weight2=None, bias2=None, *, activation="gelu",
             pool="mean", normalize_tokens=False):
    """Map every token, then pool (MbA): tokens [B, L, D], mask [B, L] bool -> pooled [B, E].

    h = act(x W1ᵀ + b1) and y = h W2ᵀ + b2 with a second layer (weight2 [E, H]), else
    y = x W1ᵀ + b1; optional per-token L2 normalization; masked mean or max over L
    (mask True = counted, None = all). Rows with no counted token give zeros. Weights and
    biases have tokens' dtype (any float dtype under autocast, which casts them as F.linear).
    """
    check_tensor("tokens", tokens, ndim=3, dtypes=FLOAT_DTYPES)
    B, L, D = tokens.shape
    if mask is not None:
        check_tensor("mask", mask, ndim=2, dtypes=(torch.bool,), device=tokens.device)
        check_size("mask", mask, 0, B, "tokens.shape[0] (batch)")
        check_size("mask", mask, 1, L, "tokens.shape[1] (length)")
    dtypes = FLOAT_DTYPES if torch.is_autocast_enabled(tokens.device.type) else (tokens.dtype,)
    check_tensor("weight1", weight1, ndim=2, dtypes=dtypes, device=tokens.device)
    check_size("weight1", weight1, 1, D, "tokens.shape[2] (model width)")
    if bias1 is not None:
        check_tensor("bias1", bias1, ndim=1, dtypes=dtypes, device=tokens.device)
        check_size("bias1", bias1, 0, weight1.shape[0], "weight1.shape[0]")
    if weight2 is not None:
        check_tensor("weight2", weight2, ndim=2, dtypes=dtypes, device=tokens.device)
        check_size("weight2", weight2, 1, weight1.shape[0], "weight1.shape[0] (hidden)")
        if bias2 is not None:
            check_tensor("bias2", bias2, ndim=1, dtypes=dtypes, device=tokens.device)
            check_size("bias2", bias2, 0, weight2.shape[0], "weight2.shape[0]")
    elif bias2 is not None:
        raise ValueError("bias2 given without weight2")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    if pool not in POOLS:
        raise ValueError(f"pool must be one of {POOLS}, got {pool!r}")
    _, fn = backend.resolve("mba_pool", tokens.device)
    return fn(tokens, mask, weight1, bias1, weight2, bias2, activation=activation, pool=pool,
              normalize_tokens=normalize_tokens)


def masked_mean(tokens, mask):
    """Mean over the counted tokens: tokens [B, L, D], mask [B, L] bool (True = counted) or
    None (all) -> [B, D] in tokens' dtype. Rows with no counted token give zeros; masked
    tokens are ignored, NaN or not (AbM's aggregate-then-map pooling)."""
    check_tensor("tokens", tokens, ndim=3, dtypes=FLOAT_DTYPES)
    if mask is not None:
        check_tensor("mask", mask, ndim=2, dtypes=(torch.bool,), device=tokens.device)
        check_size("mask", mask, 0, tokens.shape[0], "tokens.shape[0] (batch)")
        check_size("mask", mask, 1, tokens.shape[1], "tokens.shape[1] (length)")
    _, fn = backend.resolve("masked_mean", tokens.device)
    return fn(tokens, mask)


def infonce_loss(image_emb, text_emb, logit_scale, *, logit_bias=None, normalize=True,
                 gather=False, local_loss=True):
    """Symmetric InfoNCE over scaled cosine logits; a float32 scalar (float64 for float64
    embeddings). An empty batch raises ValueError.

    image_emb, text_emb [B, E] (one dtype and device); logit_scale: one-element float tensor,
    already exponentiated (open_clip), logit_bias one too or None, on the embeddings' device.
    gather=True takes negatives from every rank of torch.distributed
    (gradients reach each rank's own embeddings); local_loss scores local rows only.
    """
    check_tensor("image_emb", image_emb, ndim=2, dtypes=FLOAT_DTYPES)
    check_tensor("text_emb", text_emb, ndim=2, dtypes=(image_emb.dtype,), device=image_emb.device)
    if text_emb.shape != image_emb.shape:
        raise ValueError(f"text_emb must have the shape of image_emb {tuple(image_emb.shape)}, "
                         f"got {tuple(text_emb.shape)}")
    if image_emb.shape[0] == 0:
        raise ValueError("image_emb and text_emb must hold at least one pair (batch size 0 has no loss)")
    if not isinstance(logit_scale, torch.Tensor) or logit_scale.numel() != 1:
        raise ValueError("logit_scale must be a one-element tensor (already exponentiated)")
    check_tensor("logit_scale", logit_scale, dtypes=FLOAT_DTYPES, device=image_emb.device)
    if logit_bias is not None:
        if not isinstance(logit_bias, torch.Tensor) or logit_bias.numel() != 1:
            raise ValueError("logit_bias must be None or a one-element tensor (added to every logit)")
        check_tensor("logit_bias", logit_bias, dtypes=FLOAT_DTYPES, device=image_emb.device)
    _, fn = backend.resolve("infonce_loss", image_emb.device)
    return fn(image_emb, text_emb, logit_scale, logit_bias=logit_bias, normalize=normalize,
              gather=gather, local_loss=local_loss)


def mba_infonce(img_tokens, img_mask, txt_tokens, txt_mask, img_head, txt_head, logit_scale, *,
                logit_bias=None, pool="mean", normalize_tokens=False, gather=False, local_loss=True):
    """MbA + InfoNCE: each modality's tokens mapped by its ProjectionHead, pooled, then the
    symmetric loss. Returns (loss, image_emb [B, E], text_emb [B, E]); embeddings unnormalized."""
    image_emb = img_head.pool(img_tokens, img_mask, pool=pool, normalize_tokens=normalize_tokens)
    text_emb = txt_head.pool(txt_tokens, txt_mask, pool=pool, normalize_tokens=normalize_tokens)
    loss = infonce_loss(image_emb, text_emb, logit_scale, logit_bias=logit_bias, gather=gather,
                        local_loss=local_loss)
    return loss, image_emb, text_emb


backend.register("mba_pool", "reference", reference.mba_pool)
backend.register("masked_mean", "reference", reference.masked_mean)
backend.register("infonce_loss", "reference", reference.infonce_loss)
backend.register("mba_pool", "blockwise", _blockwise_mba.mba_pool, devices=("cpu",))
backend.register("infonce_loss", "blockwise", _blockwise_mba.infonce_loss, devices=("cpu",))

if backend.HAS_TRITON:  # a broken kernel file raises here: never a silent fallback
    from mcr_kernels.triton import mba as triton_mba

    backend.register("mba_pool", "triton", triton_mba.mba_pool)
    backend.register("infonce_loss", "triton", triton_mba.infonce_loss)
