"""The local (word-to-region) alignment loss shared by the mpma and reclf variants."""
import math

import torch
import torch.nn.functional as F
from torch import nn

import mcr_kernels


class LocalAlignment(nn.Module):
    """Symmetric cross-entropy over the batch's [B, B] local matching scores
    (mcr_kernels.local_matching) times a scale, fixed or learned in log space; image i's
    positive is report i. Negatives come from this process's batch only."""

    def __init__(self, cfg):
        """cfg: a ModelConfig; its `local` section sets the scales."""
        super().__init__()
        self.cfg = cfg
        log_scale = torch.full((1,), math.log(cfg.local.logit_scale))
        if cfg.local.scale_learnable:
            self.log_scale = nn.Parameter(log_scale)
        else:
            self.register_buffer("log_scale", log_scale, persistent=False)

    def forward(self, img_local, txt_local, word_mask, *, agg="lse", word_weights=None):
        """img_local [B, K, E], txt_local [B, L, E]: tokens in the joint space; word_mask
        [B, L] bool: the words a report is matched by. Returns a float32 scalar."""
        cfg = self.cfg
        scores = mcr_kernels.local_matching(img_local, None, txt_local, word_mask,
                                            attn_scale=cfg.local.attn_scale, agg=agg,
                                            agg_scale=cfg.local.agg_scale, word_weights=word_weights)
        logits = self.log_scale.exp().clamp(max=100) * scores
        labels = torch.arange(logits.shape[0], device=logits.device)
        return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
