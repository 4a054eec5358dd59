"""local_matching on every backend against the float64 reference (mcr_kernels.reference).

Values and gradients (img, txt, word_weights) for every agg (and the per-word matchings of
agg="none") and both attention orders (attn="regions" and GLoRIA's "words_then_regions"),
with and without masks, with
empty rows (an image without a region, a report without a word, zero total weight),
B_i != B_t and awkward sizes (1, odd, more words than one Triton word block, more pairs than
one native block). The Triton kernels run on CPU tensors under TRITON_INTERPRET=1 (conftest).
Tolerances, relative to the largest reference value (at least 0.1): float64 1e-10 (native
computes in float64), float32 1e-4, float16 5e-3, bfloat16 3e-2.
"""
import importlib
import math

import pytest
import torch
import torch.nn.functional as F

import mcr_kernels
from mcr_kernels import reference
from mcr_kernels._local_matching_inputs import prepare
from mcr_kernels.blockwise import local_matching as blockwise

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float64: 1e-10, torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 3e-2}
BACKENDS = ["reference", "blockwise", "triton"]
ATTNS = ["regions", "words_then_regions"]


def assert_close(actual, expected, dtype, what):
    expected = expected.double()
    err = (actual.double() - expected).abs().max().item()
    scale = max(0.1, expected.abs().max().item())
    assert err <= TOL[dtype] * scale, f"{what}: max error {err:.3g} > {TOL[dtype]} * {scale:.3g}"


def make_inputs(B_i, B_t, Li, Lt, E, *, masks=True, empty_rows=True):
    """float64 img, txt, word weights (leaves) and bool masks; word 0 of every report weighs 0
    (a valid word of weight 0 still enters the word softmax of attn="words_then_regions");
    with empty_rows image 0 has no region, report 0 no word and report 1 (when B_t > 2) valid
    words of weight 0 only."""
    img = torch.randn(B_i, Li, E, dtype=torch.float64)
    txt = torch.randn(B_t, Lt, E, dtype=torch.float64)
    u = torch.rand(B_t, Lt, dtype=torch.float64)
    if Lt > 1:
        u[:, 0] = 0
    img_mask = txt_mask = None
    if masks:
        img_mask, txt_mask = torch.rand(B_i, Li) > 0.3, torch.rand(B_t, Lt) > 0.3
        img_mask[:, -1] = txt_mask[:, -1] = True
        if empty_rows and B_i > 1:
            img_mask[0] = False
        if empty_rows and B_t > 1:
            txt_mask[0] = False
        if empty_rows and B_t > 2:
            u[1] = u[1] * ~txt_mask[1]
        img_mask, txt_mask = img_mask.to(DEVICE), txt_mask.to(DEVICE)
    leaves = [t.to(DEVICE).requires_grad_() for t in (img, txt, u)]
    return leaves, img_mask, txt_mask


def check(backend, B_i, B_t, Li, Lt, E, *, agg, masks=True, empty_rows=True, dtype=None,
          attn_scale=4.0, agg_scale=5.0, attn="regions", word_scale=3.0):
    """The backend's scores and gradients equal the float64 reference's."""
    (img, txt, u), img_mask, txt_mask = make_inputs(B_i, B_t, Li, Lt, E, masks=masks, empty_rows=empty_rows)
    dtype = dtype or (torch.float64 if backend != "triton" else torch.float32)
    weighted = agg == "weighted"
    kw = dict(attn_scale=attn_scale, agg=agg, agg_scale=agg_scale, attn=attn, word_scale=word_scale)
    ref = reference.local_matching(img, img_mask, txt, txt_mask, **kw, word_weights=u if weighted else None)
    inputs = [img, txt, u] if weighted else [img, txt]
    grad_out = torch.randn_like(ref)
    expected = torch.autograd.grad(ref, inputs, grad_out)
    low = [t.detach().to(dtype).requires_grad_() for t in inputs]
    with mcr_kernels.use_backend(backend, "local_matching"):
        out = mcr_kernels.local_matching(low[0], img_mask, low[1], txt_mask, **kw,
                                         word_weights=low[2] if weighted else None)
    assert out.shape == ((B_i, B_t, Lt) if agg == "none" else (B_i, B_t))
    assert out.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert_close(out, ref, dtype, f"{backend} scores")
    for name, got, want in zip(("img", "txt", "word_weights"), torch.autograd.grad(out, low, grad_out.to(out.dtype)),
                               expected, strict=False):
        assert_close(got, want, dtype, f"{backend} d {name}")
    return ref


@pytest.fixture
def small_native_blocks(monkeypatch):
    """Native blocks of at most 2 pairs of 7 x 5 entries, so the tiny shapes span many blocks."""
    monkeypatch.setattr(blockwise, "BLOCK_ELEMENTS", 2 * 7 * 5)


@pytest.mark.parametrize("attn", ATTNS)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("agg", ["lse", "mean", "weighted", "none"])
def test_matches_float64_reference_with_masks_and_empty_rows(backend, agg, attn, small_native_blocks):
    check(backend, 3, 4, 5, 7, 6, agg=agg, attn=attn)


@pytest.mark.parametrize("attn", ATTNS)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("agg", ["lse", "mean", "weighted", "none"])
def test_matches_float64_reference_without_masks(backend, agg, attn):
    check(backend, 2, 3, 4, 5, 8, agg=agg, masks=False, attn=attn)


@pytest.mark.parametrize("attn", ATTNS)
@pytest.mark.parametrize("backend", ["blockwise", "triton"])
@pytest.mark.parametrize("shape", [(1, 1, 1, 1, 1), (1, 5, 3, 19, 33), (5, 2, 17, 3, 7)])
def test_awkward_sizes(backend, shape, attn):
    """One of everything; more words than a Triton word block (16); Li, E off powers of two."""
    check(backend, *shape, agg="lse", empty_rows=False, attn=attn)
    check(backend, *shape, agg="weighted", empty_rows=False, attn=attn)
    check(backend, *shape, agg="none", empty_rows=False, attn=attn)


@pytest.mark.parametrize("attn", ATTNS)
@pytest.mark.parametrize("backend", ["blockwise", "triton"])
def test_sharp_scales(backend, attn):
    """Large attention, word and aggregation scales: the softmaxes and log-sum-exp stay finite."""
    check(backend, 2, 3, 6, 5, 4, agg="lse", attn_scale=60.0, agg_scale=100.0, attn=attn, word_scale=30.0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_triton_half_precision_inputs(dtype):
    check("triton", 2, 3, 5, 6, 16, agg="lse", dtype=dtype)


@pytest.mark.parametrize("attn", ATTNS)
def test_native_blocks_cover_every_pair(attn, small_native_blocks):
    """Ragged block grid (7 reports with blocks of 2) gives the one-block result exactly."""
    (img, txt, u), img_mask, txt_mask = make_inputs(5, 7, 5, 7, 4)
    inputs = prepare(img, img_mask, txt, txt_mask, "weighted", u, torch.float64)
    blocked = blockwise.local_matching_blockwise(*inputs, 4.0, 5.0, "linear", attn, 3.0)
    one_block = blockwise._block(*inputs, 4.0, 5.0, "linear", attn, 3.0)[-1]
    assert len(blockwise._block_ranges(5, 7, 7, 5)) > 10
    assert (blocked - one_block).abs().max().item() < 1e-12


@pytest.mark.parametrize("attn", ATTNS)
def test_reference_closed_form_for_one_region(attn):
    """With one region the attention is 1 (whatever the word softmax gives), c = v and
    s_k = cos(v, w_k): the reference's scores follow the formula (an oracle for the oracle)."""
    img, txt = torch.randn(2, 1, 5, dtype=torch.float64), torch.randn(3, 4, 5, dtype=torch.float64)
    cos = torch.einsum("ie,jke->ijk", F.normalize(img[:, 0], dim=-1), F.normalize(txt, dim=-1))
    kw = dict(attn=attn, word_scale=3.0)
    scores = reference.local_matching(img, None, txt, None, agg="lse", agg_scale=5.0, **kw)
    assert torch.allclose(scores, torch.logsumexp(5.0 * cos, -1) / 5.0, atol=1e-12)
    scores = reference.local_matching(img, None, txt, None, agg="mean", **kw)
    assert torch.allclose(scores, cos.mean(-1), atol=1e-12)
    u = torch.rand(3, 4, dtype=torch.float64)
    scores = reference.local_matching(img, None, txt, None, agg="weighted", word_weights=u, **kw)
    assert torch.allclose(scores, (cos * u).sum(-1) / u.sum(-1), atol=1e-12)


def test_reference_closed_form_for_one_word_words_then_regions():
    """With one valid word the word softmax is 1 at every region, so the attention is uniform
    over the valid regions: c = their mean and s = cos(mean v, w), whatever the scales."""
    img, txt = torch.randn(3, 6, 5, dtype=torch.float64), torch.randn(2, 4, 5, dtype=torch.float64)
    img_mask = torch.rand(3, 6) > 0.4
    img_mask[:, 0] = True
    txt_mask = torch.zeros(2, 4, dtype=torch.bool)
    txt_mask[0, 2] = txt_mask[1, 0] = True
    v = F.normalize(img, dim=-1) * img_mask[..., None]
    mean_v = v.sum(1) / img_mask.sum(1, keepdim=True)
    word = F.normalize(txt[txt_mask], dim=-1)                        # [2, E]: each report's one word
    cos = torch.einsum("ie,je->ij", F.normalize(mean_v, dim=-1), word)
    s = reference.local_matching(img, img_mask, txt, txt_mask, agg="none", attn="words_then_regions",
                                 attn_scale=60.0, word_scale=30.0)
    assert torch.allclose(s[txt_mask[None].expand_as(s)].view(3, 2), cos, atol=1e-12)
    assert (s[~txt_mask[None].expand_as(s)] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_default_attn_is_regions_and_word_scale_matters_only_for_words_then_regions(backend):
    """The default is attn="regions", bit for bit, and word_scale does not change it."""
    (img, txt, _), img_mask, txt_mask = make_inputs(3, 4, 5, 7, 6)
    img, txt = img.detach().float(), txt.detach().float()
    with mcr_kernels.use_backend(backend, "local_matching"):
        default = mcr_kernels.local_matching(img, img_mask, txt, txt_mask, agg="none")
        regions = mcr_kernels.local_matching(img, img_mask, txt, txt_mask, agg="none", attn="regions")
        sharp = mcr_kernels.local_matching(img, img_mask, txt, txt_mask, agg="none", attn="regions",
                                           word_scale=30.0)
        gloria = mcr_kernels.local_matching(img, img_mask, txt, txt_mask, agg="none",
                                            attn="words_then_regions")
    assert torch.equal(default, regions) and torch.equal(default, sharp)
    assert not torch.allclose(default, gloria, atol=1e-3)


def test_triton_runs_words_then_regions_on_the_blockwise_path(monkeypatch):
    """The kernels have no word softmax: with the triton backend attn="words_then_regions"
    launches no kernel and gives the reference's scores and gradients (through blockwise)."""
    pytest.importorskip("triton")
    triton_lm = importlib.import_module("mcr_kernels.triton.local_matching")
    launched = []
    monkeypatch.setattr(triton_lm, "local_matching_pairs", lambda *a: launched.append(1))
    for agg in ("lse", "weighted"):
        check("triton", 3, 4, 5, 7, 6, agg=agg, attn="words_then_regions")
    assert not launched
    img, txt = torch.randn(2, 3, 4), torch.randn(2, 5, 4)
    with pytest.raises(ValueError, match="attn"):
        triton_lm.local_matching(img, None, txt, None, attn="words_then_regions")


@pytest.mark.parametrize("attn", ATTNS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_per_word_matchings_aggregate_to_every_score(backend, attn):
    """agg="none" gives the s_k the aggregates are made of: log-sum-exp, mean and weighted mean
    of it over the valid words are the reference's lse, mean and weighted scores; 0 off them."""
    (img, txt, u), img_mask, txt_mask = make_inputs(3, 4, 5, 7, 6)
    img, txt, u = img.detach(), txt.detach(), u.detach()
    dtype = torch.float64 if backend != "triton" else torch.float32
    with mcr_kernels.use_backend(backend, "local_matching"):
        s = mcr_kernels.local_matching(img.to(dtype), img_mask, txt.to(dtype), txt_mask, agg="none",
                                       attn=attn).double()
    valid = txt_mask[None].expand_as(s)
    assert (s[~valid] == 0).all()
    lse = torch.logsumexp((5.0 * s).masked_fill(~valid, -math.inf), -1).nan_to_num(neginf=0.0) / 5.0
    count = valid.sum(-1)
    mean = s.sum(-1) / count.clamp(min=1)
    uu = u * txt_mask
    weighted = (s * uu).sum(-1) / uu.sum(-1).where(uu.sum(-1) > 0, 1.0)
    for agg, got, kw in (("lse", lse, {}), ("mean", mean, {}), ("weighted", weighted, dict(word_weights=u))):
        want = reference.local_matching(img, img_mask, txt, txt_mask, agg=agg, attn=attn, **kw)
        assert_close(got, want, dtype, f"{backend} {agg} of the per-word matchings")


@pytest.mark.parametrize("attn", ATTNS)
def test_empty_rows_score_as_documented(attn):
    (img, txt, u), img_mask, txt_mask = make_inputs(3, 4, 5, 6, 4)
    for backend in BACKENDS:
        with mcr_kernels.use_backend(backend, "local_matching"):
            lse = mcr_kernels.local_matching(img, img_mask, txt, txt_mask, attn=attn)
            weighted = mcr_kernels.local_matching(img, img_mask, txt, txt_mask, agg="weighted", word_weights=u,
                                                  attn=attn)
        assert lse[:, 0].abs().max() == 0 and weighted[:, :2].abs().max() == 0, backend
        n_words = txt_mask.sum(1)[1:].double()   # image 0 has no region: every s_k = 0
        assert torch.allclose(lse[0, 1:], torch.log(n_words) / 5.0), backend


def test_native_never_creates_the_full_attention(small_native_blocks, largest_tensor):
    """Forward and backward of the native backend create no tensor of B_i·B_t·Lt·Li entries
    (the eager computation's): the largest is one block's."""
    (img, txt, _), img_mask, txt_mask = make_inputs(6, 8, 5, 7, 4)
    with largest_tensor() as mode, mcr_kernels.use_backend("blockwise", "local_matching"):
        scores = mcr_kernels.local_matching(img, img_mask, txt, txt_mask)
        torch.autograd.grad(scores.sum(), (img, txt))
    assert mode.numel <= 2 * 7 * 5 * 4 < 6 * 8 * 7 * 5   # one block's [bi, bt, Lt, E]


def test_triton_falls_back_to_native_past_one_tile():
    """Li above the Triton tile limit runs the native path, with the same result."""
    check("triton", 1, 2, 257, 3, 4, agg="mean", empty_rows=False)


# --- torch.library: opcheck and torch.compile ------------------------------------------------

def prepared(mode, dtype=torch.float32):
    (img, txt, u), img_mask, txt_mask = make_inputs(2, 3, 5, 6, 4)
    inputs = prepare(img, img_mask, txt, txt_mask, "weighted" if mode == "linear" else mode, u, dtype)
    return [t.detach().requires_grad_(i in (0, 2) or (i == 4 and mode == "linear")) for i, t in enumerate(inputs)]


@pytest.mark.parametrize("mode", ["lse", "linear", "none"])
def test_opcheck_custom_ops(mode):
    from mcr_kernels.triton import local_matching as tlm

    for attn in ATTNS:
        torch.library.opcheck(blockwise.local_matching_blockwise,
                              (*prepared(mode, torch.float64), 4.0, 5.0, mode, attn, 3.0))
    v, region, w, _, weights = prepared(mode)
    torch.library.opcheck(tlm.local_matching_pairs, (v, region, w, weights, 4.0, 5.0, mode, False))


@pytest.mark.parametrize("backend", ["blockwise", "triton"])
def test_torch_compile_fullgraph_matches_eager(backend):
    torch._dynamo.reset()
    (img, txt, u), img_mask, txt_mask = make_inputs(3, 2, 4, 5, 6)
    params = [t.detach().float().requires_grad_() for t in (img, txt, u)]

    def loss(img, txt, u):
        lse = mcr_kernels.local_matching(img, img_mask, txt, txt_mask)
        weighted = mcr_kernels.local_matching(img, img_mask, txt, txt_mask, agg="weighted", word_weights=u)
        gloria = mcr_kernels.local_matching(img, img_mask, txt, txt_mask, attn="words_then_regions")
        return (lse * 3.0).logsumexp(1).sum() + weighted.square().sum() + gloria.square().sum()

    compile_backend = "inductor" if DEVICE == "cuda" else "aot_eager"
    with mcr_kernels.use_backend(backend, "local_matching"):
        eager = loss(*params)
        compiled = torch.compile(loss, fullgraph=True, backend=compile_backend)(*params)
        got, want = torch.autograd.grad(compiled, params), torch.autograd.grad(eager, params)
    assert_close(compiled, eager, torch.float32, "compiled loss")
    for g, w in zip(got, want, strict=True):
        assert_close(g, w, torch.float32, "compiled grad")


# --- bad input -----------------------------------------------------------------------------

def call(img=None, img_mask=None, txt=None, txt_mask=None, **kw):
    img = torch.randn(2, 3, 4) if img is None else img
    txt = torch.randn(5, 6, 4) if txt is None else txt
    return mcr_kernels.local_matching(img, img_mask, txt, txt_mask, **kw)


@pytest.mark.parametrize("kwargs,match", [
    (dict(img=torch.randn(2, 3)), "img"),
    (dict(txt=torch.randn(5, 6, 7)), "txt"),
    (dict(txt=torch.randn(5, 6, 4, dtype=torch.float64)), "txt"),
    (dict(img=torch.randn(2, 0, 4)), "img"),
    (dict(img_mask=torch.ones(2, 4, dtype=torch.bool)), "img_mask"),
    (dict(txt_mask=torch.ones(5, 6)), "txt_mask"),
    (dict(txt_mask=torch.ones(4, 6, dtype=torch.bool)), "txt_mask"),
    (dict(agg="max"), "agg"),
    (dict(agg_scale=0.0), "agg_scale"),
    (dict(agg="weighted"), "word_weights"),
    (dict(agg="weighted", word_weights=torch.rand(5, 7)), "word_weights"),
    (dict(agg="weighted", word_weights=-torch.rand(5, 6)), "word_weights"),
    (dict(word_weights=torch.rand(5, 6)), "word_weights"),
    (dict(attn="words"), "^attn must"),
    (dict(word_scale=0.0), "word_scale"),
    (dict(word_scale=-1.0, attn="words_then_regions"), "word_scale"),
])
def test_bad_input_raises_value_error_naming_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        call(**kwargs)


def test_default_backends():
    from mcr_kernels import backend

    assert backend.resolve("local_matching", torch.device("cpu"))[0] == "blockwise"
    assert math.isfinite(call().sum().item())


def test_triton_tiles_that_cannot_launch_take_the_blockwise_path(monkeypatch):
    """tile_fits: over 128 x 128 never; at 128 x 128 only where the backward's shared memory
    (compile check: 216 KiB with tensor cores, 145 KiB exact) fits the device's opt-in limit;
    and a too-large image really goes blockwise (same result, no kernel launch)."""
    pytest.importorskip("triton")
    triton_lm = importlib.import_module("mcr_kernels.triton.local_matching")

    class Props:
        shared_memory_per_block_optin = 0

    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: Props)
    cuda = torch.device("cuda")
    for optin, tensor_cores, fits in [(163 * 1024, True, False), (163 * 1024, False, True),
                                      (227 * 1024, True, True), (227 * 1024, False, True)]:
        Props.shared_memory_per_block_optin = optin
        assert triton_lm.tile_fits(128, 128, tensor_cores, cuda) is fits, (optin, tensor_cores)
        assert triton_lm.tile_fits(64, 128, tensor_cores, cuda)
        assert not triton_lm.tile_fits(256, 128, tensor_cores, cuda)
    assert not triton_lm.tile_fits(128, 256, False, torch.device("cpu"))

    launched = []
    monkeypatch.setattr(triton_lm, "local_matching_pairs", lambda *a: launched.append(1))
    (img, txt, _), img_mask, txt_mask = make_inputs(2, 3, 130, 5, 72)  # a 256 x 128 tile
    with mcr_kernels.use_backend("triton", "local_matching"):
        got = mcr_kernels.local_matching(img.detach().float(), img_mask, txt.detach().float(), txt_mask)
    expected = reference.local_matching(img.detach(), img_mask, txt.detach(), txt_mask)
    assert not launched
    assert_close(got, expected, torch.float32, "scores")
