"""Triton backend of the MbA alignment ops: fused token map + masked pooling, tiled InfoNCE.

See docs/mba.md. Two exact rewrites keep the work small before any kernel runs:

* Mean pooling commutes with every *linear* layer, so
      mean_l(act(x_l W1ᵀ + b1) W2ᵀ + b2) = mean_l(act(x_l W1ᵀ + b1)) W2ᵀ + b2.
  The MLP head therefore needs one fused kernel (GEMM + bias + activation + masked mean ->
  [B, H]); the second layer runs on the pooled [B, H] rows. A purely linear head (no second
  layer, or activation "none") pools the tokens first and then projects ("linear-mean
  shortcut", L times cheaper). Neither [B, L, H] nor [B, L, E] is ever stored for backward.
* Backward of the fused kernel recomputes the pre-activation tile by tile and writes
  dpre = g * w * act'(pre) for a chunk of batch rows (bounded memory); dx and dW1 of that
  chunk are two dense GEMMs (cuBLAS).
* Max pooling and per-token normalization need every token's full output row; they take the
  reference path.

InfoNCE: the forward keeps only per-row log-sum-exp values (float32, online max, so any
logit scale is safe); backward recomputes each logit tile and multiplies it by the other
side's embeddings: peak memory O(B·E). A scalar logit_bias shifts every logit equally, which
softmax cross-entropy ignores: the loss does not depend on it and its gradient is zero.
"""
import os

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from mcr_kernels import backend, reference

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
_ACT_IDS = {"none": 0, "gelu": 1, "gelu_tanh": 2, "relu": 3}
_DPRE_CHUNK_ELEMENTS = 1 << 25  # dpre [rows, L, H] per backward chunk: 64 MiB in bf16
_UPCAST_DOT = tl.constexpr(_INTERPRET)  # the interpreter's bf16 tl.dot is wrong (triton 3.8)


def _tuned(kernel, configs, key, prune=None):
    """The autotuned kernel on a GPU; the plain one (explicit small blocks) in the interpreter."""
    if _INTERPRET:
        return kernel
    prune_by = {"early_config_prune": prune} if prune else None
    return triton.autotune(configs=configs, key=key, prune_configs_by=prune_by)(kernel)


# --- activations ------------------------------------------------------------------------

@triton.jit
def _act(x, ACT: tl.constexpr):
    if ACT == 1:
        y = 0.5 * x * (1.0 + tl.erf(x * 0.7071067811865476))
    elif ACT == 2:
        u = tl.minimum(tl.maximum(0.7978845608028654 * (x + 0.044715 * x * x * x), -15.0), 15.0)
        y = 0.5 * x * (1.0 + (2.0 * tl.sigmoid(2.0 * u) - 1.0))
    elif ACT == 3:
        y = tl.maximum(x, 0.0)
    else:
        y = x
    return y


@triton.jit
def _act_grad(x, ACT: tl.constexpr):
    if ACT == 1:
        y = 0.5 * (1.0 + tl.erf(x * 0.7071067811865476)) + x * 0.3989422804014327 * tl.exp(-0.5 * x * x)
    elif ACT == 2:
        u = tl.minimum(tl.maximum(0.7978845608028654 * (x + 0.044715 * x * x * x), -15.0), 15.0)
        t = 2.0 * tl.sigmoid(2.0 * u) - 1.0
        du = 0.7978845608028654 * (1.0 + 3.0 * 0.044715 * x * x)
        y = 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * du
    elif ACT == 3:
        y = tl.where(x > 0.0, 1.0, 0.0)
    else:
        y = x * 0.0 + 1.0
    return y


# --- mba_pool: fused GEMM + activation + masked mean ---------------------------------------

@triton.jit
def _pre_tile(X, W1, B1, row, offs_l, offs_h, lmask, hmask, D, sxb, sxl, sxd, swh, swd,
              HAS_BIAS: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_H: tl.constexpr,
              BLOCK_D: tl.constexpr, PREC: tl.constexpr):
    """pre[l, h] = x[row, l] · W1[h] + b1[h] for one [BLOCK_L, BLOCK_H] tile, float32."""
    pre = tl.zeros([BLOCK_L, BLOCK_H], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        dmask = offs_d < D
        x = tl.load(X + row * sxb + offs_l[:, None] * sxl + offs_d[None, :] * sxd,
                    mask=lmask[:, None] & dmask[None, :], other=0.0)
        w = tl.load(W1 + offs_h[None, :] * swh + offs_d[:, None] * swd,
                    mask=hmask[None, :] & dmask[:, None], other=0.0)
        if _UPCAST_DOT:
            x, w = x.to(tl.float32), w.to(tl.float32)
        pre += tl.dot(x, w, input_precision=PREC)
    if HAS_BIAS:
        pre += tl.load(B1 + offs_h, mask=hmask, other=0.0).to(tl.float32)[None, :]
    return pre


@triton.jit
def _pool_fwd_kernel(X, WTS, W1, B1, OUT, L, D, H, sxb, sxl, sxd, swtb, swtl, swh, swd, sob, soh,
                     HAS_BIAS: tl.constexpr, ACT: tl.constexpr, PREC: tl.constexpr,
                     BLOCK_L: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    """OUT[b, h] = sum_l WTS[b, l] * act(x[b, l] · W1[h] + b1[h]); grid (B, cdiv(H, BLOCK_H))."""
    row = tl.program_id(0).to(tl.int64)  # row * stride can pass 2**31
    offs_h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    hmask = offs_h < H
    acc = tl.zeros([BLOCK_H], dtype=tl.float32)
    for l0 in range(0, L, BLOCK_L):
        offs_l = l0 + tl.arange(0, BLOCK_L)
        lmask = offs_l < L
        wts = tl.load(WTS + row * swtb + offs_l * swtl, mask=lmask, other=0.0)
        if tl.max(tl.abs(wts), axis=0) > 0.0:  # skip tiles of uncounted (padding) tokens
            # uncounted tokens are never read: a NaN there cannot reach the sum
            pre = _pre_tile(X, W1, B1, row, offs_l, offs_h, lmask & (wts != 0.0), hmask, D, sxb, sxl,
                            sxd, swh, swd, HAS_BIAS, BLOCK_L, BLOCK_H, BLOCK_D, PREC)
            acc += tl.sum(_act(pre, ACT) * wts[:, None], axis=0)
    tl.store(OUT + row * sob + offs_h * soh, acc, mask=hmask)


@triton.jit
def _pool_bwd_kernel(X, WTS, W1, B1, G, DPRE, row0, L, D, H, sxb, sxl, sxd, swtb, swtl, swh, swd,
                     sgb, sgh, sdb, sdl, sdh,
                     HAS_BIAS: tl.constexpr, ACT: tl.constexpr, PREC: tl.constexpr,
                     BLOCK_L: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    """DPRE[b - row0, l, h] = G[b, h] * WTS[b, l] * act'(pre[b, l, h]), pre recomputed;
    grid (rows, cdiv(L, BLOCK_L), cdiv(H, BLOCK_H))."""
    row = row0 + tl.program_id(0).to(tl.int64)
    offs_l = tl.program_id(1) * BLOCK_L + tl.arange(0, BLOCK_L)
    offs_h = tl.program_id(2) * BLOCK_H + tl.arange(0, BLOCK_H)
    lmask, hmask = offs_l < L, offs_h < H
    wts = tl.load(WTS + row * swtb + offs_l * swtl, mask=lmask, other=0.0)
    g = tl.load(G + row * sgb + offs_h * sgh, mask=hmask, other=0.0)
    dpre = tl.zeros([BLOCK_L, BLOCK_H], dtype=tl.float32)
    if tl.max(tl.abs(wts), axis=0) > 0.0:
        pre = _pre_tile(X, W1, B1, row, offs_l, offs_h, lmask & (wts != 0.0), hmask, D, sxb, sxl, sxd,
                        swh, swd, HAS_BIAS, BLOCK_L, BLOCK_H, BLOCK_D, PREC)
        dpre = _act_grad(pre, ACT) * wts[:, None] * g[None, :]
    tl.store(DPRE + tl.program_id(0) * sdb + offs_l[:, None] * sdl + offs_h[None, :] * sdh,
             dpre.to(DPRE.dtype.element_ty), mask=lmask[:, None] & hmask[None, :])


_POOL_CONFIGS = [triton.Config({"BLOCK_L": bl, "BLOCK_H": bh, "BLOCK_D": bd}, num_warps=w, num_stages=s)
                 for bl, bh, bd, w, s in [(64, 128, 64, 4, 3), (128, 128, 64, 8, 3), (32, 128, 64, 4, 3),
                                          (64, 64, 64, 4, 4), (128, 64, 64, 4, 3), (128, 256, 64, 8, 3)]]


def _pool_prune(configs, named_args, **kwargs):
    """float32 tokens: the 32 x 128 and 64 x 64 tiles only. In the compile check every larger
    (BLOCK_L, BLOCK_H) tile spilled kilobytes per thread on sm_80, and 128 x 256 needs 192 KiB
    of shared memory there (over its 163 KiB per block); 16-bit tokens keep every config."""
    if named_args["X"].element_size() < 4:
        return configs
    return [c for c in configs if c.kwargs["BLOCK_L"] * c.kwargs["BLOCK_H"] <= 4096]


_pool_fwd = _tuned(_pool_fwd_kernel, _POOL_CONFIGS, ["L", "D", "H"], _pool_prune)
_pool_bwd = _tuned(_pool_bwd_kernel, _POOL_CONFIGS, ["L", "D", "H"], _pool_prune)
_POOL_INTERPRET_BLOCKS = {"BLOCK_L": 16, "BLOCK_H": 16, "BLOCK_D": 32}


def _blocks(interpret_blocks):
    return interpret_blocks if _INTERPRET else {}


@torch.library.custom_op("mcr_kernels::mba_act_pool", mutates_args=())
def mba_act_pool(tokens: torch.Tensor, weights: torch.Tensor, weight1: torch.Tensor,
                 bias1: torch.Tensor | None, activation: str) -> torch.Tensor:
    """sum_l weights[b, l] * act(tokens[b, l] W1ᵀ + b1) -> float32 [B, H]; never stores [B, L, H].

    tokens [B, L, D] and weight1 [H, D] share a dtype; weights [B, L] float32 (mask / count).
    """
    B, L, D = tokens.shape
    H = weight1.shape[0]
    out = torch.empty(B, H, dtype=torch.float32, device=tokens.device)
    grid = lambda meta: (B, triton.cdiv(H, meta["BLOCK_H"]))
    _pool_fwd[grid](tokens, weights, weight1, bias1, out, L, D, H, *tokens.stride(), *weights.stride(),
                    *weight1.stride(), *out.stride(), HAS_BIAS=bias1 is not None,
                    ACT=_ACT_IDS[activation], PREC=backend.dot_precision(tokens.dtype),
                    **_blocks(_POOL_INTERPRET_BLOCKS))
    return out


@mba_act_pool.register_fake
def _(tokens, weights, weight1, bias1, activation):
    return tokens.new_empty(tokens.shape[0], weight1.shape[0], dtype=torch.float32)


@torch.library.custom_op("mcr_kernels::mba_act_pool_backward", mutates_args=())
def mba_act_pool_backward(grad: torch.Tensor, tokens: torch.Tensor, weights: torch.Tensor,
                          weight1: torch.Tensor, bias1: torch.Tensor | None,
                          activation: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(d tokens, d weight1, d bias1 [float32 H]) of mba_act_pool, recomputing pre per chunk."""
    B, L, D = tokens.shape
    H = weight1.shape[0]
    grad = grad.float().contiguous()
    d_tokens = torch.empty(B, L, D, dtype=tokens.dtype, device=tokens.device)
    d_weight1 = torch.zeros(H, D, dtype=torch.float32, device=tokens.device)
    d_bias1 = torch.zeros(H, dtype=torch.float32, device=tokens.device)
    chunk = max(1, min(B, _DPRE_CHUNK_ELEMENTS // max(1, L * H)))
    dpre = torch.empty(chunk, L, H, dtype=tokens.dtype, device=tokens.device)
    for row0 in range(0, B, chunk):
        rows = min(chunk, B - row0)
        grid = lambda meta, rows=rows: (rows, triton.cdiv(L, meta["BLOCK_L"]), triton.cdiv(H, meta["BLOCK_H"]))
        _pool_bwd[grid](tokens, weights, weight1, bias1, grad, dpre, row0, L, D, H, *tokens.stride(),
                        *weights.stride(), *weight1.stride(), *grad.stride(), *dpre.stride(),
                        HAS_BIAS=bias1 is not None, ACT=_ACT_IDS[activation],
                        PREC=backend.dot_precision(tokens.dtype), **_blocks(_POOL_INTERPRET_BLOCKS))
        dp = dpre[:rows].reshape(rows * L, H)
        counted = weights[row0:row0 + rows, :, None] != 0  # uncounted tokens: zeros, NaN or not
        x = torch.where(counted, tokens[row0:row0 + rows], 0).reshape(rows * L, D)
        torch.mm(dp, weight1, out=d_tokens[row0:row0 + rows].view(rows * L, D))
        d_weight1 += (dp.t() @ x).float()
        d_bias1 += dp.sum(0, dtype=torch.float32)
    return d_tokens, d_weight1.to(weight1.dtype), d_bias1


@mba_act_pool_backward.register_fake
def _(grad, tokens, weights, weight1, bias1, activation):
    H = weight1.shape[0]
    return (torch.empty_like(tokens), torch.empty_like(weight1),
            tokens.new_empty(H, dtype=torch.float32))


def _act_pool_setup(ctx, inputs, output):
    tokens, weights, weight1, bias1, activation = inputs
    ctx.save_for_backward(tokens, weights, weight1, bias1)
    ctx.activation = activation


def _act_pool_backward(ctx, grad):
    tokens, weights, weight1, bias1 = ctx.saved_tensors
    d_tokens, d_weight1, d_bias1 = mba_act_pool_backward(grad, tokens, weights, weight1, bias1,
                                                         ctx.activation)
    d_bias1 = None if bias1 is None else d_bias1.to(bias1.dtype)
    return d_tokens, None, d_weight1, d_bias1, None


mba_act_pool.register_autograd(_act_pool_backward, setup_context=_act_pool_setup)


def _masked_affine(pooled, nonempty, weight, bias):
    """pooled Wᵀ + b on rows with a counted token; rows without one stay zero."""
    out = F.linear(pooled, weight)
    return out if bias is None else out + nonempty * bias


def mba_pool(tokens, mask, weight1, bias1, weight2=None, bias2=None, *, activation="gelu",
             pool="mean", normalize_tokens=False):
    """Triton backend of mcr_kernels.mba_pool (same arguments and result, dtype of tokens)."""
    linear = weight2 is None or activation == "none"
    if pool != "mean" or normalize_tokens or (tokens.dtype == torch.float64 and not linear):
        return reference.mba_pool(tokens, mask, weight1, bias1, weight2, bias2, activation=activation,
                                  pool=pool, normalize_tokens=normalize_tokens)
    B, L, _ = tokens.shape
    if mask is None:
        mask = torch.ones(B, L, dtype=torch.bool, device=tokens.device)
    dtype = torch.promote_types(tokens.dtype, torch.float32)  # float32, or float64 inputs
    counts = mask.sum(1, keepdim=True)
    weights = mask.to(dtype) / counts.clamp(min=1)        # [B, L]: mean over counted tokens
    nonempty = (counts > 0).to(dtype)                     # [B, 1]
    if linear:                                            # linear head: pool, then project
        counted = torch.where(mask.unsqueeze(-1), tokens, 0)  # uncounted tokens: zeros, NaN or not
        pooled = counted.sum(1, dtype=dtype) / counts.clamp(min=1)
        out = _masked_affine(pooled, nonempty, weight1.to(dtype),
                             None if bias1 is None else bias1.to(dtype))
    else:
        out = mba_act_pool(tokens, weights, weight1.to(tokens.dtype), bias1, activation)
    if weight2 is not None:
        out = _masked_affine(out, nonempty.to(out.dtype), weight2.to(out.dtype),
                             None if bias2 is None else bias2.to(out.dtype))
    return out.to(tokens.dtype)


# --- InfoNCE: tiled log-sum-exp and gradient ----------------------------------------------

@triton.jit
def _logit_tile(Q, K, offs_m, offs_n, mmask, nmask, E, sqm, sqe, skn, ske, scale,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr, PREC: tl.constexpr):
    """scale * Q[offs_m] · K[offs_n] as a float32 [BLOCK_M, BLOCK_N] tile."""
    s = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for e0 in range(0, E, BLOCK_E):
        offs_e = e0 + tl.arange(0, BLOCK_E)
        emask = offs_e < E
        q = tl.load(Q + offs_m[:, None] * sqm + offs_e[None, :] * sqe,
                    mask=mmask[:, None] & emask[None, :], other=0.0)
        k = tl.load(K + offs_n[None, :] * skn + offs_e[:, None] * ske,
                    mask=nmask[None, :] & emask[:, None], other=0.0)
        s += tl.dot(q, k, input_precision=PREC)
    return s * scale


@triton.jit
def _lse_kernel(Q, K, SCALE, LSE, M, N, E, sqm, sqe, skn, ske, PREC: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr):
    """LSE[i] = log sum_j exp(scale * Q[i] · K[j]), online over K tiles; grid (cdiv(M, BLOCK_M),)."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    mmask = offs_m < M
    scale = tl.load(SCALE).to(tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        nmask = offs_n < N
        s = _logit_tile(Q, K, offs_m, offs_n, mmask, nmask, E, sqm, sqe, skn, ske, scale,
                        BLOCK_M, BLOCK_N, BLOCK_E, PREC)
        s = tl.where(nmask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        l_i = l_i * tl.exp(m_i - m_new) + tl.sum(tl.exp(s - m_new[:, None]), axis=1)
        m_i = m_new
    tl.store(LSE + offs_m, m_i + tl.log(l_i), mask=mmask)


@triton.jit
def _grad_kernel(X, Y, SCALE, LSE_X, LSE_Y, OUT, M, N, E, offset, coef_x, coef_y,
                 sxm, sxe, syn, sye, som, soe, HAS_LSE_X: tl.constexpr, HAS_LSE_Y: tl.constexpr,
                 PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_E: tl.constexpr, BLOCK_EO: tl.constexpr):
    """OUT[i] = sum_j G[i, j] Y[j] with S = scale X Yᵀ recomputed per tile and
    G = coef_x exp(S - LSE_X[i]) + coef_y exp(S - LSE_Y[j]) - (coef_x + coef_y) [j == i + offset];
    grid (cdiv(M, BLOCK_M), cdiv(E, BLOCK_EO))."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_eo = tl.program_id(1) * BLOCK_EO + tl.arange(0, BLOCK_EO)
    mmask, eomask = offs_m < M, offs_eo < E
    scale = tl.load(SCALE).to(tl.float32)
    lse_x = tl.zeros([BLOCK_M], dtype=tl.float32)
    if HAS_LSE_X:
        lse_x = tl.load(LSE_X + offs_m, mask=mmask, other=0.0)
    acc = tl.zeros([BLOCK_M, BLOCK_EO], dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        nmask = offs_n < N
        s = _logit_tile(X, Y, offs_m, offs_n, mmask, nmask, E, sxm, sxe, syn, sye, scale,
                        BLOCK_M, BLOCK_N, BLOCK_E, PREC)
        g = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        if HAS_LSE_X:
            g += coef_x * tl.exp(s - lse_x[:, None])
        if HAS_LSE_Y:
            lse_y = tl.load(LSE_Y + offs_n, mask=nmask, other=0.0)
            g += coef_y * tl.exp(s - lse_y[None, :])
        g = tl.where(offs_n[None, :] == offs_m[:, None] + offset, g - (coef_x + coef_y), g)
        g = tl.where(mmask[:, None] & nmask[None, :], g, 0.0)
        y = tl.load(Y + offs_n[:, None] * syn + offs_eo[None, :] * sye,
                    mask=nmask[:, None] & eomask[None, :], other=0.0)
        acc += tl.dot(g, y, input_precision=PREC)
    tl.store(OUT + offs_m[:, None] * som + offs_eo[None, :] * soe, acc,
             mask=mmask[:, None] & eomask[None, :])


_lse = _tuned(_lse_kernel, [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_E": be}, num_warps=w,
                                          num_stages=s)
                            for bm, bn, be, w, s in [(128, 64, 32, 4, 3), (64, 64, 64, 4, 3),
                                                     (128, 128, 32, 8, 3), (64, 128, 64, 4, 3),
                                                     (128, 64, 64, 8, 2)]], ["M", "N", "E"])
_grad = _tuned(_grad_kernel, [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_E": be, "BLOCK_EO": beo},
                                            num_warps=w, num_stages=s)
                              for bm, bn, be, beo, w, s in [(64, 64, 32, 128, 4, 3), (64, 64, 64, 256, 8, 2),
                                                            (128, 64, 32, 128, 8, 2), (64, 32, 64, 256, 4, 2),
                                                            (128, 64, 32, 64, 4, 3), (64, 64, 32, 512, 8, 2)]],
              ["M", "N", "E"])
_LSE_INTERPRET_BLOCKS = {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_E": 32}
_GRAD_INTERPRET_BLOCKS = {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_E": 32, "BLOCK_EO": 32}


def _row_lse(q, k, scale, prec):
    """float32 [M]: log-sum-exp over j of scale * q[i] · k[j]; q [M, E], k [N, E] float32."""
    M, E = q.shape
    out = torch.empty(M, dtype=torch.float32, device=q.device)
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]),)
    _lse[grid](q, k, scale, out, M, k.shape[0], E, *q.stride(), *k.stride(), PREC=prec,
               **_blocks(_LSE_INTERPRET_BLOCKS))
    return out


def _grad_rows(x, y, scale, lse_x, lse_y, offset, coef, prec):
    """float32 [M, E]: sum_j G[i, j] y[j] for the logit gradient G of _grad_kernel."""
    M, E = x.shape
    out = torch.empty(M, E, dtype=torch.float32, device=x.device)
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]), triton.cdiv(E, meta["BLOCK_EO"]))
    _grad[grid](x, y, scale, lse_x, lse_y, out, M, y.shape[0], E, offset,
                coef if lse_x is not None else 0.0, coef if lse_y is not None else 0.0,
                *x.stride(), *y.stride(), *out.stride(), HAS_LSE_X=lse_x is not None,
                HAS_LSE_Y=lse_y is not None, PREC=prec, **_blocks(_GRAD_INTERPRET_BLOCKS))
    return out


@torch.library.custom_op("mcr_kernels::infonce_square", mutates_args=())
def infonce_square(image_emb: torch.Tensor, text_emb: torch.Tensor,
                   scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Symmetric InfoNCE of scale * image_emb text_embᵀ ([B, E] float32 each, scale a float32
    scalar): (loss, row LSE [B], column LSE [B]); the [B, B] logits are never stored."""
    prec = backend.dot_precision(torch.float32)
    lse_rows = _row_lse(image_emb, text_emb, scale, prec)
    lse_cols = _row_lse(text_emb, image_emb, scale, prec)
    target = scale * (image_emb * text_emb).sum(1)
    loss = ((lse_rows - target).mean() + (lse_cols - target).mean()) / 2
    return loss, lse_rows, lse_cols


@infonce_square.register_fake
def _(image_emb, text_emb, scale):
    B = image_emb.shape[0]
    return image_emb.new_empty(()), image_emb.new_empty(B), image_emb.new_empty(B)


@torch.library.custom_op("mcr_kernels::infonce_square_backward", mutates_args=())
def infonce_square_backward(grad: torch.Tensor, image_emb: torch.Tensor, text_emb: torch.Tensor,
                            scale: torch.Tensor, lse_rows: torch.Tensor,
                            lse_cols: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(d image_emb, d text_emb, d scale) of infonce_square's loss, logit tiles recomputed."""
    coef, prec = 0.5 / image_emb.shape[0], backend.dot_precision(torch.float32)
    acc_img = _grad_rows(image_emb, text_emb, scale, lse_rows, lse_cols, 0, coef, prec)
    acc_txt = _grad_rows(text_emb, image_emb, scale, lse_cols, lse_rows, 0, coef, prec)
    d_scale = grad * (image_emb * acc_img).sum()
    return grad * scale * acc_img, grad * scale * acc_txt, d_scale


@infonce_square_backward.register_fake
def _(grad, image_emb, text_emb, scale, lse_rows, lse_cols):
    return torch.empty_like(image_emb), torch.empty_like(text_emb), image_emb.new_empty(())


def _square_setup(ctx, inputs, output):
    image_emb, text_emb, scale = inputs
    _, lse_rows, lse_cols = output
    ctx.save_for_backward(image_emb, text_emb, scale, lse_rows, lse_cols)


def _square_backward(ctx, grad, _grad_lse_rows, _grad_lse_cols):
    return infonce_square_backward(grad, *ctx.saved_tensors)


infonce_square.register_autograd(_square_backward, setup_context=_square_setup)


@torch.library.custom_op("mcr_kernels::infonce_local", mutates_args=())
def infonce_local(image_emb: torch.Tensor, text_emb: torch.Tensor, all_image_emb: torch.Tensor,
                  all_text_emb: torch.Tensor, scale: torch.Tensor,
                  offset: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """open_clip local loss: local rows [M, E] against all columns [N, E]; local row i's positive
    is column i + offset. Returns (loss, image->text LSE [M], text->image LSE [M])."""
    M, prec = image_emb.shape[0], backend.dot_precision(torch.float32)
    lse_img = _row_lse(image_emb, all_text_emb, scale, prec)
    lse_txt = _row_lse(text_emb, all_image_emb, scale, prec)
    target_img = scale * (image_emb * all_text_emb[offset:offset + M]).sum(1)
    target_txt = scale * (text_emb * all_image_emb[offset:offset + M]).sum(1)
    loss = ((lse_img - target_img).mean() + (lse_txt - target_txt).mean()) / 2
    return loss, lse_img, lse_txt


@infonce_local.register_fake
def _(image_emb, text_emb, all_image_emb, all_text_emb, scale, offset):
    M = image_emb.shape[0]
    return image_emb.new_empty(()), image_emb.new_empty(M), image_emb.new_empty(M)


@torch.library.custom_op("mcr_kernels::infonce_local_backward", mutates_args=())
def infonce_local_backward(grad: torch.Tensor, image_emb: torch.Tensor, text_emb: torch.Tensor,
                           all_image_emb: torch.Tensor, all_text_emb: torch.Tensor,
                           scale: torch.Tensor, lse_img: torch.Tensor, lse_txt: torch.Tensor,
                           offset: int) -> tuple[torch.Tensor, torch.Tensor,
                                                                   torch.Tensor, torch.Tensor,
                                                                   torch.Tensor]:
    """Gradients of infonce_local's loss for its 4 embedding inputs and scale."""
    coef, prec = 0.5 / image_emb.shape[0], backend.dot_precision(torch.float32)
    acc_img = _grad_rows(image_emb, all_text_emb, scale, lse_img, None, offset, coef, prec)
    acc_all_txt = _grad_rows(all_text_emb, image_emb, scale, None, lse_img, -offset, coef, prec)
    acc_txt = _grad_rows(text_emb, all_image_emb, scale, lse_txt, None, offset, coef, prec)
    acc_all_img = _grad_rows(all_image_emb, text_emb, scale, None, lse_txt, -offset, coef, prec)
    d_scale = grad * ((image_emb * acc_img).sum() + (text_emb * acc_txt).sum())
    g = grad * scale
    return g * acc_img, g * acc_txt, g * acc_all_img, g * acc_all_txt, d_scale


@infonce_local_backward.register_fake
def _(grad, image_emb, text_emb, all_image_emb, all_text_emb, scale, lse_img, lse_txt, offset):
    return (torch.empty_like(image_emb), torch.empty_like(text_emb), torch.empty_like(all_image_emb),
            torch.empty_like(all_text_emb), image_emb.new_empty(()))


def _local_setup(ctx, inputs, output):
    *embs, scale, ctx.offset = inputs
    ctx.save_for_backward(*embs, scale, output[1], output[2])


def _local_backward(ctx, grad, _grad_lse_img, _grad_lse_txt):
    return (*infonce_local_backward(grad, *ctx.saved_tensors, ctx.offset), None)


infonce_local.register_autograd(_local_backward, setup_context=_local_setup)


def infonce_loss(image_emb, text_emb, logit_scale, *, logit_bias=None, normalize=True, gather=False,
                 local_loss=True):
    """Triton backend of mcr_kernels.infonce_loss (same arguments, float32 scalar; float64
    embeddings go to the reference)."""
    if image_emb.dtype == torch.float64:
        return reference.infonce_loss(image_emb, text_emb, logit_scale, logit_bias=logit_bias,
                                      normalize=normalize, gather=gather, local_loss=local_loss)
    img, txt = image_emb.float(), text_emb.float()
    if normalize:
        img, txt = F.normalize(img, dim=-1), F.normalize(txt, dim=-1)
    img, txt = img.contiguous(), txt.contiguous()
    scale = logit_scale.float().reshape(())
    if gather:
        import torch.distributed as dist

        all_img, all_txt = reference.gather_features(img, txt)
        if local_loss:
            loss = infonce_local(img, txt, all_img, all_txt, scale, img.shape[0] * dist.get_rank())[0]
        else:
            loss = infonce_square(all_img, all_txt, scale)[0]
    else:
        loss = infonce_square(img, txt, scale)[0]
    if logit_bias is not None:  # softmax is shift invariant: the loss ignores a scalar bias
        loss = loss + 0.0 * logit_bias.float().sum()
    return loss


# --- compile check ------------------------------------------------------------------------
# What the launchers above pass, for python -m mcr_kernels.compile_check (every autotune config
# is compiled for sm_80 and sm_90): the default GELU head with a bias; InfoNCE sees float32
# embeddings, with tensor-core (tf32) products for 16-bit inputs and exact ones for float32.
def _pool_variants(dtype):
    return [dict(sxd=1, swd=1, HAS_BIAS=True, ACT=_ACT_IDS["gelu"], PREC="ieee" if dtype == "fp32" else "tf32")]


_POOL_SIGNATURE = dict(X="*{dtype}", WTS="*fp32", W1="*{dtype}", B1="*{dtype}", OUT="*fp32", G="*fp32",
                       DPRE="*{dtype}")
_INFONCE_SIGNATURE = dict(Q="*fp32", K="*fp32", X="*fp32", Y="*fp32", SCALE="*fp32", LSE="*fp32", LSE_X="*fp32",
                          LSE_Y="*fp32", OUT="*fp32", coef_x="fp32", coef_y="fp32")
COMPILE_SPECS = [
    dict(kernel=_pool_fwd, dtypes=("fp16", "bf16", "fp32"), signature=_POOL_SIGNATURE,
         divisible=("D", "H", "sxb", "sxl", "swh", "sob"), variants=_pool_variants),
    dict(kernel=_pool_bwd, dtypes=("fp16", "bf16", "fp32"), signature=_POOL_SIGNATURE,
         divisible=("D", "H", "sxb", "sxl", "swh", "sgb", "sdb", "sdl"),
         variants=lambda dtype: [dict(v, sgh=1, sdh=1) for v in _pool_variants(dtype)]),
    dict(kernel=_lse, dtypes=("fp32",), signature=_INFONCE_SIGNATURE, divisible=("E", "sqm", "skn"),
         variants=[dict(sqe=1, ske=1, PREC=prec) for prec in ("tf32", "ieee")]),
    dict(kernel=_grad, dtypes=("fp32",), signature=_INFONCE_SIGNATURE, divisible=("E", "sxm", "syn", "som"),
         variants=[dict(sxe=1, sye=1, soe=1, HAS_LSE_X=True, HAS_LSE_Y=True, PREC=prec) for prec in ("tf32", "ieee")]),
]
