"""MCR: Masked Contrastive Reconstruction (Wei, Jin, Zhou, arXiv 2312.15840).

One forward pass per modality on masked inputs only: ~50% of image patches dropped, ~25%
of report tokens replaced by [MASK]. The same masked features feed
  - masked image modelling: an MAE decoder restores the sequence and predicts pixels,
  - masked report modelling: an MLM head (optionally image-conditioned) predicts tokens,
  - MbA alignment: every local token mapped into the joint space, then pooled, InfoNCE.
The masks come from mcr.masking (drawn once per step by the engine). The encoders and
decoders are the project's own (mcr.models.encoders, .blocks) with timm's and Hugging Face's
parameter names; the report tokens are packed once per step and stay packed through the
report encoder and the MRM decoder. The variants (dual-stream, abm, mpma, reclf) subclass
MCR; mcr.models.build_model picks one.
"""
import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from transformers import BertConfig
from transformers.models.bert.modeling_bert import BertOnlyMLMHead

import mcr_kernels
from mcr import masking
from mcr.models.blocks import Block
from mcr.models.encoders import ReportEncoder, VisionTransformer
from mcr_kernels import ProjectionHead


def bert_config(cfg, pad_token_id=0):
    """The HF BertConfig of a ModelConfig (dropout off: masking is the regulariser)."""
    return BertConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.text_width, num_hidden_layers=cfg.text_depth,
        num_attention_heads=cfg.text_heads, intermediate_size=cfg.text_intermediate,
        max_position_embeddings=max(512, cfg.max_text_len), pad_token_id=pad_token_id,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


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


def projection_heads(cfg):
    """(image head, text head): MbA heads from each encoder's width to the joint space."""
    return tuple(ProjectionHead(width, cfg.embed_dim, cfg.head_hidden or width, cfg.head_activation)
                 for width in (cfg.vit_width, cfg.text_width))


class MCR(nn.Module):
    """The MCR model. Batches are dicts: image float [B, C, H, W] (normalized), input_ids,
    attention_mask, special_tokens_mask, word_ids int64 [B, L] (mcr.data.batching.Collate)."""

    def __init__(self, cfg, *, pad_token_id=0, mask_token_id=4):
        super().__init__()
        self.cfg = cfg
        self.mask_token_id = mask_token_id
        # image encoder: a ViT with timm's names
        self.vit = VisionTransformer(cfg.image_size, cfg.patch_size, cfg.in_chans, cfg.vit_width, cfg.vit_depth,
                                     cfg.vit_heads)
        num_patches = self.vit.patch_embed.num_patches
        # MAE decoder
        self.decoder_embed = nn.Linear(cfg.vit_width, cfg.decoder_width)
        self.mask_token = nn.Parameter(torch.zeros(cfg.decoder_width))
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, cfg.decoder_width))
        self.decoder_blocks = nn.ModuleList(Block(cfg.decoder_width, cfg.decoder_heads)
                                            for _ in range(cfg.decoder_depth))
        self.decoder_norm = nn.LayerNorm(cfg.decoder_width)
        self.decoder_pred = nn.Linear(cfg.decoder_width, cfg.patch_size ** 2 * cfg.in_chans)
        # report encoder: a BERT with Hugging Face's names, on packed reports
        self.bert_config = bert_config(cfg, pad_token_id)
        self.bert = ReportEncoder(self.bert_config)
        # masked report modelling: optional image conditioning + small encoder + MLM head
        self.image_to_text = nn.Linear(cfg.vit_width, cfg.text_width) if cfg.image_conditioned_mrm else None
        self.mrm_blocks = nn.ModuleList(Block(cfg.text_width, cfg.text_heads) for _ in range(cfg.mrm_decoder_depth))
        self.mlm_head = BertOnlyMLMHead(self.bert_config)
        # HF ties this output bias inside BertForMaskedLM; standalone, tie it here (one parameter)
        self.mlm_head.predictions.bias = self.mlm_head.predictions.decoder.bias
        # MbA heads and temperature
        self.image_head, self.text_head = projection_heads(cfg)
        # one element, not 0-dim: FSDP shards parameters along dim 0
        self.logit_scale = nn.Parameter(torch.full((1,), math.log(1 / cfg.init_temperature)))
        nn.init.trunc_normal_(self.decoder_pos_embed, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)
        if cfg.pos_embed == "sincos":  # fixed, as in MAE: every position distinct from step 0
            grid = cfg.image_size // cfg.patch_size
            for pos in (self.vit.pos_embed, self.decoder_pos_embed):
                pos.data.copy_(sincos_position_embedding(grid, pos.shape[-1]))
                pos.requires_grad_(False)

    def transformer_blocks(self):
        """Every transformer block of the model (the encoders', the decoders', a variant's own):
        the units of FSDP and of --compile (mcr.distributed, mcr.engine)."""
        return [*self.vit.blocks, *self.decoder_blocks, *self.mrm_blocks, *self.bert.encoder.layer]

    # --- image ---------------------------------------------------------------------------

    def patchify(self, imgs):
        """[B, C, H, W] -> [B, N, p*p*C] in row-major patch order."""
        p = self.cfg.patch_size
        B, C, H, W = imgs.shape
        x = imgs.reshape(B, C, H // p, p, W // p, p)
        return torch.einsum("bchpwq->bhwpqc", x).reshape(B, (H // p) * (W // p), p * p * C)

    def encode_image(self, imgs, ids_keep=None):
        """-> latent [B, 1 + K, D] (CLS first) of the patches ids_keep int64 [B, K] only (all
        N of them when ids_keep is None)."""
        return self.vit(imgs, ids_keep)

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
        """input_ids, attention_mask int64 [B, L] -> (states [total, text_width] of the
        non-padding tokens, packed in row-major order, and their encoders.Packing)."""
        return self.bert(input_ids, attention_mask)

    def mrm_hidden(self, states, packing, image_latent, chosen):
        """MRM decoder states [M, text_width] of the positions chosen bool [B, L] (the masked
        report tokens, row-major order): the packed report states, conditioned on the image
        (condition_report), through the MRM blocks; the last block computes just those rows."""
        x = self.condition_report(states, packing, image_latent)
        rows = chosen.flatten()[packing.indices].nonzero().squeeze(1)  # the packed rows that are chosen
        if not self.mrm_blocks:
            return x[rows]
        *blocks, last = self.mrm_blocks
        for blk in blocks:
            x = blk(x, varlen=packing.varlen)
        counts = chosen.sum(1)
        out_rows = (rows, F.pad(counts.cumsum(0), (1, 0)).int(), int(counts.max()))
        return last(x, varlen=packing.varlen, out_rows=out_rows)

    def mrm_loss(self, hidden, labels):
        """Cross-entropy of hidden [M, text_width], the states of the masked positions, against
        their labels [M], averaged over those of all ranks: the MLM head's transform, then its
        decoder (tied bias) through mcr_kernels.linear_cross_entropy, which never holds
        [masked, vocabulary] logits."""
        head = self.mlm_head.predictions
        total = mcr_kernels.linear_cross_entropy(head.transform(hidden), head.decoder.weight,
                                                 head.decoder.bias, labels, reduction="sum")
        return global_mean(total, torch.tensor(labels.numel(), device=labels.device))

    def condition_report(self, states, packing, image_latent):
        """The MRM decoder's input [total, text_width]: the packed report states plus the
        projected mean visible image token of their report (image_conditioned_mrm); the mpma
        variant replaces this with MA-CMF."""
        if self.image_to_text is None:
            return states
        return states + self.image_to_text(image_latent[:, 1:].mean(1))[packing.sequence_ids()]

    # --- alignment -----------------------------------------------------------------------

    def contrastive_loss(self, img_tokens, txt_tokens, txt_mask):
        """InfoNCE of the pooled embeddings (pool); img_tokens [B, K, D] as pooled (see
        image_tokens). Under torch.distributed the negatives come from every rank (gradients
        flow back)."""
        scale = self.logit_scale.exp().clamp(max=100)
        gather = distributed_world() > 1
        image_emb, text_emb = self.pool(img_tokens, txt_tokens, txt_mask)
        return mcr_kernels.infonce_loss(image_emb, text_emb, scale, gather=gather)

    def pool(self, img_tokens, txt_tokens, txt_mask):
        """Joint-space embeddings (image [B, E], text [B, E]), unnormalized, of img_tokens
        [B, K, D] and the positions txt_mask bool [B, L] of txt_tokens [B, L, D]: MbA maps
        every token, then pools (the abm variant pools, then maps)."""
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

    def embed_reports(self, input_ids, attention_mask):
        """The report encoder's states padded back: [B, L, text_width], zeros at padding."""
        states, packing = self.encode_text(input_ids, attention_mask)
        return packing.pad(states)

    @torch.no_grad()
    def embed(self, imgs, input_ids, attention_mask, special_tokens_mask=None):
        """Retrieval embeddings, L2-normalized float32: (image [B, E], text [B, E]).

        Unmasked inputs; with cfg.embed_masks = n > 0 the mean of the normalized embeddings
        of n masked views at the training ratios (masks from a fixed generator, so the same
        inputs always embed the same; special_tokens_mask is needed then)."""
        n = self.cfg.embed_masks
        if n == 0:
            image_emb, text_emb = self.pool(self.image_tokens(self.encode_image(imgs)),
                                            self.embed_reports(input_ids, attention_mask), attention_mask.bool())
            return F.normalize(image_emb.float(), dim=-1), F.normalize(text_emb.float(), dim=-1)
        if special_tokens_mask is None:
            raise ValueError("embed with embed_masks > 0 needs special_tokens_mask")
        generator = torch.Generator(device=imgs.device).manual_seed(0)
        image_sum, text_sum = 0, 0
        for _ in range(n):
            masks = masking.draw(self.cfg, imgs.shape[0], device=imgs.device, generator=generator)
            latent = self.encode_image(imgs, masks.ids_keep)
            masked_ids, labels = self.mask_text(input_ids, attention_mask, special_tokens_mask, masks)
            txt = self.embed_reports(masked_ids, attention_mask)
            image_emb, text_emb = self.pool(self.image_tokens(latent), txt, self.text_pool_mask(attention_mask, labels))
            image_sum = image_sum + F.normalize(image_emb.float(), dim=-1)
            text_sum = text_sum + F.normalize(text_emb.float(), dim=-1)
        return F.normalize(image_sum, dim=-1), F.normalize(text_sum, dim=-1)

    def mask_text(self, input_ids, attention_mask, special_tokens_mask, masks):
        """(masked ids, MRM labels) of a batch with the text noise of masking.Masks `masks`."""
        cfg = self.cfg
        return masking.mask_report_tokens(input_ids, attention_mask, special_tokens_mask, cfg.text_mask_ratio,
                                          self.mask_token_id, cfg.vocab_size, cfg.text_mask_replace,
                                          noise=masks.text_noise)

    def forward(self, batch, masks=None, unmasked=False):
        """Masked forward with masking.Masks `masks` (this batch's rows); returns a dict of the
        losses (float32 scalars). unmasked=True (no masks): one unmasked pass per modality and
        the alignment losses alone (the reconstruction losses are zeros), for unmasked tuning
        (FLIP)."""
        imgs, ids, attn = batch["image"], batch["input_ids"], batch["attention_mask"]
        if unmasked:
            zero = torch.zeros((), device=imgs.device)
            return {"mim": zero, "mrm": zero, **self.unmasked_alignment(batch)}
        if masks is None:
            raise ValueError("MCR.forward needs masks (mcr.masking.draw) unless unmasked=True")
        latent = self.encode_image(imgs, masks.ids_keep)
        masked_ids, labels = self.mask_text(ids, attn, batch["special_tokens_mask"], masks)
        states, packing = self.encode_text(masked_ids, attn)
        chosen = labels != -100
        dropped = masks.ids_dropped
        losses = {"mim": self.mim_loss(imgs, self.reconstruct_image(latent, masks.ids_restore, dropped), dropped),
                  "mrm": self.mrm_loss(self.mrm_hidden(states, packing, latent, chosen), labels[chosen])}
        losses.update(self.masked_alignment(batch, latent, packing.pad(states), labels))
        return losses

    def masked_alignment(self, batch, latent, txt_tokens, labels):
        """The alignment losses on the masked pass's features: latent [B, 1 + K, D], the report
        states txt_tokens [B, L, D] (padded back), the MRM labels [B, L]."""
        words = batch["attention_mask"].bool() & ~batch["special_tokens_mask"].bool()
        if not (self.cfg.pool_text_masked and self.cfg.local.match_masked):
            words = words & (labels == -100)
        pool_mask = self.text_pool_mask(batch["attention_mask"], labels)
        return self.alignment_losses(self.image_tokens(latent), txt_tokens, pool_mask, words, batch["word_ids"])

    def unmasked_alignment(self, batch):
        """The alignment losses of one unmasked pass per modality."""
        attn = batch["attention_mask"]
        latent = self.encode_image(batch["image"])
        txt = self.embed_reports(batch["input_ids"], attn)
        words = attn.bool() & ~batch["special_tokens_mask"].bool()
        return self.alignment_losses(self.image_tokens(latent), txt, attn.bool(), words, batch["word_ids"])

    def alignment_losses(self, img_tokens, txt_tokens, txt_mask, word_mask, word_ids):
        """{"contrastive": InfoNCE}; the mpma and reclf variants add their local loss.
        txt_mask [B, L]: the positions pooled; word_mask: those that are words (no [CLS],
        [SEP] or padding); word_ids int64 [B, L]: the word each token is a piece of."""
        return {"contrastive": self.contrastive_loss(img_tokens, txt_tokens, txt_mask)}
