"""mcr_kernels.layer_norm_linear and gelu_mlp's pre-norm form: the recomputing (`cpu`)
backends against the float64 reference (output and gradients wrt x, the norm's and the
linear layers' parameters), with and without affine norms and biases, awkward sizes, batched
inputs, what they keep for backward, autocast, opcheck, torch.compile, bad input; and the
timm blocks / transformers layers that apply_to_timm / apply_to_hf route through them.

Tolerances, relative to max(1, max |reference|): float32 5e-5 (LayerNorm's 1/std amplifies
rounding); bfloat16 inputs 3e-2 (the oracle sees the same rounded inputs and computes in
float64).
"""
import copy

import pytest
import torch
from oracle import relative_assert_close

import mcr_kernels
from mcr_kernels import reference
from mcr_kernels.blockwise import gelu_mlp as mlp_recompute
from mcr_kernels.blockwise import layer_norm_linear as recompute
from mcr_kernels.integrations import apply_to_hf, apply_to_timm, revert

TOL = {torch.float32: 5e-5, torch.bfloat16: 3e-2}
assert_close = relative_assert_close(TOL)


def norm_inputs(shape, D, *, affine=(True, True), dtype=torch.float32, seed=0):
    """x [*shape, D] (off-centre, not unit scale), norm_weight, norm_bias [D] or None."""
    g = torch.Generator().manual_seed(seed)
    x = 3 * torch.randn(*shape, D, generator=g) + torch.randn(D, generator=g)
    tensors = [x, 1 + 0.5 * torch.randn(D, generator=g) if affine[0] else None,
               torch.randn(D, generator=g) if affine[1] else None]
    return [t.to(dtype).requires_grad_() if t is not None else None for t in tensors]


def linear_inputs(D, D_out, *, bias=True, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed + 100)
    tensors = [torch.randn(D_out, D, generator=g) / D ** 0.5, torch.randn(D_out, generator=g) if bias else None]
    return [t.to(dtype).requires_grad_() if t is not None else None for t in tensors]


def double(tensors):
    return [t.detach().double().requires_grad_() if t is not None else None for t in tensors]


def check_against_reference(op, ref_op, low, names, dtype, seed, **kwargs):
    """op(*low) vs ref_op on float64 copies: output and the gradient of every tensor given."""
    ref_in = double(low)
    expected = ref_op(*ref_in, **kwargs)
    grad = torch.randn(expected.shape, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)
    expected_grads = torch.autograd.grad(expected, [t for t in ref_in if t is not None], grad)
    out = op(*low, **kwargs)
    assert out.dtype == dtype and out.shape == expected.shape
    assert_close(out, expected, dtype, "out")
    grads = torch.autograd.grad(out, [t for t in low if t is not None], grad.to(dtype))
    for name, a, b in zip([n for n, t in zip(names, low, strict=True) if t is not None], grads, expected_grads,
                          strict=True):
        assert a.dtype == dtype and a.shape == b.shape
        assert_close(a, b, dtype, f"d {name}")


LINEAR_NAMES = ("x", "norm_weight", "norm_bias", "weight", "bias")
MLP_NAMES = ("x", "fc1_weight", "fc1_bias", "fc2_weight", "fc2_bias")


def check_linear(shape, D, D_out, *, affine=(True, True), bias=True, dtype=torch.float32, seed=0, eps=1e-5):
    low = [*norm_inputs(shape, D, affine=affine, dtype=dtype, seed=seed),
           *linear_inputs(D, D_out, bias=bias, dtype=dtype, seed=seed)]
    with mcr_kernels.use_backend("blockwise", "layer_norm_linear"):
        check_against_reference(mcr_kernels.layer_norm_linear, reference.layer_norm_linear, low, LINEAR_NAMES,
                                dtype, seed, eps=eps)


def check_mlp(shape, D, hidden, D_out, *, affine=(True, True), approximate="none", dtype=torch.float32, seed=0):
    """gelu_mlp(x, ..., norm_weight, norm_bias, norm_eps): the norm's parameters are checked as
    the trailing tensors of the call."""
    x, norm_weight, norm_bias = norm_inputs(shape, D, affine=affine, dtype=dtype, seed=seed)
    w1, b1 = linear_inputs(D, hidden, dtype=dtype, seed=seed)
    w2, b2 = linear_inputs(hidden, D_out, dtype=dtype, seed=seed + 1)

    def call(op):
        return lambda x, w1, b1, w2, b2, nw, nb: op(x, w1, b1, w2, b2, approximate=approximate, norm_weight=nw,
                                                       norm_bias=nb, norm_eps=1e-6)

    with mcr_kernels.use_backend("blockwise", "gelu_mlp"):
        check_against_reference(call(mcr_kernels.gelu_mlp), call(reference.gelu_mlp),
                                [x, w1, b1, w2, b2, norm_weight, norm_bias],
                                (*MLP_NAMES, "norm_weight", "norm_bias"), dtype, seed)


@pytest.mark.parametrize("shape,D,D_out", [((1,), 1, 1), ((1,), 2, 3), ((7,), 5, 13), ((2, 9), 16, 48),
                                           ((3, 1, 5), 12, 37)])
def test_layer_norm_linear_matches_float64_reference(shape, D, D_out):
    check_linear(shape, D, D_out)


@pytest.mark.parametrize("affine,bias", [((False, False), True), ((True, False), False), ((False, True), True),
                                         ((True, True), False)])
def test_layer_norm_linear_without_affine_or_bias(affine, bias):
    check_linear((11,), 6, 20, affine=affine, bias=bias, seed=3, eps=1e-6)


def test_layer_norm_linear_bfloat16_inputs():
    check_linear((4, 13), 24, 72, dtype=torch.bfloat16, seed=5)


@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("shape,D,hidden,D_out", [((1,), 2, 1, 1), ((7,), 5, 13, 3), ((3, 1, 5), 12, 37, 12)])
def test_pre_norm_gelu_mlp_matches_float64_reference(approximate, shape, D, hidden, D_out):
    check_mlp(shape, D, hidden, D_out, approximate=approximate)


@pytest.mark.parametrize("affine", [(False, False), (True, False), (False, True)])
def test_pre_norm_gelu_mlp_without_affine(affine):
    check_mlp((9,), 8, 30, 8, affine=affine, seed=4)


def test_pre_norm_gelu_mlp_bfloat16_inputs():
    check_mlp((4, 13), 24, 96, 24, dtype=torch.bfloat16, seed=6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_matches_float64_reference(dtype):
    low = [t.detach().cuda().requires_grad_() if t is not None else None
           for t in (*norm_inputs((3, 37), 64, dtype=dtype, seed=7), *linear_inputs(64, 96, dtype=dtype, seed=7))]
    ref_in = [t.detach().cpu().double().requires_grad_() for t in low]
    expected = reference.layer_norm_linear(*ref_in)
    out = mcr_kernels.layer_norm_linear(*low)
    assert_close(out.cpu(), expected, dtype, "out")
    for a, b in zip(torch.autograd.grad(out.float().sum(), low), torch.autograd.grad(expected.sum(), ref_in),
                    strict=True):
        assert_close(a.cpu(), b, dtype, "grad")


def test_backward_keeps_x_not_the_normalized_x():
    """layer_norm_linear keeps x and the parameters; gelu_mlp's pre-norm form x, the
    parameters and fc1's output: no [N, D] tensor besides x."""
    x, nw, nb = norm_inputs((10,), 8)
    w, b = linear_inputs(8, 24)
    out = recompute.layer_norm_linear_recompute(x, nw, nb, w, b, 1e-5)
    saved = [t for t in out.grad_fn.saved_tensors if t is not None]
    assert {t.data_ptr() for t in saved} == {x.data_ptr(), nw.data_ptr(), nb.data_ptr(), w.data_ptr()}
    w2, b2 = linear_inputs(24, 8, seed=1)
    y, h = mlp_recompute.gelu_mlp_recompute(x, w, b, w2, b2, "none", nw, nb, 1e-5)
    saved = [t for t in y.grad_fn.saved_tensors if t is not None]
    assert {t.data_ptr() for t in saved} == {x.data_ptr(), w.data_ptr(), w2.data_ptr(), h.data_ptr(),
                                             nw.data_ptr(), nb.data_ptr()}


def test_autocast_casts_like_layer_norm_then_f_linear():
    x, nw, nb = norm_inputs((9,), 16)
    w, b = linear_inputs(16, 40)
    w2, b2 = linear_inputs(40, 16, seed=1)
    params = (x, nw, nb, w, b)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = reference.layer_norm_linear(*params)
        out = mcr_kernels.layer_norm_linear(*params)
        expected_mlp = reference.gelu_mlp(x, w, b, w2, b2, norm_weight=nw, norm_bias=nb, norm_eps=1e-5)
        out_mlp = mcr_kernels.gelu_mlp(x, w, b, w2, b2, norm_weight=nw, norm_bias=nb, norm_eps=1e-5)
    assert out.dtype == expected.dtype == out_mlp.dtype == expected_mlp.dtype == torch.bfloat16
    assert_close(out, expected, torch.bfloat16, "out")
    assert_close(out_mlp, expected_mlp, torch.bfloat16, "mlp out")
    for a, b_ in zip(torch.autograd.grad(out.float().sum() + out_mlp.float().sum(), params),
                     torch.autograd.grad(expected.float().sum() + expected_mlp.float().sum(), params), strict=True):
        assert a.dtype == torch.float32
        assert_close(a, b_, torch.bfloat16, "grad")


def test_opcheck():
    x, nw, nb = norm_inputs((6,), 5)
    w, b = linear_inputs(5, 9)
    w2, b2 = linear_inputs(9, 4, seed=1)
    torch.library.opcheck(recompute.layer_norm_linear_recompute, (x, nw, nb, w, b, 1e-5))
    torch.library.opcheck(recompute.layer_norm_linear_recompute, (x, None, None, w, None, 1e-6))
    torch.library.opcheck(mlp_recompute.gelu_mlp_recompute, (x, w, b, w2, b2, "none", nw, nb, 1e-5))
    torch.library.opcheck(mlp_recompute.gelu_mlp_recompute, (x, w, None, w2, None, "tanh", None, nb, 1e-5))


def test_torch_compile_fullgraph():
    torch._dynamo.reset()
    x, nw, nb = norm_inputs((5, 3), 6)
    w, b = linear_inputs(6, 18)
    w2, b2 = linear_inputs(18, 6, seed=1)
    params = (x, nw, nb, w, b, w2, b2)

    def block(x, nw, nb, w, b, w2, b2):
        x = x + mcr_kernels.layer_norm_linear(x, nw, nb, w, b)[..., :6]
        return x + mcr_kernels.gelu_mlp(x, w, b, w2, b2, norm_weight=nw, norm_bias=nb, norm_eps=1e-5)

    with mcr_kernels.use_backend("blockwise", "layer_norm_linear", "gelu_mlp"):
        eager = block(*params)
        compiled = torch.compile(block, fullgraph=True, backend="aot_eager")(*params)
        got = torch.autograd.grad(compiled.sum(), params)
    assert_close(compiled, eager, torch.float32, "out")
    for a, b_ in zip(got, torch.autograd.grad(eager.sum(), params), strict=True):
        assert_close(a, b_, torch.float32, "grad")


def bad(x=(3, 4), nw=(4,), nb=(4,), w=(5, 4), b=(5,)):
    return [torch.randn(s) if s is not None else None for s in (x, nw, nb, w, b)]


@pytest.mark.parametrize("args,kwargs,match", [
    (bad(nw=(5,)), {}, "norm_weight"),
    (bad(nb=(3,)), {}, "norm_bias"),
    (bad(w=(5, 3)), {}, "weight"),
    (bad(b=(4,)), {}, "bias"),
    (bad(x=()), {}, "x"),
    ([torch.randn(3, 4).long(), *bad()[1:]], {}, "x"),
    ([*bad()[:3], torch.randn(5, 4).double(), None], {}, "weight"),
    (bad(), {"eps": 0.0}, "eps"),
    (bad(), {"eps": "1e-5"}, "eps"),
])
def test_layer_norm_linear_bad_input_raises_value_error_naming_the_argument(args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        mcr_kernels.layer_norm_linear(*args, **kwargs)


@pytest.mark.parametrize("kwargs,match", [
    ({"norm_weight": torch.randn(4)}, "norm_eps"),
    ({"norm_weight": torch.randn(5), "norm_eps": 1e-5}, "norm_weight"),
    ({"norm_bias": torch.randn(4).double(), "norm_eps": 1e-5}, "norm_bias"),
    ({"norm_eps": -1.0}, "eps"),
])
def test_pre_norm_gelu_mlp_bad_input_raises_value_error_naming_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        mcr_kernels.gelu_mlp(torch.randn(3, 4), torch.randn(8, 4), None, torch.randn(4, 8), None, **kwargs)


# --- the blocks of timm and transformers -------------------------------------------------------

def outputs_and_grads(model, *args, **kwargs):
    out = model(*args, **kwargs)
    out = out.last_hidden_state if hasattr(out, "last_hidden_state") else out
    params = [p for p in model.parameters() if p.requires_grad]
    return out, torch.autograd.grad(out.sin().sum(), params)


def assert_same_model_outputs(ours, ref, *args, keep=None, **kwargs):
    out, grads = outputs_and_grads(ours, *args, **kwargs)
    expected, expected_grads = outputs_and_grads(ref, *args, **kwargs)
    assert_close(out if keep is None else out[keep], expected if keep is None else expected[keep], torch.float32,
                 "out")
    for a, b in zip(grads, expected_grads, strict=True):
        assert_close(a, b, torch.float32, "grad")


def test_timm_blocks_match_and_only_plain_pre_norm_blocks_are_patched():
    from timm.layers import RmsNorm
    from timm.models.vision_transformer import Block

    torch.manual_seed(0)
    blocks = torch.nn.ModuleDict({
        "plain": Block(24, 4, qkv_bias=True), "qk_norm": Block(24, 4, qk_norm=True, init_values=0.1),
        "dropout": Block(24, 4, proj_drop=0.2), "rms": Block(24, 4, norm_layer=RmsNorm),
    })
    ref = copy.deepcopy(blocks).eval()
    blocks.eval()
    assert apply_to_timm(blocks) == {"Block": 3, "Attention": 4, "Mlp": 4}
    assert {n for n, b in blocks.items() if "forward" in b.__dict__} == {"plain", "qk_norm", "dropout"}
    x = torch.randn(2, 7, 24)
    for name in blocks:
        assert_same_model_outputs(blocks[name], ref[name], x)
    blocks.train()  # dropout between fc1 and fc2 in training: the Mlp's own forward, timm's draws
    torch.manual_seed(1)
    a = blocks["dropout"](x)
    torch.manual_seed(1)
    assert torch.equal(a, ref["dropout"].train()(x))
    assert revert(blocks) == {"Block": 3, "Attention": 4, "Mlp": 4}


def test_timm_block_keeps_neither_normalized_input():
    from timm.models.vision_transformer import Block

    torch.manual_seed(0)
    block = Block(16, 2).eval()
    x = torch.randn(2, 5, 16, requires_grad=True)
    with torch.no_grad():
        x1 = x + block.attn(block.norm1(x))
        normalized = [block.norm1(x), block.norm2(x1)]
    apply_to_timm(block)
    kept = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t) or t, lambda t: t):
        block(x)
    def is_kept(a):  # kept in any shape (the ops keep [tokens, D])
        return any(t.numel() == a.numel() and torch.equal(t.reshape(a.shape), a) for t in kept)

    assert is_kept(x) and is_kept(x1)
    assert not any(is_kept(n) for n in normalized), "a normalized input is kept"


def bert_config(**kwargs):
    from transformers import BertConfig

    return BertConfig(vocab_size=90, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                      intermediate_size=52, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, **kwargs)


def test_hf_bert_layers_match_with_padding_and_revert():
    from transformers import BertModel

    ref = BertModel(bert_config(), add_pooling_layer=False).eval()
    ours = copy.deepcopy(ref)
    assert apply_to_hf(ours) == {"BertSelfAttention": 2, "BertLayer": 2}
    assert {"forward", "feed_forward_chunk"} <= set(ours.encoder.layer[0].__dict__)
    ids = torch.randint(1, 90, (3, 7))
    mask = torch.ones(3, 7, dtype=torch.long)
    mask[1, 4:] = 0
    assert_same_model_outputs(ours, ref, input_ids=ids)
    # padded positions: the kernels' padded query rows are zero, BERT's are not; compare the rest
    out, expected = ours(input_ids=ids, attention_mask=mask), ref(input_ids=ids, attention_mask=mask)
    assert_close(out.last_hidden_state[mask.bool()], expected.last_hidden_state[mask.bool()], torch.float32, "out")
    assert revert(ours) == {"BertModel": 1, "BertLayer": 2}
    assert not {"forward", "feed_forward_chunk"} & set(ours.encoder.layer[0].__dict__)


def test_hf_bert_cross_attention_and_chunking_run_berts_own_layer_forward():
    from transformers import BertModel

    ref = BertModel(bert_config(is_decoder=True, add_cross_attention=True), add_pooling_layer=False).eval()
    ours = copy.deepcopy(ref)
    apply_to_hf(ours)
    ids, memory = torch.randint(1, 90, (2, 6)), torch.randn(2, 5, 32)
    assert_same_model_outputs(ours, ref, input_ids=ids, encoder_hidden_states=memory)
    chunked_ref = BertModel(bert_config(chunk_size_feed_forward=2), add_pooling_layer=False).eval()
    chunked = copy.deepcopy(chunked_ref)
    apply_to_hf(chunked)
    assert_same_model_outputs(chunked, chunked_ref, input_ids=ids)
