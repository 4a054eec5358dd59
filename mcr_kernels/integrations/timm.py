"""timm: Attention and PatchDropout through mcr_kernels' ops.

    apply_to_timm(model)   # every timm Attention (and subclass that keeps its forward),
                           # PatchDropout and PatchDropoutWithIndices inside model
"""
from collections import Counter

from mcr_kernels.attention import flash_attention
from mcr_kernels.integrations._patching import (
    ModelToken,
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
    ops. Same parameters and state dict; outputs unchanged in eval (patch dropout draws its
    own random patches in training). Returns {class name: count} of the modules patched by
    this call; a second call changes nothing. Undo with revert(model)."""
    from timm.layers import Attention, PatchDropout, PatchDropoutWithIndices

    forwards = {Attention: timm_attention_forward, PatchDropout: timm_patch_dropout_forward,
                PatchDropoutWithIndices: timm_patch_dropout_with_indices_forward}
    token, changed = ModelToken(), Counter()
    for module in model.modules():
        for base, forward in forwards.items():
            # subclasses qualify only when they keep the base class's forward contract
            if isinstance(module, base) and type(module).forward is base.forward \
                    and patch_forward(module, forward, token):
                changed[type(module).__name__] += 1
    return dict(changed)
