"""The `cpu` backend of gelu_mlp (plain torch ops, any device): the transformer MLP
fc2(gelu(fc1(x))) whose backward recomputes the activation instead of keeping it.

Autograd through F.linear / F.gelu / F.linear keeps x, h = fc1(x) and a = gelu(h) from
forward to backward; this op keeps x and h only (a is [N, hidden], as large as h):
    forward:   h = x W1ᵀ + b1 ;  y = gelu(h) W2ᵀ + b2                        (saves x, h)
    backward:  a = gelu(h) ;  d W2 = gᵀ a ;  d b2 = Σ g ;  d h = gelu'(h) ⊙ (g W2)
               d W1 = d hᵀ x ;  d b1 = Σ d h ;  d x = d h W1
The recomputed a equals the forward's bit for bit (same op, same input), so the gradients
are autograd's up to summation order.
"""
import torch
import torch.nn.functional as F


@torch.library.custom_op("mcr_kernels::gelu_mlp_recompute", mutates_args=())
def gelu_mlp_recompute(x: torch.Tensor, fc1_weight: torch.Tensor, fc1_bias: torch.Tensor | None,
                       fc2_weight: torch.Tensor, fc2_bias: torch.Tensor | None,
                       approximate: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(y [N, D_out], h [N, hidden]) of x [N, D]; h is what backward needs."""
    h = F.linear(x, fc1_weight, fc1_bias)
    return F.linear(F.gelu(h, approximate=approximate), fc2_weight, fc2_bias), h


@gelu_mlp_recompute.register_fake
def _(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, approximate):
    return x.new_empty(x.shape[0], fc2_weight.shape[0]), x.new_empty(x.shape[0], fc1_weight.shape[0])


def _setup_context(ctx, inputs, output):
    x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, approximate = inputs
    ctx.save_for_backward(x, fc1_weight, fc2_weight, output[1])
    ctx.approximate = approximate
    ctx.has_bias = fc1_bias is not None, fc2_bias is not None


def _backward(ctx, grad, _grad_h):
    x, fc1_weight, fc2_weight, h = ctx.saved_tensors
    has_b1, has_b2 = ctx.has_bias
    a = F.gelu(h, approximate=ctx.approximate)
    d_fc2_weight = grad.T @ a
    d_h = torch.ops.aten.gelu_backward(grad @ fc2_weight, h, approximate=ctx.approximate)
    del a
    return (d_h @ fc1_weight, d_h.T @ x, d_h.sum(0) if has_b1 else None,
            d_fc2_weight, grad.sum(0) if has_b2 else None, None)


gelu_mlp_recompute.register_autograd(_backward, setup_context=_setup_context)


def gelu_mlp(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, *, approximate="none"):
    """`cpu` backend of mcr_kernels.gelu_mlp (same arguments)."""
    y, _ = gelu_mlp_recompute(x.reshape(-1, x.shape[-1]), fc1_weight, fc1_bias, fc2_weight, fc2_bias, approximate)
    return y.reshape(*x.shape[:-1], fc2_weight.shape[0])
