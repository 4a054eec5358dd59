"""The `cpu` backend of layer_norm_linear (plain torch ops, any device): a linear layer on
LayerNorm(x) whose backward recomputes the normalized input instead of keeping it.

Autograd through F.layer_norm / F.linear keeps x (with its mean and 1/std) for the norm and
y = LayerNorm(x) for the linear layer; this op keeps x only:
    forward:   y = LayerNorm(x) ;  out = y Wᵀ + b                                  (saves x)
    backward:  y, mean, rstd = LayerNorm(x) ;  d W = gᵀ y ;  d b = Σ g ;  d y = g W
               d x, d γ, d β = LayerNorm's backward(d y)
The recomputed y equals the forward's bit for bit (same op, same input), so the gradients are
autograd's up to summation order. `normalize` / `normalize_backward` serve gelu_mlp's
pre-norm form too.
"""
import torch
import torch.nn.functional as F


def normalize(x, norm_weight, norm_bias, eps, dtype):
    """(LayerNorm(x) over the last dim cast to dtype, mean, rstd): x [N, D]."""
    y, mean, rstd = torch.ops.aten.native_layer_norm(x, [x.shape[-1]], norm_weight, norm_bias, eps)
    return y.to(dtype), mean, rstd


def normalize_backward(d_y, x, mean, rstd, norm_weight, norm_bias):
    """(d x, d norm_weight, d norm_bias) of LayerNorm from the gradient of its output."""
    return torch.ops.aten.native_layer_norm_backward(
        d_y.to(x.dtype), x, [x.shape[-1]], mean, rstd, norm_weight, norm_bias,
        [True, norm_weight is not None, norm_bias is not None])


@torch.library.custom_op("mcr_kernels::layer_norm_linear_recompute", mutates_args=())
def layer_norm_linear_recompute(x: torch.Tensor, norm_weight: torch.Tensor | None, norm_bias: torch.Tensor | None,
                                weight: torch.Tensor, bias: torch.Tensor | None, eps: float) -> torch.Tensor:
    """LayerNorm(x) Wᵀ + b [N, D_out] of x [N, D] (the norm in x's dtype, the linear in W's)."""
    return F.linear(normalize(x, norm_weight, norm_bias, eps, weight.dtype)[0], weight, bias)


@layer_norm_linear_recompute.register_fake
def _(x, norm_weight, norm_bias, weight, bias, eps):
    return x.new_empty(x.shape[0], weight.shape[0], dtype=weight.dtype)


def _setup_context(ctx, inputs, output):
    x, norm_weight, norm_bias, weight, bias, eps = inputs
    ctx.save_for_backward(x, norm_weight, norm_bias, weight)
    ctx.eps, ctx.has_bias = eps, bias is not None


def _backward(ctx, grad):
    x, norm_weight, norm_bias, weight = ctx.saved_tensors
    y, mean, rstd = normalize(x, norm_weight, norm_bias, ctx.eps, weight.dtype)
    d_weight = grad.T @ y
    del y
    d_x, d_norm_weight, d_norm_bias = normalize_backward(grad @ weight, x, mean, rstd, norm_weight, norm_bias)
    return d_x, d_norm_weight, d_norm_bias, d_weight, grad.sum(0) if ctx.has_bias else None, None


layer_norm_linear_recompute.register_autograd(_backward, setup_context=_setup_context)


def layer_norm_linear(x, norm_weight, norm_bias, weight, bias, *, eps=1e-5):
    """`blockwise` backend of mcr_kernels.layer_norm_linear (same arguments)."""
    out = layer_norm_linear_recompute(x.reshape(-1, x.shape[-1]), norm_weight, norm_bias, weight, bias, eps)
    return out.reshape(*x.shape[:-1], weight.shape[0])
