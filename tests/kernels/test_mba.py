"""Triton MbA ops (mba_pool, infonce_loss, mba_infonce) against a float64 reference.

Outputs and every gradient (tokens, weights, biases, logit_scale). Without a GPU the Triton
kernels run on CPU tensors under TRITON_INTERPRET=1 (set by conftest), so shapes stay tiny.
Tolerances, relative to the largest reference value (at least 0.1, as gradients that cancel
to ~0 carry float32 rounding of their terms): float32 1e-4, float16 5e-3, bfloat16 3e-2.
"""
import os
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from oracle import backend_param, gathered_infonce

import mcr_kernels
from mcr_kernels import reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 3e-2}


def assert_close(actual, expected, dtype, what):
    expected = expected.double()
    err = (actual.double() - expected).abs().max().item()
    scale = max(0.1, expected.abs().max().item())
    assert err <= TOL[dtype] * scale, f"{what}: max error {err:.3g} > {TOL[dtype]} * {scale:.3g}"


def grads(out, inputs, grad_out):
    return torch.autograd.grad(out, inputs, grad_out)


def leaf(t, dtype=None):
    return t.detach().to(device=DEVICE, dtype=dtype or t.dtype).requires_grad_()


# --- mba_pool ---------------------------------------------------------------------------

def pool_inputs(B, L, D, H, E, two_layers, empty_row=True, bias=True):
    """float64 leaves: tokens, mask (row 0 empty when B > 1), w1, b1, w2, b2 (None when absent)."""
    mask = torch.rand(B, L) > 0.4
    mask[:, -1] = True
    if empty_row and B > 1:
        mask[0] = False
    tensors = [torch.randn(B, L, D), torch.randn(H if two_layers else E, D) / D ** 0.5,
               torch.randn(H if two_layers else E) if bias else None,
               torch.randn(E, H) / H ** 0.5 if two_layers else None,
               torch.randn(E) if two_layers and bias else None]
    x, w1, b1, w2, b2 = [None if t is None else leaf(t, torch.float64) for t in tensors]
    return x, mask.to(DEVICE), w1, b1, w2, b2


def check_pool(B, L, D, H, E, *, activation, two_layers, dtype=torch.float32, pool="mean",
               normalize_tokens=False, bias=True):
    x, mask, w1, b1, w2, b2 = pool_inputs(B, L, D, H, E, two_layers, bias=bias)
    kw = dict(activation=activation, pool=pool, normalize_tokens=normalize_tokens)
    ref = reference.mba_pool(x, mask, w1, b1, w2, b2, **kw)
    params = [t for t in (x, w1, b1, w2, b2) if t is not None]
    grad_out = torch.randn_like(ref)
    expected = grads(ref, params, grad_out)
    low = [leaf(t, dtype) for t in params]
    args = iter(low)
    x_, w1_ = next(args), next(args)
    b1_ = next(args) if b1 is not None else None
    w2_ = next(args) if w2 is not None else None
    b2_ = next(args) if b2 is not None else None
    with mcr_kernels.use_backend("triton", "mba_pool"):
        out = mcr_kernels.mba_pool(x_, mask, w1_, b1_, w2_, b2_, **kw)
    assert out.dtype == dtype and out.shape == (B, E)
    assert_close(out, ref, dtype, "pooled")
    for name, got, want in zip(("tokens", "weight1", "bias1", "weight2", "bias2"),
                               grads(out, low, grad_out.to(dtype)), expected):
        assert_close(got, want, dtype, f"d {name}")


@pytest.mark.parametrize("activation", ["gelu", "gelu_tanh", "relu", "none"])
@pytest.mark.parametrize("B", [1, 3])
def test_mba_pool_mlp_matches_float64_reference(activation, B):
    check_pool(B, 19, 21, 23, 13, activation=activation, two_layers=True)


@pytest.mark.parametrize("bias", [True, False])
def test_mba_pool_linear_head_matches_float64_reference(bias):
    check_pool(3, 9, 17, None, 11, activation="none", two_layers=False, bias=bias)


def test_mba_pool_mlp_without_biases():
    check_pool(2, 5, 7, 9, 3, activation="gelu", two_layers=True, bias=False)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_mba_pool_half_precision(dtype):
    check_pool(2, 7, 33, 17, 9, activation="gelu", two_layers=True, dtype=dtype)


@pytest.mark.parametrize("pool,normalize_tokens", [("max", False), ("mean", True), ("max", True)])
def test_mba_pool_max_and_normalized_tokens(pool, normalize_tokens):
    check_pool(3, 6, 5, 7, 4, activation="relu", two_layers=True, pool=pool,
               normalize_tokens=normalize_tokens)


def test_linear_mean_shortcut_equals_map_then_pool():
    """Pooling first and projecting after is exact for a linear head (float64, 1e-12)."""
    x, mask, w1, b1, _, _ = pool_inputs(4, 11, 6, None, 5, two_layers=False)
    mapped = F.linear(x, w1, b1)
    m = mask.unsqueeze(-1)
    expected = (mapped * m).sum(1) / m.sum(1).clamp(min=1)
    with mcr_kernels.use_backend("triton", "mba_pool"):
        out = mcr_kernels.mba_pool(x, mask, w1, b1, activation="none")
    assert (out - expected).abs().max().item() < 1e-12
    assert out[0].abs().max().item() == 0  # row 0 has no counted token


def test_mba_pool_no_mask_non_contiguous_tokens():
    """mask None counts every token; tokens may be a strided view (the model drops CLS)."""
    x, _, w1, b1, w2, b2 = pool_inputs(2, 6, 8, 6, 4, two_layers=True)
    ref = reference.mba_pool(x[:, 1:], None, w1, b1, w2, b2)
    params = (x, w1, b1, w2, b2)
    grad_out = torch.randn_like(ref)
    expected = grads(ref, params, grad_out)
    low = [leaf(t, torch.float32) for t in params]
    with mcr_kernels.use_backend("triton", "mba_pool"):
        out = mcr_kernels.mba_pool(low[0][:, 1:], None, *low[1:])
    assert_close(out, ref, torch.float32, "pooled")
    for got, want in zip(grads(out, low, grad_out.float()), expected):
        assert_close(got, want, torch.float32, "grad")


# --- infonce_loss -----------------------------------------------------------------------

def infonce64(img, txt, scale, normalize=True):
    if normalize:
        img, txt = F.normalize(img, dim=-1), F.normalize(txt, dim=-1)
    logits = scale * img @ txt.T
    labels = torch.arange(img.shape[0], device=img.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def check_infonce(img, txt, scale_value, *, dtype=torch.float32, normalize=True, logit_bias=None):
    img, txt = leaf(img, torch.float64), leaf(txt, torch.float64)
    scale = leaf(torch.tensor(scale_value), torch.float64)
    ref = infonce64(img, txt, scale, normalize)
    expected = grads(ref, (img, txt, scale), None)
    low = [leaf(img, dtype), leaf(txt, dtype), leaf(scale, torch.float32)]
    with mcr_kernels.use_backend("triton", "infonce_loss"):
        loss = mcr_kernels.infonce_loss(*low, logit_bias=logit_bias, normalize=normalize)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert_close(loss, ref, dtype, "loss")
    for name, got, want in zip(("image_emb", "text_emb", "logit_scale"), grads(loss, low, None), expected):
        assert_close(got, want, dtype, f"d {name}")


@pytest.mark.parametrize("B", [1, 2, 3, 64, 257])
@pytest.mark.parametrize("scale", [1.0, 100.0])
def test_infonce_matches_float64_reference(B, scale):
    check_infonce(torch.randn(B, 37), torch.randn(B, 37), scale)


def test_infonce_unnormalized_embeddings():
    check_infonce(torch.randn(5, 9) / 3, torch.randn(5, 9) / 3, 2.0, normalize=False)


def test_infonce_duplicate_embeddings():
    """Identical rows tie every logit of a row: the loss is log B, gradients still match."""
    row = torch.randn(1, 33)
    check_infonce(row.repeat(6, 1), row.repeat(6, 1) + 1e-3 * torch.randn(6, 33), 100.0)
    check_infonce(row.repeat(4, 1), torch.randn(4, 33), 100.0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_infonce_half_precision_inputs(dtype):
    check_infonce(torch.randn(7, 24), torch.randn(7, 24), 30.0, dtype=dtype)


def test_infonce_logit_bias_leaves_loss_unchanged_with_zero_gradient():
    img, txt = torch.randn(5, 8, device=DEVICE), torch.randn(5, 8, device=DEVICE)
    scale = torch.tensor(10.0, device=DEVICE)
    bias = torch.tensor(-3.0, device=DEVICE, requires_grad=True)
    expected = reference.infonce_loss(img, txt, scale, logit_bias=bias)
    with mcr_kernels.use_backend("triton", "infonce_loss"):
        loss = mcr_kernels.infonce_loss(img, txt, scale, logit_bias=bias)
    assert_close(loss, expected, torch.float32, "loss")
    (grad,) = torch.autograd.grad(loss, bias)
    assert grad.item() == 0


# --- mba_infonce: the model's path ------------------------------------------------------

@pytest.mark.parametrize("hidden", [None, 12])
def test_mba_infonce_matches_reference_backend(hidden):
    torch.manual_seed(1)
    img_head = mcr_kernels.ProjectionHead(10, 6, hidden).to(DEVICE)
    txt_head = mcr_kernels.ProjectionHead(8, 6, hidden, activation="gelu_tanh").to(DEVICE)
    img, txt = torch.randn(3, 5, 10, device=DEVICE), torch.randn(3, 7, 8, device=DEVICE)
    txt_mask = torch.rand(3, 7, device=DEVICE) > 0.5
    scale = torch.tensor(14.0, device=DEVICE, requires_grad=True)
    params = [*img_head.parameters(), *txt_head.parameters(), scale]
    results = []
    for name in ("reference", "triton"):
        with mcr_kernels.use_backend(name):
            loss, _, _ = mcr_kernels.mba_infonce(img, None, txt, txt_mask, img_head, txt_head, scale)
        results.append((loss, grads(loss, params, None)))
    (ref_loss, ref_grads), (loss, got) = results
    assert_close(loss, ref_loss, torch.float32, "loss")
    for i, (g, r) in enumerate(zip(got, ref_grads)):
        assert_close(g, r, torch.float32, f"grad {i}")


def test_model_alignment_path_on_triton_matches_reference(tiny_config):
    from mcr.models.mcr import MCR

    model = MCR(tiny_config(), pad_token_id=0, mask_token_id=1).to(DEVICE)
    cfg = model.cfg
    img = torch.randn(2, 4, cfg.vit_width, device=DEVICE)
    txt = torch.randn(2, 6, cfg.text_width, device=DEVICE)
    txt_mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1]], dtype=torch.bool, device=DEVICE)
    params = [model.logit_scale, *model.image_head.parameters(), *model.text_head.parameters()]
    results = []
    for name in ("reference", "triton"):
        with mcr_kernels.use_backend(name):
            loss = model.contrastive_loss(img, txt, txt_mask)
        results.append((loss, grads(loss, params, None)))
    (ref_loss, ref_grads), (loss, got) = results
    assert_close(loss, ref_loss, torch.float32, "loss")
    for i, (g, r) in enumerate(zip(got, ref_grads)):
        assert_close(g, r, torch.float32, f"grad {i}")


# --- torch.distributed: negatives from every rank ----------------------------------------

WORLD = 2


def test_infonce_gather_two_gloo_processes_match_one_process(free_port):
    """open_clip semantics: with local_loss each rank's loss covers its rows (mean over ranks =
    global loss), without it every rank computes the global loss; all_gather's backward sums
    the ranks' gradients, so each rank's gradients are WORLD x the global loss's."""
    B = 6
    img, txt, scale = torch.randn(B, 9), torch.randn(B, 9), 20.0
    # gloo runs on CPU tensors: the workers run the Triton kernels in the interpreter
    with mock.patch.dict(os.environ, {"TRITON_INTERPRET": "1"}):
        ranks = gathered_infonce(free_port, ("reference", "triton"), img, txt, scale, world=WORLD)
    img64, txt64 = leaf(img.cpu(), torch.float64), leaf(txt.cpu(), torch.float64)
    scale64 = leaf(torch.tensor(scale), torch.float64)
    ref = infonce64(img64, txt64, scale64)
    d_img, d_txt, d_scale = grads(ref, (img64, txt64, scale64), None)
    b = B // WORLD
    for local_loss in (True, False):
        for name in ("reference", "triton"):
            losses = torch.stack([r[local_loss, name][0] for r in ranks])
            what = f"{name} local_loss={local_loss}"
            assert_close(losses.mean() if local_loss else losses, ref if local_loss else ref.expand(WORLD),
                         torch.float32, f"{what} loss")
            for r, res in enumerate(ranks):
                _, gi, gt, gs = res[local_loss, name]
                assert_close(gi / WORLD, d_img[r * b:(r + 1) * b], torch.float32, f"{what} d image rank {r}")
                assert_close(gt / WORLD, d_txt[r * b:(r + 1) * b], torch.float32, f"{what} d text rank {r}")
            scale_grads = torch.stack([res[local_loss, name][3] for res in ranks])
            assert_close(scale_grads.sum() / WORLD, d_scale, torch.float32, f"{what} d scale")


# --- torch.library: opcheck and torch.compile ---------------------------------------------

def test_opcheck_custom_ops():
    from mcr_kernels.triton import mba as tm

    x = torch.randn(2, 5, 7, device=DEVICE, requires_grad=True)
    weights = (torch.rand(2, 5, device=DEVICE) > 0.3).float() / 5
    w1 = torch.randn(6, 7, device=DEVICE, requires_grad=True)
    b1 = torch.randn(6, device=DEVICE, requires_grad=True)
    torch.library.opcheck(tm.mba_act_pool, (x, weights, w1, b1, "gelu"))
    torch.library.opcheck(tm.mba_act_pool, (x, weights, w1, None, "relu"))
    img = F.normalize(torch.randn(4, 6, device=DEVICE), dim=-1).requires_grad_()
    txt = F.normalize(torch.randn(4, 6, device=DEVICE), dim=-1).requires_grad_()
    scale = torch.tensor(10.0, device=DEVICE, requires_grad=True)
    torch.library.opcheck(tm.infonce_square, (img, txt, scale))
    all_img = torch.randn(8, 6, device=DEVICE, requires_grad=True)
    all_txt = torch.randn(8, 6, device=DEVICE, requires_grad=True)
    torch.library.opcheck(tm.infonce_local, (img, txt, all_img, all_txt, scale, 4))


def test_torch_compile_fullgraph_matches_eager():
    torch._dynamo.reset()
    x, mask, w1, b1, w2, b2 = (t if t is None or t.dtype == torch.bool else leaf(t, torch.float32)
                               for t in pool_inputs(3, 6, 8, 10, 5, two_layers=True))
    y = leaf(torch.randn(3, 6, 8))
    scale = leaf(torch.tensor(12.0))

    def step(x, y, w1, b1, w2, b2, scale):
        a = mcr_kernels.mba_pool(x, mask, w1, b1, w2, b2)
        t = mcr_kernels.mba_pool(y, None, w1, b1, w2, b2)
        return mcr_kernels.infonce_loss(a, t, scale)

    params = (x, y, w1, b1, w2, b2, scale)
    backend = "inductor" if DEVICE == "cuda" else "aot_eager"
    with mcr_kernels.use_backend("triton"):
        eager = step(*params)
        compiled = torch.compile(step, fullgraph=True, backend=backend)(*params)
        for got, want in zip(grads(compiled, params, None), grads(eager, params, None)):
            assert_close(got, want, torch.float32, "compiled grad")
    assert_close(compiled, eager, torch.float32, "compiled loss")


# --- bad input --------------------------------------------------------------------------

@pytest.mark.parametrize("call,match", [
    (lambda: mcr_kernels.mba_pool(torch.randn(2, 3), None, torch.randn(4, 3), None), "tokens"),
    (lambda: mcr_kernels.mba_pool(torch.randn(2, 3, 5), None, torch.randn(4, 6), None), "weight1"),
    (lambda: mcr_kernels.mba_pool(torch.randn(2, 3, 5), torch.ones(2, 4, dtype=torch.bool),
                                  torch.randn(4, 5), None), "mask"),
    (lambda: mcr_kernels.mba_pool(torch.randn(2, 3, 5), None, torch.randn(4, 5), None,
                                  torch.randn(6, 3)), "weight2"),
    (lambda: mcr_kernels.mba_pool(torch.randn(2, 3, 5), None, torch.randn(4, 5), None,
                                  activation="tanh"), "activation"),
    (lambda: mcr_kernels.mba_pool(torch.randn(2, 3, 5), None, torch.randn(4, 5), None, pool="sum"), "pool"),
    (lambda: mcr_kernels.infonce_loss(torch.randn(2, 4), torch.randn(3, 4), torch.tensor(1.0)), "text_emb"),
    (lambda: mcr_kernels.infonce_loss(torch.randn(2, 4), torch.randn(2, 4), 1.0), "logit_scale"),
    (lambda: mcr_kernels.infonce_loss(torch.randn(2, 4), torch.randn(2, 4), torch.tensor(1.0),
                                      logit_bias=torch.zeros(2, 2)), "logit_bias"),
])
def test_bad_input_raises_value_error_naming_the_argument(call, match):
    with mcr_kernels.use_backend("triton"), pytest.raises(ValueError, match=match):
        call()


# --- GPU only ---------------------------------------------------------------------------

@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_realistic_shapes(dtype):
    check_pool(8, 99, 768, 512, 512, activation="gelu", two_layers=True, dtype=dtype)
    check_pool(8, 128, 768, None, 512, activation="none", two_layers=False, dtype=dtype)
    check_infonce(torch.randn(1000, 512), torch.randn(1000, 512), 100.0, dtype=dtype)


# --- careless or hostile input, kept as regression tests (marked hostile): NaN in -> NaN out, and a
# NaN in a masked-out position reaches nothing, on every backend the op registers ------------

# --- mba_pool, masked_mean ---------------------------------------------------------------

def nan_pool_inputs(B=3, L=11, D=12, H=20, E=8):
    tokens = torch.randn(B, L, D, device=DEVICE, requires_grad=True)
    mask = torch.rand(B, L, device=DEVICE) < 0.6
    mask[:, 0] = True
    mask[2] = False  # a row with no counted token
    params = [torch.randn(*s, device=DEVICE, requires_grad=True) * 0.3 for s in ((H, D), (H,), (E, H), (E,))]
    return tokens, mask, [p.detach().requires_grad_() for p in params]


@pytest.mark.hostile
@pytest.mark.parametrize("name", backend_param("mba_pool"))
@pytest.mark.parametrize("head", ["mlp", "linear"])
def test_mba_pool_nan_in_masked_token_reaches_nothing(name, head):
    tokens, mask, params = nan_pool_inputs()
    if head == "linear":
        params = params[:2] + [None, None]
    poisoned = torch.where(mask[..., None], tokens, float("nan"))
    cleaned = torch.where(mask[..., None], tokens, 0.0)
    with mcr_kernels.use_backend(name, "mba_pool"):
        out = mcr_kernels.mba_pool(poisoned, mask, *params)
        clean = mcr_kernels.mba_pool(cleaned, mask, *params)
    assert not out.isnan().any(), "a NaN in a masked-out token leaked"
    torch.testing.assert_close(out, clean)
    used = [tokens] + [p for p in params if p is not None]
    g = torch.randn_like(out)
    for grad, clean_grad in zip(torch.autograd.grad(out, used, g), torch.autograd.grad(clean, used, g)):
        assert not grad.isnan().any(), "a NaN in a masked-out token leaked into a gradient"
        torch.testing.assert_close(grad, clean_grad)


@pytest.mark.hostile
@pytest.mark.parametrize("name", backend_param("mba_pool"))
def test_mba_pool_nan_in_counted_token_gives_nan_in_its_row(name):
    tokens, mask, params = nan_pool_inputs()
    tokens = tokens.detach().clone()
    tokens[1, 0, 4] = float("nan")
    with mcr_kernels.use_backend(name, "mba_pool"):
        out = mcr_kernels.mba_pool(tokens, mask, *params)
    assert out[1].isnan().all() and not out[0].isnan().any()


@pytest.mark.hostile
def test_masked_mean_ignores_masked_tokens_and_keeps_counted_nan():
    tokens, mask, _ = nan_pool_inputs()
    poisoned = torch.where(mask[..., None], tokens, float("nan"))
    out = mcr_kernels.masked_mean(poisoned, mask)
    counts = mask.sum(1, keepdim=True).clamp(min=1)
    expected = (tokens.double() * mask[..., None]).sum(1) / counts
    torch.testing.assert_close(out.double(), expected)
    assert (out[2] == 0).all()
    (grad,) = torch.autograd.grad(out.sum(), tokens)
    assert not grad.isnan().any()
    poisoned = tokens.detach().clone()
    poisoned[0, 0, 1] = float("nan")
    assert mcr_kernels.masked_mean(poisoned, mask)[0, 1].isnan()
