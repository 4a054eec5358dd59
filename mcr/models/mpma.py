"""MPMA as a variant of MCR (after "Multi-task Paired Masking with Alignment Modeling for
Medical Vision-Language Pre-training", arXiv 2305.07920; our form, since only the abstract
is known: docs/method.md says what is theirs and what is ours).

On MCR's masked single pass:
  - GLA: MCR's global InfoNCE on pooled embeddings + a local alignment loss over the
    local_matching scores (agg "lse") of the MbA-mapped visible patches and report words;
  - MA-CMF: report reconstruction conditioned by cross-attention from the report tokens to
    [visible image tokens that have read a learned memory ; the memory's S slots]
    (R2GenCMN-style cross-modal memory), in place of MCR's mean-image conditioning;
    `MPMA.fuse` gives the same fusion of unmasked pairs to a multi-modal head.
"""
import torch
from timm.layers import Mlp
from torch import nn

import mcr_kernels
from mcr.models.local import LocalAlignment
from mcr.models.mcr import MCR


class CrossAttentionBlock(nn.Module):
    """Pre-norm residual cross-attention (each sequence of x attends to its context), then an MLP."""

    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.norm_x, self.norm_context, self.norm_mlp = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.q, self.kv, self.proj = nn.Linear(dim, dim), nn.Linear(dim, 2 * dim), nn.Linear(dim, dim)
        self.mlp = Mlp(dim, 4 * dim)

    def forward(self, x, context, varlen=None):
        """x [B, L, D] attends to context [B, M, D] -> [B, L, D]; with varlen=(cu_seqlens int32
        [B + 1], max_seqlen), x is packed sequences [total, D] (sequence b attends to
        context[b]) -> [total, D]."""
        D, H = x.shape[-1], self.heads
        B, M, _ = context.shape
        q = self.q(self.norm_x(x))
        kv = self.kv(self.norm_context(context))
        if varlen is None:
            L = x.shape[1]
            k, v = kv.view(B, M, 2, H, D // H).permute(2, 0, 3, 1, 4)
            out = mcr_kernels.flash_attention(q.view(B, L, H, D // H).transpose(1, 2), k, v).transpose(1, 2)
        else:
            cu_seqlens, max_seqlen = varlen
            k, v = kv.view(B * M, 2, H, D // H).unbind(1)
            cu_seqlens_context = torch.arange(0, (B + 1) * M, M, dtype=torch.int32, device=x.device)
            out = mcr_kernels.flash_attention_varlen(q.view(-1, H, D // H), k, v, cu_seqlens, cu_seqlens_context,
                                                     max_seqlen, M)
        x = x + self.proj(out.reshape(x.shape))
        return x + self.mlp(self.norm_mlp(x))


class MPMA(MCR):
    """MCR with GLA (global + local alignment) and MA-CMF (memory-augmented fusion for MRM)."""

    def __init__(self, cfg, **kwargs):
        super().__init__(cfg, **kwargs)
        D = cfg.text_width
        self.image_to_text = nn.Linear(cfg.vit_width, D)  # every visible token (MCR: their mean)
        self.memory = nn.Parameter(torch.randn(cfg.mpma.memory_slots, D) * 0.02)
        self.memory_read = CrossAttentionBlock(D, cfg.text_heads)
        self.fusion_blocks = nn.ModuleList(CrossAttentionBlock(D, cfg.text_heads) for _ in range(cfg.mpma.memory_depth))
        self.local_alignment = LocalAlignment(cfg)

    def transformer_blocks(self):
        return [*super().transformer_blocks(), self.memory_read, *self.fusion_blocks]

    def condition_report(self, states, packing, image_latent):
        """MA-CMF: the visible image tokens read the memory; each report's packed tokens attend
        to [its image's tokens ; the memory]. MCR's MRM blocks and MLM head follow."""
        img = self.image_to_text(image_latent[:, 1:])
        memory = self.memory.to(img.dtype).expand(img.shape[0], -1, -1)
        context = torch.cat([self.memory_read(img, memory), memory], dim=1)
        x = states
        for blk in self.fusion_blocks:
            x = blk(x, context, varlen=packing.varlen)
        return x

    @torch.no_grad()
    def fuse(self, imgs, input_ids, attention_mask):
        """MA-CMF's fused representation of unmasked pairs, for multi-modal heads: each
        report's tokens after attending to its image's tokens and the memory. imgs float
        [B, C, H, W], input_ids and attention_mask int64 [B, L] -> [B, L, text_width] (zeros
        at padding), in the encoders' dtype."""
        states, packing = self.encode_text(input_ids, attention_mask)
        return packing.pad(self.condition_report(states, packing, self.encode_image(imgs)))

    def alignment_losses(self, img_tokens, txt_tokens, txt_mask, word_mask, word_ids):
        """GLA: MCR's global InfoNCE + the local loss (agg "lse") on the MbA-mapped tokens
        and words (LocalAlignment.words)."""
        losses = super().alignment_losses(img_tokens, txt_tokens, txt_mask, word_mask, word_ids)
        words, words_mask = self.local_alignment.words(txt_tokens, word_mask, word_ids)
        image_head, text_head = self.local_alignment.heads(self.image_head, self.text_head)
        losses["local"] = self.local_alignment(image_head(img_tokens), text_head(words), words_mask)
        return losses
