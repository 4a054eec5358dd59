"""timm: Attention, Mlp, the ViT Block and PatchDropout through mcr_kernels' ops.

    apply_to_timm(model)   # every timm Attention (and subclass that keeps its forward),
                           # GELU Mlp, pre-norm Block, PatchDropout and
                           # PatchDropoutWithIndices inside model
"""
from collections import Counter

import torch

from mcr_kernels.attention import flash_attention, flash_attention_varlen
from mcr_kernels.gelu_mlp import gelu_mlp
from mcr_kernels.integrations._patching import (
    ModelToken,
    gelu_approximation,
    patch_forward,
    patched_forward,
    plain_layer_norm,
    warn_dropout_once,
)
from mcr_kernels.integrations.modules import drop_patches
from mcr_kernels.layer_norm_linear import layer_norm_linear
from mcr_kernels.patch_drop import gather_tokens


@patched_forward
def timm_attention_forward(self, x, attn_mask=None, is_causal=False):
    """timm.layers.Attention.forward computed by flash_attention (same contract: attn_mask
    as SDPA's, bool True = attend or float added to the scores)."""
    gate = self.gate(x).sigmoid() if getattr(self, "gate", None) is not None else None
    x = attention_of_qkv(self, self.qkv(x), attn_mask, is_causal)
    if gate is not None:
        x = x * gate
    return self.proj_drop(self.proj(x))


def attention_of_qkv(attn, qkv, attn_mask, is_causal, q_rows=None):
    """The middle of timm's Attention.forward: qkv [B, N, 3 * attn_dim] -> attention output
    [B, N, attn_dim] (q/k norms and the output norm included, before the gate and proj), or
    [B, M, attn_dim] of the queries q_rows int64 [B, M] only (every row is still a key)."""
    B, N, _ = qkv.shape
    qkv = qkv.reshape(B, N, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q = qkv[0]
    if q_rows is not None:
        q = q.gather(2, q_rows[:, None, :, None].expand(-1, attn.num_heads, -1, attn.head_dim))
    q, k = attn.q_norm(q), attn.k_norm(qkv[1])
    dropout_p = attn.attn_drop.p if attn.training else 0.0
    if dropout_p > 0:
        warn_dropout_once(attn._mcr_kernels_token, "apply_to_timm")
    if attn_mask is not None and attn_mask.dim() == 2:  # SDPA's [N, N], not a key padding mask
        attn_mask = attn_mask[None, None]
    x = flash_attention(q, k, qkv[2], attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal)
    return attn.norm(x.transpose(1, 2).reshape(B, q.shape[2], attn.attn_dim))


def varlen_attention_of_qkv(attn, qkv, cu_seqlens, max_seqlen, q_rows=None):
    """attention_of_qkv for packed sequences: qkv [total, 3 * attn_dim] -> [total, attn_dim],
    each token attending the tokens of its own sequence (flash_attention_varlen); with
    q_rows=(rows int64 [M], cu_seqlens_q int32 [B + 1], max_seqlen_q) the queries of those
    rows only, sequence by sequence as cu_seqlens_q delimits them -> [M, attn_dim]."""
    if attn.training and attn.attn_drop.p > 0:
        raise ValueError("timm Block with varlen: attention dropout > 0 in training is not supported "
                         "(flash_attention_varlen has no dropout); set it to 0 or pass padded inputs")
    q, k, v = qkv.view(qkv.shape[0], 3, attn.num_heads, attn.head_dim).unbind(1)
    cu_seqlens_q, max_seqlen_q = cu_seqlens, max_seqlen
    if q_rows is not None:
        rows, cu_seqlens_q, max_seqlen_q = q_rows
        q = q[rows]
    x = flash_attention_varlen(attn.q_norm(q), attn.k_norm(k), v, cu_seqlens_q, cu_seqlens, max_seqlen_q, max_seqlen,
                               softmax_scale=attn.scale)
    return attn.norm(x.reshape(q.shape[0], attn.attn_dim))


@patched_forward
def timm_block_forward(self, x, attn_mask=None, is_causal=False, *, varlen=None, out_rows=None):
    """timm's pre-norm Block.forward with norm1 -> attn.qkv as layer_norm_linear and norm2 ->
    mlp as gelu_mlp's pre-norm form: neither normalized x is kept for backward (recomputed
    from x, the residual); dropout between fc1 and fc2 in training runs the Mlp's forward.
    varlen=(cu_seqlens int32 [B + 1], max_seqlen): x is packed sequences [total, D]
    (mcr_kernels.unpad_input), attention within each; attn_mask and is_causal unset.
    out_rows: compute only these rows of the output, for a last block whose loss reads a few
    (every row is still a key and value): int64 [B, M] positions -> [B, M, D]; with varlen,
    (rows int64 [M] of the packed x, in sequence order, cu_seqlens_out int32 [B + 1],
    max_seqlen_out) -> [M, D]. attn_mask may then only mask keys ([B or 1, 1, 1, N])."""
    attn, mlp, norm1, norm2 = self.attn, self.mlp, self.norm1, self.norm2
    keys_only = attn_mask is None or (attn_mask.dim() == 4 and attn_mask.shape[-2] == 1)
    if out_rows is not None and (is_causal or not keys_only):
        raise ValueError("timm Block with out_rows: attn_mask may only mask keys ([B or 1, 1, 1, N]), "
                         "and is_causal must be unset")
    qkv = layer_norm_linear(x, norm1.weight, norm1.bias, attn.qkv.weight, attn.qkv.bias, eps=norm1.eps)
    if varlen is None:
        h = attention_of_qkv(attn, qkv, attn_mask, is_causal, out_rows)
        if out_rows is not None:
            x = gather_tokens(x, out_rows)
    elif attn_mask is not None or is_causal:
        raise ValueError("timm Block with varlen: attn_mask and is_causal must be unset (the packing is the mask)")
    else:
        h = varlen_attention_of_qkv(attn, qkv, *varlen, out_rows)
        if out_rows is not None:
            x = x[out_rows[0]]
    x = x + self.drop_path1(self.ls1(attn.proj_drop(attn.proj(h))))
    if mlp.training and getattr(mlp.drop1, "p", 0.0) > 0:
        y = mlp(norm2(x))
    else:
        y = mlp.drop2(gelu_mlp(x, mlp.fc1.weight, mlp.fc1.bias, mlp.fc2.weight, mlp.fc2.bias,
                               approximate=gelu_approximation(mlp.act), norm_weight=norm2.weight,
                               norm_bias=norm2.bias, norm_eps=norm2.eps))
    return x + self.drop_path2(self.ls2(y))


@patched_forward
def timm_mlp_forward(self, x):
    """timm.layers.Mlp.forward with fc1 -> GELU -> fc2 as gelu_mlp (the activation is
    recomputed in backward, not kept); dropout between them in training runs timm's forward."""
    if self.training and getattr(self.drop1, "p", 0.0) > 0:
        return type(self).forward(self, x)
    y = gelu_mlp(x, self.fc1.weight, self.fc1.bias, self.fc2.weight, self.fc2.bias,
                 approximate=gelu_approximation(self.act))
    return self.drop2(y)


def fusable_mlp(mlp):
    """A timm Mlp that is Linear -> GELU -> (dropout) -> Linear: no norm between, no 1x1 convs."""
    return (isinstance(mlp.fc1, torch.nn.Linear) and isinstance(mlp.fc2, torch.nn.Linear)
            and isinstance(mlp.norm, torch.nn.Identity) and gelu_approximation(mlp.act) is not None)


def fusable_block(block):
    """A timm Block with Block's forward whose norms are plain LayerNorms, whose attention is
    a timm Attention with its forward and no gate, and whose Mlp is fusable."""
    from timm.layers import Attention, Mlp
    from timm.models.vision_transformer import Block

    attn, mlp = block.attn, block.mlp
    return (type(block).forward is Block.forward and plain_layer_norm(block.norm1) and plain_layer_norm(block.norm2)
            and isinstance(attn, Attention) and type(attn).forward is Attention.forward
            and isinstance(attn.qkv, torch.nn.Linear) and getattr(attn, "gate", None) is None
            and isinstance(mlp, Mlp) and type(mlp).forward is Mlp.forward and fusable_mlp(mlp))


@patched_forward
def timm_patch_dropout_forward(self, x):
    if not self.training or self.prob == 0.0:
        return x
    return drop_patches(x, self.prob, self.num_prefix_tokens, self.ordered)[0]


@patched_forward
def timm_patch_dropout_with_indices_forward(self, x):
    if not self.training or self.prob == 0.0:
        return x, None
    return drop_patches(x, self.prob, self.num_prefix_tokens, self.ordered)


def apply_to_timm(model):
    """Patch, in place, the timm modules inside `model` (any nn.Module) to run mcr_kernels'
    ops: Attention through flash_attention; Mlp with a GELU and no norm between fc1 and fc2
    through gelu_mlp; the ViT Block around such an Attention and Mlp with plain LayerNorms
    through layer_norm_linear and gelu_mlp's pre-norm form; PatchDropout through
    drop_patches. Same parameters and state dict; outputs unchanged in eval (patch dropout
    draws its own random patches in training). Returns {class name: count} of the modules
    patched by this call; a second call changes nothing. Undo with revert(model)."""
    if not isinstance(model, torch.nn.Module):
        raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    from timm.layers import Attention, Mlp, PatchDropout, PatchDropoutWithIndices
    from timm.models.vision_transformer import Block

    forwards = {Attention: timm_attention_forward, Mlp: timm_mlp_forward, Block: timm_block_forward,
                PatchDropout: timm_patch_dropout_forward,
                PatchDropoutWithIndices: timm_patch_dropout_with_indices_forward}
    qualifies = {Mlp: fusable_mlp, Block: fusable_block}
    token, changed = ModelToken(), Counter()
    for module in model.modules():
        for base, forward in forwards.items():
            # subclasses qualify only when they keep the base class's forward contract
            if isinstance(module, base) and type(module).forward is base.forward \
                    and qualifies.get(base, bool)(module) and patch_forward(module, forward, token):
                changed[type(module).__name__] += 1
    return dict(changed)
