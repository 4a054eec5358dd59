"""The local (word-to-region) alignment loss shared by the mpma and reclf variants."""
import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import mcr_kernels
from mcr.models.mcr import distributed_world, projection_heads


def merge_pieces(tokens, word_ids, word_mask):
    """One row per word, the sum of its pieces (GLoRIA's aggregate_tokens).

    tokens [B, L, D] float; word_ids int64 [B, L]: the word (0, 1, ... within its report)
    each token is a piece of, -1 for none (never summed); word_mask [B, L] bool: the pieces
    to sum. Returns (words [B, W, D] in tokens' dtype, words_mask [B, W] bool): W = 1 + the
    largest word index of the batch (at least 1); row w of a report is the sum of its pieces
    of word w in word_mask, valid when at least one is; the other rows are zeros.
    Differentiable in tokens."""
    B, L, D = tokens.shape
    W = max(int(word_ids.max()) + 1, 1)
    summed = word_mask & (word_ids >= 0)
    rows = torch.where(summed, word_ids, W)  # the tokens not summed go to a spare row W, then dropped
    flat = (rows + (W + 1) * torch.arange(B, device=rows.device)[:, None]).flatten()
    words = tokens.new_zeros(B * (W + 1), D).index_add(0, flat, tokens.reshape(B * L, D))
    words_mask = torch.zeros(B, W + 1, dtype=torch.bool, device=rows.device).scatter_(1, rows, True)
    return words.view(B, W + 1, D)[:, :W], words_mask[:, :W]


def gather_rows(img_local, word_mask, reports):
    """Every rank's rows in rank order: img_local [B, K, E] and each per-report tensor of
    `reports` ([B, L, ...], or None) differentiable (gradients reach each rank's own rows),
    word_mask [B, L] not; the reports are padded to the longest rank's length first."""
    import torch.distributed.nn as dist_nn

    length = torch.tensor([word_mask.shape[1]], device=word_mask.device)
    dist.all_reduce(length, op=dist.ReduceOp.MAX)
    pad = int(length) - word_mask.shape[1]

    def gathered(t):
        return torch.cat(dist_nn.all_gather(F.pad(t, (0, 0) * (t.dim() - 2) + (0, pad))))

    masks = [torch.empty_like(F.pad(word_mask, (0, pad))) for _ in range(dist.get_world_size())]
    dist.all_gather(masks, F.pad(word_mask, (0, pad)).contiguous())
    return (torch.cat(dist_nn.all_gather(img_local.contiguous())), torch.cat(masks),
            [None if t is None else gathered(t) for t in reports])


class LocalAlignment(nn.Module):
    """Symmetric cross-entropy of local matching scores (mcr_kernels.local_matching) times a
    scale, fixed or learned in log space.

    The global batch (every rank's rows in rank order, as the data loader shuffled them) is cut
    into contiguous groups of `local.group_size` rows (0: one group, every pair of the batch, as
    GLoRIA): image i's positive is report i, its negatives the other reports of its group, and
    report i's negatives the other images of it. A group spanning ranks is scored on gathered
    tokens, so the loss and its gradients do not depend on the world size."""

    def __init__(self, cfg):
        """cfg: a ModelConfig; its `local` section sets the scales, the group size and the heads."""
        super().__init__()
        self.cfg = cfg
        log_scale = torch.full((1,), math.log(cfg.local.logit_scale))
        if cfg.local.scale_learnable:
            self.log_scale = nn.Parameter(log_scale)
        else:
            self.register_buffer("log_scale", log_scale, persistent=False)
        if cfg.local.own_heads:  # the MbA heads' shapes, trained by the local loss alone
            self.image_head, self.text_head = projection_heads(cfg)

    def words(self, txt_tokens, word_mask, word_ids):
        """The report rows the local loss matches, as (rows [B, W, D], mask [B, W] bool): with
        `local.merge_pieces` one per word, the sum of its pieces in word_mask (merge_pieces),
        else the tokens txt_tokens [B, L, D] and word_mask themselves; word_ids int64 [B, L]
        as the collate function gives them."""
        if self.cfg.local.merge_pieces:
            return merge_pieces(txt_tokens, word_ids, word_mask)
        return txt_tokens, word_mask

    def heads(self, image_head, text_head):
        """The (image, text) heads that map tokens for the local loss: its own with
        `local.own_heads`, else the model's global MbA heads given."""
        if self.cfg.local.own_heads:
            return self.image_head, self.text_head
        return image_head, text_head

    def forward(self, img_local, txt_local, word_mask, *, agg="lse", word_weights=None, aggregate=None,
                report_features=()):
        """img_local [B, K, E], txt_local [B, L, E]: this rank's tokens in the joint space;
        word_mask [B, L] bool: the words a report is matched by; word_weights [B, L] (agg
        "weighted"). With `aggregate`, a pair's score is aggregate(s, word_mask, *features)
        [m_i, m_t] of the per-word matchings s [m_i, m_t, L] (local_matching's agg="none") of
        m_i images with m_t reports, given those reports' word_mask [m_t, L] and rows of each
        per-report tensor of `report_features` ([B, L, ...]). Returns a float32 scalar: the mean
        over this rank's rows of both directions' cross-entropy (the mean over ranks is the
        one-process loss)."""
        local = self.cfg.local
        world = distributed_world()
        rank = dist.get_rank() if world > 1 else 0
        rows = img_local.shape[0]
        total = rows * world
        size = local.group_size or total
        own = range(rank * rows, (rank + 1) * rows)
        groups = [range(start, min(start + size, total)) for start in range(0, total, size)
                  if start < own.stop and start + size > own.start]
        img, mask, offset = img_local, word_mask, own.start
        txt, weights, *features = txt_local, word_weights, *report_features
        if groups[0].start < own.start or groups[-1].stop > own.stop:
            img, mask, (txt, weights, *features) = gather_rows(img_local, word_mask,
                                                               (txt_local, word_weights, *report_features))
            offset = 0
        scale = self.log_scale.exp().clamp(max=100)
        attention = dict(attn_scale=local.attn_scale, attn=local.attn, word_scale=local.word_scale)

        def scores(images, reports):
            if aggregate is not None:
                matchings = mcr_kernels.local_matching(img[images], None, txt[reports], mask[reports], agg="none",
                                                       **attention)
                return scale * aggregate(matchings, mask[reports], *(f[reports] for f in features))
            return scale * mcr_kernels.local_matching(
                img[images], None, txt[reports], mask[reports], agg=agg, agg_scale=local.agg_scale,
                word_weights=None if weights is None else weights[reports], **attention)

        total_loss = 0
        for group in groups:
            members = slice(group.start - offset, group.stop - offset)
            first, last = max(group.start, own.start), min(group.stop, own.stop)
            labels = torch.arange(first - group.start, last - group.start, device=img.device)
            if (first, last) == (group.start, group.stop):  # all the group's rows are this rank's
                logits = scores(members, members)
                image_to_report, report_to_image = logits, logits.T
            else:
                mine = slice(first - offset, last - offset)
                image_to_report, report_to_image = scores(mine, members), scores(members, mine).T
            total_loss = total_loss + (F.cross_entropy(image_to_report, labels, reduction="sum")
                                       + F.cross_entropy(report_to_image, labels, reduction="sum"))
        return total_loss / (2 * rows)
