"""transformers: attention through flash_attention, as the "mcr" attention implementation,
and BERT-style feed-forward blocks through gelu_mlp (pre-norm form: the LayerNorm before
the feed-forward is recomputed in backward, not kept).

    apply_to_hf()        # register "mcr": from_pretrained(..., attn_implementation="mcr")
    apply_to_hf(model)   # and switch a built model to it (model.set_attn_implementation),
                         # and its GELU feed-forward blocks to gelu_mlp
    apply_to_hf(model, unpad=True)   # and run BERT-style encoders on the non-padding tokens only

Works for every model whose attention calls transformers' AttentionInterface (BERT,
RoBERTa, Llama, ...). Padding masks reach the kernel as key padding masks and causal
models stay causal; masks the kernels cannot express (sliding windows, packed sequences,
static caches, custom 4D masks) and attention dropout in training run torch's SDPA for
that call, never a wrong result.
"""
import inspect
from collections import Counter

import torch

from mcr_kernels.attention import flash_attention, flash_attention_varlen, pad_input, unpad_input
from mcr_kernels.gelu_mlp import gelu_mlp
from mcr_kernels.integrations._patching import (
    ModelToken,
    gelu_approximation,
    is_patched,
    patch_forward,
    patched_forward,
    plain_layer_norm,
    warn_dropout_once,
)

ATTN_IMPLEMENTATION = "mcr"
UNSUPPORTED_KWARGS = ("softcap", "s_aux", "position_bias")


def hf_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                 is_causal=None, **kwargs):
    """transformers attention function: query [B, H, Lq, Dh], key/value [B, H_kv, Lk, Dh];
    attention_mask None, [B, Lk] bool (key padding, from hf_attention_mask) or a 4D mask.
    Returns (out [B, Lq, H, Dh], None)."""
    for name in UNSUPPORTED_KWARGS:
        if kwargs.get(name) is not None:
            raise ValueError(f"attn_implementation={ATTN_IMPLEMENTATION!r} does not support {name}; "
                             f"use 'sdpa' or 'eager' for {type(module).__name__}")
    if dropout > 0:
        warn_dropout_once(module.config, f"{type(module).__name__} (apply_to_hf)")
    if attention_mask is not None and attention_mask.dim() == 4:  # causality is in the mask
        out = flash_attention(query, key, value, attn_mask=attention_mask, dropout_p=dropout,
                              scale=scaling)
    else:
        causal = getattr(module, "is_causal", True) if is_causal is None else is_causal
        padding = None if attention_mask is None else attention_mask.bool()
        out = flash_attention(query, key, value, dropout_p=dropout, key_padding_mask=padding,
                              softmax_scale=scaling, causal=causal)
    return out.transpose(1, 2).contiguous(), None


def hf_attention_mask(batch_size, q_length, kv_length, q_offset=0, kv_offset=0, mask_function=None,
                      attention_mask=None, **kwargs):
    """transformers mask function: plain causal or bidirectional masks become the [B, Lk]
    padding mask (or None) that hf_attention hands the kernel with `causal`; anything else
    (sliding window, packing, a static cache's offsets) the full 4D bool mask."""
    from transformers import masking_utils as mu

    plain = mask_function is mu.bidirectional_mask_function or (
        mask_function is mu.causal_mask_function and isinstance(q_offset, int)
        and q_offset + q_length == kv_offset + kv_length)  # queries are the last keys: bottom-right
    if plain:
        return mu.flash_attention_mask(batch_size, q_length, kv_length, q_offset, kv_offset,
                                       mask_function, attention_mask)
    for name in ("allow_is_causal_skip", "allow_is_bidirectional_skip"):
        kwargs.pop(name, None)
    return mu.sdpa_mask(batch_size, q_length, kv_length, q_offset, kv_offset, mask_function,
                        attention_mask, allow_is_causal_skip=False, allow_is_bidirectional_skip=False,
                        **kwargs)


def apply_to_hf(model=None, *, unpad=False):
    """Register the "mcr" attention with transformers and, given a model, switch it (and its
    sub-models) to it, and run its BERT-style GELU feed-forward blocks through gelu_mlp (with
    the attention block's LayerNorm fused in, where the layer's forward is BERT's).
    unpad=True: BERT-style encoders whose every layer is BERT's run on the non-padding tokens
    only (packed, flash_attention_varlen between them; hf_bert_encoder_forward); their outputs
    at padding positions are then zeros.
    Returns {module class: count} of the attention modules switched and the layers (and
    encoders) patched (empty when there was nothing to change). Undo with revert(model)."""
    from transformers import AttentionInterface, PreTrainedModel
    from transformers.masking_utils import AttentionMaskInterface

    if model is not None and not isinstance(model, PreTrainedModel):
        raise ValueError(f"model must be a transformers PreTrainedModel or None, got {type(model).__name__}")
    AttentionInterface.register(ATTN_IMPLEMENTATION, hf_attention)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, hf_attention_mask)
    if model is None:
        return {}
    changed = Counter()
    if model.config._attn_implementation != ATTN_IMPLEMENTATION:
        previous = model.config._attn_implementation
        model.set_attn_implementation(ATTN_IMPLEMENTATION)
        if model.config._attn_implementation != ATTN_IMPLEMENTATION:
            raise ValueError(f"{type(model).__name__} does not route its attention through transformers' "
                             "AttentionInterface, so apply_to_hf cannot switch it")
        model._mcr_kernels_previous_attn = previous
        changed.update(type(m).__name__ for m in model.modules() if _calls_attention_interface(m))
    token = ModelToken()
    for module in model.modules():
        if _bert_feed_forward(module) and patch_forward(module, hf_feed_forward_chunk, token, "feed_forward_chunk"):
            changed[type(module).__name__] += 1
            if _bert_layer(module):
                patch_forward(module, hf_bert_layer_forward, token)
    if unpad:
        for module in model.modules():
            if _bert_encoder(module) and patch_forward(module, hf_bert_encoder_forward, token):
                changed[type(module).__name__] += 1
    return dict(changed)


@patched_forward
def hf_feed_forward_chunk(self, attention_output):
    """BertLayer.feed_forward_chunk with intermediate.dense -> GELU -> output.dense as gelu_mlp."""
    intermediate, output = self.intermediate, self.output
    h = gelu_mlp(attention_output, intermediate.dense.weight, intermediate.dense.bias, output.dense.weight,
                 output.dense.bias, approximate=gelu_approximation(intermediate.intermediate_act_fn))
    return output.LayerNorm(output.dropout(h) + attention_output)


@patched_forward
def hf_bert_layer_forward(self, hidden_states, attention_mask=None, encoder_hidden_states=None, *args,
                          varlen=None, **kwargs):
    """BertLayer.forward (self-attention only) with the attention block's LayerNorm fused into
    the feed-forward (gelu_mlp's pre-norm form): its output is the residual but is not kept
    for backward, the sum it normalizes is. Cross-attention, feed-forward chunking and extra
    positional arguments run BERT's own forward. varlen=(cu_seqlens int32 [B + 1], max_seqlen):
    hidden_states are packed sequences [total, D] (hf_bert_encoder_forward) and the attention
    stays within each (flash_attention_varlen)."""
    if varlen is not None:
        attn = self.attention.self
        heads = (hidden_states.shape[0], attn.num_attention_heads, attn.attention_head_size)
        q, k, v = (proj(hidden_states).view(heads) for proj in (attn.query, attn.key, attn.value))
        cu_seqlens, max_seqlen = varlen
        context = flash_attention_varlen(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen,
                                         softmax_scale=attn.scaling)
        return _bert_layer_after_attention(self, context.flatten(1), hidden_states)
    if encoder_hidden_states is not None or args or self.chunk_size_feed_forward:
        return type(self).forward(self, hidden_states, attention_mask, encoder_hidden_states, *args, **kwargs)
    kwargs.pop("encoder_attention_mask", None)  # read by cross-attention only
    context, _ = self.attention.self(hidden_states, attention_mask=attention_mask, **kwargs)
    return _bert_layer_after_attention(self, context, hidden_states)


def _bert_layer_after_attention(layer, context, hidden_states):
    """The rest of a BERT layer after its self-attention: output projection, residual,
    LayerNorm fused into the feed-forward (gelu_mlp), residual, LayerNorm. [..., D] -> [..., D]."""
    attention, intermediate, output = layer.attention, layer.intermediate, layer.output
    summed = attention.output.dropout(attention.output.dense(context)) + hidden_states
    norm = attention.output.LayerNorm
    h = gelu_mlp(summed, intermediate.dense.weight, intermediate.dense.bias, output.dense.weight, output.dense.bias,
                 approximate=gelu_approximation(intermediate.intermediate_act_fn), norm_weight=norm.weight,
                 norm_bias=norm.bias, norm_eps=norm.eps)
    return output.LayerNorm(output.dropout(h) + norm(summed))


@patched_forward
def hf_bert_encoder_forward(self, hidden_states, attention_mask=None, encoder_hidden_states=None,
                            encoder_attention_mask=None, cache=None, use_cache=None, **kwargs):
    """BertEncoder.forward on the non-padding tokens only: hidden_states [B, L, D] are packed
    to [tokens, D] once, every layer runs on the packed rows (its attention through
    flash_attention_varlen; the layers are still called, so FSDP's and gradient
    checkpointing's hooks run, and a forward hook of a layer sees the packed rows), and the
    result is padded back, zeros at padding. BERT's own forward runs instead without padding,
    with a 4D mask, cross-attention or a cache, with attention dropout in training, while
    transformers records hidden states or attentions, and under torch.compile."""
    if not _can_unpad(self, attention_mask, encoder_hidden_states, cache, use_cache):
        return type(self).forward(self, hidden_states, attention_mask, encoder_hidden_states,
                                  encoder_attention_mask=encoder_attention_mask, cache=cache, use_cache=use_cache,
                                  **kwargs)
    from transformers.modeling_outputs import BaseModelOutputWithPastAndCrossAttentions

    B, L, _ = hidden_states.shape
    x, indices, cu_seqlens, max_seqlen = unpad_input(hidden_states, attention_mask)
    for layer in self.layer:
        x = layer(x, varlen=(cu_seqlens, max_seqlen))
    return BaseModelOutputWithPastAndCrossAttentions(last_hidden_state=pad_input(x, indices, B, L))


def _can_unpad(encoder, attention_mask, encoder_hidden_states, cache, use_cache):
    """Whether hf_bert_encoder_forward computes what BERT's forward would (see its docstring)."""
    if not (isinstance(attention_mask, torch.Tensor) and attention_mask.dtype == torch.bool
            and attention_mask.dim() == 2) or encoder_hidden_states is not None or cache is not None or use_cache:
        return False
    if torch.compiler.is_compiling() or _recording_outputs():
        return False
    return all(is_patched(layer) and not (layer.training and layer.attention.self.dropout.p > 0)
               for layer in encoder.layer)


def _recording_outputs():
    """True while transformers' capture_outputs collects per-layer outputs (hidden states,
    attentions) with its forward hooks, or when this transformers version cannot say."""
    try:
        from transformers.utils.output_capturing import _active_collector
    except ImportError:
        return True
    return bool(_active_collector.get())


def _same_code(method, reference):
    a, b = getattr(inspect.unwrap(method), "__code__", None), inspect.unwrap(reference).__code__
    return a is not None and a.co_code == b.co_code and a.co_names == b.co_names


def _bert_feed_forward(layer):
    """A layer whose feed_forward_chunk, intermediate and output compute what BERT's do (the
    same bytecode: BERT's and the many "Copied from Bert" classes), with a GELU."""
    from transformers.models.bert import modeling_bert as bert

    intermediate, output = getattr(layer, "intermediate", None), getattr(layer, "output", None)
    return (intermediate is not None and output is not None
            and _same_code(getattr(type(layer), "feed_forward_chunk", None), bert.BertLayer.feed_forward_chunk)
            and _same_code(type(intermediate).forward, bert.BertIntermediate.forward)
            and _same_code(type(output).forward, bert.BertOutput.forward)
            and gelu_approximation(intermediate.intermediate_act_fn) is not None)


def _bert_layer(layer):
    """A BERT-style feed-forward layer whose forward, attention and attention output are
    BERT's too (same bytecode), with plain LayerNorms."""
    from transformers.models.bert import modeling_bert as bert

    attention = getattr(layer, "attention", None)
    attention_output = getattr(attention, "output", None)
    norms = (getattr(attention_output, "LayerNorm", None), getattr(layer.output, "LayerNorm", None))
    return (attention_output is not None and not getattr(attention, "is_cross_attention", False)
            and _same_code(type(layer).forward, bert.BertLayer.forward)
            and _same_code(type(attention).forward, bert.BertAttention.forward)
            and _same_code(type(attention_output).forward, bert.BertSelfOutput.forward)
            and all(plain_layer_norm(n) for n in norms))


def _bert_encoder(encoder):
    """A BERT encoder (same forward bytecode) of BERT self-attention layers, each of which
    apply_to_hf patched with hf_bert_layer_forward."""
    from transformers.models.bert import modeling_bert as bert

    layers = getattr(encoder, "layer", None)
    return (isinstance(layers, torch.nn.ModuleList) and len(layers) > 0
            and _same_code(type(encoder).forward, bert.BertEncoder.forward)
            and all(is_patched(layer) and not getattr(layer, "is_decoder", False)
                    and _same_code(type(layer.attention.self).forward, bert.BertSelfAttention.forward)
                    and not layer.attention.self.is_causal
                    for layer in layers))


def revert_hf(model):
    """Switch a model apply_to_hf switched back to its previous attention; True if it was."""
    previous = model.__dict__.pop("_mcr_kernels_previous_attn", None)
    if previous is None:
        return False
    model.set_attn_implementation(previous)
    return True


def _calls_attention_interface(module):
    forward = inspect.unwrap(type(module).forward)
    return "ALL_ATTENTION_FUNCTIONS" in getattr(getattr(forward, "__code__", None), "co_names", ())
