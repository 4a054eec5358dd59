"""MCR: Masked Contrastive Reconstruction (Wei, Jin, Zhou, arXiv 2312.15840).

One forward pass per modality on masked inputs only: ~50% of image patches dropped, ~25%
of report tokens replaced by [MASK]. The same masked features feed
  - masked image modelling: an MAE decoder restores the sequence and predicts pixels,
  - masked report modelling: an MLM head (optionally image-conditioned) predicts tokens,
  - MbA alignment: every local token mapped into the joint space, then pooled, InfoNCE.
Variants: "dual-stream" (unmasked second pass for the contrastive loss, the baseline) and
"abm" (aggregate, then map); "mpma" and "reclf" subclass MCR (mcr.models.mpma, .reclf,
built by mcr.run.build_model). The hot spots go through mcr_kernels' public ops.
"""
import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from timm.models.vision_transformer import Block, VisionTransformer
from torch import nn
from transformers import BertConfig, BertModel
from transformers.models.bert.modeling_bert import BertOnlyMLMHead

import mcr_kernels
from mcr_kernels import ProjectionHead
from mcr_kernels.integrations import apply_to_hf, apply_to_timm
from mcr_kernels.integrations._patching import unpatch_forward


def bert_config(cfg, pad_token_id=0):
    """The HF BertConfig of a ModelConfig (dropout off: masking is the regulariser)."""
    return BertConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.text_width, num_hidden_layers=cfg.text_depth,
        num_attention_heads=cfg.text_heads, intermediate_size=cfg.text_intermediate,
        max_position_embeddings=max(512, cfg.max_text_len), pad_token_id=pad_token_id,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def mask_report_tokens(input_ids, attention_mask, special_mask, ratio, mask_id, vocab_size,
                       replace=False, generator=None, noise=None):
    """BERT-style masking of round(ratio * n) ordinary tokens per report (at least one).

    input_ids/attention_mask/special_mask [B, L]. Returns (masked_ids, labels) with labels
    = original id at masked positions and -100 elsewhere. replace=True applies 80/10/10.
    noise: optional float [B, >=L, 2] uniform draws (see MCR.draw_masks); else drawn here.
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


def balanced_keep_indices(batch_size, grid, num_keep, *, device=None, generator=None):
    """MAE-convention masks (ids_keep int64 [B, K], ids_restore int64 [B, N]) that keep the
    same number of patches, chosen at random, in every 2x2 block of a grid x grid patch grid,
    so that every region of the image stays represented (grid even, K divisible by the
    number of blocks)."""
    half = grid // 2
    by, bx = torch.meshgrid(torch.arange(half, device=device), torch.arange(half, device=device), indexing="ij")
    dy, dx = torch.tensor([0, 0, 1, 1], device=device), torch.tensor([0, 1, 0, 1], device=device)
    block_patches = ((2 * by.reshape(-1, 1) + dy) * grid + 2 * bx.reshape(-1, 1) + dx)  # [blocks, 4]
    per_block = num_keep // block_patches.shape[0]
    order = torch.rand(batch_size, *block_patches.shape, device=device, generator=generator).argsort(-1)
    ranked = block_patches.expand(batch_size, -1, -1).gather(-1, order)
    ids_shuffle = torch.cat([ranked[..., :per_block].flatten(1), ranked[..., per_block:].flatten(1)], dim=1)
    return ids_shuffle[:, :num_keep].contiguous(), ids_shuffle.argsort(dim=1)


def sincos_position_embedding(grid, dim):
    """MAE's fixed 2-D sine-cosine position embedding, float32 [1, 1 + grid * grid, dim]
    (dim divisible by 4): a zero row for the class token, then the patches in row-major
    order; the first half of the channels encodes the row, the second the column, each as
    sin and cos of the coordinate at the frequencies 10000^(-k / (dim / 4)), k < dim / 4."""
    if dim % 4:
        raise ValueError(f"a sin-cos position embedding needs a width divisible by 4, got {dim}")
    frequencies = 10000.0 ** -(torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))
    rows, cols = torch.meshgrid(torch.arange(grid, dtype=torch.float64), torch.arange(grid, dtype=torch.float64),
                                indexing="ij")
    parts = []
    for coordinate in (rows.reshape(-1), cols.reshape(-1)):
        angles = coordinate[:, None] * frequencies[None]
        parts += [angles.sin(), angles.cos()]
    patches = torch.cat(parts, dim=1)
    return torch.cat([torch.zeros(1, dim, dtype=torch.float64), patches]).float().unsqueeze(0)


def distributed_world():
    """World size of an initialized torch.distributed group, else 1."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def global_mean(total, count):
    """total / count with count summed over the ranks of torch.distributed and divided by
    the world size, so that DDP's gradient averaging yields the global mean; plain
    total / count in one process."""
    count = count.detach().float()
    world = distributed_world()
    if world > 1:
        count = count.clone()
        dist.all_reduce(count)
        count = count / world
    return total / count.clamp(min=1)


class MCR(nn.Module):
    """The MCR model. Batches are dicts: image float [B, C, H, W] (normalized), input_ids,
    attention_mask, special_tokens_mask int64 [B, L]."""

    def __init__(self, cfg, *, pad_token_id=0, mask_token_id=4):
        super().__init__()
        self.cfg = cfg
        self.mask_token_id = mask_token_id
        # image encoder: timm ViT, attention through mcr_kernels
        self.vit = VisionTransformer(
            img_size=cfg.image_size, patch_size=cfg.patch_size, in_chans=cfg.in_chans,
            embed_dim=cfg.vit_width, depth=cfg.vit_depth, num_heads=cfg.vit_heads,
            num_classes=0, global_pool="token", class_token=True)
        apply_to_timm(self.vit)
        num_patches = self.vit.patch_embed.num_patches
        # MAE decoder
        self.decoder_embed = nn.Linear(cfg.vit_width, cfg.decoder_width)
        self.mask_token = nn.Parameter(torch.zeros(cfg.decoder_width))
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, cfg.decoder_width))
        self.decoder_blocks = nn.ModuleList(
            Block(cfg.decoder_width, cfg.decoder_heads, qkv_bias=True) for _ in range(cfg.decoder_depth))
        apply_to_timm(self.decoder_blocks)
        self.decoder_norm = nn.LayerNorm(cfg.decoder_width)
        self.decoder_pred = nn.Linear(cfg.decoder_width, cfg.patch_size ** 2 * cfg.in_chans)
        # report encoder: HF BERT, attention through mcr_kernels
        self.bert_config = bert_config(cfg, pad_token_id)
        self.bert = BertModel(self.bert_config, add_pooling_layer=False)
        apply_to_hf(self.bert)
        # masked report modelling: optional image conditioning + small encoder + MLM head
        self.image_to_text = nn.Linear(cfg.vit_width, cfg.text_width) if cfg.image_conditioned_mrm else None
        self.mrm_blocks = nn.ModuleList(
            Block(cfg.text_width, cfg.text_heads, qkv_bias=True) for _ in range(cfg.mrm_decoder_depth))
        apply_to_timm(self.mrm_blocks)
        self.mlm_head = BertOnlyMLMHead(self.bert_config)
        self.set_unpad_reports(True)
        # HF ties this output bias inside BertForMaskedLM; standalone, tie it here (one parameter)
        self.mlm_head.predictions.bias = self.mlm_head.predictions.decoder.bias
        # MbA heads and temperature
        self.image_head = ProjectionHead(cfg.vit_width, cfg.embed_dim, cfg.head_hidden or cfg.vit_width,
                                         cfg.head_activation)
        self.text_head = ProjectionHead(cfg.text_width, cfg.embed_dim, cfg.head_hidden or cfg.text_width,
                                        cfg.head_activation)
        # one element, not 0-dim: FSDP shards parameters along dim 0
        self.logit_scale = nn.Parameter(torch.full((1,), math.log(1 / cfg.init_temperature)))
        nn.init.trunc_normal_(self.decoder_pos_embed, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)
        if cfg.pos_embed == "sincos":  # fixed, as in MAE: every position distinct from step 0
            grid = cfg.image_size // cfg.patch_size
            for pos in (self.vit.pos_embed, self.decoder_pos_embed):
                pos.data.copy_(sincos_position_embedding(grid, pos.shape[-1]))
                pos.requires_grad_(False)

    def set_unpad_reports(self, on):
        """Run the report encoder and the MRM decoder on the non-padding tokens only (packed;
        the default) or on every padded position (the same results where it is not padding)."""
        self.unpad_reports = on
        if on:
            apply_to_hf(self.bert, unpad=True)
        else:
            unpatch_forward(self.bert.encoder)

    # --- image ---------------------------------------------------------------------------

    def patchify(self, imgs):
        """[B, C, H, W] -> [B, N, p*p*C] in row-major patch order."""
        p = self.cfg.patch_size
        B, C, H, W = imgs.shape
        x = imgs.reshape(B, C, H // p, p, W // p, p)
        return torch.einsum("bchpwq->bhwpqc", x).reshape(B, (H // p) * (W // p), p * p * C)

    def encode_image(self, imgs, ids_keep=None, ids_restore=None):
        """-> latent [B, 1 + K, D] (CLS first), mask [B, N] (1 = dropped); only the patches
        ids_keep [B, K] are encoded (all of them, mask None, when ids_keep is None)."""
        vit = self.vit
        x = vit.patch_embed(imgs) + vit.pos_embed[:, 1:]
        mask = None
        if ids_keep is not None:  # position embedding added before the drop (MAE)
            x = mcr_kernels.gather_tokens(x, ids_keep)
            mask = (ids_restore >= ids_keep.shape[1]).to(x.dtype)
        cls = (vit.cls_token + vit.pos_embed[:, :1]).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1)
        for blk in vit.blocks:
            x = blk(x)
        return vit.norm(x), mask

    def reconstruct_image(self, latent, ids_restore, rows=None):
        """MAE decoder: latent [B, 1 + K, D] -> pixel predictions [B, N, p*p*C] of every patch,
        or [B, M, p*p*C] of the patches rows int64 [B, M] only: the last block computes just
        those rows (every patch is still a key and value), the head reads just those."""
        x = self.decoder_embed(latent)
        patches = mcr_kernels.restore_tokens(x[:, 1:], ids_restore, self.mask_token)
        x = torch.cat([x[:, :1], patches], dim=1) + self.decoder_pos_embed
        *blocks, last = self.decoder_blocks
        for blk in blocks:
            x = blk(x)
        x = last(x)[:, 1:] if rows is None else last(x, out_rows=rows + 1)  # + 1: CLS first
        return self.decoder_pred(self.decoder_norm(x))

    def mim_loss(self, imgs, pred, dropped):
        """Mean squared error of pred [B, M, p*p*C], the predictions of the dropped patches
        dropped int64 [B, M] (of all ranks under DDP)."""
        target = self.patchify(imgs)
        target = mcr_kernels.gather_tokens(target, dropped)
        if self.cfg.norm_pix_loss:
            mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
            target = (target - mean) / (var + 1e-6).sqrt()
        dtype = torch.promote_types(pred.dtype, torch.float32)  # bf16 autocast -> float32; float64 stays
        per_patch = ((pred.to(dtype) - target.to(dtype)) ** 2).mean(-1)
        return global_mean(per_patch.sum(), torch.tensor(per_patch.numel(), device=pred.device))

    # --- text ----------------------------------------------------------------------------

    def encode_text(self, input_ids, attention_mask):
        return self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    def mrm_hidden(self, text_tokens, attention_mask, image_latent, chosen):
        """MRM decoder states [M, text_width] of the positions chosen bool [B, L] (the masked
        report tokens, row-major order): the masked report's tokens, conditioned on the image
        (condition_report), through the MRM blocks; the last block computes just those rows."""
        x = self.condition_report(text_tokens, image_latent)
        if not self.mrm_blocks:
            return x[chosen]
        if not self.unpad_reports:
            key_padding = attention_mask.bool()[:, None, None, :]  # SDPA's key padding shape
            for blk in self.mrm_blocks:
                x = blk(x, attn_mask=key_padding)
            return x[chosen]
        x, indices, cu_seqlens, max_seqlen = mcr_kernels.unpad_input(x, attention_mask.bool())
        *blocks, last = self.mrm_blocks
        for blk in blocks:  # apply_to_timm's Block forward on packed sequences
            x = blk(x, varlen=(cu_seqlens, max_seqlen))
        counts = chosen.sum(1)
        rows = chosen.flatten()[indices].nonzero().squeeze(1)  # the packed rows that are chosen
        out_rows = (rows, F.pad(counts.cumsum(0), (1, 0)).int(), int(counts.max()))
        return last(x, varlen=(cu_seqlens, max_seqlen), out_rows=out_rows)

    def mrm_loss(self, hidden, labels):
        """Cross-entropy of hidden [M, text_width], the states of the masked positions, against
        their labels [M], averaged over those of all ranks: the MLM head's transform, then its
        decoder (tied bias) through mcr_kernels.linear_cross_entropy, which never holds
        [masked, vocabulary] logits."""
        head = self.mlm_head.predictions
        total = mcr_kernels.linear_cross_entropy(head.transform(hidden), head.decoder.weight,
                                                 head.decoder.bias, labels, reduction="sum")
        return global_mean(total, torch.tensor(labels.numel(), device=labels.device))

    def condition_report(self, text_tokens, image_latent):
        """The MRM decoder's input: the report tokens plus the projected mean visible image
        token (image_conditioned_mrm); the mpma variant replaces this with MA-CMF."""
        if self.image_to_text is None:
            return text_tokens
        return text_tokens + self.image_to_text(image_latent[:, 1:].mean(1)).unsqueeze(1)

    # --- alignment -----------------------------------------------------------------------

    def contrastive_loss(self, img_tokens, txt_tokens, txt_mask):
        """MbA (map every token, then pool) or AbM; img_tokens [B, K, D] as pooled (see
        image_tokens). Under torch.distributed the negatives come from every rank (gradients
        flow back)."""
        scale = self.logit_scale.exp().clamp(max=100)
        gather = distributed_world() > 1
        image_emb, text_emb = self.pool(img_tokens, txt_tokens, txt_mask)
        return mcr_kernels.infonce_loss(image_emb, text_emb, scale, gather=gather)

    def pool(self, img_tokens, txt_tokens, txt_mask):
        """Joint-space embeddings (image [B, E], text [B, E]), unnormalized: MbA maps every
        token, then pools; AbM pools, then maps."""
        if self.cfg.variant == "abm":
            return (self.image_head(img_tokens.mean(1)),
                    self.text_head(mcr_kernels.masked_mean(txt_tokens, txt_mask)))
        return self.image_head.pool(img_tokens, None), self.text_head.pool(txt_tokens, txt_mask)

    def image_tokens(self, latent):
        """The encoder tokens the alignment pools: the patches, with CLS if pool_image_cls."""
        return latent if self.cfg.pool_image_cls else latent[:, 1:]

    def text_pool_mask(self, attention_mask, labels=None):
        """Report positions the alignment pools: non-padding, minus the masked positions
        (labels != -100) unless pool_text_masked."""
        mask = attention_mask.bool()
        if labels is not None and not self.cfg.pool_text_masked:
            mask = mask & (labels == -100)
        return mask

    @torch.no_grad()
    def embed(self, imgs, input_ids, attention_mask, special_tokens_mask=None):
        """Retrieval embeddings, L2-normalized float32: (image [B, E], text [B, E]).

        Unmasked inputs; with cfg.embed_masks = n > 0 the mean of the normalized embeddings
        of n masked views at the training ratios (masks from a fixed generator, so the same
        inputs always embed the same; special_tokens_mask is needed then)."""
        n = self.cfg.embed_masks
        if n == 0:
            latent, _ = self.encode_image(imgs)
            txt = self.encode_text(input_ids, attention_mask)
            image_emb, text_emb = self.pool(self.image_tokens(latent), txt, attention_mask.bool())
            return F.normalize(image_emb.float(), dim=-1), F.normalize(text_emb.float(), dim=-1)
        if special_tokens_mask is None:
            raise ValueError("embed with embed_masks > 0 needs special_tokens_mask")
        generator = torch.Generator(device=imgs.device).manual_seed(0)
        image_sum, text_sum = 0, 0
        for _ in range(n):
            masks = self.draw_masks(imgs.shape[0], device=imgs.device, generator=generator)
            latent, _ = self.encode_image(imgs, masks["ids_keep"], masks["ids_restore"])
            masked_ids, labels = self.mask_text(input_ids, attention_mask, special_tokens_mask, masks)
            txt = self.encode_text(masked_ids, attention_mask)
            image_emb, text_emb = self.pool(self.image_tokens(latent), txt, self.text_pool_mask(attention_mask, labels))
            image_sum = image_sum + F.normalize(image_emb.float(), dim=-1)
            text_sum = text_sum + F.normalize(text_emb.float(), dim=-1)
        return F.normalize(image_sum, dim=-1), F.normalize(text_sum, dim=-1)

    def mask_text(self, input_ids, attention_mask, special_tokens_mask, masks):
        """(masked ids, MRM labels) of a batch with the text noise of `masks`."""
        cfg = self.cfg
        return mask_report_tokens(input_ids, attention_mask, special_tokens_mask, cfg.text_mask_ratio,
                                  self.mask_token_id, cfg.vocab_size, cfg.text_mask_replace,
                                  noise=masks["text_noise"])

    def draw_masks(self, batch_size, *, device=None, generator=None):
        """The random masks of one batch, drawn once for a global batch so that every rank
        (or a resumed run) can take its rows: ids_keep int64 [B, K], ids_restore int64 [B, N]
        (MAE convention) and text_noise float32 [B, max_text_len, 2]."""
        cfg = self.cfg
        num_patches = self.vit.patch_embed.num_patches
        num_keep = int(num_patches * (1 - cfg.image_mask_ratio))
        if cfg.mask_sampling == "balanced":
            ids_keep, ids_restore = balanced_keep_indices(
                batch_size, cfg.image_size // cfg.patch_size, num_keep, device=device, generator=generator)
        else:
            ids_keep, ids_restore = mcr_kernels.random_keep_indices(
                batch_size, num_patches, num_keep, device=device, generator=generator)
        text_noise = torch.rand(batch_size, cfg.max_text_len, 2, device=device, generator=generator)
        return {"ids_keep": ids_keep, "ids_restore": ids_restore, "text_noise": text_noise}

    def forward(self, batch, masks=None, generator=None, unmasked=False):
        """Masked forward; returns a dict of the three losses (float32 scalars).

        masks: from draw_masks (rows of this batch); drawn here with `generator` if None.
        unmasked=True: one unmasked pass per modality and the contrastive loss alone (the
        reconstruction losses are zeros), for unmasked tuning at the end of training (FLIP)."""
        cfg = self.cfg
        imgs, ids, attn = batch["image"], batch["input_ids"], batch["attention_mask"]
        special = batch["special_tokens_mask"].bool()
        if unmasked:
            latent, _ = self.encode_image(imgs)
            txt = self.encode_text(ids, attn)
            zero = torch.zeros((), device=imgs.device)
            return {"mim": zero, "mrm": zero, **self.alignment_losses(self.image_tokens(latent), txt, attn.bool(),
                                                                      attn.bool() & ~special)}
        if masks is None:
            masks = self.draw_masks(imgs.shape[0], device=imgs.device, generator=generator)
        latent, _ = self.encode_image(imgs, masks["ids_keep"], masks["ids_restore"])
        masked_ids, labels = self.mask_text(ids, attn, batch["special_tokens_mask"], masks)
        txt = self.encode_text(masked_ids, attn)
        dropped = masks["ids_restore"].argsort(dim=1)[:, masks["ids_keep"].shape[1]:]  # [B, N - K]
        chosen = labels != -100
        losses = {"mim": self.mim_loss(imgs, self.reconstruct_image(latent, masks["ids_restore"], dropped), dropped),
                  "mrm": self.mrm_loss(self.mrm_hidden(txt, attn, latent, chosen), labels[chosen])}
        if cfg.variant == "dual-stream":  # second, unmasked pass per modality for alignment
            full_latent, _ = self.encode_image(imgs)
            full_txt = self.encode_text(ids, attn)
            losses.update(self.alignment_losses(self.image_tokens(full_latent), full_txt, attn.bool(),
                                                attn.bool() & ~special))
        else:
            pool_mask = self.text_pool_mask(attn, labels)
            losses.update(self.alignment_losses(self.image_tokens(latent), txt, pool_mask, pool_mask & ~special))
        return losses

    def alignment_losses(self, img_tokens, txt_tokens, txt_mask, word_mask):
        """{"contrastive": InfoNCE}; the mpma and reclf variants add their local loss.
        txt_mask [B, L]: the positions pooled; word_mask: those that are words (no [CLS],
        [SEP] or padding)."""
        return {"contrastive": self.contrastive_loss(img_tokens, txt_tokens, txt_mask)}
