"""A linear layer on LayerNorm(x) without keeping the normalized x for backward.

    qkv = layer_norm_linear(x, norm1.weight, norm1.bias, qkv.weight, qkv.bias, eps=norm1.eps)

Equals F.linear(F.layer_norm(x, (D,), γ, β, eps), W, b); the backward recomputes the norm
from x, which a pre-norm block keeps anyway (it is the residual), so each such pair holds one
[tokens, D] tensor less between forward and backward. gelu_mlp's norm_* arguments do the same
for the MLP after a norm. Signature, backends and limits: docs/layer_norm_linear.md.
"""
import torch

from mcr_kernels import backend, reference
from mcr_kernels._validate import FLOAT_DTYPES, check_size, check_tensor
from mcr_kernels.blockwise import layer_norm_linear as _blockwise


def check_norm(x, norm_weight, norm_bias, eps, eps_name="eps"):
    """The LayerNorm arguments of x [..., D]: weight / bias [D] in x's dtype or None, eps > 0
    (named eps_name in the error)."""
    for name, t in (("norm_weight", norm_weight), ("norm_bias", norm_bias)):
        if t is not None:
            check_tensor(name, t, ndim=1, dtypes=(x.dtype,), device=x.device)
            check_size(name, t, 0, x.shape[-1], "x.shape[-1] (model width)")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0:
        raise ValueError(f"{eps_name} must be a float > 0, got {eps!r}")


def autocast_norm_params(x, norm_weight, norm_bias):
    """Under autocast the norm runs in x's dtype: (norm_weight, norm_bias) cast to it."""
    return tuple(t.to(x.dtype) if t is not None else None for t in (norm_weight, norm_bias))


def layer_norm_linear(x, norm_weight, norm_bias, weight, bias, *, eps=1e-5):
    """F.linear(F.layer_norm(x, (D,), norm_weight, norm_bias, eps), weight, bias): x [..., D];
    norm_weight, norm_bias [D] or None (x's dtype); weight [D_out, D], bias [D_out] or None
    (one dtype; under autocast cast to its dtype, and the normalized x with them, as F.linear).
    Returns [..., D_out] in weight's dtype."""
    check_tensor("x", x, dtypes=FLOAT_DTYPES)
    if x.dim() < 1:
        raise ValueError(f"x must have at least 1 dim, got shape {tuple(x.shape)}")
    autocast = torch.is_autocast_enabled(x.device.type)
    if autocast:
        dtype = torch.get_autocast_dtype(x.device.type)
        norm_weight, norm_bias = autocast_norm_params(x, norm_weight, norm_bias)
        weight, bias = weight.to(dtype), bias.to(dtype) if bias is not None else None
    check_norm(x, norm_weight, norm_bias, eps)
    check_tensor("weight", weight, ndim=2, dtypes=FLOAT_DTYPES if autocast else (x.dtype,), device=x.device)
    check_size("weight", weight, 1, x.shape[-1], "x.shape[-1] (model width)")
    if bias is not None:
        check_tensor("bias", bias, ndim=1, dtypes=(weight.dtype,), device=x.device)
        check_size("bias", bias, 0, weight.shape[0], "weight.shape[0]")
    _, fn = backend.resolve("layer_norm_linear", x.device)
    return fn(x, norm_weight, norm_bias, weight, bias, eps=float(eps))


backend.register("layer_norm_linear", "reference", reference.layer_norm_linear)
backend.register("layer_norm_linear", "blockwise", _blockwise.layer_norm_linear)
