"""The chunk loops of the fused linear + cross-entropy, shared by its `blockwise` backend
(rows in torch ops) and its `triton` backend (rows in Triton kernels).

Only one chunk of rows' logits [rows, V] (float32) exists at a time. The forward pass keeps
each row's log-sum-exp and nothing else; the backward pass recomputes the chunk's logits
(one more GEMM than Liger-Kernel's gradient-in-forward design, which holds d W [V, D] from
forward to backward and outweighs the logits it saves when rows < D):
    forward:   logits = hidden[c] Wᵀ + b ;  lse[c] = logsumexp(logits) ;  loss += CE(logits, labels[c])
    backward:  logits = hidden[c] Wᵀ + b ;  g = (exp(logits - lse[c]) - onehot) * scale * grad
               d hidden[c] = g W ;  d W += gᵀ hidden[c] ;  d b += Σ g
d W and d b accumulate in float32.
"""
import math

import torch

_MIN_CHUNK_ELEMENTS = 1 << 21  # logits per chunk at least (8 MiB float32): GEMMs long enough to reuse W


def chunk_rows(num_rows, vocab, width):
    """Rows per chunk: about num_rows * width logits per chunk (Liger: the chunk's logits as
    large as the hidden rows), at least _MIN_CHUNK_ELEMENTS, at most every row."""
    liger = math.ceil(num_rows / math.ceil(vocab / max(1, width)))
    return max(1, min(num_rows, max(liger, _MIN_CHUNK_ELEMENTS // vocab)))


def counted_rows(h, labels, ignore_index):
    """h [c, D] with the rows of ignored labels zeroed: they enter neither the loss nor a
    gradient, whatever they hold (0 · NaN would be NaN)."""
    return torch.where((labels != ignore_index)[:, None], h, 0)


def chunk_logits(h, weight, bias):
    logits = (h @ weight.T).float()
    if bias is not None:
        logits += bias.float()
    return logits


def loss_scale(labels, ignore_index, mean):
    """1 / (non-ignored rows) for "mean", 1 for "sum" (a float32 0-dim tensor)."""
    if mean:
        return 1.0 / (labels != ignore_index).sum().clamp(min=1).float()
    return torch.ones((), dtype=torch.float32, device=labels.device)


def chunked_forward(hidden, weight, bias, labels, ignore_index, mean, ce_rows):
    """(loss float32 scalar, lse float32 [N]): sum (or mean over the non-ignored rows) of
    CE(hidden Wᵀ + b, labels), and each row's log-sum-exp for the backward pass."""
    N, D = hidden.shape
    lse = torch.empty(N, dtype=torch.float32, device=hidden.device)
    loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
    rows = chunk_rows(N, weight.shape[0], D)
    for start in range(0, N, rows):
        chunk_labels = labels[start:start + rows]
        h = counted_rows(hidden[start:start + rows], chunk_labels, ignore_index)
        row_loss, lse[start:start + rows] = ce_rows(chunk_logits(h, weight, bias), chunk_labels, ignore_index)
        loss += row_loss.sum()
    return loss * loss_scale(labels, ignore_index, mean), lse


def chunked_backward(grad, hidden, weight, bias, labels, lse, ignore_index, mean, ce_grad_rows):
    """(d hidden, d weight, d bias) of grad * chunked_forward's loss; d bias is empty without bias."""
    N, D = hidden.shape
    V = weight.shape[0]
    scale = grad.float() * loss_scale(labels, ignore_index, mean)
    d_hidden = torch.empty_like(hidden)
    d_weight = torch.zeros(V, D, dtype=torch.float32, device=hidden.device)
    d_bias = torch.zeros(V, dtype=torch.float32, device=hidden.device) if bias is not None else hidden.new_empty(0)
    rows = chunk_rows(N, V, D)
    for start in range(0, N, rows):
        h = counted_rows(hidden[start:start + rows], labels[start:start + rows], ignore_index)
        logits = chunk_logits(h, weight, bias)
        ce_grad_rows(logits, labels[start:start + rows], lse[start:start + rows], ignore_index, scale)
        d_hidden[start:start + rows] = logits.to(weight.dtype) @ weight
        d_weight.addmm_(logits.T, h.float())
        if bias is not None:
            d_bias += logits.sum(0)
    return d_hidden, d_weight.to(weight.dtype), d_bias.to(bias.dtype) if bias is not None else d_bias


def fake_forward(hidden, weight, bias, labels, ignore_index, mean):
    return hidden.new_empty((), dtype=torch.float32), hidden.new_empty(hidden.shape[0], dtype=torch.float32)


def fake_backward(grad, hidden, weight, bias, labels, lse, ignore_index, mean):
    return (torch.empty_like(hidden), torch.empty_like(weight),
            torch.empty_like(bias) if bias is not None else hidden.new_empty(0))


def register(forward_op, backward_op):
    """Fakes of a chunked forward / backward op pair, and the forward's autograd through the backward op."""
    forward_op.register_fake(fake_forward)
    backward_op.register_fake(fake_backward)

    def setup_context(ctx, inputs, output):
        hidden, weight, bias, labels, ignore_index, mean = inputs
        ctx.save_for_backward(hidden, weight, bias, labels, output[1])
        ctx.ignore_index, ctx.mean = ignore_index, mean

    def backward(ctx, grad, _grad_lse):
        hidden, weight, bias, labels, lse = ctx.saved_tensors
        d_hidden, d_weight, d_bias = backward_op(grad, hidden, weight, bias, labels, lse, ctx.ignore_index, ctx.mean)
        return d_hidden, d_weight, d_bias if bias is not None else None, None, None, None

    forward_op.register_autograd(backward, setup_context=setup_context)
