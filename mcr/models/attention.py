"""Route the encoders' attention through mcr_kernels.flash_attention.

- timm ViT blocks: `use_flash_attention(module)` swaps every timm Attention in `module` for
  FlashViTAttention (same parameters, so timm checkpoints load unchanged).
- HF BERT: `BertModel(config, attn_implementation="mcr")` after this module is
  imported; the padding mask reaches the kernel as a [B, L] key padding mask.
"""
import torch
from timm.layers import Attention as TimmAttention
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, flash_attention_mask

import mcr_kernels

ATTN_IMPLEMENTATION = "mcr"


class FlashViTAttention(TimmAttention):
    """timm's Attention computed by mcr_kernels.flash_attention.

    attn_mask, if given, is a key padding mask [B, L] bool (True = attend).
    """

    def forward(self, x, attn_mask=None, is_causal=False):
        B, N, _ = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        x = mcr_kernels.flash_attention(q, k, v, key_padding_mask=attn_mask, causal=is_causal)
        x = self.norm(x.transpose(1, 2).reshape(B, N, self.attn_dim))
        return self.proj_drop(self.proj(x))


def use_flash_attention(module):
    """Swap every timm Attention inside `module` for FlashViTAttention, in place."""
    for sub in module.modules():
        if type(sub) is TimmAttention:
            if sub.gate is not None or sub.attn_drop.p > 0:
                raise ValueError("FlashViTAttention supports neither gated attention nor attention dropout")
            sub.__class__ = FlashViTAttention
    return module


def bert_flash_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers attention function: q/k/v [B, H, L, Dh], attention_mask [B, L] or None."""
    if dropout > 0:
        raise ValueError(f"{ATTN_IMPLEMENTATION} attention has no dropout; set attention_probs_dropout_prob=0")
    key_padding_mask = None if attention_mask is None else attention_mask.to(torch.bool)
    out = mcr_kernels.flash_attention(query, key, value, key_padding_mask=key_padding_mask,
                                      softmax_scale=scaling)
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(ATTN_IMPLEMENTATION, bert_flash_attention)
ALL_MASK_ATTENTION_FUNCTIONS.register(ATTN_IMPLEMENTATION, flash_attention_mask)
