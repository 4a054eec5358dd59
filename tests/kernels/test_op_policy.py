"""The policy every op keeps on every backend it registers (present and future), read from
registered_backends(op); a backend is skipped only where it cannot run on this machine.

* NaN in, NaN out: a NaN in a counted (attended, kept, valid) position gives NaN in the
  outputs that see it.
* Masked positions are ignored: a NaN or inf in a masked-out position (a masked key or value,
  token, region, word, word weight, ignored row, dropped token) changes nothing, forward and
  gradients, against the same inputs with zeros there.
* dtype kept: float64 in gives float64 out, float32 float32, bfloat16 what the reference
  gives (the op's documented result dtype).
* Every tensor argument's device and dtype is checked: one on another device (meta) or in
  another float dtype raises ValueError naming it.

Tolerances: poisoned against clean inputs compare with assert_close's per-dtype defaults
(the same computation on the same values); float64 results against float64 results.
"""
import dataclasses
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from oracle import backend_param

import mcr_kernels

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
NAN, INF = float("nan"), float("inf")


@dataclasses.dataclass
class Case:
    """One op's inputs and what each policy test needs of them.

    make(dtype, seed) -> dict of named arguments (tensors and others); call(**args) runs the op.
    masked: names of the float tensors with masked-out positions and, per name, where (a bool
    tensor of its shape, True = masked out). poison: the name and index of one counted entry.
    devices / dtypes: the tensor arguments to move to meta / cast to another float dtype."""
    op: str
    make: callable
    call: callable
    masked: callable = None
    poison: tuple = None
    devices: tuple = ()
    dtypes: tuple = ()
    float64: bool = True
    bfloat16: bool = True


def randn(*shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype).to(DEVICE)


def bools(*shape, p, seed, keep_first=True):
    g = torch.Generator().manual_seed(seed)
    b = torch.rand(*shape, generator=g) < p
    if keep_first:
        b[..., 0] = True
    return b.to(DEVICE)


# --- the ops' cases ---------------------------------------------------------------------------

def attention_args(dtype, seed):
    q = randn(2, 2, 7, 8, dtype=dtype, seed=seed)
    k, v = randn(2, 2, 9, 8, dtype=dtype, seed=seed + 1), randn(2, 2, 9, 8, dtype=dtype, seed=seed + 2)
    return dict(q=q, k=k, v=v, key_padding_mask=bools(2, 9, p=0.6, seed=seed))


def attention_masked(args):
    where = ~args["key_padding_mask"][:, None, :, None].expand_as(args["k"])
    return {"k": where, "v": where}


def varlen_args(dtype, seed):
    cu = torch.tensor([0, 4, 5, 11], dtype=torch.int32, device=DEVICE)
    q, k, v = (randn(11, 2, 8, dtype=dtype, seed=seed + i) for i in range(3))
    return dict(q=q, k=k, v=v, cu_seqlens_q=cu, cu_seqlens_k=cu.clone(), max_seqlen_q=6, max_seqlen_k=6)


def gather_args(dtype, seed):
    ids_keep = torch.tensor([[4, 0, 2], [1, 3, 6]], device=DEVICE)
    return dict(x=randn(2, 7, 5, dtype=dtype, seed=seed), ids_keep=ids_keep)


def gather_masked(args):
    dropped = torch.ones(2, 7, dtype=torch.bool, device=DEVICE).scatter(1, args["ids_keep"], False)
    return {"x": dropped[..., None].expand_as(args["x"])}


def restore_args(dtype, seed):
    _, ids_restore = mcr_kernels.random_keep_indices(2, 7, 3, device=DEVICE,
                                                     generator=torch.Generator(DEVICE).manual_seed(seed))
    return dict(x_kept=randn(2, 3, 5, dtype=dtype, seed=seed), ids_restore=ids_restore,
                mask_token=randn(5, dtype=dtype, seed=seed + 1))


def pool_args(dtype, seed, pool="mean"):
    mask = bools(3, 6, p=0.6, seed=seed)
    mask[2] = False  # a row with no counted token
    return dict(tokens=randn(3, 6, 5, dtype=dtype, seed=seed), mask=mask,
                weight1=randn(7, 5, dtype=dtype, seed=seed + 1) * 0.5, bias1=randn(7, dtype=dtype, seed=seed + 2),
                weight2=randn(4, 7, dtype=dtype, seed=seed + 3) * 0.5, bias2=randn(4, dtype=dtype, seed=seed + 4),
                pool=pool)


def pool_masked(args):
    return {"tokens": ~args["mask"][..., None].expand_as(args["tokens"])}


def mean_args(dtype, seed):
    args = pool_args(dtype, seed)
    return dict(tokens=args["tokens"], mask=args["mask"])


def infonce_args(dtype, seed):
    return dict(image_emb=randn(5, 6, dtype=dtype, seed=seed), text_emb=randn(5, 6, dtype=dtype, seed=seed + 1),
                logit_scale=torch.tensor(10.0, dtype=dtype, device=DEVICE),
                logit_bias=torch.tensor(-1.0, dtype=dtype, device=DEVICE))


def matching_args(dtype, seed, agg="weighted", attn="regions"):
    img_mask, txt_mask = bools(3, 5, p=0.6, seed=seed), bools(4, 6, p=0.6, seed=seed + 1)
    weights = randn(4, 6, dtype=dtype, seed=seed + 2).abs() if agg == "weighted" else None
    return dict(img=randn(3, 5, 8, dtype=dtype, seed=seed), img_mask=img_mask,
                txt=randn(4, 6, 8, dtype=dtype, seed=seed + 3), txt_mask=txt_mask, agg=agg, word_weights=weights,
                attn=attn)


def matching_masked(args):
    masked = {"img": ~args["img_mask"][..., None].expand_as(args["img"]),
              "txt": ~args["txt_mask"][..., None].expand_as(args["txt"])}
    if args["word_weights"] is not None:
        masked["word_weights"] = ~args["txt_mask"]
    return masked


def cross_entropy_args(dtype, seed):
    labels = torch.tensor([3, -100, 0, 6, -100], device=DEVICE)
    return dict(hidden=randn(5, 8, dtype=dtype, seed=seed), weight=randn(7, 8, dtype=dtype, seed=seed + 1),
                bias=randn(7, dtype=dtype, seed=seed + 2), labels=labels)


def cross_entropy_masked(args):
    return {"hidden": (args["labels"] == -100)[:, None].expand_as(args["hidden"])}


def mlp_args(dtype, seed):
    return dict(x=randn(2, 3, 6, dtype=dtype, seed=seed), fc1_weight=randn(10, 6, dtype=dtype, seed=seed + 1),
                fc1_bias=randn(10, dtype=dtype, seed=seed + 2), fc2_weight=randn(6, 10, dtype=dtype, seed=seed + 3),
                fc2_bias=randn(6, dtype=dtype, seed=seed + 4))


def norm_linear_args(dtype, seed):
    return dict(x=randn(2, 3, 6, dtype=dtype, seed=seed), norm_weight=randn(6, dtype=dtype, seed=seed + 1),
                norm_bias=randn(6, dtype=dtype, seed=seed + 2), weight=randn(5, 6, dtype=dtype, seed=seed + 3),
                bias=randn(5, dtype=dtype, seed=seed + 4))


CASES = {
    "flash_attention": Case("flash_attention", attention_args, mcr_kernels.flash_attention, attention_masked,
                            poison=("q", (0, 1, 3, 2)), devices=("k", "v", "key_padding_mask"), dtypes=("k", "v")),
    "flash_attention_varlen": Case("flash_attention_varlen", varlen_args, mcr_kernels.flash_attention_varlen,
                                   poison=("k", (6, 1, 3)), devices=("k", "v", "cu_seqlens_q", "cu_seqlens_k"),
                                   dtypes=("k", "v")),
    "gather_tokens": Case("gather_tokens", gather_args, mcr_kernels.gather_tokens, gather_masked,
                          poison=("x", (1, 3, 2)), devices=("ids_keep",)),
    "restore_tokens": Case("restore_tokens", restore_args, mcr_kernels.restore_tokens,
                           poison=("x_kept", (0, 1, 4)), devices=("ids_restore", "mask_token")),
    "mba_pool": Case("mba_pool", pool_args, mcr_kernels.mba_pool, pool_masked, poison=("tokens", (1, 0, 3)),
                     devices=("mask", "weight1", "bias1", "weight2", "bias2"),
                     dtypes=("weight1", "bias1", "weight2", "bias2")),
    "masked_mean": Case("masked_mean", mean_args, mcr_kernels.masked_mean, pool_masked, poison=("tokens", (1, 0, 3)),
                        devices=("mask",)),
    "infonce_loss": Case("infonce_loss", infonce_args, mcr_kernels.infonce_loss, poison=("text_emb", (2, 4)),
                         devices=("text_emb", "logit_scale", "logit_bias"), dtypes=("text_emb",)),
    "local_matching": Case("local_matching", matching_args, mcr_kernels.local_matching, matching_masked,
                           poison=("txt", (1, 0, 5)), devices=("img_mask", "txt", "txt_mask", "word_weights"),
                           dtypes=("txt",)),
    "linear_cross_entropy": Case("linear_cross_entropy", cross_entropy_args, mcr_kernels.linear_cross_entropy,
                                 cross_entropy_masked, poison=("hidden", (0, 5)), devices=("weight", "bias", "labels"),
                                 dtypes=("weight", "bias"), float64=False),
    "gelu_mlp": Case("gelu_mlp", mlp_args, mcr_kernels.gelu_mlp, poison=("x", (1, 2, 0)),
                     devices=("fc1_weight", "fc1_bias", "fc2_weight", "fc2_bias"),
                     dtypes=("fc1_weight", "fc1_bias", "fc2_weight", "fc2_bias")),
    "layer_norm_linear": Case("layer_norm_linear", norm_linear_args, mcr_kernels.layer_norm_linear,
                              poison=("x", (0, 1, 4)), devices=("norm_weight", "norm_bias", "weight", "bias"),
                              dtypes=("norm_weight", "norm_bias", "weight", "bias")),
}
VARIANTS = {  # further inputs of an op the masked, NaN and dtype tests run as well
    "mba_pool": [lambda dtype, seed: pool_args(dtype, seed, pool="max")],
    "local_matching": [lambda dtype, seed: matching_args(dtype, seed, agg="lse"),
                       lambda dtype, seed: matching_args(dtype, seed, agg="mean"),
                       lambda dtype, seed: matching_args(dtype, seed, agg="none"),
                       lambda dtype, seed: matching_args(dtype, seed, attn="words_then_regions"),
                       lambda dtype, seed: matching_args(dtype, seed, agg="none", attn="words_then_regions")],
}


def every_backend(ops):
    """(op, backend) for every backend registered for each op; skipped where it cannot run here."""
    return [pytest.param(op, name, id=f"{op}-{name}",
                         marks=pytest.mark.skipif(name not in mcr_kernels.available_backends(op, DEVICE),
                                                  reason=f"{name} cannot run on {DEVICE}"))
            for op in ops for name in mcr_kernels.registered_backends(op)]


def run(case, name, args):
    with mcr_kernels.use_backend(name, case.op):
        out = case.call(**args)
    return out[0] if isinstance(out, tuple) else out


def float_tensors(args):
    return {k: v for k, v in args.items() if isinstance(v, torch.Tensor) and v.is_floating_point()}


def with_grad(args):
    return {k: v.detach().requires_grad_() if k in float_tensors(args) else v for k, v in args.items()}


def grads(out, args):
    leaves = float_tensors(args)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    got = torch.autograd.grad(out, list(leaves.values()), g.to(out.dtype).to(out.device), allow_unused=True)
    return {k: v for k, v in zip(leaves, got) if v is not None}


# --- masked positions are ignored -------------------------------------------------------------

MASKED_OPS = [op for op, case in CASES.items() if case.masked]


@pytest.mark.parametrize("value", [NAN, INF], ids=["nan", "inf"])
@pytest.mark.parametrize("op, name", every_backend(MASKED_OPS))
def test_masked_positions_change_nothing_forward_and_backward(op, name, value):
    case = CASES[op]
    for make in [case.make] + VARIANTS.get(op, []):
        base = make(torch.float32, 0)
        where = case.masked(base)
        clean = with_grad({k: torch.where(where[k], 0.0, v) if k in where else v for k, v in base.items()})
        poisoned = with_grad({k: torch.where(where[k], value, v) if k in where else v for k, v in base.items()})
        out_clean, out_poisoned = run(case, name, clean), run(case, name, poisoned)
        assert not out_poisoned.isnan().any(), f"{op} [{name}]: a masked-out {value} reached the output"
        torch.testing.assert_close(out_poisoned, out_clean)
        grads_clean, grads_poisoned = grads(out_clean, clean), grads(out_poisoned, poisoned)
        assert grads_clean.keys() == grads_poisoned.keys()
        for arg in grads_clean:
            assert not grads_poisoned[arg].isnan().any(), f"{op} [{name}]: a masked-out {value} reached d {arg}"
            torch.testing.assert_close(grads_poisoned[arg], grads_clean[arg], msg=f"{op} [{name}] d {arg}")


# --- NaN in, NaN out --------------------------------------------------------------------------

@pytest.mark.parametrize("op, name", every_backend(CASES))
def test_nan_in_a_counted_position_gives_nan(op, name):
    case = CASES[op]
    for make in [case.make] + VARIANTS.get(op, []):
        args = make(torch.float32, 1)
        arg, index = case.poison
        args[arg] = args[arg].clone()
        args[arg][index] = NAN
        out = run(case, name, args)
        assert out.isnan().any(), f"{op} [{name}]: a NaN in {arg}{list(index)} was hidden"
        with mcr_kernels.use_backend("reference", op):
            expected = run(case, "reference", args)
        torch.testing.assert_close(out.isnan(), expected.isnan(), msg=f"{op} [{name}]: NaN where the reference has it")


def test_attention_nan_query_row_gives_nan_on_every_backend_as_sdpa_math():
    """SDPA's math backend gives NaN for a NaN query row; its CPU flash kernel (the CPU
    default) gives zeros: every backend here must follow the math backend."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q, k, v = (randn(1, 2, 5, 8, dtype=torch.float32, seed=s) for s in range(3))
    q[0, 1, 2, 3] = NAN
    with sdpa_kernel(SDPBackend.MATH):
        expected = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    for name in mcr_kernels.available_backends("flash_attention", DEVICE):
        out = run(CASES["flash_attention"], name, dict(q=q, k=k, v=v))
        torch.testing.assert_close(out.isnan(), expected.isnan(), msg=name)


# --- dtype kept -------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("op, name", every_backend(CASES))
def test_result_dtype_is_the_references(op, name, dtype):
    case = CASES[op]
    if dtype == torch.bfloat16 and not case.bfloat16:
        pytest.skip(f"{op} takes no bfloat16")
    for make in [case.make] + VARIANTS.get(op, []):
        args = make(dtype, 2)
        out = run(case, name, args)
        expected = run(case, "reference", args)
        assert out.dtype == expected.dtype, \
            f"{op} [{name}]: {dtype} in gave {out.dtype}, the reference {expected.dtype}"
        if dtype == torch.float64 and case.float64:
            assert out.dtype == torch.float64
            torch.testing.assert_close(out, expected, rtol=1e-9, atol=1e-9)


# --- every tensor argument's device and dtype checked -----------------------------------------

@pytest.mark.parametrize("op, name", every_backend(CASES))
def test_an_argument_on_another_device_is_named(op, name):
    case = CASES[op]
    for arg in case.devices:
        args = case.make(torch.float32, 3)
        args[arg] = args[arg].to("meta")
        with pytest.raises(ValueError, match=f"^{arg} must be on"):
            run(case, name, args)


@pytest.mark.parametrize("op, name", every_backend([op for op, case in CASES.items() if case.dtypes]))
def test_an_argument_in_another_dtype_is_named(op, name):
    case = CASES[op]
    for arg in case.dtypes:
        args = case.make(torch.float32, 4)
        args[arg] = args[arg].double()
        with pytest.raises(ValueError, match=f"^{arg} must have dtype"):
            run(case, name, args)


def test_every_op_with_float_inputs_has_a_case():
    float_free = {"random_keep_indices"}  # its arguments are sizes, a device and a generator
    assert set(mcr_kernels.backend.ops()) - float_free == set(CASES)


# --- careless or hostile input, kept as regression tests (marked hostile): NaN in -> NaN out, and a
# NaN in a masked-out position reaches nothing, on every backend the op registers ------------

# --- infonce_loss ------------------------------------------------------------------------

@pytest.mark.hostile
@pytest.mark.parametrize("name", backend_param("infonce_loss"))
def test_infonce_empty_batch_raises(name):
    empty = torch.zeros(0, 8, device=DEVICE)
    with mcr_kernels.use_backend(name, "infonce_loss"), pytest.raises(ValueError, match="at least one pair"):
        mcr_kernels.infonce_loss(empty, empty, torch.tensor(10.0, device=DEVICE))


@pytest.mark.hostile
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


@pytest.mark.hostile
@pytest.mark.parametrize("name", backend_param("infonce_loss"))
def test_infonce_nan_embedding_gives_nan_loss(name):
    img, txt = (torch.randn(5, 8, device=DEVICE) for _ in range(2))
    img[3, 2] = float("nan")
    with mcr_kernels.use_backend(name, "infonce_loss"):
        assert mcr_kernels.infonce_loss(img, txt, torch.tensor(10.0, device=DEVICE)).isnan()


# --- backend registry --------------------------------------------------------------------

@pytest.mark.hostile
def test_available_backends_accepts_a_device_string():
    assert mcr_kernels.available_backends("flash_attention", "cpu") == \
        mcr_kernels.available_backends("flash_attention", torch.device("cpu"))
    assert "reference" in mcr_kernels.available_backends("mba_pool", "cpu")
    assert set(mcr_kernels.registered_backends("gather_tokens")) >= {"reference", "triton"}
    with pytest.raises(ValueError, match="unknown op"):
        mcr_kernels.registered_backends("nope")


@pytest.mark.hostile
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


@pytest.mark.hostile
def test_import_needs_torch_only():
    """`import mcr_kernels` pulls in neither the model stack nor the mcr package."""
    code = ("import sys, mcr_kernels\n"
            "leaked = sorted({m.split('.')[0] for m in sys.modules} & {'mcr', 'transformers', 'timm', 'tokenizers'})\n"
            "print(','.join(leaked))\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "", f"import mcr_kernels imported {result.stdout.strip()}"


@pytest.mark.hostile
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


@pytest.mark.hostile
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
