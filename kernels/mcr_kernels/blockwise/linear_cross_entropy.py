"""`blockwise` backend of linear_cross_entropy (any device): the chunk loops of
mcr_kernels/_chunked_cross_entropy.py with each chunk's rows in torch ops."""
import torch

from mcr_kernels._chunked_cross_entropy import chunked_backward, chunked_forward, register


def ce_rows_torch(logits, labels, ignore_index):
    """(per-row CE float32 [c] (0 for ignored rows), per-row log-sum-exp [c]) of logits [c, V]."""
    valid = labels != ignore_index
    lse = torch.logsumexp(logits, dim=1)
    target = logits.gather(1, torch.where(valid, labels, 0)[:, None]).squeeze(1)
    return (lse - target) * valid, lse


def ce_grad_rows_torch(logits, labels, lse, ignore_index, scale):
    """Overwrite logits [c, V] float32 with scale * d CE / d logits (0 on ignored rows)."""
    valid = labels != ignore_index
    logits.sub_(lse[:, None]).exp_()
    logits.scatter_add_(1, torch.where(valid, labels, 0)[:, None], -valid.to(logits.dtype)[:, None])
    logits.mul_((valid * scale)[:, None])


@torch.library.custom_op("mcr_kernels::linear_cross_entropy_chunked", mutates_args=())
def linear_cross_entropy_chunked(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                                 labels: torch.Tensor, ignore_index: int,
                                 mean: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, per-row log-sum-exp) of the chunked linear cross-entropy (torch ops)."""
    return chunked_forward(hidden, weight, bias, labels, ignore_index, mean, ce_rows_torch)


@torch.library.custom_op("mcr_kernels::linear_cross_entropy_chunked_backward", mutates_args=())
def linear_cross_entropy_chunked_backward(grad: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor,
                                          bias: torch.Tensor | None, labels: torch.Tensor, lse: torch.Tensor,
                                          ignore_index: int,
                                          mean: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(d hidden, d weight, d bias) of the chunked linear cross-entropy (torch ops)."""
    return chunked_backward(grad, hidden, weight, bias, labels, lse, ignore_index, mean, ce_grad_rows_torch)


register(linear_cross_entropy_chunked, linear_cross_entropy_chunked_backward)


def linear_cross_entropy(hidden, weight, bias, labels, *, ignore_index=-100, reduction="mean"):
    """`blockwise` backend of mcr_kernels.linear_cross_entropy (same arguments, float32 scalar)."""
    return linear_cross_entropy_chunked(hidden, weight, bias, labels, ignore_index, reduction == "mean")[0]
