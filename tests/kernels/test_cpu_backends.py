"""The `blockwise` backends (mcr_kernels/blockwise): flash_attention on torch's fused SDPA CPU kernel,
blockwise infonce_loss and mba_pool, against the float64 reference with gradients, awkward
sizes and several blocks; proof that they are the CPU default and the ones that ran; bounded
memory (no tensor beyond a block); opcheck and torch.compile.

Tolerances, relative to max(1, max |reference|): float32 2e-5 (attention, InfoNCE and the
pooled outputs are O(1)), bfloat16 4e-2.
"""
import contextlib

import pytest
import torch
import torch.nn.functional as F
from oracle import gathered_infonce, relative_assert_close

import mcr_kernels
from mcr_kernels import backend, reference
from mcr_kernels.blockwise import attention as blockwise_attention
from mcr_kernels.blockwise import mba as blockwise_mba

TOL = {torch.float32: 2e-5, torch.bfloat16: 4e-2}
CPU_OPS = ("flash_attention", "infonce_loss", "mba_pool")
assert_close = relative_assert_close(TOL)
# lse is float32 for every input dtype; for bf16 inputs torch's vectorised kernel uses a fast
# approximate exp (AVX2 build: ~4e-5 absolute, 3e-7 with ATEN_CPU_CAPABILITY=default)
assert_lse_close = relative_assert_close({torch.float32: TOL[torch.float32], torch.bfloat16: 1e-4})


def leaves(*tensors, dtype):
    return [t.detach().to(dtype).requires_grad_() for t in tensors]


@pytest.fixture
def cpu_calls():
    """Counts the calls that reach each op's registered `cpu` function."""
    calls = dict.fromkeys(CPU_OPS, 0)

    def counter(op):
        def wrap(fn):
            def counted(*args, **kwargs):
                calls[op] += 1
                return fn(*args, **kwargs)
            return counted
        return wrap

    with contextlib.ExitStack() as stack:
        for op in CPU_OPS:
            stack.enter_context(backend.wrapped(op, "blockwise", counter(op)))
        yield calls


@pytest.fixture
def small_blocks(monkeypatch):
    """Blocks of 64 elements, so that small inputs already take several blocks."""
    monkeypatch.setattr(blockwise_mba, "_BLOCK_ELEMENTS", 64)


# --- default choice ------------------------------------------------------------------------

def test_cpu_backend_is_the_default_on_cpu_tensors_and_runs(cpu_calls):
    with mcr_kernels.use_backend(None):
        for op in CPU_OPS:
            assert backend.resolve(op, torch.device("cpu"))[0] == "blockwise", op
        q = torch.randn(2, 2, 5, 8)
        mcr_kernels.flash_attention(q, q, q)
        emb = mcr_kernels.mba_pool(torch.randn(3, 4, 6), None, torch.randn(5, 6), None)
        mcr_kernels.infonce_loss(emb, emb + 1, torch.tensor(3.0))
    assert cpu_calls == dict.fromkeys(CPU_OPS, 1)


def test_model_step_on_default_cpu_backends_matches_reference(tiny_config, cpu_calls):
    from mcr import masking
    from mcr.data.batching import one_word_per_token
    from mcr.models.mcr import MCR

    model = MCR(tiny_config(), pad_token_id=0, mask_token_id=1)
    B, L = 3, 11
    ids = torch.randint(5, 128, (B, L))
    attn = (torch.arange(L)[None] < torch.tensor([[L], [6], [2]])).long()
    batch = {"image": torch.randn(B, 1, 32, 32), "input_ids": ids, "attention_mask": attn,
             "special_tokens_mask": torch.zeros_like(ids), "word_ids": one_word_per_token(attn.bool())}
    masks = masking.draw(model.cfg, B, generator=torch.Generator().manual_seed(0))
    params = [p for p in model.parameters() if p.requires_grad]
    results = []
    for forced in ("reference", None):
        with mcr_kernels.use_backend(forced):
            losses = model(batch, masks)
        total = sum(losses.values())
        results.append((losses, torch.autograd.grad(total, params, allow_unused=True)))
    (ref_losses, ref_grads), (losses, got) = results
    assert all(cpu_calls[op] > 0 for op in CPU_OPS), cpu_calls
    for name in ref_losses:
        assert_close(losses[name], ref_losses[name], torch.float32, name)
    for g, r in zip(got, ref_grads, strict=True):
        if r is not None:
            torch.testing.assert_close(g, r, atol=1e-4, rtol=1e-3)


# --- flash_attention -----------------------------------------------------------------------

def attention_mask(kind, B, Lk, g):
    if kind is None:
        return None
    if kind == "prefix":  # right padding, lengths 0, 1, full, then random
        lengths = torch.randint(0, Lk + 1, (B,), generator=g)
        lengths[:3] = torch.tensor([0, 1, Lk])[:B]
        return torch.arange(Lk)[None] < lengths[:, None]
    mask = torch.rand(B, Lk, generator=g) > 0.4  # arbitrary pattern, row 0 all masked
    mask[0] = False
    return mask


@pytest.mark.parametrize("B,H,Lq,Lk,Dh,kind,causal", [
    (1, 1, 1, 1, 8, None, False),
    (2, 3, 13, 13, 16, "prefix", False),
    (3, 2, 13, 13, 16, "prefix", True),
    (3, 2, 9, 17, 32, "random", False),
    (2, 1, 17, 9, 8, "random", True),
    (2, 2, 7, 19, 24, None, True),
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_flash_attention_matches_float64_reference(B, H, Lq, Lk, Dh, kind, causal, dtype):
    g = torch.Generator().manual_seed(B * 100 + Lq)
    q, k, v = (torch.randn(B, H, L, Dh, generator=g) for L in (Lq, Lk, Lk))
    mask = attention_mask(kind, B, Lk, g)
    grad_out = torch.randn(B, H, Lq, Dh, generator=g)
    low = leaves(q, k, v, dtype=dtype)
    q64, k64, v64 = leaves(*low, dtype=torch.float64)  # the oracle sees the rounded inputs
    ref, ref_lse = reference.flash_attention(q64, k64, v64, key_padding_mask=mask, causal=causal,
                                             return_lse=True)
    expected = torch.autograd.grad(ref, (q64, k64, v64), grad_out.to(dtype).double())
    with mcr_kernels.use_backend("blockwise", "flash_attention"):
        out, lse = mcr_kernels.flash_attention(*low, key_padding_mask=mask, causal=causal, return_lse=True)
    assert out.dtype == dtype and out.shape == (B, H, Lq, Dh) and lse.dtype == torch.float32
    assert_close(out, ref, dtype, "out")
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse)), "lse: -inf rows differ"
    finite = torch.isfinite(ref_lse)
    assert_lse_close(lse[finite], ref_lse[finite], dtype, "lse")
    grads = torch.autograd.grad(out, low, grad_out.to(dtype))
    for name, got, want in zip(("dq", "dk", "dv"), grads, expected, strict=True):
        assert_close(got, want, dtype, name)


def test_flash_attention_ignores_nan_at_masked_keys_and_propagates_attended_nan():
    q, k, v = torch.randn(3, 2, 6, 8), torch.randn(3, 2, 6, 8), torch.randn(3, 2, 6, 8)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 0]], dtype=torch.bool)
    with mcr_kernels.use_backend("blockwise", "flash_attention"):
        clean = mcr_kernels.flash_attention(q, k, v, key_padding_mask=mask)
        k_nan, v_nan = k.clone(), v.clone()
        k_nan[0, :, 4:], v_nan[0, :, 5], v_nan[2] = float("nan"), float("inf"), float("nan")
        out = mcr_kernels.flash_attention(q, k_nan, v_nan, key_padding_mask=mask)
        assert torch.equal(out, clean)
        v_nan[1, 0, 2] = float("nan")  # attended: every query row of (batch 1, head 0) sees it
        out = mcr_kernels.flash_attention(q, k_nan, v_nan, key_padding_mask=mask)
    assert out[1, 0].isnan().all() and not out[1, 1].isnan().any() and not out[0].isnan().any()


def test_flash_attention_compiles_fullgraph():
    torch._dynamo.reset()
    q, k, v = leaves(*(torch.randn(2, 2, 7, 8) for _ in range(3)), dtype=torch.float32)
    mask = torch.tensor([[1] * 7, [1] * 3 + [0] * 4], dtype=torch.bool)

    def attend(q, k, v):
        return mcr_kernels.flash_attention(q, k, v, key_padding_mask=mask, causal=True)

    with mcr_kernels.use_backend("blockwise", "flash_attention"):
        eager = attend(q, k, v)
        compiled = torch.compile(attend, fullgraph=True, backend="aot_eager")(q, k, v)
        grads = torch.autograd.grad(compiled.sum(), (q, k, v))
        expected = torch.autograd.grad(eager.sum(), (q, k, v))
    assert_close(compiled, eager, torch.float32, "out")
    for got, want in zip(grads, expected, strict=True):
        assert_close(got, want, torch.float32, "grad")


@pytest.mark.parametrize("lengths_q,lengths_k,causal", [
    ([5, 1, 0, 9, 3], None, False),       # empty and length-1 sequences, self-attention
    ([5, 1, 0, 9, 3], None, True),
    ([4, 2, 7], [6, 0, 3], False),        # queries and keys of different lengths
    ([4, 2, 7], [6, 3, 3], True),         # bottom-right causal per sequence: the reference's loop
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_flash_attention_varlen_matches_float64_reference(lengths_q, lengths_k, causal, dtype, monkeypatch):
    lengths_k = lengths_k or lengths_q
    g = torch.Generator().manual_seed(sum(lengths_q) + len(lengths_k))
    cu = lambda lengths: F.pad(torch.tensor(lengths).cumsum(0), (1, 0)).int()
    H, Dh = 3, 24
    low = leaves(*(torch.randn(sum(n), H, Dh, generator=g) for n in (lengths_q, lengths_k, lengths_k)), dtype=dtype)
    q64, k64, v64 = leaves(*low, dtype=torch.float64)
    args = (cu(lengths_q), cu(lengths_k), max(lengths_q) + 2, max(lengths_k))  # max_seqlen may exceed every length
    grad_out = torch.randn(sum(lengths_q), H, Dh, generator=g).to(dtype)
    ref = reference.flash_attention_varlen(q64, k64, v64, *args, causal=causal)
    expected = torch.autograd.grad(ref, (q64, k64, v64), grad_out.double())
    loops = []
    loop = reference.flash_attention_varlen
    monkeypatch.setattr(reference, "flash_attention_varlen", lambda *a, **kw: loops.append(1) or loop(*a, **kw))
    with mcr_kernels.use_backend(None):
        assert backend.resolve("flash_attention_varlen", torch.device("cpu"))[0] == "blockwise"
        out = mcr_kernels.flash_attention_varlen(*low, *args, causal=causal)
    assert out.dtype == dtype and out.shape == low[0].shape
    assert len(loops) == (causal and lengths_q != lengths_k)
    assert_close(out, ref, dtype, "out")
    for name, got, want in zip(("dq", "dk", "dv"), torch.autograd.grad(out, low, grad_out), expected, strict=True):
        assert_close(got, want, dtype, name)


@pytest.mark.parametrize("Lq,Lk", [(0, 5), (4, 0), (0, 0)])
def test_flash_attention_on_empty_sequences_matches_the_reference(Lq, Lk):
    """aten's CPU flash kernel dies with SIGFPE on an empty sequence; the backend must not reach it."""
    g = torch.Generator().manual_seed(Lq + 7 * Lk)
    q, k, v = leaves(*(torch.randn(2, 3, L, 8, generator=g) for L in (Lq, Lk, Lk)), dtype=torch.float32)
    with mcr_kernels.use_backend(None):
        assert backend.resolve("flash_attention", torch.device("cpu"))[0] == "blockwise"
        out, lse = mcr_kernels.flash_attention(q, k, v, return_lse=True)
    assert out.shape == (2, 3, Lq, 8) and (out == 0).all() and lse.shape == (2, 3, Lq) and (lse == float("-inf")).all()
    grads = torch.autograd.grad(out.sum(), (q, k, v), allow_unused=True)
    assert all(grad is None or (grad == 0).all() for grad in grads)
    cu_q, cu_k = torch.zeros(3, dtype=torch.int32), torch.tensor([0, Lk, 2 * Lk], dtype=torch.int32)
    packed = mcr_kernels.flash_attention_varlen(torch.randn(0, 3, 8), torch.randn(2 * Lk, 3, 8),
                                                torch.randn(2 * Lk, 3, 8), cu_q, cu_k, 0, Lk)
    assert packed.shape == (0, 3, 8)


def test_flash_attention_varlen_compiles_fullgraph():
    torch._dynamo.reset()
    q, k, v = leaves(*(torch.randn(9, 2, 8) for _ in range(3)), dtype=torch.float32)
    cu = torch.tensor([0, 4, 4, 9], dtype=torch.int32)

    def attend(q, k, v):
        return mcr_kernels.flash_attention_varlen(q, k, v, cu, cu, 5, 5)

    eager = attend(q, k, v)
    compiled = torch.compile(attend, fullgraph=True, backend="aot_eager")(q, k, v)
    assert_close(compiled, eager, torch.float32, "out")
    for got, want in zip(torch.autograd.grad(compiled.sum(), (q, k, v)), torch.autograd.grad(eager.sum(), (q, k, v))):
        assert_close(got, want, torch.float32, "grad")


def test_flash_attention_kernel_opcheck():
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 3, L, 8, generator=g, requires_grad=True) for L in (5, 6, 6))
    allowed = torch.rand(2, 1, 5, 6, generator=g) > 0.3
    zero_rows = ~allowed.any(-1, keepdim=True)
    bias = torch.zeros(2, 1, 5, 6).masked_fill(~(allowed | zero_rows), float("-inf"))
    torch.library.opcheck(blockwise_attention.sdpa_flash_cpu, (q, k, v, bias, zero_rows, 0.3))
    torch.library.opcheck(blockwise_attention.sdpa_flash_cpu, (q, k, v, None, None, 0.3))


def test_flash_attention_output_is_what_backward_keeps_laid_out_for_the_next_layer():
    """out is [B, L, H, D] in memory (so out.transpose(1, 2).reshape(B, L, H * D), the next
    linear layer's input, is a view) and is the tensor backward keeps: one copy, not two."""
    q, k, v = leaves(*(torch.randn(2, 3, 6, 8) for _ in range(3)), dtype=torch.float32)
    mask = torch.tensor([[1] * 6, [1] * 2 + [0] * 4], dtype=torch.bool)
    with mcr_kernels.use_backend("blockwise", "flash_attention"):
        out = mcr_kernels.flash_attention(q, k, v, key_padding_mask=mask)
    merged = out.transpose(1, 2).reshape(2, 6, 24)
    assert merged.data_ptr() == out.data_ptr() and merged._base is not None
    kept = [t for t in out.grad_fn.saved_tensors if t is not None and t.shape == out.shape]
    assert [t.data_ptr() for t in kept].count(out.data_ptr()) == 1 and torch.equal(kept[-1], out)
    assert len({t.data_ptr() for t in kept}) == len(kept) == 4  # q, k, v and out, no second out


# --- infonce_loss --------------------------------------------------------------------------

def infonce64(img, txt, scale, normalize=True):
    if normalize:
        img, txt = F.normalize(img, dim=-1), F.normalize(txt, dim=-1)
    logits = scale * img @ txt.T
    labels = torch.arange(img.shape[0])
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


@pytest.mark.parametrize("B,E,scale,normalize", [(1, 5, 1.0, True), (3, 37, 100.0, True),
                                                 (67, 9, 30.0, True), (13, 6, 2.0, False)])
def test_infonce_matches_float64_reference_over_several_blocks(B, E, scale, normalize, small_blocks):
    img, txt = torch.randn(B, E), torch.randn(B, E) / (1 if normalize else 3)
    img64, txt64, scale64 = leaves(img, txt, torch.tensor(scale), dtype=torch.float64)
    ref = infonce64(img64, txt64, scale64, normalize)
    expected = torch.autograd.grad(ref, (img64, txt64, scale64))
    low = leaves(img, txt, torch.tensor(scale), dtype=torch.float32)
    with mcr_kernels.use_backend("blockwise", "infonce_loss"):
        loss = mcr_kernels.infonce_loss(*low, normalize=normalize)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert_close(loss, ref, torch.float32, "loss")
    for name, got, want in zip(("image", "text", "scale"), torch.autograd.grad(loss, low), expected, strict=True):
        assert_close(got, want, torch.float32, f"d {name}")


def test_infonce_bfloat16_inputs_and_logit_bias():
    img, txt = torch.randn(7, 24), torch.randn(7, 24)
    bias = torch.tensor(-3.0, requires_grad=True)
    low = leaves(img, txt, dtype=torch.bfloat16)
    with mcr_kernels.use_backend("blockwise", "infonce_loss"):
        loss = mcr_kernels.infonce_loss(*low, torch.tensor(30.0), logit_bias=bias)
    assert_close(loss, infonce64(low[0].double(), low[1].double(), 30.0), torch.float32, "loss")
    assert torch.autograd.grad(loss, bias)[0].item() == 0


def test_infonce_blocks_never_hold_the_batch_by_batch_logits(small_blocks, largest_tensor):
    B, E = 40, 3
    img, txt = F.normalize(torch.randn(B, E), dim=-1), F.normalize(torch.randn(B, E), dim=-1)
    scale = torch.tensor(5.0)
    with largest_tensor() as largest:
        lse_img = blockwise_mba._row_lse(img, txt, scale)
        blockwise_mba._direction_grads(img, txt, scale, lse_img, 0, torch.tensor(0.5 / B))
    assert largest.numel < B * B // 4, largest.numel  # blocks of 64 elements: 2 rows of 40


def test_infonce_gather_two_gloo_processes_match_one_process(free_port):
    B, world = 6, 2
    img, txt = torch.randn(B, 9), torch.randn(B, 9)
    results = [{local_loss: rank[local_loss, "blockwise"] for local_loss in (True, False)}
               for rank in gathered_infonce(free_port, ("blockwise",), img, txt, 20.0, world=world)]
    img64, txt64, scale64 = leaves(img, txt, torch.tensor(20.0), dtype=torch.float64)
    ref = infonce64(img64, txt64, scale64)
    d_img, d_txt, d_scale = torch.autograd.grad(ref, (img64, txt64, scale64))
    for local_loss in (True, False):
        check_gathered([r[local_loss] for r in results], ref, d_img, d_txt, d_scale, local_loss)


def check_gathered(ranks, ref, d_img, d_txt, d_scale, local_loss):
    """open_clip semantics: with local_loss each rank's loss covers its rows (their mean is the
    global loss), without it every rank computes the global loss."""
    world, b = len(ranks), d_img.shape[0] // len(ranks)
    losses = torch.stack([r[0] for r in ranks])
    assert_close(losses.mean(), ref, torch.float32, "loss")
    if not local_loss:
        assert_close(losses, ref.expand(world), torch.float32, "loss per rank")
    for r, (_, gi, gt, _) in enumerate(ranks):  # all_gather's backward sums the ranks' gradients
        assert_close(gi / world, d_img[r * b:(r + 1) * b], torch.float32, f"d image rank {r}")
        assert_close(gt / world, d_txt[r * b:(r + 1) * b], torch.float32, f"d text rank {r}")
    assert_close(torch.stack([r[3] for r in ranks]).sum() / world, d_scale, torch.float32, "d scale")


def test_infonce_blocks_opcheck():
    img = F.normalize(torch.randn(4, 6), dim=-1).requires_grad_()
    txt = F.normalize(torch.randn(4, 6), dim=-1).requires_grad_()
    all_img, all_txt = torch.randn(8, 6, requires_grad=True), torch.randn(8, 6, requires_grad=True)
    scale = torch.tensor(10.0, requires_grad=True)
    torch.library.opcheck(blockwise_mba.infonce_blocks, (img, txt, img, txt, scale, 0))
    torch.library.opcheck(blockwise_mba.infonce_blocks, (img, txt, all_img, all_txt, scale, 4))


# --- mba_pool ------------------------------------------------------------------------------

@pytest.mark.parametrize("activation,two_layers,bias,pool,normalize_tokens", [
    ("gelu", True, True, "mean", False),
    ("gelu_tanh", True, False, "mean", False),
    ("relu", True, True, "mean", False),
    ("none", True, True, "mean", False),
    ("none", False, True, "mean", False),
    ("none", False, False, "mean", False),
    ("relu", True, True, "max", False),
    ("gelu", True, True, "mean", True),
    ("gelu", True, True, "max", True),
])
@pytest.mark.parametrize("B,L", [(1, 1), (5, 9)])
def test_mba_pool_matches_float64_reference_over_several_blocks(activation, two_layers, bias, pool,
                                                                normalize_tokens, B, L, small_blocks):
    D, H, E = 11, 7, 5
    mask = torch.rand(B, L) > 0.4
    mask[:, -1] = True
    if B > 1:
        mask[0] = False  # a row with no counted token
    tensors = [torch.randn(B, L, D), torch.randn(H if two_layers else E, D) / D ** 0.5,
               torch.randn(H if two_layers else E), torch.randn(E, H) / H ** 0.5, torch.randn(E)]
    present = [True, True, bias, two_layers, two_layers and bias]
    kw = dict(activation=activation, pool=pool, normalize_tokens=normalize_tokens)

    def run(dtype):
        params = leaves(*(t for t, p in zip(tensors, present, strict=True) if p), dtype=dtype)
        it = iter(params)
        args = [next(it) if p else None for p in present]
        return params, args

    params64, args64 = run(torch.float64)
    ref = reference.mba_pool(args64[0], mask, *args64[1:], **kw)
    grad_out = torch.randn_like(ref)
    expected = torch.autograd.grad(ref, params64, grad_out)
    params, args = run(torch.float32)
    with mcr_kernels.use_backend("blockwise", "mba_pool"):
        out = mcr_kernels.mba_pool(args[0], mask, *args[1:], **kw)
    assert out.dtype == torch.float32 and out.shape == (B, E)
    assert_close(out, ref, torch.float32, "pooled")
    for got, want in zip(torch.autograd.grad(out, params, grad_out.float()), expected, strict=True):
        assert_close(got, want, torch.float32, "grad")


def test_mba_pool_blocks_never_hold_the_whole_hidden_activations(small_blocks, largest_tensor):
    B, L, D, H, E = 12, 4, 3, 8, 2
    x = torch.randn(B, L, D, requires_grad=True)
    w1, b1, w2 = torch.randn(H, D, requires_grad=True), torch.randn(H), torch.randn(E, H)
    with largest_tensor() as largest:
        out = blockwise_mba.mba_pool(x, None, w1, b1, w2, None)
        out.sum().backward()
    assert largest.numel <= max(64, B * L * D) < B * L * H  # a block, or the tokens themselves


def test_mba_pool_and_infonce_compile_fullgraph(small_blocks):
    torch._dynamo.reset()
    x, y, w1, b1, w2, b2 = leaves(torch.randn(3, 6, 8), torch.randn(3, 5, 8), torch.randn(10, 8),
                                  torch.randn(10), torch.randn(5, 10), torch.randn(5), dtype=torch.float32)
    mask = torch.rand(3, 6) > 0.3
    scale = torch.tensor(12.0, requires_grad=True)
    params = (x, y, w1, b1, w2, b2, scale)

    def step(x, y, w1, b1, w2, b2, scale):
        return mcr_kernels.infonce_loss(mcr_kernels.mba_pool(x, mask, w1, b1, w2, b2),
                                        mcr_kernels.mba_pool(y, None, w1, b1, w2, b2), scale)

    with mcr_kernels.use_backend("blockwise"):
        eager = step(*params)
        compiled = torch.compile(step, fullgraph=True, backend="aot_eager")(*params)
        for got, want in zip(torch.autograd.grad(compiled, params), torch.autograd.grad(eager, params), strict=True):
            assert_close(got, want, torch.float32, "compiled grad")
    assert_close(compiled, eager, torch.float32, "compiled loss")
