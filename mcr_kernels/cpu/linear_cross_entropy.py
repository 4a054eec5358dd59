"""Chunked fused linear + cross-entropy: the `cpu` backend of linear_cross_entropy (any
device) and the chunk loop the Triton backend shares.

Liger-Kernel's design: the gradient is computed in the forward pass, chunk of rows by chunk
of rows, so that only one chunk's logits [rows, V] (float32) exist at a time:
    logits = hidden[chunk] Wᵀ + b                  (float32)
    loss  += CE(logits, labels[chunk])              (ce_rows, which also overwrites logits with
                                                     d loss / d logits)
    d hidden[chunk] = d logits W ;  d W += d logitsᵀ hidden[chunk] ;  d b += Σ d logits
The backward pass only scales the stored gradients by the incoming gradient. Without grad
mode (evaluation) the gradients are skipped. d W and d b accumulate in float32.
"""
import math

import torch

_MIN_CHUNK_ELEMENTS = 1 << 21  # logits per chunk at least (8 MiB float32): GEMMs long enough to reuse W


def chunk_rows(num_rows, vocab, width):
    """Rows per chunk: about num_rows * width logits per chunk (Liger: the chunk's logits as
    large as the hidden rows), at least _MIN_CHUNK_ELEMENTS, at most every row."""
    liger = math.ceil(num_rows / math.ceil(vocab / max(1, width)))
    return max(1, min(num_rows, max(liger, _MIN_CHUNK_ELEMENTS // vocab)))


def ce_rows_torch(logits, labels, ignore_index, scale, compute_grads):
    """Sum over the rows of scale * CE(logits [c, V] float32, labels [c]) (ignored rows count 0);
    with compute_grads, logits is overwritten by the gradient of that sum."""
    valid = labels != ignore_index
    target = torch.where(valid, labels, 0)
    lse = torch.logsumexp(logits, dim=1)
    loss = ((lse - logits.gather(1, target[:, None]).squeeze(1)) * valid).sum() * scale
    if compute_grads:
        logits.sub_(lse[:, None]).exp_()
        logits.scatter_add_(1, target[:, None], -valid.to(logits.dtype)[:, None])
        logits.mul_((valid * scale)[:, None])
    return loss


def chunked_forward(hidden, weight, bias, labels, ignore_index, mean, compute_grads, ce_rows):
    """(loss float32 scalar, d hidden, d weight, d bias) of sum (or mean over the non-ignored
    rows) of CE(hidden Wᵀ + b, labels); the gradients are empty tensors without compute_grads
    (d bias also without bias)."""
    N, D = hidden.shape
    V = weight.shape[0]
    valid_count = (labels != ignore_index).sum()
    scale = 1.0 / valid_count.clamp(min=1).float() if mean else torch.ones((), device=hidden.device)
    loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
    d_hidden = torch.empty_like(hidden) if compute_grads else hidden.new_empty(0)
    d_weight = torch.zeros(V, D, dtype=torch.float32, device=hidden.device) if compute_grads \
        else hidden.new_empty(0)
    d_bias = torch.zeros(V, dtype=torch.float32, device=hidden.device) if compute_grads and bias is not None \
        else hidden.new_empty(0)
    rows = chunk_rows(N, V, D)
    for start in range(0, N, rows):
        h = hidden[start:start + rows]
        logits = (h @ weight.T).float()
        if bias is not None:
            logits += bias.float()
        loss += ce_rows(logits, labels[start:start + rows], ignore_index, scale, compute_grads)
        if compute_grads:  # logits now holds d loss / d logits
            d_hidden[start:start + rows] = logits.to(weight.dtype) @ weight
            d_weight.addmm_(logits.T, h.float())
            if bias is not None:
                d_bias += logits.sum(0)
    if compute_grads:
        d_weight = d_weight.to(weight.dtype)
        d_bias = d_bias.to(bias.dtype) if bias is not None else d_bias
    return loss, d_hidden, d_weight, d_bias


def fake_forward(hidden, weight, bias, labels, ignore_index, mean, compute_grads):
    """Output shapes of chunked_forward (the custom ops' register_fake)."""
    loss = hidden.new_empty((), dtype=torch.float32)
    if not compute_grads:
        return loss, hidden.new_empty(0), hidden.new_empty(0), hidden.new_empty(0)
    return (loss, torch.empty_like(hidden), torch.empty_like(weight),
            torch.empty_like(bias) if bias is not None else hidden.new_empty(0))


def register_autograd(op):
    """The backward of a chunked op: its stored gradients times the incoming gradient."""
    def setup_context(ctx, inputs, output):
        hidden, weight, bias = inputs[:3]
        ctx.has_bias = bias is not None
        ctx.save_for_backward(*output[1:])

    def backward(ctx, grad, *_):
        d_hidden, d_weight, d_bias = ctx.saved_tensors
        return grad * d_hidden, grad * d_weight, grad * d_bias if ctx.has_bias else None, None, None, None, None

    op.register_autograd(backward, setup_context=setup_context)


@torch.library.custom_op("mcr_kernels::linear_cross_entropy_chunked", mutates_args=())
def linear_cross_entropy_chunked(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                                 labels: torch.Tensor, ignore_index: int, mean: bool,
                                 compute_grads: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                               torch.Tensor]:
    """(loss, d hidden, d weight, d bias) of the chunked linear cross-entropy (torch ops)."""
    return chunked_forward(hidden, weight, bias, labels, ignore_index, mean, compute_grads, ce_rows_torch)


linear_cross_entropy_chunked.register_fake(fake_forward)
register_autograd(linear_cross_entropy_chunked)


def linear_cross_entropy(hidden, weight, bias, labels, *, ignore_index=-100, reduction="mean"):
    """`cpu` backend of mcr_kernels.linear_cross_entropy (same arguments, float32 scalar)."""
    return run(linear_cross_entropy_chunked, hidden, weight, bias, labels, ignore_index, reduction)


def run(op, hidden, weight, bias, labels, ignore_index, reduction):
    """Call a chunked op, computing gradients only when autograd will ask for them."""
    compute_grads = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (hidden, weight, bias))
    return op(hidden, weight, bias, labels, ignore_index, reduction == "mean", compute_grads)[0]
