"""`native` backend of the patch-drop ops: the C++/CUDA kernels of mcr_kernels._C (csrc/) as
torch custom ops, with fakes and autograd (mcr_kernels/_patch_drop_grads.py)."""
import torch

from mcr_kernels._patch_drop_grads import fake_restore_backward, register_gather_autograd, register_restore_autograd
from mcr_kernels.native import _C


@torch.library.custom_op("mcr_kernels::gather_tokens_native", mutates_args=())
def gather_tokens(x: torch.Tensor, ids_keep: torch.Tensor) -> torch.Tensor:
    if x.is_cuda:
        return _C.gather_tokens_cuda(x, ids_keep)
    return _C.gather_tokens_cpu(x, ids_keep)


@gather_tokens.register_fake
def _(x, ids_keep):
    return x.new_empty(x.shape[0], ids_keep.shape[1], x.shape[2])


@torch.library.custom_op("mcr_kernels::scatter_tokens_native", mutates_args=())
def _scatter_tokens(grad: torch.Tensor, ids_keep: torch.Tensor, num_tokens: int) -> torch.Tensor:
    if grad.is_cuda:
        return _C.scatter_tokens_cuda(grad, ids_keep, num_tokens)
    return _C.scatter_tokens_cpu(grad, ids_keep, num_tokens)


@_scatter_tokens.register_fake
def _(grad, ids_keep, num_tokens):
    return grad.new_empty(grad.shape[0], num_tokens, grad.shape[2])


register_gather_autograd(gather_tokens, _scatter_tokens)  # the C++ side makes inputs contiguous


@torch.library.custom_op("mcr_kernels::restore_tokens_native", mutates_args=())
def restore_tokens(x_kept: torch.Tensor, ids_restore: torch.Tensor, mask_token: torch.Tensor) -> torch.Tensor:
    if x_kept.is_cuda:
        return _C.restore_tokens_cuda(x_kept, ids_restore, mask_token)
    return _C.restore_tokens_cpu(x_kept, ids_restore, mask_token)


@restore_tokens.register_fake
def _(x_kept, ids_restore, mask_token):
    return x_kept.new_empty(x_kept.shape[0], ids_restore.shape[1], x_kept.shape[2])


@torch.library.custom_op("mcr_kernels::restore_tokens_backward_native", mutates_args=())
def _restore_tokens_backward(grad: torch.Tensor, ids_restore: torch.Tensor,
                             num_keep: int) -> tuple[torch.Tensor, torch.Tensor]:
    if grad.is_cuda:
        return _C.restore_tokens_backward_cuda(grad, ids_restore, num_keep)
    return _C.restore_tokens_backward_cpu(grad, ids_restore, num_keep)


_restore_tokens_backward.register_fake(fake_restore_backward)


register_restore_autograd(restore_tokens, _restore_tokens_backward)
