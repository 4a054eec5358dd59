"""Triton kernels for patch dropping: keep/restore indices, token gather, MAE restore.

Every data kernel runs one program per (output row, block of D) and reads its inputs
through their strides, so views such as x[:, 1:] cost no copy. Backward passes never use
atomics: the indices are sorted once per call (a small int64 sort), each output row then
sums its own contiguous segment of incoming rows in float32 and is written exactly once
(no zero fill, deterministic, repeated indices add up).

The ops are registered with torch.library (custom_op + register_autograd + register_fake),
so they work under torch.compile(fullgraph=True) and pass torch.library.opcheck. Public
entry points (with validation) are in mcr_kernels.patch_drop; docs in docs/patch_drop.md.
"""
import os

import torch
import triton
import triton.language as tl

from mcr_kernels._patch_drop_grads import (
    fake_restore_backward,
    mask_grad_dtype,
    register_gather_autograd,
    register_restore_autograd,
)

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

# A copy is memory bound: one 16-byte vector per thread per step; the configs cover one
# to four vectors per thread for 2-byte dtypes. Under the interpreter: one small block,
# no benchmarking, so that CPU tests stay fast and still see several D-blocks per row.
_CONFIGS = ([triton.Config({"BLOCK_D": 64}, num_warps=1)] if INTERPRET else [
    triton.Config({"BLOCK_D": 128}, num_warps=1),
    triton.Config({"BLOCK_D": 256}, num_warps=1),
    triton.Config({"BLOCK_D": 256}, num_warps=2),
    triton.Config({"BLOCK_D": 512}, num_warps=2),
    triton.Config({"BLOCK_D": 512}, num_warps=4),
    triton.Config({"BLOCK_D": 1024}, num_warps=4),
    triton.Config({"BLOCK_D": 1024}, num_warps=8),
])


@triton.autotune(_CONFIGS, key=["D"])
@triton.jit
def _gather_rows_kernel(src_ptr, ids_ptr, out_ptr, K, D,
                        stride_sb, stride_sn, stride_sd, stride_ib, stride_ik,
                        BLOCK_D: tl.constexpr):
    """out[b, j, :] = src[b, ids[b, j], :]; program (b * K + j, d-block); out contiguous."""
    row = tl.program_id(0).to(tl.int64)
    b = row // K
    j = row % K
    idx = tl.load(ids_ptr + b * stride_ib + j * stride_ik)
    offs = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    in_d = offs < D
    vals = tl.load(src_ptr + b * stride_sb + idx * stride_sn + offs * stride_sd, mask=in_d)
    tl.store(out_ptr + row * D + offs, vals, mask=in_d)


@triton.autotune(_CONFIGS, key=["D"])
@triton.jit
def _restore_rows_kernel(x_ptr, ids_ptr, fill_ptr, out_ptr, N, K, D,
                         stride_xb, stride_xk, stride_xd, stride_ib, stride_in, stride_fd,
                         BLOCK_D: tl.constexpr):
    """out[b, n, :] = x[b, ids[b, n], :] if ids[b, n] < K else fill[:]; program (b * N + n, d-block)."""
    row = tl.program_id(0).to(tl.int64)
    b = row // N
    n = row % N
    idx = tl.load(ids_ptr + b * stride_ib + n * stride_in)
    kept = idx < K
    offs = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    in_d = offs < D
    from_x = tl.load(x_ptr + b * stride_xb + idx * stride_xk + offs * stride_xd, mask=in_d & kept, other=0.0)
    from_fill = tl.load(fill_ptr + offs * stride_fd, mask=in_d & (idx >= K), other=0.0)
    vals = tl.where(kept, from_x, from_fill)
    tl.store(out_ptr + row * D + offs, vals, mask=in_d)


@triton.autotune(_CONFIGS, key=["D", "BLOCK_P"])
@triton.jit
def _segment_sum_kernel(src_ptr, order_ptr, bounds_ptr, out_ptr, L, NB, D, FIRST, COUNT, SPLITS, CHUNK,
                        stride_sb, stride_sl, stride_sd,
                        FP64: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr):
    """Segment sums in float32 (float64 when FP64), one output row per (segment, split), written once.

    Program ((b * COUNT + s) * SPLITS + c, d-block) handles split c of segment r = FIRST + s
    of batch row b: it sums src[b, order[b, p], :] for p in [bounds[b, r], bounds[b, r + 1])
    intersected with [bounds[b, r] + c * CHUNK, + CHUNK) and writes row program_id(0) of
    out (cast to out's dtype). order is [B, L], bounds is [B, NB]; both contiguous.
    BLOCK_P rows are loaded at a time (1 for short segments, more for long ones).
    """
    pid = tl.program_id(0).to(tl.int64)
    segment = pid // SPLITS
    b = segment // COUNT
    r = FIRST + segment % COUNT
    start = tl.load(bounds_ptr + b * NB + r) + (pid % SPLITS) * CHUNK
    end = tl.minimum(tl.load(bounds_ptr + b * NB + r + 1), start + CHUNK)
    offs = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    in_d = offs < D
    if FP64:
        acc = tl.zeros([BLOCK_D], dtype=tl.float64)
    else:
        acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for p0 in range(start, end, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        in_p = p < end
        src_rows = tl.load(order_ptr + b * L + p, mask=in_p, other=0)
        tile = tl.load(src_ptr + b * stride_sb + src_rows[:, None] * stride_sl + offs[None, :] * stride_sd,
                       mask=in_p[:, None] & in_d[None, :], other=0.0)
        acc += tl.sum(tile.to(acc.dtype), axis=0)
    tl.store(out_ptr + pid * D + offs, acc.to(out_ptr.dtype.element_ty), mask=in_d)


@triton.jit
def _keep_restore_kernel(shuffle_ptr, keep_ptr, restore_ptr, N, K, BLOCK_N: tl.constexpr):
    """Row b of ids_shuffle [B, N] -> ids_keep[b] = shuffle[b, :K], ids_restore[b, shuffle[b, j]] = j."""
    b = tl.program_id(0).to(tl.int64)
    for start in range(0, N, BLOCK_N):
        j = start + tl.arange(0, BLOCK_N)
        in_n = j < N
        ids = tl.load(shuffle_ptr + b * N + j, mask=in_n, other=0)
        tl.store(restore_ptr + b * N + ids, j.to(tl.int64), mask=in_n)
        tl.store(keep_ptr + b * K + j, ids, mask=j < K)


_MASK_CHUNK = 16  # masked slots summed per program in the restore backward


def _d_grid(rows, D):
    return lambda meta: (rows, triton.cdiv(D, meta["BLOCK_D"]))


def _segments(ids, num_segments):
    """Sort int64 ids [B, L] (values in [0, num_segments]) into segments.

    Returns order [B, L] (positions sorted by id, stable) and bounds [B, num_segments + 2]
    with segment r = order[b, bounds[b, r]:bounds[b, r + 1]]; the last one ends at L.
    """
    sorted_ids, order = torch.sort(ids, dim=1, stable=True)
    values = torch.arange(num_segments + 2, device=ids.device).expand(ids.shape[0], -1).contiguous()
    return order, torch.searchsorted(sorted_ids, values)


def _segment_sum(src, order, bounds, out, first, count, *, splits=1, chunk=None, block_p=1):
    """Launch _segment_sum_kernel over segments [first, first + count) of every batch row,
    each cut into `splits` chunks of `chunk` positions (default: one chunk per segment)."""
    B, L, D = src.shape[0], order.shape[1], src.shape[2]
    if B * count * splits == 0 or D == 0:
        return
    _segment_sum_kernel[_d_grid(B * count * splits, D)](
        src, order, bounds, out, L, bounds.shape[1], D, first, count, splits, chunk or max(L, 1),
        src.stride(0), src.stride(1), src.stride(2), FP64=src.dtype == torch.float64, BLOCK_P=block_p)


# --- torch ops ------------------------------------------------------------------------

@torch.library.custom_op("mcr_kernels::gather_tokens_triton", mutates_args=())
def gather_tokens(x: torch.Tensor, ids_keep: torch.Tensor) -> torch.Tensor:
    """x [B, N, D] (any strides), ids_keep int64 [B, K] -> [B, K, D] contiguous."""
    B, _, D = x.shape
    K = ids_keep.shape[1]
    out = x.new_empty(B, K, D)
    if out.numel():
        _gather_rows_kernel[_d_grid(B * K, D)](
            x, ids_keep, out, K, D, x.stride(0), x.stride(1), x.stride(2),
            ids_keep.stride(0), ids_keep.stride(1))
    return out


@gather_tokens.register_fake
def _(x, ids_keep):
    return x.new_empty(x.shape[0], ids_keep.shape[1], x.shape[2])


@torch.library.custom_op("mcr_kernels::scatter_tokens_triton", mutates_args=())
def scatter_tokens(grad: torch.Tensor, ids_keep: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """Backward of gather_tokens: grad [B, K, D] -> [B, num_tokens, D], out[b, n] = sum of
    grad[b, j] over j with ids_keep[b, j] == n (zeros where none)."""
    B, K, D = grad.shape
    if K == 0:  # nothing was gathered: no kernel on empty tensors
        return grad.new_zeros(B, num_tokens, D)
    out = grad.new_empty(B, num_tokens, D)
    order, bounds = _segments(ids_keep, num_tokens)
    _segment_sum(grad, order, bounds, out, 0, num_tokens)
    return out


@scatter_tokens.register_fake
def _(grad, ids_keep, num_tokens):
    return grad.new_empty(grad.shape[0], num_tokens, grad.shape[2])


def _scatter_setup_context(ctx, inputs, output):
    ctx.save_for_backward(inputs[1])


def _scatter_backward(ctx, grad):  # scatter is linear: its adjoint is the gather
    (ids_keep,) = ctx.saved_tensors
    return gather_tokens(grad, ids_keep), None, None


register_gather_autograd(gather_tokens, scatter_tokens)
scatter_tokens.register_autograd(_scatter_backward, setup_context=_scatter_setup_context)


@torch.library.custom_op("mcr_kernels::restore_tokens_triton", mutates_args=())
def restore_tokens(x_kept: torch.Tensor, ids_restore: torch.Tensor, mask_token: torch.Tensor) -> torch.Tensor:
    """x_kept [B, K, D], ids_restore int64 [B, N], mask_token [D] -> [B, N, D] in x_kept's dtype."""
    B, K, D = x_kept.shape
    N = ids_restore.shape[1]
    out = x_kept.new_empty(B, N, D)
    fill = mask_token.to(x_kept.dtype)  # D elements; rounds like the reference
    if out.numel():
        _restore_rows_kernel[_d_grid(B * N, D)](
            x_kept if K else fill, ids_restore, fill, out, N, K, D,  # K = 0: x is never read
            x_kept.stride(0), x_kept.stride(1), x_kept.stride(2),
            ids_restore.stride(0), ids_restore.stride(1), fill.stride(0))
    return out


@restore_tokens.register_fake
def _(x_kept, ids_restore, mask_token):
    return x_kept.new_empty(x_kept.shape[0], ids_restore.shape[1], x_kept.shape[2])


@torch.library.custom_op("mcr_kernels::restore_tokens_backward_triton", mutates_args=())
def restore_tokens_backward(grad: torch.Tensor, ids_restore: torch.Tensor,
                            num_keep: int) -> tuple[torch.Tensor, torch.Tensor]:
    """grad [B, N, D] -> (grad_x_kept [B, K, D] in grad's dtype, grad_mask_token [D] in float32,
    float64 for float64 grads).

    grad_x_kept[b, k] sums grad[b, n] over n with ids_restore[b, n] == k; the mask token's
    grad sums grad[b, n] over every slot with ids_restore[b, n] >= K.
    """
    B, N, D = grad.shape
    K = num_keep
    grad_x = grad.new_empty(B, K, D)
    # The masked slots form one long segment per batch row (N - K slots for MAE indices):
    # cut into chunks of _MASK_CHUNK rows summed by separate programs, then added here.
    splits = triton.cdiv(N, _MASK_CHUNK)
    partial = torch.empty(B * splits, D, dtype=mask_grad_dtype(grad.dtype), device=grad.device)
    order, bounds = _segments(ids_restore.clamp(max=K), K)
    _segment_sum(grad, order, bounds, grad_x, 0, K)
    _segment_sum(grad, order, bounds, partial, K, 1, splits=splits, chunk=_MASK_CHUNK, block_p=_MASK_CHUNK)
    return grad_x, partial.sum(0)


restore_tokens_backward.register_fake(fake_restore_backward)


register_restore_autograd(restore_tokens, restore_tokens_backward)


@torch.library.custom_op("mcr_kernels::keep_restore_from_shuffle_triton", mutates_args=())
def keep_restore_from_shuffle(ids_shuffle: torch.Tensor, num_keep: int) -> tuple[torch.Tensor, torch.Tensor]:
    """ids_shuffle int64 [B, N] (a permutation per row) -> (ids_keep [B, K], ids_restore [B, N])."""
    B, N = ids_shuffle.shape
    ids_shuffle = ids_shuffle.contiguous()
    ids_keep = ids_shuffle.new_empty(B, num_keep)
    ids_restore = torch.empty_like(ids_shuffle)
    if ids_shuffle.numel():
        block_n = min(triton.next_power_of_2(N), 1024)
        _keep_restore_kernel[(B,)](ids_shuffle, ids_keep, ids_restore, N, num_keep,
                                   BLOCK_N=block_n, num_warps=4 if block_n >= 512 else 1)
    return ids_keep, ids_restore


@keep_restore_from_shuffle.register_fake
def _(ids_shuffle, num_keep):
    return ids_shuffle.new_empty(ids_shuffle.shape[0], num_keep), torch.empty_like(ids_shuffle)


def random_keep_indices(batch_size, num_tokens, num_keep, *, device=None, generator=None):
    """MAE indices (same noise and argsort as the reference), inverted by one kernel."""
    noise = torch.rand(batch_size, num_tokens, device=device, generator=generator)
    ids_shuffle = torch.argsort(noise, dim=1)
    return keep_restore_from_shuffle(ids_shuffle, num_keep)


# What the launchers above pass, for python -m mcr_kernels.compile_check (every autotune config
# is compiled for sm_80 and sm_90). Divisible: D and row strides at MCR's D = 768 / 512.
_FLOAT_DTYPES = ("fp16", "bf16", "fp32", "fp64")
COMPILE_SPECS = [
    dict(kernel=_gather_rows_kernel, dtypes=_FLOAT_DTYPES,
         signature=dict(src_ptr="*{dtype}", ids_ptr="*i64", out_ptr="*{dtype}"),
         divisible=("D", "stride_sb", "stride_sn"), variants=[dict(stride_sd=1, stride_ik=1)]),
    dict(kernel=_restore_rows_kernel, dtypes=_FLOAT_DTYPES,
         signature=dict(x_ptr="*{dtype}", ids_ptr="*i64", fill_ptr="*{dtype}", out_ptr="*{dtype}"),
         divisible=("D", "stride_xb", "stride_xk"), variants=[dict(stride_xd=1, stride_in=1, stride_fd=1)]),
    dict(kernel=_segment_sum_kernel, dtypes=_FLOAT_DTYPES,
         signature=dict(src_ptr="*{dtype}", order_ptr="*i64", bounds_ptr="*i64", out_ptr="*{dtype}"),
         divisible=("D", "stride_sb", "stride_sl"),
         variants=lambda dtype: [  # gradient rows (one row at a time), then the mask token's chunks
             dict(stride_sd=1, FP64=dtype == "fp64", BLOCK_P=1),
             dict(stride_sd=1, FP64=dtype == "fp64", BLOCK_P=_MASK_CHUNK,
                  signature=dict(out_ptr="*fp64" if dtype == "fp64" else "*fp32"))]),
    dict(kernel=_keep_restore_kernel, dtypes=("i64",),
         signature=dict(shuffle_ptr="*i64", keep_ptr="*i64", restore_ptr="*i64"),
         variants=[dict(BLOCK_N=256, num_warps=1), dict(BLOCK_N=1024, num_warps=4)]),
]
