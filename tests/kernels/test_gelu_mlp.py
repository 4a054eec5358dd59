"""mcr_kernels.gelu_mlp: the recomputing (`cpu`) backend against the float64 reference
(output and gradients wrt x and all four parameters), both GELU forms, without biases,
awkward sizes, batched inputs, what it keeps for backward, autocast, opcheck, torch.compile,
bad input; and the timm / transformers MLPs that apply_to_timm / apply_to_hf route through it.

Tolerances, relative to max(1, max |reference|): float32 2e-5; bfloat16 inputs 2e-2 (the
oracle sees the same rounded inputs and computes in float64).
"""
import copy

import pytest
import torch
import torch.nn.functional as F
from oracle import relative_assert_close

import mcr_kernels
from mcr_kernels import reference
from mcr_kernels.blockwise import gelu_mlp as recompute
from mcr_kernels.integrations import apply_to_hf, apply_to_timm, revert
from mcr_kernels.integrations._patching import gelu_approximation

TOL = {torch.float32: 2e-5, torch.bfloat16: 2e-2}
assert_close = relative_assert_close(TOL)


def inputs(shape, D, hidden, D_out, *, bias=(True, True), dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    tensors = [torch.randn(*shape, D, generator=g), torch.randn(hidden, D, generator=g) / D ** 0.5,
               torch.randn(hidden, generator=g) if bias[0] else None,
               torch.randn(D_out, hidden, generator=g) / hidden ** 0.5,
               torch.randn(D_out, generator=g) if bias[1] else None]
    return [t.to(dtype).requires_grad_() if t is not None else None for t in tensors]


def check(shape, D, hidden, D_out, *, approximate="none", bias=(True, True), dtype=torch.float32, seed=0):
    low = inputs(shape, D, hidden, D_out, bias=bias, dtype=dtype, seed=seed)
    ref_in = [t.detach().double().requires_grad_() if t is not None else None for t in low]
    expected = reference.gelu_mlp(*ref_in, approximate=approximate)
    grad = torch.randn(expected.shape, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)
    expected_grads = torch.autograd.grad(expected, [t for t in ref_in if t is not None], grad)
    with mcr_kernels.use_backend("blockwise", "gelu_mlp"):
        out = mcr_kernels.gelu_mlp(*low, approximate=approximate)
    assert out.dtype == dtype and out.shape == (*shape, D_out)
    assert_close(out, expected, dtype, "out")
    grads = torch.autograd.grad(out, [t for t in low if t is not None], grad.to(dtype))
    names = [n for n, t in zip(("x", "fc1_weight", "fc1_bias", "fc2_weight", "fc2_bias"), low, strict=True)
             if t is not None]
    for name, a, b in zip(names, grads, expected_grads, strict=True):
        assert a.dtype == dtype and a.shape == b.shape
        assert_close(a, b, dtype, f"d {name}")


@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("shape,D,hidden,D_out", [((1,), 1, 1, 1), ((7,), 5, 13, 3), ((2, 9), 16, 64, 16),
                                                   ((3, 1, 5), 12, 37, 7)])
def test_matches_float64_reference(approximate, shape, D, hidden, D_out):
    check(shape, D, hidden, D_out, approximate=approximate)


@pytest.mark.parametrize("bias", [(False, False), (True, False), (False, True)])
def test_without_biases(bias):
    check((11,), 6, 20, 4, bias=bias, seed=3)


def test_bfloat16_inputs():
    check((4, 13), 24, 96, 24, dtype=torch.bfloat16, seed=5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_matches_float64_reference(dtype):
    low = [t.detach().cuda().requires_grad_() for t in inputs((3, 37), 64, 200, 48, dtype=dtype, seed=7)]
    ref_in = [t.detach().cpu().double().requires_grad_() for t in low]
    expected = reference.gelu_mlp(*ref_in)
    out = mcr_kernels.gelu_mlp(*low)
    assert_close(out.cpu(), expected, dtype, "out")
    for a, b in zip(torch.autograd.grad(out.float().sum(), low), torch.autograd.grad(expected.sum(), ref_in),
                    strict=True):
        assert_close(a.cpu(), b, dtype, "grad")


def test_backward_keeps_the_pre_activation_not_the_activation():
    """Between forward and backward: x, both weights and fc1(x); no second [N, hidden] tensor."""
    x, w1, b1, w2, b2 = inputs((10,), 8, 32, 8)
    y, h = recompute.gelu_mlp_recompute(x, w1, b1, w2, b2, "none")
    saved = [t for t in y.grad_fn.saved_tensors if t is not None]
    big = [t for t in saved if t.shape == (10, 32)]
    assert len(big) == 1 and torch.equal(big[0], F.linear(x, w1, b1))
    assert {t.data_ptr() for t in saved} <= {x.data_ptr(), w1.data_ptr(), w2.data_ptr(), big[0].data_ptr()}


def test_autocast_casts_like_f_linear():
    x, w1, b1, w2, b2 = inputs((9,), 16, 40, 12)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = reference.gelu_mlp(x, w1, b1, w2, b2)
        out = mcr_kernels.gelu_mlp(x, w1, b1, w2, b2)
    assert out.dtype == expected.dtype == torch.bfloat16
    assert_close(out, expected, torch.bfloat16, "out")
    for a, b in zip(torch.autograd.grad(out.float().sum(), (x, w1, b1, w2, b2)),
                    torch.autograd.grad(expected.float().sum(), (x, w1, b1, w2, b2)), strict=True):
        assert a.dtype == torch.float32
        assert_close(a, b, torch.bfloat16, "grad")


def test_opcheck():
    x, w1, b1, w2, b2 = inputs((6,), 5, 9, 4)
    torch.library.opcheck(recompute.gelu_mlp_recompute, (x, w1, b1, w2, b2, "none"))
    torch.library.opcheck(recompute.gelu_mlp_recompute, (x, w1, None, w2, None, "tanh"))


def test_torch_compile_fullgraph():
    torch._dynamo.reset()
    x, w1, b1, w2, b2 = inputs((5, 3), 6, 14, 6)

    def block(x, w1, b1, w2, b2):
        return x + mcr_kernels.gelu_mlp(torch.tanh(x), w1, b1, w2, b2)

    params = (x, w1, b1, w2, b2)
    with mcr_kernels.use_backend("blockwise", "gelu_mlp"):
        eager = block(*params)
        compiled = torch.compile(block, fullgraph=True, backend="aot_eager")(*params)
        got = torch.autograd.grad(compiled.sum(), params)
    assert_close(compiled, eager, torch.float32, "out")
    for a, b in zip(got, torch.autograd.grad(eager.sum(), params), strict=True):
        assert_close(a, b, torch.float32, "grad")


@pytest.mark.parametrize("args,kwargs,match", [
    ((torch.randn(3, 4), torch.randn(8, 5), None, torch.randn(4, 8), None), {}, "fc1_weight"),
    ((torch.randn(3, 4), torch.randn(8, 4), None, torch.randn(4, 7), None), {}, "fc2_weight"),
    ((torch.randn(3, 4), torch.randn(8, 4), torch.randn(4), torch.randn(4, 8), None), {}, "fc1_bias"),
    ((torch.randn(3, 4), torch.randn(8, 4), None, torch.randn(4, 8), torch.randn(8)), {}, "fc2_bias"),
    ((torch.randn(3, 4), torch.randn(8, 4).double(), None, torch.randn(4, 8), None), {}, "fc1_weight"),
    ((torch.randn(3, 4).long(), torch.randn(8, 4), None, torch.randn(4, 8), None), {}, "x"),
    ((torch.tensor(1.0), torch.randn(8, 1), None, torch.randn(4, 8), None), {}, "x"),
    ((torch.randn(3, 4), torch.randn(8, 4), None, torch.randn(4, 8), None), {"approximate": "erf"}, "approximate"),
])
def test_bad_input_raises_value_error_naming_the_argument(args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        mcr_kernels.gelu_mlp(*args, **kwargs)


# --- the MLPs of timm and transformers ---------------------------------------------------------

def test_gelu_approximation_recognises_exact_gelus_only():
    from timm.layers import activations as timm_act
    from transformers import activations as hf_act

    assert gelu_approximation(torch.nn.GELU()) == "none"
    assert gelu_approximation(torch.nn.GELU(approximate="tanh")) == "tanh"
    assert gelu_approximation(timm_act.GELU()) == "none" and gelu_approximation(timm_act.GELUTanh()) == "tanh"
    assert gelu_approximation(hf_act.GELUActivation()) == "none"
    assert gelu_approximation(hf_act.GELUTanh()) == "tanh"
    for other in (hf_act.GELUActivation(use_gelu_python=True), hf_act.NewGELUActivation(),
                  hf_act.QuickGELUActivation(), torch.nn.ReLU(), torch.nn.SiLU()):
        assert gelu_approximation(other) is None, type(other).__name__


def outputs_and_grads(model, *args, **kwargs):
    out = model(*args, **kwargs)
    out = out.last_hidden_state if hasattr(out, "last_hidden_state") else out
    params = [p for p in model.parameters() if p.requires_grad]
    return out, torch.autograd.grad(out.sin().sum(), params)


def test_timm_mlps_match_and_only_fusable_ones_are_patched():
    from timm.layers import Mlp

    torch.manual_seed(0)
    mlps = torch.nn.ModuleDict({
        "gelu": Mlp(12, 40, act_layer=torch.nn.GELU), "tanh": Mlp(12, 40, act_layer=lambda: torch.nn.GELU("tanh")),
        "dropout": Mlp(12, 40, drop=0.3),
        "relu": Mlp(12, 40, act_layer=torch.nn.ReLU), "norm": Mlp(12, 40, norm_layer=torch.nn.LayerNorm),
    })
    ref = copy.deepcopy(mlps).eval()
    mlps.eval()
    assert apply_to_timm(mlps) == {"Mlp": 3}
    assert {n for n, m in mlps.items() if "forward" in m.__dict__} == {"gelu", "tanh", "dropout"}
    x = torch.randn(2, 5, 12)
    for name in mlps:
        out, grads = outputs_and_grads(mlps[name], x)
        expected, expected_grads = outputs_and_grads(ref[name], x)
        assert_close(out, expected, torch.float32, name)
        for a, b in zip(grads, expected_grads, strict=True):
            assert_close(a, b, torch.float32, f"{name} grad")
    mlps.train()  # dropout between fc1 and fc2: timm's forward, so the draw is timm's
    torch.manual_seed(1)
    a = mlps["dropout"](x)
    torch.manual_seed(1)
    assert torch.equal(a, ref["dropout"].train()(x))
    assert revert(mlps) == {"Mlp": 3}


def test_hf_bert_feed_forward_matches_and_reverts():
    from transformers import BertConfig, BertModel

    config = BertConfig(vocab_size=90, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=52, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    ref = BertModel(config, add_pooling_layer=False).eval()
    ours = copy.deepcopy(ref)
    assert apply_to_hf(ours) == {"BertSelfAttention": 2, "BertLayer": 2}
    assert "feed_forward_chunk" in ours.encoder.layer[0].__dict__
    ids = torch.randint(1, 90, (3, 7))
    out, grads = outputs_and_grads(ours, input_ids=ids)
    expected, expected_grads = outputs_and_grads(ref, input_ids=ids)
    assert_close(out, expected, torch.float32, "out")
    for a, b in zip(grads, expected_grads, strict=True):
        assert_close(a, b, torch.float32, "grad")
    assert revert(ours) == {"BertModel": 1, "BertLayer": 2}
    assert "feed_forward_chunk" not in ours.encoder.layer[0].__dict__


def test_hf_feed_forward_with_another_activation_is_left_alone():
    from transformers import BertConfig, BertModel

    config = BertConfig(vocab_size=90, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                        intermediate_size=52, hidden_act="relu")
    assert apply_to_hf(BertModel(config)) == {"BertSelfAttention": 1}
