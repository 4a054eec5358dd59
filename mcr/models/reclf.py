"""RECLF as a variant of MCR (after "Enhancing medical vision-language contrastive learning via
inter-matching relation modelling", arXiv 2401.10501; our form, since only the abstract is
known: docs/method.md says what is theirs and what is ours).

Global InfoNCE + a local loss whose word-to-region matchings (mcr_kernels.local_matching)
are aggregated with learned weights instead of pooled evenly. SRM's relations R: a row-softmax
over the report's other valid words of their token cosine similarities / srm_temperature.
`reclf.reasoning_over` says what IRM and SRM act on:
  - "words": IRM gives each word a non-negative importance u_k = softplus(MLP(t_k)) from its
    report row t_k (the sum of its WordPiece pieces' tokens, LocalAlignment.words); SRM
    moves importance between related words, u' = (1 - srm_mix) u + srm_mix R u; the pair's
    score is the u'-weighted mean of its matchings s_k;
  - "matchings": the per-word matchings s [images, reports, words] themselves: SRM mixes each
    pair's matchings over related words, s' = (1 - srm_mix) s + srm_mix R s, and IRM weighs
    every matching from its word and its own score, u_ijk = softplus(MLP(t_k, s_ijk)); the
    score is the u-weighted mean of s'.
Masked inputs as MCR; RECLF's unmasked, contrastive-only setting is `--unmasked-tuning 1`
(MCR.forward(unmasked=True) on every step: global and local losses, no reconstruction).
"""
import torch
import torch.nn.functional as F
from torch import nn

from mcr.models.local import LocalAlignment
from mcr.models.mcr import MCR


def relations(unit_tokens, word_mask, temperature):
    """SRM's R [B, L, L] float32: row k a softmax over the other valid words l of
    cos(t_k, t_l) / temperature, from unit_tokens [B, L, D] (L2-normalised float32); rows
    and columns off word_mask, and the row of a report's only word, are 0."""
    L = unit_tokens.shape[1]
    related = word_mask[:, :, None] & word_mask[:, None, :] & ~torch.eye(L, dtype=torch.bool,
                                                                          device=word_mask.device)
    similarity = (unit_tokens @ unit_tokens.transpose(1, 2) / temperature).masked_fill(
        ~related, torch.finfo(unit_tokens.dtype).min)
    return torch.softmax(similarity, dim=-1) * related


class RECLF(MCR):
    """MCR whose alignment adds a local loss aggregated by IRM and SRM."""

    def __init__(self, cfg, **kwargs):
        super().__init__(cfg, **kwargs)
        self.irm = nn.Sequential(nn.Linear(cfg.text_width, cfg.reclf.irm_hidden), nn.GELU(),
                                 nn.Linear(cfg.reclf.irm_hidden, 1))
        if cfg.reclf.reasoning_over == "matchings":  # how a matching's score enters IRM's hidden layer
            self.irm_matching = nn.Linear(1, cfg.reclf.irm_hidden, bias=False)
        self.local_alignment = LocalAlignment(cfg)

    def word_weights(self, txt_tokens, word_mask):
        """IRM importance propagated by SRM ("words") of the words txt_tokens [B, L, D] (the rows the
        local loss matches, LocalAlignment.words): non-negative float32 [B, L], 0 off
        word_mask [B, L] bool."""
        cfg = self.cfg
        importance = F.softplus(self.irm(txt_tokens).squeeze(-1).float()) * word_mask
        relation = relations(F.normalize(txt_tokens.float(), dim=-1), word_mask, cfg.reclf.srm_temperature)
        propagated = (relation @ importance.unsqueeze(-1)).squeeze(-1)
        return (1 - cfg.reclf.srm_mix) * importance + cfg.reclf.srm_mix * propagated

    def aggregate_matchings(self, matchings, word_mask, unit_tokens, irm_hidden):
        """Scores [m_i, m_t] float32 of per-word matchings [m_i, m_t, L] ("matchings"): SRM-mixed
        matchings weighed by IRM; word_mask [m_t, L], the reports' unit_tokens [m_t, L, D] and
        irm_hidden [m_t, L, irm_hidden] (IRM's first layer on t_k). A report whose weights are
        all 0 scores 0."""
        cfg = self.cfg
        relation = relations(unit_tokens, word_mask, cfg.reclf.srm_temperature)
        mixed = (1 - cfg.reclf.srm_mix) * matchings + cfg.reclf.srm_mix * torch.einsum(
            "jkl,ijl->ijk", relation, matchings)
        hidden = F.gelu(irm_hidden[None] + self.irm_matching(matchings[..., None]))
        weights = F.softplus(self.irm[2](hidden).squeeze(-1)) * word_mask
        total = weights.sum(-1)
        return (weights * mixed).sum(-1) / torch.where(total > 0, total, 1.0)

    def alignment_losses(self, img_tokens, txt_tokens, txt_mask, word_mask, word_ids):
        losses = super().alignment_losses(img_tokens, txt_tokens, txt_mask, word_mask, word_ids)
        words, words_mask = self.local_alignment.words(txt_tokens, word_mask, word_ids)
        image_head, text_head = self.local_alignment.heads(self.image_head, self.text_head)
        img_local, txt_local = image_head(img_tokens), text_head(words)
        if self.cfg.reclf.reasoning_over == "matchings":
            features = (F.normalize(words.float(), dim=-1), self.irm[0](words).float())
            losses["local"] = self.local_alignment(img_local, txt_local, words_mask,
                                                   aggregate=self.aggregate_matchings, report_features=features)
        else:
            losses["local"] = self.local_alignment(img_local, txt_local, words_mask, agg="weighted",
                                                   word_weights=self.word_weights(words, words_mask))
        return losses
