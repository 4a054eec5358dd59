"""The image encoder (a ViT) and the report encoder (a BERT) of MCR, in the project's own code.

Both keep the parameter names of the libraries whose weights they load: timm's
VisionTransformer (patch_embed.proj, cls_token, pos_embed, blocks.N.*, norm) and Hugging
Face's BertModel without pooler (embeddings.*, encoder.layer.N.attention.self.query, ...),
and their initialisation, so pretrained weights, exported encoders and checkpoints carry
over as they are. The report encoder runs on the non-padding tokens only: the reports are
packed once (mcr_kernels.unpad_input) and every layer attends within each report
(flash_attention_varlen).
"""
from dataclasses import dataclass

import torch
from timm.layers import PatchEmbed, trunc_normal_
from torch import nn
from transformers import BertConfig
from transformers.models.bert.modeling_bert import BertEmbeddings

import mcr_kernels
from mcr.models.blocks import Block


class VisionTransformer(nn.Module):
    """timm's VisionTransformer with a class token and no head (num_classes=0), on the kept
    patches only: patch embedding, position embedding, [CLS; patches], pre-norm Blocks
    (LayerNorm eps 1e-6), final norm."""

    def __init__(self, img_size, patch_size, in_chans, embed_dim, depth, num_heads):
        super().__init__()
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        num_patches = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.empty(1, num_patches + 1, embed_dim))
        self.blocks = nn.Sequential(*(Block(embed_dim, num_heads) for _ in range(depth)))
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.init_weights()

    def init_weights(self):
        """timm's default ViT initialisation, in its order (so a seed gives timm's weights)."""
        trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)

    def forward(self, imgs, ids_keep=None):
        """imgs float [B, C, H, W] -> latent [B, 1 + K, D] (CLS first) of the patches ids_keep
        int64 [B, K] (position embedding added before the drop, as in MAE), or of all N
        patches when ids_keep is None (then timm's forward_features)."""
        x = self.patch_embed(imgs) + self.pos_embed[:, 1:]
        if ids_keep is not None:
            x = mcr_kernels.gather_tokens(x, ids_keep)
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)


@dataclass(frozen=True)
class Packing:
    """Where the packed tokens of a padded [B, L] batch came from: indices int64 [total]
    (flat positions b * L + l), cu_seqlens int32 [B + 1], max_seqlen (int), and (B, L)."""
    indices: torch.Tensor
    cu_seqlens: torch.Tensor
    max_seqlen: int
    batch_size: int
    seq_len: int

    @property
    def varlen(self):
        """(cu_seqlens, max_seqlen): the `varlen=` of a Block or report layer."""
        return self.cu_seqlens, self.max_seqlen

    def sequence_ids(self):
        """int64 [total]: the report each packed token belongs to."""
        return self.indices // self.seq_len

    def pad(self, packed):
        """packed [total, ...] -> [B, L, ...], zeros at padding."""
        return mcr_kernels.pad_input(packed, self.indices, self.batch_size, self.seq_len)


class BertLayer(nn.Module):
    """BERT's post-norm layer on packed tokens: self-attention, residual, LayerNorm, GELU
    feed-forward, residual, LayerNorm. The attention's LayerNorm is fused into the
    feed-forward (gelu_mlp's pre-norm form): its output is the residual but is not kept for
    backward, the sum it normalizes is."""

    def __init__(self, config):
        super().__init__()
        width, eps = config.hidden_size, config.layer_norm_eps
        self.num_heads = config.num_attention_heads
        self.head_dim = width // self.num_heads
        self.attention = nn.ModuleDict({
            "self": nn.ModuleDict({"query": nn.Linear(width, width), "key": nn.Linear(width, width),
                                   "value": nn.Linear(width, width)}),
            "output": nn.ModuleDict({"dense": nn.Linear(width, width), "LayerNorm": nn.LayerNorm(width, eps=eps)})})
        self.intermediate = nn.ModuleDict({"dense": nn.Linear(width, config.intermediate_size)})
        self.output = nn.ModuleDict({"dense": nn.Linear(config.intermediate_size, width),
                                     "LayerNorm": nn.LayerNorm(width, eps=eps)})

    def forward(self, x, *, varlen):
        """x [total, D] packed reports, varlen=(cu_seqlens int32 [B + 1], max_seqlen) -> [total, D]."""
        attention, intermediate, output = self.attention, self.intermediate, self.output
        heads = (x.shape[0], self.num_heads, self.head_dim)
        q, k, v = (attention.self[name](x).view(heads) for name in ("query", "key", "value"))
        cu_seqlens, max_seqlen = varlen
        context = mcr_kernels.flash_attention_varlen(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen,
                                                     softmax_scale=self.head_dim ** -0.5)
        summed = attention.output.dense(context.flatten(1)) + x
        norm = attention.output.LayerNorm
        h = mcr_kernels.gelu_mlp(summed, intermediate.dense.weight, intermediate.dense.bias, output.dense.weight,
                                 output.dense.bias, approximate="none", norm_weight=norm.weight, norm_bias=norm.bias,
                                 norm_eps=norm.eps)
        return output.LayerNorm(h + norm(summed))


class BertEncoder(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.layer = nn.ModuleList(BertLayer(config) for _ in range(config.num_hidden_layers))


class ReportEncoder(nn.Module):
    """BertModel(config, add_pooling_layer=False) on packed reports: HF's BertEmbeddings, then
    BERT layers (GELU, no dropout) over the non-padding tokens only."""

    def __init__(self, config: BertConfig):
        super().__init__()
        if config.hidden_act != "gelu":
            raise ValueError(f"the report encoder computes BERT's exact GELU, got hidden_act {config.hidden_act!r}")
        self.config = config
        self.embeddings = BertEmbeddings(config)
        self.encoder = BertEncoder(config)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self):
        """BertPreTrainedModel's initialisation, in its order (children before parents), so a
        seed gives transformers' weights: N(0, initializer_range) weights, zero biases, unit
        LayerNorms, the padding embedding zero."""
        std = self.config.initializer_range
        for module in post_order(self):
            if isinstance(module, nn.Linear):
                module.weight.normal_(0.0, std)
                module.bias.zero_()
            elif isinstance(module, nn.Embedding):
                module.weight.normal_(0.0, std)
                if module.padding_idx is not None:
                    module.weight[module.padding_idx].zero_()
            elif isinstance(module, nn.LayerNorm):
                module.weight.fill_(1.0)
                module.bias.zero_()

    def forward(self, input_ids, attention_mask):
        """input_ids, attention_mask int64 [B, L] -> (states [total, D] of the non-padding
        tokens in row-major order, their Packing)."""
        x = self.embeddings(input_ids=input_ids)
        x, indices, cu_seqlens, max_seqlen = mcr_kernels.unpad_input(x, attention_mask.bool())
        packing = Packing(indices, cu_seqlens, max_seqlen, *input_ids.shape)
        for layer in self.encoder.layer:
            x = layer(x, varlen=packing.varlen)
        return x, packing


def post_order(module):
    """module's submodules, children before their parent (nn.Module.apply's order)."""
    for child in module.children():
        yield from post_order(child)
    yield module
