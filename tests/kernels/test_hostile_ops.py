"""Hostile inputs to the ops, kept as regression tests.

NaN in -> NaN out, with masked positions truly ignored: a NaN in an attended query, key or
token reaches the outputs that see it, a NaN in a masked-out key, value or token reaches
nothing (outputs and gradients equal those of the same inputs with zeros there). Every
check runs on every backend the op registers (Triton under TRITON_INTERPRET=1 on CPU);
tests/kernels/test_op_policy.py holds the same policy for every op.
"""
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import mcr_kernels

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def backend_param(op):
    return [pytest.param(b, marks=pytest.mark.skipif(b not in mcr_kernels.available_backends(op, DEVICE),
                                                     reason=f"{b} not available on {DEVICE}"))
            for b in mcr_kernels.registered_backends(op)]


def attention(name, q, k, v, mask=None, causal=False):
    with mcr_kernels.use_backend(name, "flash_attention"):
        return mcr_kernels.flash_attention(q, k, v, key_padding_mask=mask, causal=causal)


def qkv(B=2, H=2, L=37, Dh=16):
    return [torch.randn(B, H, L, Dh, device=DEVICE, requires_grad=True) for _ in range(3)]


def masks(B, L):
    """A right-padding prefix mask and an arbitrary one, each row with keys left."""
    prefix = torch.arange(L, device=DEVICE)[None] < torch.tensor([L, L - 13], device=DEVICE)[:, None]
    scattered = torch.rand(B, L, device=DEVICE) < 0.6
    scattered[:, 0] = True
    return {"prefix": prefix, "scattered": scattered}


# --- flash_attention -----------------------------------------------------------------------

@pytest.mark.parametrize("name", backend_param("flash_attention"))
@pytest.mark.parametrize("where", ["q", "k"])
def test_attention_nan_in_query_or_key_gives_nan_like_sdpa_math(name, where):
    """SDPA's math backend is the oracle: its CPU flash kernel returns zeros for a NaN query row."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q, k, v = (t.detach().clone() for t in qkv())
    (q if where == "q" else k)[0, 1, 5, 3] = float("nan")
    out = attention(name, q, k, v)
    with sdpa_kernel(SDPBackend.MATH):
        expected = F.scaled_dot_product_attention(q, k, v)
    assert out.isnan().any(), "a NaN input was hidden"
    torch.testing.assert_close(out.isnan(), expected.isnan())


@pytest.mark.parametrize("name", backend_param("flash_attention"))
@pytest.mark.parametrize("kind", ["prefix", "scattered"])
def test_attention_nan_in_masked_key_or_value_reaches_nothing(name, kind):
    q, k, v = qkv()
    mask = masks(2, 37)[kind]
    masked = ~mask[:, None, :, None]
    poisoned = [torch.where(masked, float("nan"), t) for t in (k, v)]
    cleaned = [torch.where(masked, 0.0, t) for t in (k, v)]
    out = attention(name, q, *poisoned, mask)
    clean = attention(name, q, *cleaned, mask)
    assert not out.isnan().any(), "a NaN in a masked-out key or value leaked"
    torch.testing.assert_close(out, clean)
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), g)
    clean_grads = torch.autograd.grad(clean, (q, k, v), g)
    for grad, clean_grad in zip(grads, clean_grads):
        assert not grad.isnan().any(), "a NaN in a masked-out key or value leaked into a gradient"
        torch.testing.assert_close(grad, clean_grad)


def test_varlen_rejects_bad_cu_seqlens():
    q = torch.randn(9, 2, 16, device=DEVICE)
    cu = lambda *b: torch.tensor(b, dtype=torch.int32, device=DEVICE)  # noqa: E731
    good = cu(0, 4, 9)
    mcr_kernels.flash_attention_varlen(q, q, q, good, good, 5, 5)
    for bad, message in [(cu(1, 4, 9), "start at 0"), (cu(0, 6, 4), "not decrease"),
                         (cu(0, 4, 12), "end at the packed length 9"), (cu(0, 4, 8), "end at")]:
        with pytest.raises(ValueError, match=f"cu_seqlens_q must {message}"):
            mcr_kernels.flash_attention_varlen(q, q, q, bad, good, 9, 9)
    with pytest.raises(ValueError, match="cu_seqlens_k must start at 0"):
        mcr_kernels.flash_attention_varlen(q, q, q, good, cu(2, 4, 9), 9, 9)
    with pytest.raises(ValueError, match="max_seqlen_q must be >= the longest sequence 5"):
        mcr_kernels.flash_attention_varlen(q, q, q, good, good, 4, 5)


# --- mba_pool, masked_mean ---------------------------------------------------------------

def pool_inputs(B=3, L=11, D=12, H=20, E=8):
    tokens = torch.randn(B, L, D, device=DEVICE, requires_grad=True)
    mask = torch.rand(B, L, device=DEVICE) < 0.6
    mask[:, 0] = True
    mask[2] = False  # a row with no counted token
    params = [torch.randn(*s, device=DEVICE, requires_grad=True) * 0.3 for s in ((H, D), (H,), (E, H), (E,))]
    return tokens, mask, [p.detach().requires_grad_() for p in params]


@pytest.mark.parametrize("name", backend_param("mba_pool"))
@pytest.mark.parametrize("head", ["mlp", "linear"])
def test_mba_pool_nan_in_masked_token_reaches_nothing(name, head):
    tokens, mask, params = pool_inputs()
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


@pytest.mark.parametrize("name", backend_param("mba_pool"))
def test_mba_pool_nan_in_counted_token_gives_nan_in_its_row(name):
    tokens, mask, params = pool_inputs()
    tokens = tokens.detach().clone()
    tokens[1, 0, 4] = float("nan")
    with mcr_kernels.use_backend(name, "mba_pool"):
        out = mcr_kernels.mba_pool(tokens, mask, *params)
    assert out[1].isnan().all() and not out[0].isnan().any()


def test_masked_mean_ignores_masked_tokens_and_keeps_counted_nan():
    tokens, mask, _ = pool_inputs()
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


# --- infonce_loss ------------------------------------------------------------------------

@pytest.mark.parametrize("name", backend_param("infonce_loss"))
def test_infonce_empty_batch_raises(name):
    empty = torch.zeros(0, 8, device=DEVICE)
    with mcr_kernels.use_backend(name, "infonce_loss"), pytest.raises(ValueError, match="at least one pair"):
        mcr_kernels.infonce_loss(empty, empty, torch.tensor(10.0, device=DEVICE))


@pytest.mark.parametrize("name", backend_param("infonce_loss"))
def test_infonce_keeps_float64(name):
    img, txt = (torch.randn(5, 8, device=DEVICE, dtype=torch.float64) for _ in range(2))
    scale = torch.tensor(10.0, device=DEVICE, dtype=torch.float64)
    with mcr_kernels.use_backend(name, "infonce_loss"):
        loss = mcr_kernels.infonce_loss(img, txt, scale)
    assert loss.dtype == torch.float64
    logits = 10.0 * F.normalize(img, dim=-1) @ F.normalize(txt, dim=-1).T
    labels = torch.arange(5, device=DEVICE)
    expected = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
    torch.testing.assert_close(loss, expected, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("name", backend_param("infonce_loss"))
def test_infonce_nan_embedding_gives_nan_loss(name):
    img, txt = (torch.randn(5, 8, device=DEVICE) for _ in range(2))
    img[3, 2] = float("nan")
    with mcr_kernels.use_backend(name, "infonce_loss"):
        assert mcr_kernels.infonce_loss(img, txt, torch.tensor(10.0, device=DEVICE)).isnan()


# --- backend registry --------------------------------------------------------------------

def test_available_backends_accepts_a_device_string():
    assert mcr_kernels.available_backends("flash_attention", "cpu") == \
        mcr_kernels.available_backends("flash_attention", torch.device("cpu"))
    assert "reference" in mcr_kernels.available_backends("mba_pool", "cpu")
    assert set(mcr_kernels.registered_backends("gather_tokens")) >= {"reference", "triton"}
    with pytest.raises(ValueError, match="unknown op"):
        mcr_kernels.registered_backends("nope")


@pytest.mark.parametrize("module", ["attention", "mba", "patch_drop"])
def test_broken_triton_module_raises_instead_of_falling_back(module):
    """With triton installed, a kernel file that fails to import must not leave the op
    silently on its reference backend."""
    pytest.importorskip("triton")
    code = (f"import sys; sys.modules['mcr_kernels.triton.{module}'] = None\n"
            "import mcr_kernels\n")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                            timeout=300)
    assert result.returncode != 0, "mcr_kernels imported with a broken Triton module"
    assert f"mcr_kernels.triton.{module}" in result.stderr


def test_import_needs_torch_only():
    """`import mcr_kernels` pulls in neither the model stack nor the mcr package."""
    code = ("import sys, mcr_kernels\n"
            "leaked = sorted({m.split('.')[0] for m in sys.modules} & {'mcr', 'transformers', 'timm', 'tokenizers'})\n"
            "print(','.join(leaked))\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "", f"import mcr_kernels imported {result.stdout.strip()}"


def test_old_backend_name_cpu_is_accepted_with_a_deprecation_warning():
    with pytest.warns(DeprecationWarning, match="backend 'cpu' is now called 'blockwise'"):
        with mcr_kernels.use_backend("cpu", "mba_pool"):
            assert mcr_kernels.get_backend("mba_pool") == "blockwise"
    with mcr_kernels.use_backend(None):
        with pytest.warns(DeprecationWarning, match="set_backend: backend 'cpu'"):
            mcr_kernels.set_backend("cpu", "gelu_mlp")
        assert mcr_kernels.get_backend("gelu_mlp") == "blockwise"
    code = "import mcr_kernels; print(mcr_kernels.get_backend('mba_pool'))"
    env = {**os.environ, "MCR_KERNELS_BACKEND": "mba_pool=cpu", "PYTHONWARNINGS": "always::DeprecationWarning"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "blockwise"
    assert "MCR_KERNELS_BACKEND: backend 'cpu' is now called 'blockwise'" in result.stderr


def test_wrapped_backend_runs_the_wrapper_and_restores_the_registration():
    from mcr_kernels import backend

    seen = []
    x = torch.randn(2, 3, 4)
    with backend.wrapped("mba_pool", "reference", lambda fn: lambda *a, **k: seen.append(1) or fn(*a, **k)):
        with mcr_kernels.use_backend("reference", "mba_pool"):
            mcr_kernels.mba_pool(x, None, torch.randn(5, 4), None)
    assert seen == [1]
    with mcr_kernels.use_backend("reference", "mba_pool"):
        mcr_kernels.mba_pool(x, None, torch.randn(5, 4), None)
    assert seen == [1]  # restored
    with pytest.raises(ValueError, match="no 'native' backend"):
        with backend.wrapped("mba_pool", "native", lambda fn: fn):
            pass
