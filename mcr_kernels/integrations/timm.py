"""timm: Attention, Mlp and PatchDropout through mcr_kernels' ops.

    apply_to_timm(model)   # every timm Attention (and subclass that keeps its forward),
                           # GELU Mlp, PatchDropout and PatchDropoutWithIndices inside model
"""
from collections import Counter

import torch

from mcr_kernels.attention import flash_attention
from mcr_kernels.gelu_mlp import gelu_mlp
from mcr_kernels.integrations._patching import (
    ModelToken,
    gelu_approximation,
    patch_forward,
    patched_forward,
    warn_dropout_once,
)
from mcr_kernels.integrations.modules import drop_patches


@patched_forward
def timm_attention_forward(self, x, attn_mask=None, is_causal=False):
    """timm.layers.Attention.forward computed by flash_attention (same contract: attn_mask
    as SDPA's, bool True = attend or float added to the scores)."""
    B, N, _ = x.shape
    gate = self.gate(x).sigmoid() if getattr(self, "gate", None) is not None else None
    qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
    q, k = self.q_norm(qkv[0]), self.k_norm(qkv[1])
    dropout_p = self.attn_drop.p if self.training else 0.0
    if dropout_p > 0:
        warn_dropout_once(self._mcr_kernels_token, "apply_to_timm")
    if attn_mask is not None and attn_mask.dim() == 2:  # SDPA's [N, N], not a key padding mask
        attn_mask = attn_mask[None, None]
    x = flash_attention(q, k, qkv[2], attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal)
    x = self.norm(x.transpose(1, 2).reshape(B, N, self.attn_dim))
    if gate is not None:
        x = x * gate
    return self.proj_drop(self.proj(x))


@patched_forward
def timm_mlp_forward(self, x):
    """timm.layers.Mlp.forward with fc1 -> GELU -> fc2 as gelu_mlp (the activation is
    recomputed in backward, not kept); dropout between them in training runs timm's forward."""
    if self.training and getattr(self.drop1, "p", 0.0) > 0:
        return type(self).forward(self, x)
    y = gelu_mlp(x, self.fc1.weight, self.fc1.bias, self.fc2.weight, self.fc2.bias,
                 approximate=gelu_approximation(self.act))
    return self.drop2(y)


def fusable_mlp(mlp):
    """A timm Mlp that is Linear -> GELU -> (dropout) -> Linear: no norm between, no 1x1 convs."""
    return (isinstance(mlp.fc1, torch.nn.Linear) and isinstance(mlp.fc2, torch.nn.Linear)
            and isinstance(mlp.norm, torch.nn.Identity) and gelu_approximation(mlp.act) is not None)


@patched_forward
def timm_patch_dropout_forward(self, x):
    if not self.training or self.prob == 0.0:
        return x
    return drop_patches(x, self.prob, self.num_prefix_tokens, self.ordered)[0]


@patched_forward
def timm_patch_dropout_with_indices_forward(self, x):
    if not self.training or self.prob == 0.0:
        return x, None
    return drop_patches(x, self.prob, self.num_prefix_tokens, self.ordered)


def apply_to_timm(model):
    """Patch, in place, the timm modules inside `model` (any nn.Module) to run mcr_kernels'
    ops (Mlp: those with a GELU and no norm between fc1 and fc2, through gelu_mlp). Same
    parameters and state dict; outputs unchanged in eval (patch dropout draws its own random
    patches in training). Returns {class name: count} of the modules patched by
    this call; a second call changes nothing. Undo with revert(model)."""
    from timm.layers import Attention, Mlp, PatchDropout, PatchDropoutWithIndices

    forwards = {Attention: timm_attention_forward, Mlp: timm_mlp_forward, PatchDropout: timm_patch_dropout_forward,
                PatchDropoutWithIndices: timm_patch_dropout_with_indices_forward}
    token, changed = ModelToken(), Counter()
    for module in model.modules():
        for base, forward in forwards.items():
            # subclasses qualify only when they keep the base class's forward contract
            if isinstance(module, base) and type(module).forward is base.forward \
                    and (base is not Mlp or fusable_mlp(module)) and patch_forward(module, forward, token):
                changed[type(module).__name__] += 1
    return dict(changed)
