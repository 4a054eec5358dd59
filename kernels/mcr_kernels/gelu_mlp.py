"""The transformer MLP fc2(gelu(fc1(x))) without keeping its activation for backward.

    y = gelu_mlp(x, fc1.weight, fc1.bias, fc2.weight, fc2.bias)     # x [..., D]

Equals F.linear(F.gelu(F.linear(x, W1, b1)), W2, b2); the backward recomputes gelu(fc1(x))
from the kept pre-activation, so between forward and backward each MLP holds one
[tokens, hidden] tensor instead of two. With norm_eps it is the MLP of a pre-norm block,
fc2(gelu(fc1(LayerNorm(x)))), and keeps x instead of LayerNorm(x) as well.
Signature, backends and limits: docs/gelu_mlp.md.
"""
import torch

from mcr_kernels import backend, reference
from mcr_kernels._validate import FLOAT_DTYPES, check_size, check_tensor
from mcr_kernels.blockwise import gelu_mlp as _blockwise
from mcr_kernels.layer_norm_linear import autocast_norm_params, check_norm

APPROXIMATIONS = ("none", "tanh")


def gelu_mlp(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, *, approximate="none", norm_weight=None,
             norm_bias=None, norm_eps=None):
    """fc2(gelu(fc1(x))): x [..., D], fc1_weight [hidden, D], fc1_bias [hidden] or None,
    fc2_weight [D_out, hidden], fc2_bias [D_out] or None, one float dtype and device (under
    autocast the four are cast to its dtype, as F.linear). approximate: GELU's "none" (erf) or
    "tanh", as F.gelu. Pre-norm form: with norm_eps (> 0) the MLP runs on
    F.layer_norm(x, (D,), norm_weight, norm_bias, norm_eps) (norm_weight, norm_bias [D] or None,
    x's dtype), recomputed in backward from x. Returns [..., D_out] in fc1_weight's dtype."""
    check_tensor("x", x, dtypes=FLOAT_DTYPES)
    if x.dim() < 1:
        raise ValueError(f"x must have at least 1 dim, got shape {tuple(x.shape)}")
    pre_norm = norm_eps is not None
    if not pre_norm and (norm_weight is not None or norm_bias is not None):
        raise ValueError("norm_weight / norm_bias need norm_eps (the pre-norm form); got norm_eps=None")
    autocast = torch.is_autocast_enabled(x.device.type)
    if autocast:  # the projections follow autocast, as F.linear
        dtype = torch.get_autocast_dtype(x.device.type)
        if pre_norm:  # the norm runs in x's dtype, its output is cast with the projections
            norm_weight, norm_bias = autocast_norm_params(x, norm_weight, norm_bias)
        else:
            x = x.to(dtype)
        fc1_weight, fc2_weight = fc1_weight.to(dtype), fc2_weight.to(dtype)
        fc1_bias = fc1_bias.to(dtype) if fc1_bias is not None else None
        fc2_bias = fc2_bias.to(dtype) if fc2_bias is not None else None
    if pre_norm:
        check_norm(x, norm_weight, norm_bias, norm_eps, eps_name="norm_eps")
        norm_eps = float(norm_eps)
    weight_dtypes = FLOAT_DTYPES if pre_norm and autocast else (x.dtype,)
    check_tensor("fc1_weight", fc1_weight, ndim=2, dtypes=weight_dtypes, device=x.device)
    check_size("fc1_weight", fc1_weight, 1, x.shape[-1], "x.shape[-1] (model width)")
    check_tensor("fc2_weight", fc2_weight, ndim=2, dtypes=(fc1_weight.dtype,), device=x.device)
    check_size("fc2_weight", fc2_weight, 1, fc1_weight.shape[0], "fc1_weight.shape[0] (hidden width)")
    for name, b, w in (("fc1_bias", fc1_bias, fc1_weight), ("fc2_bias", fc2_bias, fc2_weight)):
        if b is not None:
            check_tensor(name, b, ndim=1, dtypes=(fc1_weight.dtype,), device=x.device)
            check_size(name, b, 0, w.shape[0], f"{name.replace('bias', 'weight')}.shape[0]")
    if approximate not in APPROXIMATIONS:
        raise ValueError(f"approximate must be one of {APPROXIMATIONS}, got {approximate!r}")
    _, fn = backend.resolve("gelu_mlp", x.device)
    return fn(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, approximate=approximate, norm_weight=norm_weight,
              norm_bias=norm_bias, norm_eps=norm_eps)


backend.register("gelu_mlp", "reference", reference.gelu_mlp)
backend.register("gelu_mlp", "blockwise", _blockwise.gelu_mlp)
