"""Patch dropping ops (random_keep_indices, gather_tokens, restore_tokens, random_masking)
on every backend against the reference computed in float64: outputs, gradients, indices.

Triton kernels run under TRITON_INTERPRET=1 on CPU tensors (tests/conftest.py), the
native ones through mcr_kernels._C, so shapes stay tiny. Exact copies are compared
exactly; sums (gradients) with the per-dtype tolerances of TOL.
"""
import pytest
import torch

import mcr_kernels
from mcr_kernels import reference

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Gradients are sums accumulated in float32 and rounded once to the dtype.
TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.float16: dict(atol=2e-3, rtol=2e-3),
       torch.bfloat16: dict(atol=2e-2, rtol=1e-2), torch.float64: dict(atol=1e-12, rtol=1e-12)}
# Repeated indices: the native kernels add in the dtype, rounding after each of up to 6 adds.
REPEAT_TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.float16: dict(atol=1e-2, rtol=5e-3),
              torch.bfloat16: dict(atol=8e-2, rtol=4e-2)}
OPS = ("random_keep_indices", "gather_tokens", "restore_tokens")
# (B, N, K, D): B=1, N=1, K=0, K=N, D in 1, 7, 100, 768 (not multiples of any block), and
# N - K = 32 masked slots, more than one chunk of the restore backward.
SHAPES = [(1, 1, 1, 1), (2, 7, 3, 7), (3, 5, 0, 100), (2, 6, 6, 1), (1, 4, 2, 768), (2, 37, 5, 3)]


def backends_of(op):
    return [pytest.param(b, marks=pytest.mark.skipif(b not in mcr_kernels.available_backends(op, DEVICE),
                                                     reason=f"{b} not available on {DEVICE}"))
            for b in ("triton", "native") if b in mcr_kernels.registered_backends(op)]


def keep_restore(B, N, K, seed=0):
    return reference.random_keep_indices(B, N, K, device=DEVICE, generator=_gen(seed))


def _gen(seed):
    return torch.Generator(DEVICE).manual_seed(seed)


def randn(*shape, dtype=torch.float32, requires_grad=False):
    return torch.randn(*shape, device=DEVICE).to(dtype).requires_grad_(requires_grad)


def run_gather(name, x, ids_keep):
    with mcr_kernels.use_backend(name, "gather_tokens"):
        return mcr_kernels.gather_tokens(x, ids_keep)


def run_restore(name, x_kept, ids_restore, mask_token):
    with mcr_kernels.use_backend(name, "restore_tokens"):
        return mcr_kernels.restore_tokens(x_kept, ids_restore, mask_token)


def grads(out, inputs, grad_out):
    return torch.autograd.grad(out, inputs, grad_out, allow_unused=True)


# --- gather ---------------------------------------------------------------------------

@pytest.mark.parametrize("name", backends_of("gather_tokens"))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,N,K,D", SHAPES)
def test_gather_matches_float64_reference(name, dtype, B, N, K, D):
    x = randn(B, N, D, dtype=dtype, requires_grad=True)
    ids_keep, _ = keep_restore(B, N, K)
    out = run_gather(name, x, ids_keep)
    x64 = x.detach().double().requires_grad_()
    ref = reference.gather_tokens(x64, ids_keep)
    assert out.shape == (B, K, D) and out.dtype == dtype
    torch.testing.assert_close(out.double(), ref, atol=0, rtol=0)
    g = randn(B, K, D, dtype=dtype)
    (gx,), (gx_ref,) = grads(out, [x], g), grads(ref, [x64], g.double())
    assert gx.dtype == dtype
    torch.testing.assert_close(gx.double(), gx_ref, atol=0, rtol=0)  # distinct ids: a copy


@pytest.mark.parametrize("name", backends_of("gather_tokens"))
@pytest.mark.parametrize("dtype", DTYPES)
def test_gather_repeated_indices_add_up_in_backward(name, dtype):
    x = randn(2, 5, 7, dtype=dtype, requires_grad=True)
    ids_keep = torch.tensor([[4, 0, 4, 4, 1, 0], [2, 2, 2, 2, 2, 2]], device=DEVICE)
    out = run_gather(name, x, ids_keep)
    x64 = x.detach().double().requires_grad_()
    ref = reference.gather_tokens(x64, ids_keep)
    torch.testing.assert_close(out.double(), ref, atol=0, rtol=0)
    g = randn(2, 6, 7, dtype=dtype)
    (gx,), (gx_ref,) = grads(out, [x], g), grads(ref, [x64], g.double())
    torch.testing.assert_close(gx.double(), gx_ref, **REPEAT_TOL[dtype])
    assert (gx[0, 3] == 0).all() and (gx[1, 0] == 0).all()  # never-picked tokens get zeros


@pytest.mark.parametrize("name", backends_of("gather_tokens"))
def test_gather_gradcheck(name):
    x = randn(2, 3, 2, dtype=torch.float64, requires_grad=True)
    ids_keep = torch.tensor([[2, 0, 2], [1, 2, 0]], device=DEVICE)
    with mcr_kernels.use_backend(name, "gather_tokens"):
        assert torch.autograd.gradcheck(lambda t: mcr_kernels.gather_tokens(t, ids_keep), (x,))
        if name == "triton":  # its backward is an op with its own backward (the gather)
            assert torch.autograd.gradgradcheck(lambda t: mcr_kernels.gather_tokens(t, ids_keep), (x,),
                                                fast_mode=True)


# --- restore --------------------------------------------------------------------------

@pytest.mark.parametrize("name", backends_of("restore_tokens"))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,N,K,D", SHAPES)
def test_restore_matches_float64_reference(name, dtype, B, N, K, D):
    x_kept = randn(B, K, D, dtype=dtype, requires_grad=True)
    mask_token = randn(D, dtype=dtype, requires_grad=True)
    _, ids_restore = keep_restore(B, N, K)
    out = run_restore(name, x_kept, ids_restore, mask_token)
    x64 = x_kept.detach().double().requires_grad_()
    m64 = mask_token.detach().double().requires_grad_()
    ref = reference.restore_tokens(x64, ids_restore, m64)
    assert out.shape == (B, N, D) and out.dtype == dtype
    torch.testing.assert_close(out.double(), ref, atol=0, rtol=0)
    g = randn(B, N, D, dtype=dtype)
    gx, gm = grads(out, [x_kept, mask_token], g)
    gx_ref, gm_ref = grads(ref, [x64, m64], g.double())
    assert gx.dtype == dtype and gm.dtype == dtype and gm.shape == (D,)
    torch.testing.assert_close(gx.double(), gx_ref, atol=0, rtol=0)
    torch.testing.assert_close(gm.double(), gm_ref, **TOL[dtype])


@pytest.mark.parametrize("name", backends_of("restore_tokens"))
def test_restore_mask_token_in_another_dtype(name):
    """The model keeps mask_token in float32 [1, 1, D] under bf16 autocast-style inputs."""
    x_kept = randn(2, 3, 9, dtype=torch.bfloat16, requires_grad=True)
    mask_token = randn(1, 1, 9, requires_grad=True)
    _, ids_restore = keep_restore(2, 8, 3)
    out = run_restore(name, x_kept, ids_restore, mask_token)
    ref = reference.restore_tokens(x_kept, ids_restore, mask_token.reshape(-1))
    torch.testing.assert_close(out, ref, atol=0, rtol=0)
    g = randn(2, 8, 9, dtype=torch.bfloat16)
    (gm,) = grads(out, [mask_token], g)
    gm_ref = (g.double() * (ids_restore >= 3)[..., None]).sum((0, 1))
    assert gm.dtype == torch.float32 and gm.shape == (1, 1, 9)
    torch.testing.assert_close(gm.reshape(-1).double(), gm_ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", backends_of("restore_tokens"))
def test_restore_repeated_indices_and_gradcheck(name):
    """ids_restore need not be a permutation: repeated kept slots add up in the gradient."""
    x_kept = randn(2, 2, 2, dtype=torch.float64, requires_grad=True)
    mask_token = randn(2, dtype=torch.float64, requires_grad=True)
    ids_restore = torch.tensor([[0, 0, 4, 1, 3], [3, 3, 1, 1, 2]], device=DEVICE)
    out = run_restore(name, x_kept, ids_restore, mask_token)
    torch.testing.assert_close(out, reference.restore_tokens(x_kept, ids_restore, mask_token), atol=0, rtol=0)
    with mcr_kernels.use_backend(name, "restore_tokens"):
        assert torch.autograd.gradcheck(lambda a, m: mcr_kernels.restore_tokens(a, ids_restore, m),
                                        (x_kept, mask_token))


def test_restore_inverts_gather_on_kept_tokens():
    B, N, K, D = 3, 10, 4, 6
    x = randn(B, N, D)
    ids_keep, ids_restore = keep_restore(B, N, K)
    full = mcr_kernels.restore_tokens(mcr_kernels.gather_tokens(x, ids_keep), ids_restore, torch.zeros(D))
    kept = (ids_restore < K)[..., None]
    torch.testing.assert_close(full, x * kept, atol=0, rtol=0)


# --- indices --------------------------------------------------------------------------

def chi_square(counts):
    expected = counts.sum() / counts.numel()
    return float(((counts - expected) ** 2 / expected).sum())


CHI2_7DOF_P1E4 = 29.88  # chi-square critical value, 7 degrees of freedom, p = 1e-4


@pytest.mark.parametrize("name", ["reference", *backends_of("random_keep_indices")])
@pytest.mark.parametrize("B,N,K", [(1, 1, 1), (3, 1, 0), (2, 9, 0), (4, 9, 4), (2, 6, 6), (1, 197, 98)])
def test_keep_indices_properties(name, B, N, K):
    with mcr_kernels.use_backend(name, "random_keep_indices"):
        ids_keep, ids_restore = mcr_kernels.random_keep_indices(B, N, K, device=DEVICE, generator=_gen(3))
    assert ids_keep.shape == (B, K) and ids_restore.shape == (B, N)
    assert ids_keep.dtype == ids_restore.dtype == torch.int64
    assert ids_keep.device.type == ids_restore.device.type == DEVICE.type
    assert ((ids_keep >= 0) & (ids_keep < N)).all()
    assert (ids_keep.sort(1).values.diff(dim=1) > 0).all()  # distinct per row
    # ids_restore is a permutation and restore∘keep = identity on the kept positions
    torch.testing.assert_close(ids_restore.sort(1).values, torch.arange(N, device=DEVICE).expand(B, N))
    torch.testing.assert_close(ids_restore.gather(1, ids_keep), torch.arange(K, device=DEVICE).expand(B, K))


@pytest.mark.parametrize("name", backends_of("random_keep_indices"))
def test_keep_indices_equal_reference_and_reproducible(name):
    with mcr_kernels.use_backend(name, "random_keep_indices"):
        first = mcr_kernels.random_keep_indices(5, 13, 6, device=DEVICE, generator=_gen(7))
        again = mcr_kernels.random_keep_indices(5, 13, 6, device=DEVICE, generator=_gen(7))
        other = mcr_kernels.random_keep_indices(5, 13, 6, device=DEVICE, generator=_gen(8))
    ref = reference.random_keep_indices(5, 13, 6, device=DEVICE, generator=_gen(7))
    for a, b, r in zip(first, again, ref):
        assert torch.equal(a, b) and torch.equal(a, r)
    assert not torch.equal(first[0], other[0])


@pytest.mark.parametrize("name", ["reference", *backends_of("random_keep_indices")])
def test_keep_indices_uniform_by_chi_square(name):
    B, N, K = 800, 8, 3
    with mcr_kernels.use_backend(name, "random_keep_indices"):
        ids_keep, _ = mcr_kernels.random_keep_indices(B, N, K, device=DEVICE, generator=_gen(11))
    ids_keep = ids_keep.cpu()
    assert chi_square(torch.bincount(ids_keep.flatten(), minlength=N).double()) < CHI2_7DOF_P1E4
    assert chi_square(torch.bincount(ids_keep[:, 0], minlength=N).double()) < CHI2_7DOF_P1E4
    # the test can fail: always keeping the lowest indices is far from uniform
    biased = torch.randperm(N)[:K].expand(B, K).sort(1).values.clamp(max=N - 3)
    assert chi_square(torch.bincount(biased.flatten(), minlength=N).double()) > CHI2_7DOF_P1E4


@pytest.mark.parametrize("name", ["reference", *backends_of("gather_tokens")])
def test_random_masking_keeps_prefix_and_marks_dropped(name):
    B, P, N, D = 3, 1, 8, 5
    x = randn(B, P + N, D, requires_grad=True)
    with mcr_kernels.use_backend(name, "gather_tokens"):
        x_kept, mask, ids_restore = mcr_kernels.random_masking(x, 0.75, generator=_gen(2))
    K = 2
    assert x_kept.shape == (B, P + K, D) and mask.shape == (B, N) and mask.dtype == x.dtype
    torch.testing.assert_close(x_kept[:, :P], x[:, :P], atol=0, rtol=0)
    assert (mask.sum(1) == N - K).all() and torch.equal(mask, (ids_restore >= K).to(mask.dtype))
    back = reference.restore_tokens(x_kept[:, P:], ids_restore, torch.zeros(D))
    torch.testing.assert_close(back, x[:, P:] * (1 - mask)[..., None], atol=0, rtol=0)
    x_kept.sum().backward()
    torch.testing.assert_close(x.grad[:, P:], (1 - mask)[..., None].expand(B, N, D))


# --- torch.library, torch.compile, the model --------------------------------------------

def _op_samples():
    x = randn(2, 5, 7, requires_grad=True)
    ids_keep, ids_restore = keep_restore(2, 5, 3)
    x_kept, mask_token = randn(2, 3, 7, requires_grad=True), randn(7, requires_grad=True)
    grad_full = randn(2, 5, 7)
    samples = {"gather_tokens_native": (x, ids_keep), "scatter_tokens_native": (randn(2, 3, 7), ids_keep, 5),
               "restore_tokens_native": (x_kept, ids_restore, mask_token),
               "restore_tokens_backward_native": (grad_full, ids_restore, 3)}
    samples.update({name.replace("_native", "_triton"): args for name, args in samples.items()})
    samples["keep_restore_from_shuffle_triton"] = (torch.stack([torch.randperm(5), torch.randperm(5)]), 2)
    return samples


@pytest.mark.parametrize("op_name", sorted(_op_samples()))
def test_opcheck(op_name):
    kind = op_name.rsplit("_", 1)[1]
    if kind not in mcr_kernels.available_backends("gather_tokens", DEVICE):
        pytest.skip(f"{kind} not available on {DEVICE}")
    args = _op_samples()[op_name]
    torch.library.opcheck(getattr(torch.ops.mcr_kernels, op_name).default, args)


@pytest.mark.parametrize("name", ["triton", "native"])
def test_torch_compile_fullgraph(name):
    if name not in mcr_kernels.available_backends("gather_tokens", DEVICE):
        pytest.skip(f"{name} not available")
    torch._dynamo.reset()

    def step(x, mask_token):
        x_kept, mask, ids_restore = mcr_kernels.random_masking(x, 0.5, num_prefix_tokens=1)
        full = mcr_kernels.restore_tokens(x_kept[:, 1:] * 2, ids_restore, mask_token)
        return full, mask, ids_restore

    x, mask_token = randn(2, 7, 9, requires_grad=True), randn(9, requires_grad=True)
    with mcr_kernels.use_backend(name, *[op for op in OPS if name in mcr_kernels.registered_backends(op)]):
        full, mask, ids_restore = torch.compile(step, fullgraph=True, backend="aot_eager")(x, mask_token)
    full.sum().backward()
    dropped = mask.bool()[..., None]
    torch.testing.assert_close(full, torch.where(dropped, mask_token, 2 * x[:, 1:]).detach())
    torch.testing.assert_close(x.grad[:, 1:], torch.where(dropped, 0.0, 2.0).expand(2, 6, 9))
    torch.testing.assert_close(mask_token.grad, mask.sum().expand(9))


@pytest.mark.parametrize("name", ["triton", "native"])
def test_model_runs_on_every_backend(tiny_config, name, make_batch):
    """The MCR model calls these ops on its hot path: same losses and grads on every backend."""
    from mcr import masking
    from mcr.models.mcr import MCR

    ops = [op for op in OPS if name in mcr_kernels.available_backends(op, DEVICE)]
    if not ops:
        pytest.skip(f"{name} not available")
    cfg = tiny_config()
    model = MCR(cfg).to(DEVICE)
    batch = {k: v.to(DEVICE) for k, v in make_batch(cfg, B=2).items()}

    def run(backend_name, *op_names):
        model.zero_grad()
        masks = masking.draw(cfg, 2, device=DEVICE, generator=torch.Generator(DEVICE).manual_seed(5))
        with mcr_kernels.use_backend(backend_name, *op_names):
            losses = model(batch, masks)
        sum(losses.values()).backward()
        return {k: v.item() for k, v in losses.items()}, model.mask_token.grad.clone()

    losses, grad = run(name, *ops)
    ref_losses, ref_grad = run("reference", *ops)
    assert losses == pytest.approx(ref_losses, rel=1e-5)
    torch.testing.assert_close(grad, ref_grad, atol=1e-6, rtol=1e-5)


# --- bad input ------------------------------------------------------------------------

@pytest.mark.parametrize("call,match", [
    (lambda x, i, r, m: mcr_kernels.gather_tokens(x[0], i), "x must have 3 dims"),
    (lambda x, i, r, m: mcr_kernels.gather_tokens(x.long(), i), "x must have dtype"),
    (lambda x, i, r, m: mcr_kernels.gather_tokens(x, i.int()), "ids_keep must have dtype"),
    (lambda x, i, r, m: mcr_kernels.gather_tokens(x, i[:1]), "ids_keep dim 0"),
    (lambda x, i, r, m: mcr_kernels.gather_tokens(x, i.to("meta")), "ids_keep must be on"),
    (lambda x, i, r, m: mcr_kernels.gather_tokens(x, i + 5, check_indices=True), "ids_keep has values"),
    (lambda x, i, r, m: mcr_kernels.gather_tokens(x, i - 9, check_indices=True), "ids_keep has values"),
    (lambda x, i, r, m: mcr_kernels.restore_tokens(x, r, m[:-1]), "mask_token must have D"),
    (lambda x, i, r, m: mcr_kernels.restore_tokens(x, r[:, :1], m), "ids_restore must have N >= K"),
    (lambda x, i, r, m: mcr_kernels.restore_tokens(x, r.float(), m), "ids_restore must have dtype"),
    (lambda x, i, r, m: mcr_kernels.restore_tokens(x[..., 0], r, m), "x_kept must have 3 dims"),
    (lambda x, i, r, m: mcr_kernels.restore_tokens(x, r, m.int()), "mask_token must have dtype"),
    (lambda x, i, r, m: mcr_kernels.restore_tokens(x, r, m.to("meta")), "mask_token must be on"),
    (lambda x, i, r, m: mcr_kernels.restore_tokens(x, r + 7, m, check_indices=True), "ids_restore has values"),
    (lambda x, i, r, m: mcr_kernels.random_keep_indices(2, 4, 5), "num_keep must be <= num_tokens"),
    (lambda x, i, r, m: mcr_kernels.random_keep_indices(-1, 4, 2), "batch_size must be"),
    (lambda x, i, r, m: mcr_kernels.random_keep_indices(2, 4.0, 2), "num_tokens must be"),
    (lambda x, i, r, m: mcr_kernels.random_masking(x, 1.0), "mask_ratio must be"),
    (lambda x, i, r, m: mcr_kernels.random_masking(x, 0.5, num_prefix_tokens=9), "num_prefix_tokens must be"),
    (lambda x, i, r, m: mcr_kernels.random_masking(x[0], 0.5), "x must have 3 dims"),
])
def test_bad_input_raises_value_error_naming_the_argument(call, match):
    x, m = randn(2, 6, 4), randn(4)
    ids_keep, ids_restore = keep_restore(2, 6, 3)
    with pytest.raises(ValueError, match=match):
        call(x, ids_keep, ids_restore, m)


# --- non-contiguous inputs --------------------------------------------------------------

@pytest.mark.parametrize("name", backends_of("gather_tokens"))
def test_non_contiguous_inputs(name):
    B, N, K, D = 2, 6, 3, 5
    big = randn(B, D, N + 2, requires_grad=True)
    x_view = big.transpose(1, 2)[:, 1:-1]                 # [B, N, D]: offset, D-stride != 1
    assert not x_view.is_contiguous()
    ids_keep, ids_restore = keep_restore(B, N, K)
    ids_keep_nc = torch.stack([ids_keep, ids_keep], -1)[..., 0]  # stride (2K, 2)
    ids_restore_nc = torch.stack([ids_restore, ids_restore], -1)[..., 1]
    assert not ids_keep_nc.is_contiguous() and not ids_restore_nc.is_contiguous()
    out = run_gather(name, x_view, ids_keep_nc)
    torch.testing.assert_close(out, reference.gather_tokens(x_view, ids_keep), atol=0, rtol=0)
    g = randn(B, D, K).transpose(1, 2)                   # non-contiguous incoming gradient
    (gx,) = grads(out, [x_view], g)
    torch.testing.assert_close(gx, reference.gather_tokens(x_view, ids_keep).new_zeros(B, N, D)
                               .scatter(1, ids_keep[..., None].expand(B, K, D), g), atol=0, rtol=0)

    if name not in mcr_kernels.available_backends("restore_tokens", DEVICE):
        return
    mask_token = randn(2 * D)[::2].requires_grad_()
    x_kept = out.detach().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_()
    full = run_restore(name, x_kept, ids_restore_nc, mask_token)
    torch.testing.assert_close(full, reference.restore_tokens(x_kept, ids_restore, mask_token), atol=0, rtol=0)
    g_full = randn(B, D, N).transpose(1, 2)
    gk, gm = grads(full, [x_kept, mask_token], g_full)
    gk_ref, gm_ref = grads(reference.restore_tokens(x_kept, ids_restore, mask_token), [x_kept, mask_token], g_full)
    torch.testing.assert_close(gk, gk_ref, atol=0, rtol=0)
    torch.testing.assert_close(gm, gm_ref, **TOL[torch.float32])


# --- GPU: MCR shapes ---------------------------------------------------------------------

@pytest.mark.cuda
@pytest.mark.parametrize("name", ["triton", "native"])
@pytest.mark.parametrize("B,D", [(64, 768), (256, 768), (64, 512)])
def test_mcr_shapes_on_gpu(name, B, D):
    N, K, dtype = 196, 98, torch.bfloat16
    if name not in mcr_kernels.available_backends("restore_tokens", DEVICE):
        pytest.skip(f"{name} not available on {DEVICE}")
    x = randn(B, N + 1, D, dtype=dtype, requires_grad=True)
    mask_token = randn(D, dtype=dtype, requires_grad=True)
    with mcr_kernels.use_backend(name, *[op for op in OPS if name in mcr_kernels.registered_backends(op)]):
        kept, mask, ids_restore = mcr_kernels.random_masking(x, 0.5, generator=_gen(0))
        full = mcr_kernels.restore_tokens(kept[:, 1:], ids_restore, mask_token)
    x64, m64 = x.detach().double().requires_grad_(), mask_token.detach().double().requires_grad_()
    ids_keep = ids_restore.argsort(1)[:, :K]
    kept_ref = torch.cat([x64[:, :1], reference.gather_tokens(x64[:, 1:], ids_keep)], 1)
    full_ref = reference.restore_tokens(kept_ref[:, 1:], ids_restore, m64)
    torch.testing.assert_close(kept.double(), kept_ref, atol=0, rtol=0)
    torch.testing.assert_close(full.double(), full_ref, atol=0, rtol=0)
    g = randn(B, N, D, dtype=dtype)
    gx, gm = grads(full, [x, mask_token], g)
    gx_ref, gm_ref = grads(full_ref, [x64, m64], g.double())
    torch.testing.assert_close(gx.double(), gx_ref, **TOL[dtype])
    torch.testing.assert_close(gm.double(), gm_ref, **TOL[dtype])
