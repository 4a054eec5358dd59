"""open_clip: the towers' self-attention, GELU MLPs and patch dropout through mcr_kernels' ops.

    apply_to_open_clip(model)   # vision + text transformer blocks, PatchDropout, and any
                                # timm / transformers tower inside (apply_to_timm / apply_to_hf)

The loss: mcr_kernels.ClipLoss, a drop-in for open_clip.loss.ClipLoss.
"""
import sys
from collections import Counter

import torch
import torch.nn.functional as F
from torch import nn

from mcr_kernels.attention import flash_attention
from mcr_kernels.gelu_mlp import gelu_mlp
from mcr_kernels.integrations._patching import (
    ModelToken,
    gelu_approximation,
    is_causal_mask,
    patch_forward,
    patched_forward,
    warn_dropout_once,
)
from mcr_kernels.integrations.modules import drop_patches


@patched_forward
def self_attention_forward(self, query, key, value, key_padding_mask=None, need_weights=True,
                           attn_mask=None, average_attn_weights=True, is_causal=False):
    """nn.MultiheadAttention.forward for batch-first self-attention without weights (what
    open_clip's blocks call), by flash_attention; other calls run the original forward.
    open_clip's text tower passes its causal mask [L, L], recognised by value (once per
    mask tensor) and run as a causal kernel."""
    if need_weights or not (query is key is value) or query.dim() != 3:
        return nn.MultiheadAttention.forward(self, query, key, value, key_padding_mask, need_weights,
                                             attn_mask, average_attn_weights, is_causal)
    B, L, E = query.shape
    H = self.num_heads
    q, k, v = F.linear(query, self.in_proj_weight, self.in_proj_bias).view(B, L, 3, H, E // H).permute(
        2, 0, 3, 1, 4)
    if attn_mask is not None and (is_causal or is_causal_mask(attn_mask, bool_true_means_masked=True)):
        attn_mask, is_causal = None, True
    mask = _sdpa_mask(attn_mask, key_padding_mask, B, H, L)
    dropout_p = self.dropout if self.training else 0.0
    if dropout_p > 0:
        warn_dropout_once(self._mcr_kernels_token, "apply_to_open_clip")
    out = flash_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=is_causal)
    return self.out_proj(out.transpose(1, 2).reshape(B, L, E)), None


def _sdpa_mask(attn_mask, key_padding_mask, B, H, L):
    """nn.MultiheadAttention's masks (bool True = masked, or additive; attn_mask [L, L] or
    [B*H, L, L], key_padding_mask [B, L]) as one SDPA mask (bool True = attend, or additive)."""
    masks = []
    if attn_mask is not None:
        masks.append(attn_mask.view(B, H, L, L) if attn_mask.dim() == 3 else attn_mask)
    if key_padding_mask is not None:
        masks.append(key_padding_mask[:, None, None, :])
    allowed = additive = None
    for m in masks:
        if m.dtype == torch.bool:
            allowed = ~m if allowed is None else allowed & ~m
        else:
            additive = m if additive is None else additive + m
    if additive is None:
        return allowed
    return additive if allowed is None else additive.masked_fill(~allowed, float("-inf"))


@patched_forward
def open_clip_patch_dropout_forward(self, x):
    if not self.training or self.prob == 0.0:
        return x
    return drop_patches(x, self.prob, 1 if self.exclude_first_token else 0)[0]


def _supported(mha):
    return (mha.batch_first and mha._qkv_same_embed_dim and mha.bias_k is None
            and not mha.add_zero_attn and mha.in_proj_weight is not None)


@patched_forward
def residual_block_mlp_forward(self, x):
    """open_clip's block MLP, Sequential(c_fc, gelu, c_proj), as gelu_mlp."""
    return gelu_mlp(x, self.c_fc.weight, self.c_fc.bias, self.c_proj.weight, self.c_proj.bias,
                    approximate=gelu_approximation(self.gelu))


def _gelu_block_mlp(module):
    """Sequential(c_fc=Linear, gelu=GELU, c_proj=Linear) exactly (open_clip's
    ResidualAttentionBlock.mlp; QuickGELU and scaled-cosine blocks' extra norms do not qualify)."""
    return (type(module) is nn.Sequential and list(module._modules) == ["c_fc", "gelu", "c_proj"]
            and type(module.c_fc) is nn.Linear and type(module.c_proj) is nn.Linear
            and gelu_approximation(module.gelu) is not None)


def apply_to_open_clip(model):
    """Patch, in place, an open_clip model (or any module holding open_clip towers):
    batch-first nn.MultiheadAttention self-attention (open_clip's ResidualAttentionBlock,
    vision and text, the text tower staying causal), the blocks' GELU MLPs (gelu_mlp) and
    open_clip's PatchDropout; timm and
    transformers towers inside go through apply_to_timm / apply_to_hf. Same parameters and
    state dict; outputs unchanged in eval. Returns {class name: count} of what this call
    changed; a second call changes nothing. Undo with revert(model)."""
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    from open_clip.transformer import PatchDropout

    token, changed = ModelToken(), Counter()
    for module in model.modules():
        if isinstance(module, nn.MultiheadAttention) and _supported(module):
            forward = self_attention_forward
        elif isinstance(module, PatchDropout) and type(module).forward is PatchDropout.forward:
            forward = open_clip_patch_dropout_forward
        elif _gelu_block_mlp(module):
            forward = residual_block_mlp_forward
        else:
            continue
        if patch_forward(module, forward, token):
            changed[type(module).__name__] += 1
    if "timm" in sys.modules:
        from mcr_kernels.integrations.timm import apply_to_timm

        changed.update(apply_to_timm(model))
    if "transformers" in sys.modules:
        from transformers import PreTrainedModel

        from mcr_kernels.integrations.hf import apply_to_hf

        for module in model.modules():
            if isinstance(module, PreTrainedModel):
                changed.update(apply_to_hf(module))
    return dict(changed)
