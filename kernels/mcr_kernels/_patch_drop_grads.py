"""The autograd rules of the patch-drop ops, one copy for every backend (native, Triton).

gather_tokens' backward is the scatter-add of the gathered rows into a zero [B, N, D];
restore_tokens' backward gives the kept rows their own slots' gradients and the mask token
the sum over every masked slot. Each backend registers its own kernels through these.
"""
import torch


def mask_grad_dtype(dtype):
    """dtype of the mask token's gradient sum: float64 for float64 grads, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def fake_restore_backward(grad, ids_restore, num_keep):
    """Output shapes of a restore backward (its register_fake)."""
    return (grad.new_empty(grad.shape[0], num_keep, grad.shape[2]),
            grad.new_empty(grad.shape[2], dtype=mask_grad_dtype(grad.dtype)))


def register_gather_autograd(gather, scatter):
    """gather(x [B, N, D], ids_keep [B, K]) gets the backward scatter(grad, ids_keep, N)."""

    def setup_context(ctx, inputs, output):
        x, ids_keep = inputs
        ctx.save_for_backward(ids_keep)
        ctx.num_tokens = x.shape[1]

    def backward(ctx, grad):
        (ids_keep,) = ctx.saved_tensors
        return scatter(grad, ids_keep, ctx.num_tokens), None

    gather.register_autograd(backward, setup_context=setup_context)


def register_restore_autograd(restore, restore_backward):
    """restore(x_kept [B, K, D], ids_restore [B, N], mask_token [D]) gets the backward
    restore_backward(grad, ids_restore, K) -> (grad_x_kept, grad_mask_token in mask_grad_dtype)."""

    def setup_context(ctx, inputs, output):
        x_kept, ids_restore, mask_token = inputs
        ctx.save_for_backward(ids_restore)
        ctx.num_keep = x_kept.shape[1]
        ctx.mask_dtype = mask_token.dtype

    def backward(ctx, grad):
        (ids_restore,) = ctx.saved_tensors
        grad_x, grad_mask = restore_backward(grad, ids_restore, ctx.num_keep)
        return grad_x, None, grad_mask.to(ctx.mask_dtype)

    restore.register_autograd(backward, setup_context=setup_context)
