"""The `cpu` backend of gelu_mlp (plain torch ops, any device): the transformer MLP
fc2(gelu(fc1(z))) whose backward recomputes the activation instead of keeping it; z = x, or
z = LayerNorm(x) (the pre-norm form), recomputed as well.

Autograd through F.linear / F.gelu / F.linear keeps z, h = fc1(z) and a = gelu(h) from
forward to backward (and x for the norm); this op keeps x and h only (a is [N, hidden], as
large as h):
    forward:   h = z W1ᵀ + b1 ;  y = gelu(h) W2ᵀ + b2                        (saves x, h)
    backward:  a = gelu(h) ;  d W2 = gᵀ a ;  d b2 = Σ g ;  d h = gelu'(h) ⊙ (g W2)
               d W1 = d hᵀ z ;  d b1 = Σ d h ;  d z = d h W1 ;  d x = LayerNorm's backward(d z)
The recomputed a (and z) equal the forward's bit for bit (same op, same input), so the
gradients are autograd's up to summation order.
"""
import torch
import torch.nn.functional as F

from mcr_kernels.blockwise.layer_norm_linear import normalize, normalize_backward


@torch.library.custom_op("mcr_kernels::gelu_mlp_recompute", mutates_args=())
def gelu_mlp_recompute(x: torch.Tensor, fc1_weight: torch.Tensor, fc1_bias: torch.Tensor | None,
                       fc2_weight: torch.Tensor, fc2_bias: torch.Tensor | None, approximate: str,
                       norm_weight: torch.Tensor | None = None, norm_bias: torch.Tensor | None = None,
                       norm_eps: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(y [N, D_out], h [N, hidden]) of x [N, D]; h is what backward needs."""
    z = x if norm_eps is None else normalize(x, norm_weight, norm_bias, norm_eps, fc1_weight.dtype)[0]
    h = F.linear(z, fc1_weight, fc1_bias)
    return F.linear(F.gelu(h, approximate=approximate), fc2_weight, fc2_bias), h


@gelu_mlp_recompute.register_fake
def _(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, approximate, norm_weight=None, norm_bias=None,
      norm_eps=None):
    N, dtype = x.shape[0], fc1_weight.dtype
    return x.new_empty(N, fc2_weight.shape[0], dtype=dtype), x.new_empty(N, fc1_weight.shape[0], dtype=dtype)


def _setup_context(ctx, inputs, output):
    x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, approximate, norm_weight, norm_bias, norm_eps = inputs
    ctx.save_for_backward(x, fc1_weight, fc2_weight, output[1], norm_weight, norm_bias)
    ctx.approximate, ctx.norm_eps = approximate, norm_eps
    ctx.has_bias = fc1_bias is not None, fc2_bias is not None


def _backward(ctx, grad, _grad_h):
    x, fc1_weight, fc2_weight, h, norm_weight, norm_bias = ctx.saved_tensors
    has_b1, has_b2 = ctx.has_bias
    a = F.gelu(h, approximate=ctx.approximate)
    d_fc2_weight = grad.T @ a
    d_h = torch.ops.aten.gelu_backward(grad @ fc2_weight, h, approximate=ctx.approximate)
    del a
    d_z = d_h @ fc1_weight
    if ctx.norm_eps is None:
        d_fc1_weight, d_x, d_norm_weight, d_norm_bias = d_h.T @ x, d_z, None, None
    else:
        z, mean, rstd = normalize(x, norm_weight, norm_bias, ctx.norm_eps, fc1_weight.dtype)
        d_fc1_weight = d_h.T @ z
        del z
        d_x, d_norm_weight, d_norm_bias = normalize_backward(d_z, x, mean, rstd, norm_weight, norm_bias)
    return (d_x, d_fc1_weight, d_h.sum(0) if has_b1 else None, d_fc2_weight, grad.sum(0) if has_b2 else None,
            None, d_norm_weight, d_norm_bias, None)


gelu_mlp_recompute.register_autograd(_backward, setup_context=_setup_context)


def gelu_mlp(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, *, approximate="none", norm_weight=None,
             norm_bias=None, norm_eps=None):
    """`blockwise` backend of mcr_kernels.gelu_mlp (same arguments)."""
    y, _ = gelu_mlp_recompute(x.reshape(-1, x.shape[-1]), fc1_weight, fc1_bias, fc2_weight, fc2_bias, approximate,
                              norm_weight, norm_bias, norm_eps)
    return y.reshape(*x.shape[:-1], fc2_weight.shape[0])
