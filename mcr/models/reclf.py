"""RECLF as a variant of MCR (after "Enhancing medical vision-language contrastive learning via
inter-matching relation modelling", arXiv 2401.10501; our form, since only the abstract is
known: docs/method.md says what is theirs and what is ours).

Global InfoNCE + a local loss whose word-to-region matchings (mcr_kernels.local_matching)
are aggregated with per-word weights instead of pooled evenly:
  - IRM (importance): a small head on the report tokens gives each word a non-negative
    importance u_k = softplus(MLP(t_k));
  - SRM (semantic relations): R = row-softmax over the report's other valid words of their
    token cosine similarities / srm_temperature; a word's weight takes srm_mix of the
    importance of the words it relates to: weight = (1 - srm_mix) u + srm_mix R u.
Masked inputs as MCR; RECLF's unmasked, contrastive-only setting is `--unmasked-tuning 1`
(MCR.forward(unmasked=True) on every step: global and local losses, no reconstruction).
"""
import torch
import torch.nn.functional as F
from torch import nn

from mcr.models.local import LocalAlignment
from mcr.models.mcr import MCR


class RECLF(MCR):
    """MCR whose alignment adds a local loss aggregated by IRM and SRM word weights."""

    def __init__(self, cfg, **kwargs):
        super().__init__(cfg, **kwargs)
        self.irm = nn.Sequential(nn.Linear(cfg.text_width, cfg.reclf.irm_hidden), nn.GELU(),
                                 nn.Linear(cfg.reclf.irm_hidden, 1))
        self.local_alignment = LocalAlignment(cfg)

    def word_weights(self, txt_tokens, word_mask):
        """IRM importance propagated by SRM: non-negative float32 [B, L], 0 off word_mask."""
        cfg = self.cfg
        importance = F.softplus(self.irm(txt_tokens).squeeze(-1).float()) * word_mask
        t = F.normalize(txt_tokens.float(), dim=-1)
        L = t.shape[1]
        related = word_mask[:, :, None] & word_mask[:, None, :] & ~torch.eye(L, dtype=torch.bool, device=t.device)
        similarity = (t @ t.transpose(1, 2) / cfg.reclf.srm_temperature).masked_fill(~related, torch.finfo(t.dtype).min)
        relation = torch.softmax(similarity, dim=-1) * related      # a word with no other word: 0
        propagated = (relation @ importance.unsqueeze(-1)).squeeze(-1)
        return (1 - cfg.reclf.srm_mix) * importance + cfg.reclf.srm_mix * propagated

    def alignment_losses(self, img_tokens, txt_tokens, txt_mask, word_mask):
        losses = super().alignment_losses(img_tokens, txt_tokens, txt_mask, word_mask)
        image_head, text_head = self.local_alignment.heads(self.image_head, self.text_head)
        losses["local"] = self.local_alignment(
            image_head(img_tokens), text_head(txt_tokens), word_mask, agg="weighted",
            word_weights=self.word_weights(txt_tokens, word_mask))
        return losses
