"""`blockwise` backends of mba_pool and infonce_loss: torch GEMMs in blocks, bounded memory.

mba_pool: mean pooling commutes with every linear layer, so an MLP head pools its hidden
activations ([B, H]) and applies the second layer to the pooled rows, and a linear head (one
layer, or activation "none") pools the tokens first. The [rows, L, H] activations exist for
one block of batch rows at a time: when the whole batch exceeds _BLOCK_ELEMENTS, each block
runs under activation checkpointing (recomputed in backward). Max pooling and per-token
normalisation need each token's output row: blocks of the reference, checkpointed alike.

infonce_loss: the [B, B] logits are never stored. The forward keeps the per-row
log-sum-exp (float32, float64 for float64); the backward recomputes the logits block by block (_BLOCK_ELEMENTS
per block) and multiplies the softmax gradient by the other side's embeddings: peak memory
O(B * block). Registered as torch.library ops `mcr_kernels::infonce_blocks(_backward)`.
A scalar logit_bias shifts every logit equally; softmax cross-entropy ignores it.
"""
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from mcr_kernels import reference

_BLOCK_ELEMENTS = 1 << 20  # float32 elements of one block's activations or logits (4 MiB)


# --- mba_pool -----------------------------------------------------------------------------

def mba_pool(tokens, mask, weight1, bias1, weight2=None, bias2=None, *, activation="gelu",
             pool="mean", normalize_tokens=False):
    """`blockwise` backend of mcr_kernels.mba_pool (same arguments and result)."""
    B, L, _ = tokens.shape
    if mask is None:
        mask = torch.ones(B, L, dtype=torch.bool, device=tokens.device)
    else:  # masked tokens are ignored, NaN or not (a zero weight times NaN is NaN)
        tokens = torch.where(mask[..., None], tokens, 0)
    if pool != "mean" or normalize_tokens:
        def pool_rows(x, m):
            return reference.mba_pool(x, m, weight1, bias1, weight2, bias2, activation=activation,
                                      pool=pool, normalize_tokens=normalize_tokens)
        return _in_blocks(pool_rows, tokens, mask, weight1.shape[0])
    nonempty = mask.any(dim=1, keepdim=True)
    weights = (mask.to(tokens.dtype) / mask.sum(dim=1, keepdim=True).clamp(min=1)).unsqueeze(-1)
    if weight2 is None or activation == "none":  # linear head: pool, then project
        pooled = F.linear((tokens * weights).sum(dim=1), weight1, bias1)
        if weight2 is not None:
            pooled = F.linear(pooled, weight2, bias2)
        return pooled * nonempty
    act = reference.ACTIVATIONS[activation]

    def pool_hidden(x, w):
        return (act(F.linear(x, weight1, bias1)) * w).sum(dim=1)

    pooled_hidden = _in_blocks(pool_hidden, tokens, weights, weight1.shape[0])
    return F.linear(pooled_hidden, weight2, bias2) * nonempty


def _in_blocks(fn, tokens, per_token, width):
    """fn(tokens, per_token) -> [B, ...], run on blocks of batch rows whose [rows, L, width]
    activations hold at most _BLOCK_ELEMENTS; checkpointed when there is more than one."""
    B, L, _ = tokens.shape
    rows = max(1, _BLOCK_ELEMENTS // max(1, L * width))
    if rows >= B:
        return fn(tokens, per_token)
    return torch.cat([checkpoint(fn, tokens[i:i + rows], per_token[i:i + rows], use_reentrant=False)
                      for i in range(0, B, rows)])


# --- infonce_loss -------------------------------------------------------------------------

def _row_blocks(num_rows, num_cols):
    step = max(1, _BLOCK_ELEMENTS // max(1, num_cols))
    return range(0, num_rows, step), step


def _row_lse(rows, cols, scale):
    """[M] in rows' dtype: log-sum-exp over j of scale * rows[i] · cols[j], a block of rows at a time."""
    starts, step = _row_blocks(rows.shape[0], cols.shape[0])
    return torch.cat([torch.logsumexp(scale * (rows[i:i + step] @ cols.T), dim=1) for i in starts])


def _direction_grads(rows, cols, scale, lse, offset, coef):
    """Gradients wrt rows, cols and scale of coef * sum_i CE(scale * rows[i] colsᵀ, i + offset)."""
    d_rows, d_cols = torch.empty_like(rows), torch.zeros_like(cols)
    d_scale = rows.new_zeros(())
    starts, step = _row_blocks(rows.shape[0], cols.shape[0])
    for i in starts:
        block = rows[i:i + step]
        dots = block @ cols.T
        grad_logits = torch.exp(scale * dots - lse[i:i + step, None])
        index = torch.arange(i, i + block.shape[0], device=rows.device)
        grad_logits[index - i, index + offset] -= 1.0
        grad_logits *= coef
        d_scale += (grad_logits * dots).sum()
        d_rows[i:i + step] = scale * (grad_logits @ cols)
        d_cols += scale * (grad_logits.T @ block)
    return d_rows, d_cols, d_scale


@torch.library.custom_op("mcr_kernels::infonce_blocks", mutates_args=())
def infonce_blocks(image_rows: torch.Tensor, text_rows: torch.Tensor, image_cols: torch.Tensor,
                   text_cols: torch.Tensor, scale: torch.Tensor,
                   offset: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Symmetric InfoNCE, rows [M, E] against columns [N, E] (float32 or float64, normalised),
    scale a scalar of their dtype; row i's positive is column i + offset. Returns (loss, image->text LSE [M],
    text->image LSE [M])."""
    M = image_rows.shape[0]
    lse_img = _row_lse(image_rows, text_cols, scale)
    lse_txt = _row_lse(text_rows, image_cols, scale)
    target_img = scale * (image_rows * text_cols[offset:offset + M]).sum(1)
    target_txt = scale * (text_rows * image_cols[offset:offset + M]).sum(1)
    loss = ((lse_img - target_img).mean() + (lse_txt - target_txt).mean()) / 2
    return loss, lse_img, lse_txt


@infonce_blocks.register_fake
def _(image_rows, text_rows, image_cols, text_cols, scale, offset):
    M = image_rows.shape[0]
    return image_rows.new_empty(()), image_rows.new_empty(M), image_rows.new_empty(M)


@torch.library.custom_op("mcr_kernels::infonce_blocks_backward", mutates_args=())
def infonce_blocks_backward(grad: torch.Tensor, image_rows: torch.Tensor, text_rows: torch.Tensor,
                            image_cols: torch.Tensor, text_cols: torch.Tensor, scale: torch.Tensor,
                            lse_img: torch.Tensor, lse_txt: torch.Tensor, offset: int
                            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                       torch.Tensor]:
    """Gradients of infonce_blocks' loss wrt its four embedding inputs and scale."""
    coef = grad * (0.5 / image_rows.shape[0])
    d_img_rows, d_txt_cols, d_scale_i = _direction_grads(image_rows, text_cols, scale, lse_img, offset, coef)
    d_txt_rows, d_img_cols, d_scale_t = _direction_grads(text_rows, image_cols, scale, lse_txt, offset, coef)
    return d_img_rows, d_txt_rows, d_img_cols, d_txt_cols, d_scale_i + d_scale_t


@infonce_blocks_backward.register_fake
def _(grad, image_rows, text_rows, image_cols, text_cols, scale, lse_img, lse_txt, offset):
    return (torch.empty_like(image_rows), torch.empty_like(text_rows), torch.empty_like(image_cols),
            torch.empty_like(text_cols), image_rows.new_empty(()))


def _setup(ctx, inputs, output):
    *embeddings, scale, ctx.offset = inputs
    ctx.save_for_backward(*embeddings, scale, output[1], output[2])


def _backward(ctx, grad, _grad_lse_img, _grad_lse_txt):
    return (*infonce_blocks_backward(grad, *ctx.saved_tensors, ctx.offset), None)


infonce_blocks.register_autograd(_backward, setup_context=_setup)


def infonce_loss(image_emb, text_emb, logit_scale, *, logit_bias=None, normalize=True, gather=False,
                 local_loss=True):
    """`blockwise` backend of mcr_kernels.infonce_loss (same arguments; a float32 scalar, float64
    for float64 embeddings)."""
    dtype = torch.promote_types(image_emb.dtype, torch.float32)
    img, txt = image_emb.to(dtype), text_emb.to(dtype)
    if normalize:
        img, txt = F.normalize(img, dim=-1), F.normalize(txt, dim=-1)
    scale = logit_scale.to(dtype).reshape(())
    if gather:
        import torch.distributed as dist

        all_img, all_txt = reference.gather_features(img, txt)
        if local_loss:
            loss = infonce_blocks(img, txt, all_img, all_txt, scale, img.shape[0] * dist.get_rank())[0]
        else:
            loss = infonce_blocks(all_img, all_txt, all_img, all_txt, scale, 0)[0]
    else:
        loss = infonce_blocks(img, txt, img, txt, scale, 0)[0]
    if logit_bias is not None:  # softmax is shift invariant: the loss ignores a scalar bias
        loss = loss + 0.0 * logit_bias.to(dtype).sum()
    return loss
