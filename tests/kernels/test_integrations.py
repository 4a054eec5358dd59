"""mcr_kernels.integrations against the real libraries, on CPU: a stock transformers BERT
(and RoBERTa, a causal BERT, a grouped-query Llama), timm's vit_small_patch16_224 and
open_clip's ViT-B-32, all random init, give the outputs and gradients of the unpatched
model; PatchDropout follows timm's contract; ClipLoss equals open_clip's; flash_attention
takes SDPA's arguments with SDPA's meaning.

Tolerances (float32, our attention vs torch's SDPA through whole models): outputs and
gradients to atol 1e-4 / rtol 1e-4 unless stated; ops against SDPA in float64 to 1e-6
(the CPU kernel computes in float32). Padded query positions are excluded: our kernels
give zeros there, SDPA a value nobody reads.
"""
import copy
import warnings

import pytest
import torch
import torch.nn.functional as F

import mcr_kernels
from mcr_kernels import integrations
from mcr_kernels.integrations import (
    ClipLoss,
    PatchDropout,
    apply_to_hf,
    apply_to_open_clip,
    apply_to_timm,
    revert,
)

ATOL = RTOL = 1e-4


def close(actual, expected, atol=ATOL, rtol=RTOL):
    torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol)


@pytest.fixture
def attention_calls(monkeypatch):
    """Counts the calls that reach mcr_kernels' attention kernels (not the SDPA fallback)."""
    calls = []
    resolve = mcr_kernels.backend.resolve
    monkeypatch.setattr(mcr_kernels.backend, "resolve",
                        lambda op, device: calls.append(op) or resolve(op, device))
    return calls


def right_padded(lengths, L):
    return torch.arange(L)[None] < torch.tensor(lengths)[:, None]


# --- flash_attention: SDPA's arguments --------------------------------------------------------

def qkv(B, H, Lq, Lk, Dh, H_kv=None, dtype=torch.float64):
    q = torch.randn(B, H, Lq, Dh, dtype=dtype, requires_grad=True)
    k = torch.randn(B, H_kv or H, Lk, Dh, dtype=dtype, requires_grad=True)
    v = torch.randn(B, H_kv or H, Lk, Dh, dtype=dtype, requires_grad=True)
    return q, k, v


def assert_matches_sdpa(q, k, v, ours_kwargs, sdpa_kwargs, atol=1e-6):
    out = mcr_kernels.flash_attention(q, k, v, **ours_kwargs)
    grads = torch.autograd.grad(out.square().sum(), (q, k, v))
    expected = F.scaled_dot_product_attention(q, k, v, **sdpa_kwargs)
    expected_grads = torch.autograd.grad(expected.square().sum(), (q, k, v))
    close(out, expected, atol=atol, rtol=0)
    for g, e in zip(grads, expected_grads):
        close(g, e, atol=atol * 10, rtol=0)


@pytest.mark.parametrize("Lq,Lk", [(1, 1), (5, 5), (7, 13), (13, 7)])
def test_key_padding_attn_mask_runs_the_kernel(Lq, Lk, attention_calls):
    q, k, v = qkv(3, 2, Lq, Lk, 8)
    padding = torch.rand(3, Lk) > 0.3
    padding[:, 0] = True
    mask = padding[:, None, None, :]
    assert_matches_sdpa(q, k, v, {"attn_mask": mask}, {"attn_mask": mask})
    assert attention_calls == ["flash_attention"]


@pytest.mark.parametrize("Lq,Lk", [(6, 6), (3, 9)])
def test_is_causal_and_scale_mean_what_sdpa_means(Lq, Lk):
    q, k, v = qkv(2, 3, Lq, Lk, 16)
    assert_matches_sdpa(q, k, v, {"is_causal": True, "scale": 0.3}, {"is_causal": True, "scale": 0.3})


def test_full_bool_and_float_masks_and_fully_masked_rows():
    q, k, v = qkv(2, 3, 5, 7, 8)
    allowed = torch.rand(2, 3, 5, 7) > 0.4
    allowed[..., 0] = True
    assert_matches_sdpa(q, k, v, {"attn_mask": allowed}, {"attn_mask": allowed})
    bias = torch.randn(5, 7, dtype=torch.float64)
    assert_matches_sdpa(q, k, v, {"attn_mask": bias}, {"attn_mask": bias})
    allowed[0, 1, 2] = False  # a query with no key: zeros, never NaN
    out = mcr_kernels.flash_attention(q, k, v, allowed)
    assert torch.isfinite(out).all() and not out[0, 1, 2].any()


def test_grouped_query_attention():
    q, k, v = qkv(2, 6, 5, 9, 8, H_kv=2)
    assert_matches_sdpa(q, k, v, {"is_causal": True}, {"is_causal": True, "enable_gqa": True})
    padding = right_padded([9, 4], 9)
    assert_matches_sdpa(q, k, v, {"key_padding_mask": padding},
                        {"attn_mask": padding[:, None, None, :], "enable_gqa": True})


def test_dropout_runs_sdpa_with_the_same_random_stream():
    q, k, v = qkv(2, 2, 6, 6, 8)
    torch.manual_seed(3)
    out = mcr_kernels.flash_attention(q, k, v, dropout_p=0.3, is_causal=True)
    torch.manual_seed(3)
    expected = F.scaled_dot_product_attention(q, k, v, dropout_p=0.3, is_causal=True)
    close(out, expected, atol=1e-12, rtol=0)


def test_sdpa_arguments_errors_name_the_argument():
    q, k, v = qkv(1, 2, 4, 4, 8)
    with pytest.raises(ValueError, match="scale and softmax_scale"):
        mcr_kernels.flash_attention(q, k, v, scale=0.1, softmax_scale=0.1)
    with pytest.raises(ValueError, match="dropout_p"):
        mcr_kernels.flash_attention(q, k, v, dropout_p=1.0)
    with pytest.raises(ValueError, match="attn_mask must broadcast"):
        mcr_kernels.flash_attention(q, k, v, attn_mask=torch.ones(3, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="attn_mask and key_padding_mask"):
        mcr_kernels.flash_attention(q, k, v, attn_mask=torch.ones(4, 4, dtype=torch.bool),
                                    key_padding_mask=torch.ones(1, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="return_lse"):
        mcr_kernels.flash_attention(q, k, v, dropout_p=0.1, return_lse=True)
    with pytest.raises(ValueError, match="heads"):
        mcr_kernels.flash_attention(q, k[:, :1].expand(1, 3, 4, 8), v)


# --- PatchDropout --------------------------------------------------------------------------------

@pytest.mark.parametrize("N,prob,prefix", [(1, 0.5, 1), (7, 0.5, 1), (16, 0.75, 0), (13, 0.1, 5)])
def test_patch_dropout_follows_timm(N, prob, prefix):
    from timm.layers import PatchDropoutWithIndices

    x = torch.randn(3, prefix + N, 10, requires_grad=True)
    ours = PatchDropout(prob, num_prefix_tokens=prefix, return_indices=True)
    out, keep = ours(x)
    expected, _ = PatchDropoutWithIndices(prob, num_prefix_tokens=prefix)(x)
    assert out.shape == expected.shape and keep.shape == (3, max(1, int(N * (1 - prob))))
    assert all(len(set(row.tolist())) == keep.shape[1] for row in keep)  # distinct patches
    index = torch.cat([torch.arange(prefix).expand(3, prefix), keep + prefix], 1)
    reference = torch.gather(x, 1, index[..., None].expand(-1, -1, 10))
    close(out, reference, atol=0, rtol=0)
    grad = torch.randn_like(out)
    close(torch.autograd.grad(out, x, grad)[0], torch.autograd.grad(reference, x, grad)[0], atol=0, rtol=0)
    ours.eval()
    assert ours(x)[0] is x and ours(x)[1] is None


def test_patch_dropout_ordered_and_bad_arguments():
    out = PatchDropout(0.5, num_prefix_tokens=0, ordered=True, return_indices=True)(torch.randn(2, 9, 4))
    assert torch.equal(out[1], out[1].sort(1).values)
    with pytest.raises(ValueError, match="prob"):
        PatchDropout(1.0)
    with pytest.raises(ValueError, match="num_prefix_tokens"):
        PatchDropout(0.5, num_prefix_tokens=-1)
    with pytest.raises(ValueError, match="patch tokens"):
        PatchDropout(0.5, num_prefix_tokens=3)(torch.randn(2, 3, 4))


# --- ClipLoss ------------------------------------------------------------------------------------

@pytest.mark.parametrize("local_loss", [False, True])
@pytest.mark.parametrize("with_bias", [False, True])
def test_clip_loss_equals_open_clip(local_loss, with_bias):
    from open_clip.loss import ClipLoss as OpenClipLoss

    image = F.normalize(torch.randn(7, 12), dim=-1).requires_grad_()
    text = F.normalize(torch.randn(7, 12), dim=-1).requires_grad_()
    scale = torch.tensor(14.3, requires_grad=True)
    bias = torch.tensor(-2.5) if with_bias else None
    ours = ClipLoss(local_loss=local_loss)(image, text, scale, bias, output_dict=True)
    expected = OpenClipLoss(local_loss=local_loss)(image, text, scale, bias, output_dict=True)
    assert ours.keys() == expected.keys() == {"contrastive_loss"}
    ours, expected = ours["contrastive_loss"], expected["contrastive_loss"]
    close(ours, expected, atol=1e-6, rtol=1e-6)
    for g, e in zip(torch.autograd.grad(ours, (image, text, scale)),
                    torch.autograd.grad(expected, (image, text, scale))):
        close(g, e, atol=1e-6, rtol=1e-5)


def test_clip_loss_refuses_horovod():
    with pytest.raises(ValueError, match="use_horovod"):
        ClipLoss(use_horovod=True)


def test_clip_loss_names_a_logit_scale_or_bias_on_another_device():
    features = torch.randn(4, 8), torch.randn(4, 8)
    with pytest.raises(ValueError, match="^logit_scale must be on cpu"):
        ClipLoss()(*features, torch.tensor(10.0, device="meta"))
    with pytest.raises(ValueError, match="^logit_bias must be on cpu"):
        ClipLoss()(*features, torch.tensor(10.0), torch.tensor(-1.0, device="meta"))
    torch.testing.assert_close(ClipLoss()(*features, 10.0), ClipLoss()(*features, torch.tensor(10.0)))


def test_apply_refuses_what_is_not_a_model_of_its_library():
    import timm

    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=1)
    for not_hf in (vit, "bert-base-uncased"):
        with pytest.raises(ValueError, match="^model must be a transformers PreTrainedModel or None, got"):
            apply_to_hf(not_hf)
    for apply in (apply_to_timm, apply_to_open_clip):
        with pytest.raises(ValueError, match="^model must be a torch.nn.Module, got NoneType"):
            apply(None)


# --- transformers ----------------------------------------------------------------------------------

def outputs_and_grads(model, batch, real):
    """Last hidden states at real tokens and every parameter's gradient of a loss over them."""
    model.zero_grad()
    out = model(**batch).last_hidden_state
    (out[real].sin().sum()).backward()
    return out[real].detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same_model(ours, ref, batch, real):
    out, grads = outputs_and_grads(ours, batch, real)
    expected, expected_grads = outputs_and_grads(ref, batch, real)
    close(out, expected)
    assert grads.keys() == expected_grads.keys()
    for name in grads:
        close(grads[name], expected_grads[name])


def test_stock_bert_matches_sdpa_and_trains_with_dropout(attention_calls):
    from transformers import BertConfig, BertModel

    config = BertConfig(num_hidden_layers=2)  # bert-base otherwise; dropout 0.1 as shipped
    assert config.attention_probs_dropout_prob == 0.1
    ref = BertModel(config).eval()
    assert ref.config._attn_implementation == "sdpa"
    ours = copy.deepcopy(ref)
    assert apply_to_hf(ours) == {"BertSelfAttention": 2, "BertLayer": 2}
    assert apply_to_hf(ours) == {}  # idempotent
    ids = torch.randint(1, config.vocab_size, (3, 11))
    real = right_padded([11, 6, 1], 11)
    batch = {"input_ids": ids, "attention_mask": real.long()}
    assert_same_model(ours, ref, batch, real)
    assert attention_calls.count("flash_attention") == 2  # one per layer of the patched model
    ours.train()
    with pytest.warns(UserWarning, match="attention dropout"):
        ours(**batch).last_hidden_state.sum().backward()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per model
        ours(**batch).last_hidden_state.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in ours.parameters() if p.grad is not None)
    assert revert(ours) == {"BertModel": 1, "BertLayer": 2} and ours.config._attn_implementation == "sdpa"


def test_bert_unpad_matches_the_padded_model_and_falls_back_where_it_must(attention_calls):
    from transformers import BertConfig, BertModel

    config = BertConfig(vocab_size=100, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                        intermediate_size=96, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    ref = BertModel(config).eval()
    ours = copy.deepcopy(ref)
    apply_to_hf(ref)
    assert apply_to_hf(ours, unpad=True) == {"BertSelfAttention": 3, "BertLayer": 3, "BertEncoder": 1}
    real = right_padded([13, 1, 7, 12], 13)  # lengths 1, odd and full
    ids = torch.randint(3, 100, (4, 13)).masked_fill(~real, 0)
    batch = {"input_ids": ids, "attention_mask": real.long()}
    assert_same_model(ours, ref, batch, real)

    def attention_ops(run):
        attention_calls.clear()
        result = run()
        return result, [op for op in attention_calls if op.startswith("flash_attention")]

    out, ops = attention_ops(lambda: ours(**batch).last_hidden_state)
    assert ops == ["flash_attention_varlen"] * 3 and out[~real].abs().max() == 0  # padding: zeros
    full, ops = attention_ops(lambda: ours(input_ids=ids).last_hidden_state)  # no padding: BERT's loop
    close(full, ref(input_ids=ids).last_hidden_state)
    assert ops == ["flash_attention"] * 3
    output, ops = attention_ops(lambda: ours(**batch, output_hidden_states=True))  # recorded per layer
    assert len(output.hidden_states) == 4 and all(h.shape == (4, 13, 64) for h in output.hidden_states)
    assert ops == ["flash_attention"] * 3
    ours.train()
    ref.train()
    assert_same_model(ours, ref, batch, real)
    assert revert(ours) == {"BertModel": 1, "BertEncoder": 1, "BertLayer": 3}
    assert "forward" not in ours.encoder.__dict__


def test_roberta_and_causal_bert_match_sdpa():
    from transformers import BertConfig, BertLMHeadModel, RobertaConfig, RobertaModel

    small = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 96,
             "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
    roberta = RobertaModel(RobertaConfig(vocab_size=100, **small)).eval()
    ours = copy.deepcopy(roberta)
    assert apply_to_hf(ours) == {"RobertaSelfAttention": 2, "RobertaLayer": 2}
    real = right_padded([9, 5], 9)
    ids = torch.randint(3, 100, (2, 9)).masked_fill(~real, 1)
    assert_same_model(ours, roberta, {"input_ids": ids, "attention_mask": real.long()}, real)

    decoder = BertLMHeadModel(BertConfig(vocab_size=100, is_decoder=True, **small)).eval()
    ours = copy.deepcopy(decoder)
    apply_to_hf(ours)
    assert ours.bert.encoder.layer[0].attention.self.is_causal
    batch = {"input_ids": ids, "attention_mask": real.long()}
    logits = ours(**batch).logits
    close(logits[real], decoder(**batch).logits[real])
    changed_last = ours(input_ids=ids.index_fill(1, torch.tensor([8]), 7)).logits
    close(changed_last[:, :8], ours(input_ids=ids).logits[:, :8])  # causal: the past ignores the future


def test_grouped_query_llama_matches_sdpa():
    from transformers import LlamaConfig, LlamaModel

    config = LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    ref = LlamaModel(config).eval()
    ours = copy.deepcopy(ref)
    assert apply_to_hf(ours) == {"LlamaAttention": 2}
    real = torch.tensor([[False, False, True, True, True, True, True], [True] * 7])  # left padding
    batch = {"input_ids": torch.randint(0, 100, (2, 7)), "attention_mask": real.long()}
    assert_same_model(ours, ref, batch, real)


# --- timm ------------------------------------------------------------------------------------------

def test_timm_vit_small_matches_and_patch_dropout_trains(attention_calls):
    import timm

    ref = timm.create_model("vit_small_patch16_224", pretrained=False, img_size=64, depth=3,
                            patch_drop_rate=0.5).eval()
    ours = copy.deepcopy(ref)
    assert apply_to_timm(ours) == {"Attention": 3, "Mlp": 3, "Block": 3, "PatchDropout": 1}
    assert apply_to_timm(ours) == {}
    images = torch.randn(2, 3, 64, 64)
    outs, grads = [], []
    for model in (ours, ref):
        out = model(images)
        outs.append(out)
        grads.append(torch.autograd.grad(out.sin().sum(), list(model.parameters())))
    close(outs[0], outs[1])
    for g, e in zip(*grads):
        close(g, e)
    assert attention_calls.count("flash_attention") == 3
    ours.train()
    tokens = ours.forward_features(images)
    assert tokens.shape == (2, 1 + 8, 384)  # CLS + half of the 16 patches
    tokens.sum().backward()
    assert revert(ours) == {"Attention": 3, "Mlp": 3, "Block": 3, "PatchDropout": 1}
    assert "forward" not in ours.blocks[0].attn.__dict__


def test_timm_block_on_packed_sequences_matches_each_sequence_alone():
    from timm.models.vision_transformer import Block

    torch.manual_seed(0)
    block = Block(48, 4, qkv_bias=True, qk_norm=True).double().eval()
    apply_to_timm(block)
    lengths = [5, 1, 0, 8]
    x = torch.randn(sum(lengths), 48, dtype=torch.float64, requires_grad=True)
    cu = F.pad(torch.tensor(lengths).cumsum(0), (1, 0)).int()
    out = block(x, varlen=(cu, max(lengths)))
    alone = torch.cat([block(part[None])[0] for part in x.split(lengths) if len(part)])
    close(out, alone, atol=1e-10, rtol=0)
    g = torch.randn_like(out)
    close(torch.autograd.grad(out, x, g)[0], torch.autograd.grad(alone, x, g)[0], atol=1e-10, rtol=0)
    with pytest.raises(ValueError, match="attn_mask and is_causal"):
        block(x, is_causal=True, varlen=(cu, max(lengths)))
    block.attn.attn_drop.p = 0.1
    with pytest.raises(ValueError, match="attention dropout"):
        block.train()(x, varlen=(cu, max(lengths)))


def test_timm_block_out_rows_are_those_rows_of_the_full_output():
    from timm.models.vision_transformer import Block

    torch.manual_seed(0)
    block = Block(48, 4, qkv_bias=True, qk_norm=True).double().eval()
    apply_to_timm(block)
    x = torch.randn(3, 7, 48, dtype=torch.float64, requires_grad=True)
    keys = right_padded([7, 1, 5], 7)[:, None, None, :]
    rows = torch.tensor([[6, 0], [0, 0], [4, 2]])  # any order, repeats allowed
    full = block(x, attn_mask=keys)
    close(block(x, attn_mask=keys, out_rows=rows), full.gather(1, rows[..., None].expand(-1, -1, 48)),
          atol=1e-10, rtol=0)
    lengths = [5, 1, 0, 8]  # packed: rows 2 and 4 of the first sequence, none of the next two, 3 of the last
    packed = torch.randn(sum(lengths), 48, dtype=torch.float64, requires_grad=True)
    cu = F.pad(torch.tensor(lengths).cumsum(0), (1, 0)).int()
    wanted = torch.tensor([2, 4, 6, 9, 13])
    cu_out = torch.tensor([0, 2, 2, 2, 5], dtype=torch.int32)
    out = block(packed, varlen=(cu, 8), out_rows=(wanted, cu_out, 3))
    want = block(packed, varlen=(cu, 8))[wanted]
    close(out, want, atol=1e-10, rtol=0)
    g = torch.randn_like(out)
    close(torch.autograd.grad(out, packed, g)[0], torch.autograd.grad(want, packed, g)[0], atol=1e-10, rtol=0)
    with pytest.raises(ValueError, match="out_rows"):
        block(x, is_causal=True, out_rows=rows)


def test_timm_subclasses_patched_only_with_the_same_forward():
    from timm.layers import Attention

    class Renamed(Attention):
        pass

    class Different(Attention):
        def forward(self, x, attn_mask=None, is_causal=False):
            return x

    model = torch.nn.ModuleList([Renamed(32, num_heads=4), Different(32, num_heads=4)])
    assert apply_to_timm(model) == {"Renamed": 1}
    x = torch.randn(2, 5, 32)
    mask = torch.rand(5, 5) > 0.3
    mask[:, 0] = True
    close(model[0](x, attn_mask=mask), Attention.forward(model[0], x, attn_mask=mask))


# --- open_clip -------------------------------------------------------------------------------------

def test_open_clip_vit_b_32_matches_with_our_loss_and_patch_dropout(attention_calls):
    import open_clip
    from open_clip.loss import ClipLoss as OpenClipLoss

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = open_clip.create_model("ViT-B-32", pretrained=None, force_image_size=64,
                                     force_context_length=16, force_patch_dropout=0.5).eval()
    ours = copy.deepcopy(ref)
    assert apply_to_open_clip(ours) == {"MultiheadAttention": 24, "Sequential": 24, "PatchDropout": 1}
    assert apply_to_open_clip(ours) == {}
    images, texts = torch.randn(2, 3, 64, 64), torch.randint(1, 49000, (2, 16))
    results = []
    for model, loss_fn in ((ours, ClipLoss()), (ref, OpenClipLoss())):
        image_features, text_features, logit_scale = model(images, texts)
        loss = loss_fn(image_features, text_features, logit_scale)
        grads = torch.autograd.grad(loss, list(model.parameters()))
        results.append((image_features, text_features, loss, grads))
    for actual, expected in zip(results[0][:3], results[1][:3]):
        close(actual, expected)
    for g, e in zip(results[0][3], results[1][3]):
        close(g, e)
    assert attention_calls.count("flash_attention") == 24  # the text tower's mask ran as causal
    ours.train()
    ClipLoss()(*ours(images, texts)).backward()
    assert revert(ours) == {"MultiheadAttention": 24, "Sequential": 24, "PatchDropout": 1}


def test_multihead_attention_masks_match_torch():
    from mcr_kernels.integrations.open_clip import self_attention_forward

    mha = torch.nn.MultiheadAttention(16, 4, batch_first=True).eval()
    x = torch.randn(3, 6, 16)
    padding = ~right_padded([6, 3, 4], 6)  # True = ignore, torch's convention
    bias = torch.randn(3 * 4, 6, 6)
    causal = torch.full((6, 6), float("-inf")).triu(1)
    for kwargs in ({"key_padding_mask": padding}, {"attn_mask": bias}, {"attn_mask": causal},
                   {"attn_mask": causal.isinf(), "key_padding_mask": padding}):
        out, _ = self_attention_forward(mha, x, x, x, need_weights=False, **kwargs)
        expected, _ = mha(x, x, x, need_weights=False, **kwargs)
        real = ~padding if "key_padding_mask" in kwargs else torch.ones(3, 6, dtype=torch.bool)
        close(out[real], expected[real], atol=1e-5, rtol=1e-5)


# --- the Triton kernels inside the patched models (interpreter on CPU) ---------------------------

@pytest.fixture
def triton_calls(monkeypatch):
    """Counts the calls that reach the Triton op (proves the layer used our kernel)."""
    pytest.importorskip("triton")
    from mcr_kernels.triton import attention as triton_attention
    calls = []
    op = triton_attention.flash_attn_fwd
    monkeypatch.setattr(triton_attention, "flash_attn_fwd", lambda *a: calls.append(a[3]) or op(*a))
    return calls


def test_timm_attention_runs_the_triton_kernel(triton_calls):
    from timm.layers import Attention

    eager = Attention(64, num_heads=4, qkv_bias=True)
    eager.fused_attn = False
    ours = copy.deepcopy(eager)
    apply_to_timm(ours)
    x = torch.randn(2, 13, 64, requires_grad=True)
    with mcr_kernels.use_backend("triton", "flash_attention"):
        out = ours(x)
    grads = torch.autograd.grad(out.sum(), (x, ours.qkv.weight))
    expected = eager(x)
    expected_grads = torch.autograd.grad(expected.sum(), (x, eager.qkv.weight))
    assert triton_calls == [None]
    close(out, expected, atol=1e-5, rtol=1e-4)
    for g, e in zip(grads, expected_grads):
        close(g, e, atol=1e-5, rtol=1e-4)


def test_bert_padding_mask_reaches_the_triton_kernel(triton_calls):
    from transformers import BertConfig, BertModel

    config = BertConfig(vocab_size=50, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=96, attention_probs_dropout_prob=0.0, hidden_dropout_prob=0.0,
                        attn_implementation="eager")
    eager = BertModel(config).eval()
    ours = copy.deepcopy(eager)
    apply_to_hf(ours)
    ids = torch.randint(1, 50, (3, 17))
    real = right_padded([17, 9, 1], 17)
    with mcr_kernels.use_backend("triton", "flash_attention"):
        out = ours(input_ids=ids, attention_mask=real.long()).last_hidden_state
    expected = eager(input_ids=ids, attention_mask=real.long()).last_hidden_state
    assert len(triton_calls) == 2 and torch.equal(triton_calls[0], real)
    close(out[real], expected[real], atol=1e-5, rtol=1e-4)


def test_mcr_kernels_imports_without_the_model_libraries():
    import subprocess
    import sys

    code = ("import sys, mcr_kernels, mcr_kernels.integrations; "
            "print(sorted(m for m in ('transformers', 'timm', 'open_clip') if m in sys.modules))")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True).stdout.strip() == "[]"
    assert integrations.ClipLoss is mcr_kernels.ClipLoss and integrations.PatchDropout is mcr_kernels.PatchDropout


def test_patched_model_survives_deepcopy_and_pickling(tmp_path):
    from timm.layers import Attention

    model = torch.nn.Sequential(Attention(32, num_heads=4), PatchDropout(0.5)).eval()
    apply_to_timm(model)
    torch.save(model, tmp_path / "model.pt")
    for copied in (copy.deepcopy(model), torch.load(tmp_path / "model.pt", weights_only=False)):
        assert copied[0].forward.args[0] is copied[0]  # bound to the copy, not the original
        x = torch.randn(2, 5, 32)
        close(copied(x), model(x), atol=0, rtol=0)
        assert revert(copied) == {"Attention": 1}
