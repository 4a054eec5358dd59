"""mcr_kernels.linear_cross_entropy: the chunked (`cpu`) and Triton backends against the
float64 reference (loss and gradients wrt hidden, weight, bias), ignore_index, all rows
ignored, awkward sizes, several chunks, both reductions, bounded memory, opcheck, torch.compile.

Without a GPU the Triton kernel runs on CPU tensors under TRITON_INTERPRET=1 (conftest).
Tolerances, relative to max(1, max |reference|): float32 2e-5; bfloat16 inputs 2e-2 (the
oracle sees the same rounded inputs; logits GEMM in bfloat16 as F.linear would).
"""
import pytest
import torch
import torch.nn.functional as F
from oracle import relative_assert_close

import mcr_kernels
from mcr_kernels import _chunked_cross_entropy as chunked
from mcr_kernels import backend, reference
from mcr_kernels.blockwise import linear_cross_entropy as blockwise

pytest.importorskip("triton")
BACKENDS = ("blockwise", "triton")
TOL = {torch.float32: 2e-5, torch.bfloat16: 2e-2}
assert_close = relative_assert_close(TOL)


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of a few rows, so that small inputs already take several."""
    monkeypatch.setattr(chunked, "_MIN_CHUNK_ELEMENTS", 64)


def check(name, N, D, V, *, bias=True, dtype=torch.float32, reduction="mean", ignore_index=-100,
          ignored=0.3, grad_scale=1.7, seed=0):
    g = torch.Generator().manual_seed(seed)
    tensors = [torch.randn(N, D, generator=g), torch.randn(V, D, generator=g) / D ** 0.5,
               torch.randn(V, generator=g) if bias else None]
    labels = torch.randint(0, V, (N,), generator=g)
    labels[torch.rand(N, generator=g) < ignored] = ignore_index
    low = [t.to(dtype).requires_grad_() if t is not None else None for t in tensors]
    ref_in = [t.detach().double().requires_grad_() if t is not None else None for t in low]
    kw = dict(ignore_index=ignore_index, reduction=reduction)
    ref = reference.linear_cross_entropy(*ref_in, labels, **kw)
    present = [t for t in ref_in if t is not None]
    expected = torch.autograd.grad(grad_scale * ref, present)
    with mcr_kernels.use_backend(name, "linear_cross_entropy"):
        loss = mcr_kernels.linear_cross_entropy(*low, labels, **kw)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert_close(loss, ref, dtype, "loss")
    got = torch.autograd.grad(grad_scale * loss, [t for t in low if t is not None])
    for what, a, b in zip(("hidden", "weight", "bias"), got, expected, strict=False):  # no bias: 2
        assert a.dtype == dtype
        assert_close(a, b, dtype, f"d {what}")
    return loss, got


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("N,D,V", [(1, 1, 1), (1, 8, 5), (17, 13, 37), (29, 24, 130)])
def test_matches_float64_reference(name, reduction, N, D, V):
    check(name, N, D, V, reduction=reduction)


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_several_chunks_without_bias_and_another_ignore_index(name, reduction, small_chunks):
    assert chunked.chunk_rows(41, 67, 9) < 41
    check(name, 41, 9, 67, bias=False, reduction=reduction, ignore_index=3, ignored=0.5)


@pytest.mark.parametrize("name", BACKENDS)
def test_bfloat16_inputs(name, small_chunks):
    check(name, 23, 16, 45, dtype=torch.bfloat16)


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_every_row_ignored_gives_zero_loss_and_zero_gradients(name, reduction):
    loss, grads = check(name, 6, 5, 11, reduction=reduction, ignored=1.0)
    assert loss.item() == 0 and all(g.abs().max().item() == 0 for g in grads)


def test_large_logits_stay_finite():
    """Logits of ±1e4 (a softmax in float32 without the max shift would overflow)."""
    hidden = torch.randn(5, 4) * 100
    weight = torch.randn(9, 4) * 100
    labels = torch.randint(0, 9, (5,))
    ref = F.cross_entropy(F.linear(hidden.double(), weight.double()), labels)
    for name in BACKENDS:
        with mcr_kernels.use_backend(name, "linear_cross_entropy"):
            loss = mcr_kernels.linear_cross_entropy(hidden, weight, None, labels)
        assert torch.isfinite(loss) and abs(loss.item() - ref.item()) <= 1e-4 * max(1, ref.item())


def test_empty_vocabulary_is_named():
    hidden = torch.randn(3, 4)
    for name in BACKENDS + ("reference",):
        with mcr_kernels.use_backend(name, "linear_cross_entropy"), \
                pytest.raises(ValueError, match=r"^weight must have at least one row \(the vocabulary\)"):
            mcr_kernels.linear_cross_entropy(hidden, torch.randn(0, 4), None, torch.full((3,), -100))


def test_chunked_default_on_cpu_and_it_runs():
    calls = []
    counted = backend.wrapped("linear_cross_entropy", "blockwise",
                              lambda fn: lambda *a, **k: calls.append(1) or fn(*a, **k))
    with counted, mcr_kernels.use_backend(None):
        assert backend.resolve("linear_cross_entropy", torch.device("cpu"))[0] == "blockwise"
        mcr_kernels.linear_cross_entropy(torch.randn(3, 4), torch.randn(5, 4), None, torch.tensor([0, 4, 2]))
    assert calls == [1]


def test_no_grad_mode_keeps_only_the_row_log_sum_exp():
    hidden, weight = torch.randn(7, 4, requires_grad=True), torch.randn(9, 4, requires_grad=True)
    labels = torch.randint(0, 9, (7,))
    with torch.no_grad():
        loss, lse = blockwise.linear_cross_entropy_chunked(hidden, weight, None, labels, -100, True)
    assert not loss.requires_grad and lse.shape == (7,)
    assert_close(lse, torch.logsumexp(hidden.double() @ weight.double().T, 1), torch.float32, "lse")
    assert_close(loss, reference.linear_cross_entropy(hidden, weight, None, labels), torch.float32, "loss")


def test_chunks_never_hold_the_rows_by_vocabulary_logits(small_chunks, largest_tensor):
    N, D, V = 60, 3, 50
    hidden, weight, bias = torch.randn(N, D), torch.randn(V, D), torch.randn(V)
    labels = torch.randint(0, V, (N,))
    with largest_tensor() as largest:
        _, lse = chunked.chunked_forward(hidden, weight, bias, labels, -100, True, blockwise.ce_rows_torch)
    assert largest.numel <= V * chunked.chunk_rows(N, V, D) < N * V // 4, largest.numel
    with largest_tensor() as largest:
        chunked.chunked_backward(torch.tensor(1.0), hidden, weight, bias, labels, lse, -100, True,
                                 blockwise.ce_grad_rows_torch)
    assert largest.numel <= max(V * chunked.chunk_rows(N, V, D), V * D) < N * V // 4, largest.numel


def test_forward_holds_no_weight_sized_gradient():
    """Between forward and backward only the rows' log-sum-exp is kept (not d W [V, D])."""
    hidden, weight = torch.randn(5, 8, requires_grad=True), torch.randn(300, 8, requires_grad=True)
    labels = torch.randint(0, 300, (5,))
    with mcr_kernels.use_backend("blockwise", "linear_cross_entropy"):
        loss = mcr_kernels.linear_cross_entropy(hidden, weight, None, labels)
    saved = [t for t in loss.grad_fn.saved_tensors if t is not None]  # custom op's autograd node
    assert {tuple(t.shape) for t in saved} <= {(5, 8), (300, 8), (5,)}
    assert all(t.data_ptr() in (hidden.data_ptr(), weight.data_ptr(), labels.data_ptr()) or t.shape == (5,)
               for t in saved)


@pytest.mark.parametrize("name", BACKENDS)
def test_opcheck(name):
    if name == "triton":
        from mcr_kernels.triton import linear_cross_entropy as module
        forward, backward = module.linear_cross_entropy_triton, module.linear_cross_entropy_triton_backward
    else:
        forward, backward = blockwise.linear_cross_entropy_chunked, blockwise.linear_cross_entropy_chunked_backward
    hidden, weight, bias = (torch.randn(*s, requires_grad=True) for s in ((6, 5), (7, 5), (7,)))
    labels = torch.tensor([0, 6, -100, 3, 3, 1])
    torch.library.opcheck(forward, (hidden, weight, bias, labels, -100, True))
    torch.library.opcheck(forward, (hidden, weight, None, labels, -100, False))
    hidden, weight, bias = hidden.detach(), weight.detach(), bias.detach()  # no double backward
    lse = torch.logsumexp(hidden @ weight.T + bias, 1)
    torch.library.opcheck(backward, (torch.tensor(1.3), hidden, weight, bias, labels, lse, -100, True))


@pytest.mark.parametrize("name", BACKENDS)
def test_torch_compile_fullgraph(name):
    torch._dynamo.reset()
    hidden, weight, bias = (torch.randn(*s, requires_grad=True) for s in ((9, 6), (11, 6), (11,)))
    labels = torch.tensor([0, 10, -100, 3, 3, 1, 7, -100, 2])

    def loss_fn(hidden, weight, bias):
        return mcr_kernels.linear_cross_entropy(torch.tanh(hidden), weight, bias, labels)

    with mcr_kernels.use_backend(name, "linear_cross_entropy"):
        eager = loss_fn(hidden, weight, bias)
        compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")(hidden, weight, bias)
        got = torch.autograd.grad(compiled, (hidden, weight, bias))
    assert_close(compiled, eager, torch.float32, "loss")
    for a, b in zip(got, torch.autograd.grad(eager, (hidden, weight, bias)), strict=True):
        assert_close(a, b, torch.float32, "grad")


@pytest.mark.parametrize("call,match", [
    (lambda: mcr_kernels.linear_cross_entropy(torch.randn(3), torch.randn(5, 4), None, torch.zeros(3).long()),
     "hidden"),
    (lambda: mcr_kernels.linear_cross_entropy(torch.randn(3, 4), torch.randn(5, 3), None, torch.zeros(3).long()),
     "weight"),
    (lambda: mcr_kernels.linear_cross_entropy(torch.randn(3, 4), torch.randn(5, 4), torch.randn(4),
                                              torch.zeros(3).long()), "bias"),
    (lambda: mcr_kernels.linear_cross_entropy(torch.randn(3, 4), torch.randn(5, 4), None, torch.zeros(3)),
     "labels"),
    (lambda: mcr_kernels.linear_cross_entropy(torch.randn(3, 4), torch.randn(5, 4), None, torch.zeros(2).long()),
     "labels"),
    (lambda: mcr_kernels.linear_cross_entropy(torch.randn(3, 4), torch.randn(5, 4), None,
                                              torch.tensor([0, 5, -100])), r"labels must be in \[0, 5\)"),
    (lambda: mcr_kernels.linear_cross_entropy(torch.randn(3, 4), torch.randn(5, 4), None, torch.zeros(3).long(),
                                              reduction="none"), "reduction"),
])
def test_bad_input_raises_value_error_naming_the_argument(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_autocast_casts_the_projection_like_f_linear():
    hidden, weight, bias = (torch.randn(*s, requires_grad=True) for s in ((9, 16), (21, 16), (21,)))
    labels = torch.randint(0, 21, (9,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = F.cross_entropy(F.linear(hidden, weight, bias).float(), labels)
        loss = mcr_kernels.linear_cross_entropy(hidden, weight, bias, labels)
    assert_close(loss, expected, torch.bfloat16, "loss")
    for a, b in zip(torch.autograd.grad(loss, (hidden, weight, bias)),
                    torch.autograd.grad(expected, (hidden, weight, bias)), strict=True):
        assert a.dtype == torch.float32
        assert_close(a, b, torch.bfloat16, "grad")


@pytest.mark.parametrize("forced", ["reference", None])
def test_model_mrm_loss_equals_full_vocabulary_logits(tiny_config, forced):
    """MCR.mrm_loss (masked rows only, fused) = the MLM head's full logits + cross-entropy."""
    from mcr.models.mcr import MCR

    model = MCR(tiny_config(), pad_token_id=0, mask_token_id=1)
    hidden = torch.randn(3, 10, model.cfg.text_width, requires_grad=True)
    labels = torch.randint(0, model.cfg.vocab_size, (3, 10))
    labels[torch.rand(3, 10) < 0.7] = -100
    labels[0, 0] = 7
    params = [hidden, *model.mlm_head.parameters()]
    logits = model.mlm_head(hidden)
    expected = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
    with mcr_kernels.use_backend(forced):
        chosen = labels != -100
        loss = model.mrm_loss(hidden[chosen], labels[chosen])
    assert_close(loss, expected, torch.float32, "loss")
    for a, b in zip(torch.autograd.grad(loss, params), torch.autograd.grad(expected, params), strict=True):
        assert_close(a, b, torch.float32, "grad")
