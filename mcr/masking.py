"""The random masks of a training step: drawn once, for the global batch, as one typed value.

`draw(cfg, batch_size, generator=...)` gives the `Masks` of a global batch; `masks.rows(s)`
the rows of one rank; `mask_report_tokens` applies a Masks' text noise to the reports. MAE's
vocabulary: ids_keep are the patches the encoder sees, ids_dropped the ones the decoder
predicts, ids_restore puts the decoder's sequence back in patch order (mask 1 = dropped).
"""
from dataclasses import dataclass

import torch

import mcr_kernels


@dataclass(frozen=True)
class Masks:
    """ids_keep int64 [B, K], ids_dropped int64 [B, N - K] (together one permutation of the
    N patches per row), ids_restore int64 [B, N] (its inverse: ids_restore[b, ids_keep[b, j]]
    == j) and text_noise float32 [B, max_text_len, 2] (mask_report_tokens' draws)."""
    ids_keep: torch.Tensor
    ids_restore: torch.Tensor
    ids_dropped: torch.Tensor
    text_noise: torch.Tensor

    def rows(self, rows):
        """The masks of rows `rows` (a slice or int64 indices) of the batch."""
        return Masks(self.ids_keep[rows], self.ids_restore[rows], self.ids_dropped[rows], self.text_noise[rows])

    def patch_mask(self, dtype=torch.float32):
        """[B, N] in `dtype`: 1 where a patch is dropped, 0 where it is kept (MAE's mask)."""
        return (self.ids_restore >= self.ids_keep.shape[1]).to(dtype)


def draw(cfg, batch_size, *, device=None, generator=None):
    """The Masks of a batch of `batch_size` for ModelConfig `cfg`: cfg.image_mask_ratio of the
    patches dropped (cfg.mask_sampling: uniformly, or as many kept in each 2x2 block), noise
    for masking cfg.text_mask_ratio of the report tokens. A function of the generator's state
    alone, so every rank (or a resumed run) can take its rows of the same global draw."""
    grid = cfg.image_size // cfg.patch_size
    num_patches = grid * grid
    num_keep = int(num_patches * (1 - cfg.image_mask_ratio))
    if cfg.mask_sampling == "balanced":
        ids_shuffle = balanced_shuffle(batch_size, grid, num_keep, device=device, generator=generator)
        ids_restore = ids_shuffle.argsort(dim=1)
    else:
        _, ids_restore = mcr_kernels.random_keep_indices(batch_size, num_patches, num_keep, device=device,
                                                         generator=generator)
        ids_shuffle = torch.empty_like(ids_restore).scatter_(  # the inverse permutation of ids_restore
            1, ids_restore, torch.arange(num_patches, device=ids_restore.device).expand_as(ids_restore))
    text_noise = torch.rand(batch_size, cfg.max_text_len, 2, device=device, generator=generator)
    return Masks(ids_shuffle[:, :num_keep].contiguous(), ids_restore, ids_shuffle[:, num_keep:].contiguous(),
                 text_noise)


def balanced_shuffle(batch_size, grid, num_keep, *, device=None, generator=None):
    """A per-row permutation int64 [B, N] of a grid x grid patch grid whose first num_keep
    entries hold the same number of patches, chosen at random, from every 2x2 block, so that
    every region of the image stays represented (grid even, num_keep divisible by the number
    of blocks)."""
    half = grid // 2
    by, bx = torch.meshgrid(torch.arange(half, device=device), torch.arange(half, device=device), indexing="ij")
    dy, dx = torch.tensor([0, 0, 1, 1], device=device), torch.tensor([0, 1, 0, 1], device=device)
    block_patches = ((2 * by.reshape(-1, 1) + dy) * grid + 2 * bx.reshape(-1, 1) + dx)  # [blocks, 4]
    per_block = num_keep // block_patches.shape[0]
    order = torch.rand(batch_size, *block_patches.shape, device=device, generator=generator).argsort(-1)
    ranked = block_patches.expand(batch_size, -1, -1).gather(-1, order)
    return torch.cat([ranked[..., :per_block].flatten(1), ranked[..., per_block:].flatten(1)], dim=1)


def mask_report_tokens(input_ids, attention_mask, special_mask, ratio, mask_id, vocab_size,
                       replace=False, generator=None, noise=None):
    """BERT-style masking of round(ratio * n) ordinary tokens per report (at least one).

    input_ids/attention_mask/special_mask [B, L]. Returns (masked_ids, labels) with labels
    = original id at masked positions and -100 elsewhere. replace=True applies 80/10/10.
    noise: optional float [B, >=L, 2] uniform draws (Masks.text_noise); else drawn here.
    """
    B, L = input_ids.shape
    if noise is None:
        noise = torch.rand(B, L, 2, device=input_ids.device, generator=generator)
    scores, u = noise[:, :L, 0], noise[:, :L, 1]
    candidates = attention_mask.bool() & ~special_mask.bool()
    scores = scores.masked_fill(~candidates, 2.0)
    rank = scores.argsort(dim=1).argsort(dim=1)
    num = (candidates.sum(1, keepdim=True) * ratio).round().clamp(min=1)
    chosen = (rank < num) & candidates
    labels = input_ids.masked_fill(~chosen, -100)
    masked = input_ids.masked_fill(chosen, mask_id)
    if replace:  # u in [0.8, 0.9): a random token (drawn from u itself), [0.9, 1): unchanged
        random_ids = ((u - 0.8) * 10 * vocab_size).long().clamp(0, vocab_size - 1)
        masked = torch.where(chosen & (u >= 0.8) & (u < 0.9), random_ids, masked)
        masked = torch.where(chosen & (u >= 0.9), input_ids, masked)
    return masked, labels
