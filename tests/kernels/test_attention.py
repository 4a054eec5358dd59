"""mcr_kernels.flash_attention / flash_attention_varlen: the Triton backend against the
float64 reference (outputs, LSE and all gradients), masks, causal, varlen, registration
(opcheck, torch.compile); the model integrations: tests/kernels/test_integrations.py.

Without a GPU the Triton kernels run under TRITON_INTERPRET=1 (set by conftest), so the CPU
cases are small; the full sweep over head dims, lengths and fp16/bf16 needs CUDA.
(The 3.8 interpreter mis-computes bf16 tl.dot, so bf16 is tested on the GPU only.)
"""
import contextlib

import pytest
import torch
import torch.nn.functional as F
from oracle import backend_param

import mcr_kernels
from mcr_kernels import reference

triton = pytest.importorskip("triton")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# max abs error allowed, relative to max |reference| (outputs are O(1) for unit inputs)
TOL = {torch.float32: 2e-5, torch.float16: 5e-3, torch.bfloat16: 4e-2}


def triton_backend():
    return mcr_kernels.use_backend("triton", "flash_attention", "flash_attention_varlen")


def make_mask(kind, B, Lk, generator):
    if kind is None:
        return None
    if kind == "prefix":  # right padding with lengths 0, 1, full, then random
        lengths = torch.randint(0, Lk + 1, (B,), generator=generator)
        lengths[: 3] = torch.tensor([0, 1, Lk])[: B]
        return (torch.arange(Lk)[None] < lengths[:, None]).to(DEVICE)
    mask = torch.rand(B, Lk, generator=generator) > 0.4  # arbitrary pattern, one row all masked
    mask[0] = False
    return mask.to(DEVICE)


def inputs(B, H, Lq, Lk, Dh, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    make = lambda L: torch.randn(B, H, L, Dh, generator=g).to(DEVICE, dtype).requires_grad_()
    return make(Lq), make(Lk), make(Lk), g


def assert_close(actual, expected, dtype, what):
    assert not torch.isnan(actual).any(), f"{what} has NaN"
    if expected.numel() == 0:
        return
    scale = max(expected.abs().max().item(), 1.0)
    err = (actual.double() - expected).abs().max().item()
    assert err <= TOL[dtype] * scale, f"{what}: max error {err:.3g} > {TOL[dtype] * scale:.3g}"


def check_against_reference(B, H, Lq, Lk, Dh, mask_kind=None, causal=False, dtype=torch.float32,
                            softmax_scale=None, seed=0):
    q, k, v, g = inputs(B, H, Lq, Lk, Dh, dtype, seed)
    mask = make_mask(mask_kind, B, Lk, g)
    with triton_backend():
        out, lse = mcr_kernels.flash_attention(q, k, v, key_padding_mask=mask, causal=causal,
                                               softmax_scale=softmax_scale, return_lse=True)
    grad_out = torch.randn(out.shape, generator=g).to(DEVICE, dtype)
    out.backward(grad_out)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref, ref_lse = reference.flash_attention(q64, k64, v64, key_padding_mask=mask, causal=causal,
                                             softmax_scale=softmax_scale, return_lse=True)
    ref.backward(grad_out.double())
    assert out.dtype == dtype and out.shape == (B, H, Lq, Dh) and lse.dtype == torch.float32
    assert_close(out, ref, dtype, "out")
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse)), "lse: -inf rows differ"
    finite = torch.isfinite(ref_lse)
    assert_close(lse[finite], ref_lse[finite], torch.float32 if dtype == torch.float32 else dtype, "lse")
    for name, t, t64 in (("dq", q, q64), ("dk", k, k64), ("dv", v, v64)):
        assert_close(t.grad, t64.grad, dtype, name)
    return out, (q.grad, k.grad, v.grad), mask


CASES = [  # B, H, Lq, Lk, Dh, mask, causal
    (2, 2, 77, 77, 64, None, False),
    (1, 1, 1, 1, 32, None, False),
    (2, 1, 7, 40, 48, None, True),      # Lq < Lk, bottom-right causal
    (2, 1, 40, 7, 32, None, True),      # Lq > Lk: the first rows have no key
    (4, 1, 50, 50, 32, "prefix", False),
    (3, 2, 99, 99, 64, "prefix", False),
    (4, 1, 30, 50, 80, "prefix", False),   # Lq != Lk with padding
    (3, 2, 45, 45, 96, "random", False),
    (3, 1, 20, 45, 128, "random", True),
]


@pytest.mark.parametrize("B,H,Lq,Lk,Dh,mask_kind,causal", CASES)
def test_matches_float64_reference(B, H, Lq, Lk, Dh, mask_kind, causal):
    check_against_reference(B, H, Lq, Lk, Dh, mask_kind, causal)


def test_softmax_scale_and_float16():
    check_against_reference(2, 1, 33, 33, 64, "prefix", dtype=torch.float16, softmax_scale=0.3)


def test_fully_masked_rows_give_zeros_not_nan():
    out, grads, mask = check_against_reference(3, 2, 45, 45, 32, "random")
    assert torch.equal(out[0], torch.zeros_like(out[0]))  # row 0 attends nothing
    assert torch.equal(grads[0][0], torch.zeros_like(grads[0][0]))
    for g in grads:
        assert torch.isfinite(g).all()
    # keys nobody attends get zero gradients
    assert (grads[1][~mask[:, None, :, None].expand_as(grads[1])] == 0).all()


def test_right_padding_zeroes_padded_queries_and_their_grads():
    out, grads, mask = check_against_reference(4, 1, 50, 50, 32, "prefix")
    padded = ~mask[:, None, :, None].expand_as(out)
    assert (out[padded] == 0).all() and (grads[0][padded] == 0).all() and (grads[1][padded] == 0).all()


def test_deterministic():
    runs = []
    for _ in range(2):
        q, k, v, g = inputs(2, 2, 40, 40, 32, torch.float32, seed=3)
        mask = make_mask("prefix", 2, 40, g)
        with triton_backend():
            out = mcr_kernels.flash_attention(q, k, v, key_padding_mask=mask)
        out.backward(torch.ones_like(out))
        runs.append((out, q.grad, k.grad, v.grad))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_mask_lengths_kernel_many_rows_and_long_keys():
    from mcr_kernels.triton.attention import _mask_info
    g = torch.Generator().manual_seed(0)
    B, L = 70, 150  # several row chunks and key chunks in the one-program kernel
    lengths = torch.randint(0, L + 1, (B,), generator=g)
    prefix = (torch.arange(L)[None] < lengths[:, None]).to(DEVICE)
    _, q_len, kv_len, kv_full = _mask_info(prefix, L)
    assert torch.equal(kv_len.cpu(), lengths.int()) and torch.equal(kv_full, kv_len) and torch.equal(q_len, kv_len)
    _, q_len, _, _ = _mask_info(prefix, 9)
    assert (q_len == 9).all()
    holes = prefix.clone()
    holes[5, 0] = False
    holes[5, 1] = True
    _, q_len, kv_len, kv_full = _mask_info(holes, L)
    last = torch.where(holes.cpu(), torch.arange(1, L + 1), 0).amax(1)
    assert torch.equal(kv_len.cpu(), last.int()) and (kv_full == 0).all() and (q_len == L).all()


@pytest.mark.parametrize("causal", [False, True])
def test_varlen_with_empty_and_length_one_sequences(causal):
    g = torch.Generator().manual_seed(1)
    len_q, len_k = [0, 1, 7, 33, 0, 20], [5, 1, 7, 40, 3, 0]
    cu_q = torch.tensor([0] + len_q).cumsum(0).int().to(DEVICE)
    cu_k = torch.tensor([0] + len_k).cumsum(0).int().to(DEVICE)
    H, Dh = 2, 48
    make = lambda n: torch.randn(n, H, Dh, generator=g).to(DEVICE).requires_grad_()
    q, k, v = make(sum(len_q)), make(sum(len_k)), make(sum(len_k))
    with triton_backend():
        out = mcr_kernels.flash_attention_varlen(q, k, v, cu_q, cu_k, max(len_q), max(len_k), causal=causal)
    grad_out = torch.randn(out.shape, generator=g).to(DEVICE)
    out.backward(grad_out)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = reference.flash_attention_varlen(q64, k64, v64, cu_q, cu_k, max(len_q), max(len_k), causal=causal)
    ref.backward(grad_out.double())
    assert_close(out, ref, torch.float32, "out")
    for name, t, t64 in (("dq", q, q64), ("dk", k, k64), ("dv", v, v64)):
        assert_close(t.grad, t64.grad, torch.float32, name)


def test_varlen_matches_padded_via_unpad_pad():
    g = torch.Generator().manual_seed(2)
    B, H, L, Dh = 3, 2, 20, 32
    mask = (torch.arange(L)[None] < torch.tensor([[20], [1], [13]])).to(DEVICE)
    x = torch.randn(B, L, 3, H, Dh, generator=g).to(DEVICE)
    packed, indices, cu, max_len = mcr_kernels.unpad_input(x, mask)
    with triton_backend():
        out = mcr_kernels.flash_attention_varlen(packed[:, 0], packed[:, 1], packed[:, 2], cu, cu, max_len, max_len)
        dense = mcr_kernels.flash_attention(*(x[:, :, i].transpose(1, 2) for i in range(3)), key_padding_mask=mask)
    repadded = mcr_kernels.pad_input(out, indices, B, L)
    torch.testing.assert_close(repadded, dense.transpose(1, 2), atol=1e-5, rtol=1e-5)


def test_opcheck():
    g = torch.Generator().manual_seed(0)
    make = lambda *s: torch.randn(*s, generator=g).to(DEVICE).requires_grad_()
    q, k, v = make(2, 2, 9, 32), make(2, 2, 11, 32), make(2, 2, 11, 32)
    mask = (torch.arange(11)[None] < torch.tensor([[3], [11]])).to(DEVICE)
    torch.library.opcheck(torch.ops.mcr_kernels.flash_attn_fwd, (q, k, v, mask, 0.3, False))
    torch.library.opcheck(torch.ops.mcr_kernels.flash_attn_fwd, (q, k, v, None, 0.2, True))
    cu = torch.tensor([0, 4, 4, 9], dtype=torch.int32, device=DEVICE)
    torch.library.opcheck(torch.ops.mcr_kernels.flash_attn_varlen_fwd,
                          (make(9, 2, 32), make(9, 2, 32), make(9, 2, 32), cu, cu, 5, 5, 0.1, False))


def test_torch_compile_fullgraph():
    q, k, v, g = inputs(2, 2, 9, 11, 32, torch.float32)
    mask = make_mask("prefix", 2, 11, g)

    def loss(q, k, v, mask):
        return (mcr_kernels.flash_attention(q, k, v, key_padding_mask=mask) ** 2).sum()

    with triton_backend():
        # aot_eager traces fwd+bwd through the op's fake impls like inductor does, without
        # spending a minute compiling C++ on CPU CI
        compiled = torch.compile(loss, fullgraph=True, backend="aot_eager" if DEVICE == "cpu" else "inductor")
        grads = torch.autograd.grad(compiled(q, k, v, mask), (q, k, v))
        expected = torch.autograd.grad(loss(q, k, v, mask), (q, k, v))
    for a, b in zip(grads, expected):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("Lq,Lk", [(0, 5), (5, 0)])
@pytest.mark.parametrize("with_mask", [False, True])
def test_empty_sequences_give_zero_outputs_and_grads(Lq, Lk, with_mask):
    q, k, v, _ = inputs(2, 2, Lq, Lk, 32, torch.float32)
    mask = torch.ones(2, Lk, dtype=torch.bool, device=DEVICE) if with_mask else None
    with triton_backend():
        out = mcr_kernels.flash_attention(q, k, v, key_padding_mask=mask)
    out.sum().backward()
    assert out.shape == (2, 2, Lq, 32) and (out == 0).all()
    for t in (q, k, v):
        assert (t.grad == 0).all()


def test_bad_head_dim_is_a_value_error():
    q = torch.zeros(1, 1, 2, 264)
    with pytest.raises(ValueError, match="head dim"):
        mcr_kernels.flash_attention(q, q, q)


# --- GPU sweep ---------------------------------------------------------------------------------

@contextlib.contextmanager
def one_config(Dh):
    """Skip autotuning (one tile per kernel) so that the sweep compiles ~3 kernels per case."""
    from mcr_kernels.triton import attention as triton_attention
    tiles = (32, 32, 1) if Dh > 128 else (64, 64, 2)
    config = triton.Config({"BLOCK_M": tiles[0], "BLOCK_N": tiles[1]}, num_warps=4, num_stages=tiles[2])
    kernels = (triton_attention._attn_fwd, triton_attention._attn_bwd_dkdv, triton_attention._attn_bwd_dq)
    saved = [kernel.configs for kernel in kernels]
    for kernel in kernels:
        kernel.configs = [config]
    try:
        yield
    finally:
        for kernel, configs in zip(kernels, saved):
            kernel.configs = configs


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("Dh", [32, 48, 64, 80, 96, 128, 256])
def test_gpu_head_dims(dtype, Dh):
    with one_config(Dh):
        for L in (77, 200):
            check_against_reference(3, 2, L, L, Dh, "prefix", dtype=dtype, seed=L + Dh)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("mask_kind,causal", [(None, False), ("random", False), (None, True), ("prefix", True)])
def test_gpu_masks_and_lengths(dtype, mask_kind, causal):
    with one_config(64):
        for L in (1, 7, 99, 197):
            check_against_reference(3, 2, L, L, 64, mask_kind, causal, dtype=dtype, seed=L)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_autotuned_uneven_lengths(dtype):
    for Lq, Lk in ((99, 197), (200, 7), (128, 128), (1, 200)):
        check_against_reference(4, 3, Lq, Lk, 64, "prefix", dtype=dtype)
        check_against_reference(4, 3, Lq, Lk, 64, None, True, dtype=dtype)


@pytest.mark.cuda
def test_gpu_float32_and_long_sequence():
    check_against_reference(2, 2, 1000, 1000, 64, "prefix", dtype=torch.float32)
    check_against_reference(1, 2, 2048, 2048, 64, None, True, dtype=torch.bfloat16)


def test_backward_tiles_follow_the_device_shared_memory_and_else_the_reference_runs(monkeypatch):
    """The backward prune keeps only tiles whose shared memory fits the device's limit (fp32 at
    head dim 256: none on an A100's 163 KiB, the 32 x 32 tile on an H100's 227 KiB); when none
    fits and a gradient is needed, flash_attention runs the reference instead of a kernel that
    cannot launch."""
    pytest.importorskip("triton")
    from mcr_kernels.triton import attention as tri

    def fits(dtype, dh, limit):
        named = {"Q": torch.empty(0, dtype=dtype), "SHARED_LIMIT": limit}
        block_d = max(16, 1 << (dh - 1).bit_length())
        return [len(tri._backward_prune(s)(tri._configs(), named, BLOCK_D=block_d)) for s in ("BLOCK_M", "BLOCK_N")]

    a100, h100 = 163 * 1024, 227 * 1024
    assert fits(torch.float32, 256, a100) == [0, 0]
    assert min(fits(torch.float32, 256, h100)) >= 1 and min(fits(torch.bfloat16, 128, a100)) >= 1

    monkeypatch.setattr(tri, "backward_fits", lambda q, block_d: False)
    calls = []
    counted = tri.reference.flash_attention
    monkeypatch.setattr(tri.reference, "flash_attention", lambda *a, **k: calls.append(1) or counted(*a, **k))
    q, k, v = (torch.randn(2, 3, 5, 16, requires_grad=True) for _ in range(3))
    out = tri.flash_attention(q, k, v)
    assert calls == [1]
    out.sum().backward()
    with torch.no_grad():  # no gradient asked for: the kernel runs whatever the backward's tiles
        tri.flash_attention(q, k, v)
    assert calls == [1]


# --- careless or hostile input, kept as regression tests (marked hostile): NaN in -> NaN out, and a
# NaN in a masked-out position reaches nothing, on every backend the op registers ------------

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

@pytest.mark.hostile
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


@pytest.mark.hostile
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


@pytest.mark.hostile
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
