"""FlashAttention-2 forward and backward in Triton, with key padding masks and varlen.

Registered as torch.library custom ops (`mcr_kernels::flash_attn_fwd`, `..._bwd`,
`..._varlen_fwd`, `..._varlen_bwd`) with autograd and fake implementations, and as the
`triton` backend of mcr_kernels.flash_attention / flash_attention_varlen. Docs:
docs/attention.md.

Kernels (one program per (block of rows, head, batch)):
- forward: tiled online softmax (exp2), stores out and the row log-sum-exp (float32).
- backward: delta = rowsum(dO * O); a dK/dV kernel looping over query blocks and a dQ
  kernel looping over key blocks (recomputing P from the LSE; no atomics).

Masks: from key_padding_mask [B, Lk] the op computes on the device (no host sync) each
sequence's key length (last attended key + 1) and whether the whole mask is a right-
padding prefix. Key blocks past a sequence's length and query blocks that are all padding
(prefix mask with Lq == Lk) are skipped; for a prefix mask the key blocks inside the
length run without any masking, and only the last partial block reads the mask. Any other
mask pattern goes through the masked loop, which loads the mask vector of each key block.
"""
import functools
import os

import torch
import triton
import triton.language as tl

from mcr_kernels import backend, reference

LOG2E = 1.4426950408889634
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def _configs():
    if _INTERPRET:  # one config: the interpreter cannot benchmark, and it is slow
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32}, num_warps=4, num_stages=1)]
    # (BLOCK_M, BLOCK_N, warps, stages): a small-tile config for short sequences, then the
    # usual FA2 tiles on H100; few, so that first-call tuning stays short
    shapes = [(32, 32, 4, 2), (64, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3)]
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in shapes]


def _prune(configs, named_args, **kwargs):
    """Tiles by the bytes of one head-dim row (BLOCK_D x element size), from the compile check's
    registers and spills: up to 128 bytes (bf16 Dh <= 64, fp32 Dh <= 32) every config; 256
    (bf16 Dh 128, fp32 Dh 64) the small tiles (at bf16 Dh 128 the 128-row tiles with 3 stages
    need 192 KiB, over sm_80's 163 KiB per block); from 512 (bf16 Dh 256, fp32 Dh >= 128) the
    32 x 32 tile alone: every larger one spilled kilobytes per thread (fp32 Dh 128: 3-37 KiB)."""
    block_d = kwargs.get("BLOCK_D", named_args.get("BLOCK_D"))
    if block_d is None:
        return configs
    row_bytes = block_d * named_args["Q"].element_size()
    if row_bytes < 256:
        return configs
    shapes = ((32, 32, 4, 1), (64, 32, 4, 2), (64, 64, 8, 1)) if row_bytes < 512 else ((32, 32, 4, 1),)
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in shapes]


def shared_memory_limit(named_args):
    """Shared memory per block (bytes) the launch may use: the device's opt-in limit for CUDA
    tensors, the compile check's target arch ("SHARED_LIMIT" among its stand-ins), else None
    (the interpreter: no limit)."""
    if "SHARED_LIMIT" in named_args:
        return named_args["SHARED_LIMIT"]
    q = named_args["Q"]
    return backend.shared_memory_per_block(q.device) if q.is_cuda else None


def _backward_prune(streamed):
    """early_config_prune of a backward kernel whose loop streams BLOCK_<streamed> rows of two
    tensors (dK/dV: q and dO; dQ: k and v). Its shared memory is at most 1.5 x (num_stages x 2
    x streamed rows + 2 x resident rows) x BLOCK_D x element size + 2 KiB: the factor bounds
    every one of the 400 backward configs of the compile check (fp32 and tf32 products need
    the most). Tiles over the device's limit could never launch (e.g. the dQ kernel in fp32 at
    Dh 32 with 128 x 128 tiles on sm_80, 176 KiB; at Dh 256 every fp32 tile on sm_80), so they
    are dropped here, not left to fail at run time."""
    resident = "BLOCK_N" if streamed == "BLOCK_M" else "BLOCK_M"

    def prune(configs, named_args, **kwargs):
        limit = shared_memory_limit(named_args)
        block_d = kwargs.get("BLOCK_D", named_args.get("BLOCK_D"))
        size = named_args["Q"].element_size()
        kept = []
        for config in _prune(configs, named_args, **kwargs):
            rows = max(1, config.num_stages) * 2 * config.kwargs[streamed] + 2 * config.kwargs[resident]
            if limit is None or 1.5 * rows * block_d * size + 2048 <= limit:
                kept.append(config)
        return kept
    return prune


def backward_fits(q, block_d):
    """Whether both backward kernels keep a config for q's dtype and head dim on q's device."""
    return _backward_fits(q.dtype, block_d, q.device)


@functools.cache
def _backward_fits(dtype, block_d, device):  # once per (dtype, head dim, device), not per attention call
    named_args = {"Q": torch.empty(0, dtype=dtype, device=device), "BLOCK_D": block_d}
    return all(_backward_prune(s)(_configs(), named_args, BLOCK_D=block_d) for s in ("BLOCK_M", "BLOCK_N"))


# tuned per power-of-two length bucket: padded report batches have many distinct Lmax
_TUNE_KEY = ["LQ_BUCKET", "LK_BUCKET", "DH", "HAS_MASK", "CAUSAL", "VARLEN"]
# one binary per (dtype, head dim, mask, causal, varlen, tile), whatever the sizes
_NO_SPECIALIZE = ["MAX_LQ", "MAX_LK", "LQ_BUCKET", "LK_BUCKET"]


# --- shared helpers ---------------------------------------------------------------------

@triton.jit
def _load(ptrs, rows, n_rows, cols, n_cols, CHECK_ROWS: tl.constexpr, CHECK_COLS: tl.constexpr):
    if CHECK_ROWS and CHECK_COLS:
        x = tl.load(ptrs, mask=(rows[:, None] < n_rows) & (cols[None, :] < n_cols), other=0.0)
    elif CHECK_ROWS:
        x = tl.load(ptrs, mask=rows[:, None] < n_rows, other=0.0)
    elif CHECK_COLS:
        x = tl.load(ptrs, mask=cols[None, :] < n_cols, other=0.0)
    else:
        x = tl.load(ptrs)
    return x


@triton.jit
def _seq_bounds(CU, b):
    """(start, length) of packed sequence b; start is int64 because (start + row) * row stride
    passes 2**31 once total_tokens * H * Dh does (about 2.8 M tokens at H * Dh = 768)."""
    start = tl.load(CU + b)
    return start.to(tl.int64), tl.load(CU + b + 1) - start


@triton.jit
def _block_and_batch(ROWS, BLOCK: tl.constexpr):
    """(row block, batch index) of a program: grid axis 0 is row blocks x batch, because
    axes 1 and 2 stop at 65,535 (B sequences may exceed that; heads sit on axis 1)."""
    n_blocks = tl.cdiv(ROWS, BLOCK)
    return tl.program_id(0) % n_blocks, tl.program_id(0) // n_blocks


@triton.jit
def _seq_info(b, Q_LEN, KV_LEN, KV_FULL, CU_Q, CU_K, MAX_LQ, MAX_LK,
              HAS_MASK: tl.constexpr, VARLEN: tl.constexpr):
    """(q_start, q_len, q_rows, k_start, kv_len, kv_full, causal_off) of sequence b.

    q_len: query rows computed (rows in [q_len, q_rows) are written as zeros); kv_len:
    keys that may be attended; kv_full: keys attendable without reading the mask;
    causal_off: key index aligned with query 0 (bottom-right causal alignment).
    """
    if VARLEN:
        q_start, q_len = _seq_bounds(CU_Q, b)
        k_start, kv_len = _seq_bounds(CU_K, b)
        q_rows = q_len
        kv_full = kv_len
        causal_off = kv_len - q_len
    else:
        q_start = 0
        k_start = 0
        q_rows = MAX_LQ
        causal_off = MAX_LK - MAX_LQ
        if HAS_MASK:
            q_len = tl.load(Q_LEN + b)
            kv_len = tl.load(KV_LEN + b)
            kv_full = tl.load(KV_FULL + b)
        else:
            q_len = MAX_LQ
            kv_len = MAX_LK
            kv_full = MAX_LK
    return q_start, q_len, q_rows, k_start, kv_len, kv_full, causal_off


@triton.jit
def _key_bounds(start_m, q_len, kv_len, kv_full, causal_off,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr):
    """Key range [0, n_hi) a query block attends; [0, n_full) needs no masking."""
    n_hi = kv_len
    n_full = (kv_full // BLOCK_N) * BLOCK_N
    if CAUSAL:
        n_hi = tl.minimum(n_hi, start_m + BLOCK_M + causal_off)
        n_full = tl.minimum(n_full, (tl.maximum(start_m + causal_off + 1, 0) // BLOCK_N) * BLOCK_N)
    n_hi = tl.where(start_m < q_len, tl.maximum(n_hi, 0), 0)
    n_full = tl.maximum(tl.minimum(n_full, n_hi), 0)
    return n_full, n_hi


@triton.jit
def _attended(offs_n, kv_len, mask_row, HAS_MASK: tl.constexpr):
    """Keys of a block that the padding mask lets be attended (all keys below kv_len without one)."""
    attend = offs_n < kv_len
    if HAS_MASK:
        attend = attend & (tl.load(mask_row + offs_n, mask=offs_n < kv_len, other=0) != 0)
    return attend


@triton.jit
def _valid_keys(offs_m, offs_n, attend, causal_off, CAUSAL: tl.constexpr):
    valid = attend[None, :] & (offs_m >= 0)[:, None]
    if CAUSAL:
        valid = valid & (offs_n[None, :] <= offs_m[:, None] + causal_off)
    return valid


# --- forward ------------------------------------------------------------------------------

@triton.jit
def _fwd_inner(acc, l_i, m_i, q, k_ptrs, v_ptrs, lo, hi, offs_m, offs_d, kv_len, causal_off,
               mask_row, qk_scale, stride_kn, stride_vn, DH,
               MASKED: tl.constexpr, HAS_MASK: tl.constexpr, CAUSAL: tl.constexpr,
               EVEN_D: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr):
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = _load(k_ptrs + start_n * stride_kn, offs_n, kv_len, offs_d, DH, MASKED, not EVEN_D)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        if MASKED:
            attend = _attended(offs_n, kv_len, mask_row, HAS_MASK)
            qk = tl.where(_valid_keys(offs_m, offs_n, attend, causal_off, CAUSAL), qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        if MASKED:  # a row may have seen no key yet: keep exp2 away from (-inf) - (-inf)
            m_new = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.math.exp2(m_i - m_new)
        p = tl.math.exp2(qk - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _load(v_ptrs + start_n * stride_vn, offs_n, kv_len, offs_d, DH, MASKED, not EVEN_D)
        if MASKED and HAS_MASK:  # masked values are ignored, NaN or not (p = 0 times NaN is NaN)
            v = tl.where(attend[:, None], v, 0.0)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.autotune(configs=_configs(), key=_TUNE_KEY, prune_configs_by={"early_config_prune": _prune})
@triton.jit(do_not_specialize=_NO_SPECIALIZE)
def _attn_fwd(Q, K, V, O, LSE, MASK, Q_LEN, KV_LEN, KV_FULL, CU_Q, CU_K,
              stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn,
              stride_vb, stride_vh, stride_vn, stride_ob, stride_oh, stride_om,
              stride_lb, stride_lh, stride_mb, MAX_LQ, MAX_LK, LQ_BUCKET, LK_BUCKET, qk_scale,
              DH: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr, HAS_MASK: tl.constexpr,
              CAUSAL: tl.constexpr, VARLEN: tl.constexpr, DOT_PRECISION: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_m, b = _block_and_batch(MAX_LQ, BLOCK_M)
    h = tl.program_id(1)
    q_start, q_len, q_rows, k_start, kv_len, kv_full, causal_off = _seq_info(
        b, Q_LEN, KV_LEN, KV_FULL, CU_Q, CU_K, MAX_LQ, MAX_LK, HAS_MASK, VARLEN)
    start_m = pid_m * BLOCK_M
    if start_m < q_rows:
        b64 = b.to(tl.int64)
        h64 = h.to(tl.int64)
        offs_m = start_m + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        offs_n = tl.arange(0, BLOCK_N)
        q_ptrs = Q + b64 * stride_qb + h64 * stride_qh + (q_start + offs_m)[:, None] * stride_qm + offs_d[None, :]
        k_ptrs = K + b64 * stride_kb + h64 * stride_kh + (k_start + offs_n)[:, None] * stride_kn + offs_d[None, :]
        v_ptrs = V + b64 * stride_vb + h64 * stride_vh + (k_start + offs_n)[:, None] * stride_vn + offs_d[None, :]
        mask_row = MASK + b64 * stride_mb
        q = _load(q_ptrs, offs_m, q_len, offs_d, DH, True, not EVEN_D)

        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        n_full, n_hi = _key_bounds(start_m, q_len, kv_len, kv_full, causal_off, BLOCK_M, BLOCK_N, CAUSAL)
        acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_ptrs, v_ptrs, 0, n_full, offs_m, offs_d, kv_len,
                                   causal_off, mask_row, qk_scale, stride_kn, stride_vn, DH,
                                   False, HAS_MASK, CAUSAL, EVEN_D, BLOCK_N, DOT_PRECISION)
        acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_ptrs, v_ptrs, n_full, n_hi, offs_m, offs_d, kv_len,
                                   causal_off, mask_row, qk_scale, stride_kn, stride_vn, DH,
                                   True, HAS_MASK, CAUSAL, EVEN_D, BLOCK_N, DOT_PRECISION)

        row_ok = (offs_m < q_len) & (l_i != 0.0)  # rows with no key, or padded, give zeros; NaN stays
        l_safe = tl.where(row_ok, l_i, 1.0)
        out = tl.where(row_ok[:, None], acc / l_safe[:, None], 0.0)
        lse = tl.where(row_ok, (m_i + tl.math.log2(l_safe)) / 1.4426950408889634, float("-inf"))
        o_ptrs = O + b64 * stride_ob + h64 * stride_oh + (q_start + offs_m)[:, None] * stride_om + offs_d[None, :]
        if EVEN_D:
            tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=(offs_m < q_rows)[:, None])
        else:
            tl.store(o_ptrs, out.to(O.dtype.element_ty),
                     mask=(offs_m < q_rows)[:, None] & (offs_d < DH)[None, :])
        tl.store(LSE + b64 * stride_lb + h64 * stride_lh + q_start + offs_m, lse, mask=offs_m < q_rows)


# --- backward -----------------------------------------------------------------------------

@triton.jit
def _bwd_preprocess(O, DO, DELTA, CU_Q, stride_ob, stride_oh, stride_om,
                    stride_dob, stride_doh, stride_dom, stride_lb, stride_lh, MAX_LQ,
                    DH: tl.constexpr, BLOCK_D: tl.constexpr, VARLEN: tl.constexpr,
                    BLOCK_M: tl.constexpr):
    """delta[row] = sum_d dO[row, d] * O[row, d] in float32, laid out like the LSE."""
    pid_m, b = _block_and_batch(MAX_LQ, BLOCK_M)
    h = tl.program_id(1)
    if VARLEN:
        q_start, q_rows = _seq_bounds(CU_Q, b)
    else:
        q_start = 0
        q_rows = MAX_LQ
    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    rows = (q_start + offs_m)[:, None]
    mask = (offs_m < q_rows)[:, None] & (offs_d < DH)[None, :]
    o = tl.load(O + b64 * stride_ob + h64 * stride_oh + rows * stride_om + offs_d[None, :], mask=mask, other=0.0)
    do = tl.load(DO + b64 * stride_dob + h64 * stride_doh + rows * stride_dom + offs_d[None, :], mask=mask, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + b64 * stride_lb + h64 * stride_lh + q_start + offs_m, delta, mask=offs_m < q_rows)


@triton.jit
def _load_row_stats(LSE, DELTA, lse_off, offs_m, q_len):
    """LSE (log2 units) and delta of query rows; rows with no key or past q_len get LSE = +inf
    so that their recomputed probabilities are exactly 0."""
    lse = tl.load(LSE + lse_off + offs_m, mask=offs_m < q_len, other=float("-inf"))
    lse = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
    delta = tl.load(DELTA + lse_off + offs_m, mask=offs_m < q_len, other=0.0)
    return lse, delta


@triton.autotune(configs=_configs(), key=_TUNE_KEY, prune_configs_by={"early_config_prune": _backward_prune("BLOCK_M")})
@triton.jit(do_not_specialize=_NO_SPECIALIZE)
def _attn_bwd_dkdv(Q, K, V, DO, LSE, DELTA, DK, DV, MASK, Q_LEN, KV_LEN, KV_FULL, CU_Q, CU_K,
                   stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn,
                   stride_vb, stride_vh, stride_vn, stride_dob, stride_doh, stride_dom,
                   stride_dkb, stride_dkh, stride_dkn, stride_lb, stride_lh, stride_mb,
                   MAX_LQ, MAX_LK, LQ_BUCKET, LK_BUCKET, sm_scale, qk_scale,
                   DH: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr, HAS_MASK: tl.constexpr,
                   CAUSAL: tl.constexpr, VARLEN: tl.constexpr, DOT_PRECISION: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """dK, dV of one key block (dK/dV share strides), looping over the query blocks."""
    pid_n, b = _block_and_batch(MAX_LK, BLOCK_N)
    h = tl.program_id(1)
    q_start, q_len, q_rows, k_start, kv_len, kv_full, causal_off = _seq_info(
        b, Q_LEN, KV_LEN, KV_FULL, CU_Q, CU_K, MAX_LQ, MAX_LK, HAS_MASK, VARLEN)
    if VARLEN:
        k_rows = kv_len
    else:
        k_rows = MAX_LK
    start_n = pid_n * BLOCK_N
    if start_n < k_rows:
        b64 = b.to(tl.int64)
        h64 = h.to(tl.int64)
        offs_n = start_n + tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        offs_m0 = tl.arange(0, BLOCK_M)
        k = _load(K + b64 * stride_kb + h64 * stride_kh + (k_start + offs_n)[:, None] * stride_kn + offs_d[None, :],
                  offs_n, kv_len, offs_d, DH, True, not EVEN_D)
        v = _load(V + b64 * stride_vb + h64 * stride_vh + (k_start + offs_n)[:, None] * stride_vn + offs_d[None, :],
                  offs_n, kv_len, offs_d, DH, True, not EVEN_D)
        q_ptrs = Q + b64 * stride_qb + h64 * stride_qh + (q_start + offs_m0)[:, None] * stride_qm + offs_d[None, :]
        do_ptrs = DO + b64 * stride_dob + h64 * stride_doh + (q_start + offs_m0)[:, None] * stride_dom + offs_d[None, :]
        lse_off = b64 * stride_lb + h64 * stride_lh + q_start
        dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
        dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
        lo = 0
        hi = tl.where(start_n < kv_len, q_len, 0)
        if CAUSAL:  # queries m with m + causal_off >= start_n
            lo = (tl.maximum(start_n - causal_off, 0) // BLOCK_M) * BLOCK_M
        for start_m in range(lo, hi, BLOCK_M):
            offs_m = start_m + offs_m0
            q = _load(q_ptrs + start_m * stride_qm, offs_m, q_len, offs_d, DH, True, not EVEN_D)
            do = _load(do_ptrs + start_m * stride_dom, offs_m, q_len, offs_d, DH, True, not EVEN_D)
            lse, delta = _load_row_stats(LSE, DELTA, lse_off, offs_m, q_len)
            qk_t = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION) * qk_scale
            p_t = tl.math.exp2(qk_t - lse[None, :])
            if CAUSAL:
                p_t = tl.where(offs_m[None, :] + causal_off >= offs_n[:, None], p_t, 0.0)
            dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=DOT_PRECISION)
            dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
            ds_t = p_t * (dp_t - delta[None, :])
            dk = tl.dot(ds_t.to(q.dtype), q, dk, input_precision=DOT_PRECISION)
        # keys that no query may attend get zero gradients (their recomputed P is not masked)
        key_ok = offs_n < kv_len
        if HAS_MASK:
            key_ok = key_ok & (tl.load(MASK + b64 * stride_mb + offs_n, mask=key_ok, other=0) != 0)
        dk = tl.where(key_ok[:, None], dk * sm_scale, 0.0)
        dv = tl.where(key_ok[:, None], dv, 0.0)
        store_mask = (offs_n < k_rows)[:, None] & (offs_d < DH)[None, :]
        rows = (k_start + offs_n)[:, None] * stride_dkn + offs_d[None, :]
        tl.store(DK + b64 * stride_dkb + h64 * stride_dkh + rows, dk.to(DK.dtype.element_ty), mask=store_mask)
        tl.store(DV + b64 * stride_dkb + h64 * stride_dkh + rows, dv.to(DV.dtype.element_ty), mask=store_mask)


@triton.jit
def _dq_inner(dq, q, do, lse, delta, k_ptrs, v_ptrs, lo, hi, offs_m, offs_d, kv_len, causal_off,
              mask_row, qk_scale, stride_kn, stride_vn, DH,
              MASKED: tl.constexpr, HAS_MASK: tl.constexpr, CAUSAL: tl.constexpr,
              EVEN_D: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr):
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = _load(k_ptrs + start_n * stride_kn, offs_n, kv_len, offs_d, DH, MASKED, not EVEN_D)
        v = _load(v_ptrs + start_n * stride_vn, offs_n, kv_len, offs_d, DH, MASKED, not EVEN_D)
        if MASKED:
            attend = _attended(offs_n, kv_len, mask_row, HAS_MASK)
            if HAS_MASK:  # masked keys and values are ignored, NaN or not
                k = tl.where(attend[:, None], k, 0.0)
                v = tl.where(attend[:, None], v, 0.0)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        p = tl.math.exp2(qk - lse[:, None])
        if MASKED:
            p = tl.where(_valid_keys(offs_m, offs_n, attend, causal_off, CAUSAL), p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=DOT_PRECISION)
    return dq


@triton.autotune(configs=_configs(), key=_TUNE_KEY, prune_configs_by={"early_config_prune": _backward_prune("BLOCK_N")})
@triton.jit(do_not_specialize=_NO_SPECIALIZE)
def _attn_bwd_dq(Q, K, V, DO, LSE, DELTA, DQ, MASK, Q_LEN, KV_LEN, KV_FULL, CU_Q, CU_K,
                 stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn,
                 stride_vb, stride_vh, stride_vn, stride_dob, stride_doh, stride_dom,
                 stride_dqb, stride_dqh, stride_dqm, stride_lb, stride_lh, stride_mb,
                 MAX_LQ, MAX_LK, LQ_BUCKET, LK_BUCKET, sm_scale, qk_scale,
                 DH: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr, HAS_MASK: tl.constexpr,
                 CAUSAL: tl.constexpr, VARLEN: tl.constexpr, DOT_PRECISION: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """dQ of one query block, looping over the key blocks like the forward."""
    pid_m, b = _block_and_batch(MAX_LQ, BLOCK_M)
    h = tl.program_id(1)
    q_start, q_len, q_rows, k_start, kv_len, kv_full, causal_off = _seq_info(
        b, Q_LEN, KV_LEN, KV_FULL, CU_Q, CU_K, MAX_LQ, MAX_LK, HAS_MASK, VARLEN)
    start_m = pid_m * BLOCK_M
    if start_m < q_rows:
        b64 = b.to(tl.int64)
        h64 = h.to(tl.int64)
        offs_m = start_m + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        offs_n = tl.arange(0, BLOCK_N)
        rows = (q_start + offs_m)[:, None]
        q = _load(Q + b64 * stride_qb + h64 * stride_qh + rows * stride_qm + offs_d[None, :],
                  offs_m, q_len, offs_d, DH, True, not EVEN_D)
        do = _load(DO + b64 * stride_dob + h64 * stride_doh + rows * stride_dom + offs_d[None, :],
                   offs_m, q_len, offs_d, DH, True, not EVEN_D)
        lse, delta = _load_row_stats(LSE, DELTA, b64 * stride_lb + h64 * stride_lh + q_start, offs_m, q_len)
        k_ptrs = K + b64 * stride_kb + h64 * stride_kh + (k_start + offs_n)[:, None] * stride_kn + offs_d[None, :]
        v_ptrs = V + b64 * stride_vb + h64 * stride_vh + (k_start + offs_n)[:, None] * stride_vn + offs_d[None, :]
        mask_row = MASK + b64 * stride_mb
        dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        n_full, n_hi = _key_bounds(start_m, q_len, kv_len, kv_full, causal_off, BLOCK_M, BLOCK_N, CAUSAL)
        dq = _dq_inner(dq, q, do, lse, delta, k_ptrs, v_ptrs, 0, n_full, offs_m, offs_d, kv_len, causal_off,
                       mask_row, qk_scale, stride_kn, stride_vn, DH,
                       False, HAS_MASK, CAUSAL, EVEN_D, BLOCK_N, DOT_PRECISION)
        dq = _dq_inner(dq, q, do, lse, delta, k_ptrs, v_ptrs, n_full, n_hi, offs_m, offs_d, kv_len, causal_off,
                       mask_row, qk_scale, stride_kn, stride_vn, DH,
                       True, HAS_MASK, CAUSAL, EVEN_D, BLOCK_N, DOT_PRECISION)
        dq = dq * sm_scale
        store_mask = (offs_m < q_rows)[:, None] & (offs_d < DH)[None, :]
        tl.store(DQ + b64 * stride_dqb + h64 * stride_dqh + rows * stride_dqm + offs_d[None, :],
                 dq.to(DQ.dtype.element_ty), mask=store_mask)


# --- launchers ----------------------------------------------------------------------------

def _last_dim_contiguous(t):
    return t if t.stride(-1) == 1 else t.contiguous()


@triton.jit
def _mask_info_kernel(MASK, Q_LEN, KV_LEN, KV_FULL, B, LK, LQ, stride_mb,
                      SAME_LEN: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_L: tl.constexpr):
    """One program: per-row key lengths of the mask, then whether every row is a prefix."""
    not_prefix = tl.zeros([BLOCK_B], dtype=tl.int32)
    for b0 in range(0, B, BLOCK_B):
        offs_b = b0 + tl.arange(0, BLOCK_B)
        last = tl.zeros([BLOCK_B], dtype=tl.int32)
        count = tl.zeros([BLOCK_B], dtype=tl.int32)
        for l0 in range(0, LK, BLOCK_L):
            offs_l = l0 + tl.arange(0, BLOCK_L)
            attend = tl.load(MASK + offs_b[:, None].to(tl.int64) * stride_mb + offs_l[None, :],
                             mask=(offs_b < B)[:, None] & (offs_l < LK)[None, :], other=0) != 0
            last = tl.maximum(last, tl.max(tl.where(attend, offs_l[None, :] + 1, 0), 1))
            count += tl.sum(attend.to(tl.int32), 1)
        tl.store(KV_LEN + offs_b, last, mask=offs_b < B)
        not_prefix += (last != count).to(tl.int32)
    tl.debug_barrier()
    prefix = tl.sum(not_prefix, 0) == 0
    for b0 in range(0, B, BLOCK_B):
        offs_b = b0 + tl.arange(0, BLOCK_B)
        last = tl.load(KV_LEN + offs_b, mask=offs_b < B, other=0)
        tl.store(KV_FULL + offs_b, tl.where(prefix, last, 0), mask=offs_b < B)
        if SAME_LEN:
            tl.store(Q_LEN + offs_b, tl.where(prefix, last, LQ), mask=offs_b < B)
        else:
            tl.store(Q_LEN + offs_b, tl.zeros([BLOCK_B], dtype=tl.int32) + LQ, mask=offs_b < B)


def _mask_info(mask, Lq):
    """Per-sequence lengths of a key padding mask [B, Lk] bool, computed on the device in one
    launch (no host sync).

    Returns (mask as uint8, q_len, kv_len, kv_full), int32 [B] each: kv_len = last
    attended key + 1; kv_full = kv_len if the whole mask is a right-padding prefix, else 0
    (every key block then reads the mask); q_len = kv_len for a prefix mask with Lq == Lk
    (padded query rows are zeros), else Lq.
    """
    B, Lk = mask.shape
    mask_u8 = mask.contiguous().view(torch.uint8)
    info = torch.empty((3, B), device=mask.device, dtype=torch.int32)
    _mask_info_kernel[(1,)](mask_u8, info[0], info[1], info[2], B, Lk, Lq, mask_u8.stride(0),
                            SAME_LEN=Lq == Lk, BLOCK_B=32, BLOCK_L=128, num_warps=4)
    return mask_u8, info[0], info[1], info[2]


def _grid(rows, pb, block="BLOCK_M"):
    """(row blocks x batch, heads): see _block_and_batch."""
    return lambda meta: (triton.cdiv(rows, meta[block]) * pb.B, pb.H)


def _rows(t, varlen):
    """(batch, head, row) strides of a dense [B, H, L, Dh] or packed [total, H, Dh] tensor."""
    return (0, t.stride(1), t.stride(0)) if varlen else (t.stride(0), t.stride(1), t.stride(2))


class _Problem:
    """What every kernel launch shares: sizes, sequence bounds and mask arguments."""

    def __init__(self, q, k, mask, causal, cu_q, cu_k, max_q, max_k):
        self.causal = causal
        self.varlen = cu_q is not None
        if self.varlen:
            _, self.H, self.Dh = q.shape
            self.B, self.max_lq, self.max_lk = cu_q.shape[0] - 1, max_q, max_k
        else:
            self.B, self.H, self.max_lq, self.Dh = q.shape
            self.max_lk = k.shape[2]
        self.has_mask = mask is not None
        if self.has_mask:
            self.mask, *self.lengths = _mask_info(mask, self.max_lq)
        else:
            self.mask, self.lengths = q, (q, q, q)  # unused pointers
        self.cu = (cu_q, cu_k) if self.varlen else (q, q)
        self.empty = self.B == 0 or self.H == 0 or self.max_lq == 0

    def pointers(self):
        """MASK, Q_LEN, KV_LEN, KV_FULL, CU_Q, CU_K."""
        return (self.mask, *self.lengths, *self.cu)

    def sizes(self):
        """stride_mb, MAX_LQ, MAX_LK and the autotuning keys (lengths rounded up to a power
        of two: padded report batches have many distinct Lmax)."""
        return (self.mask.stride(0) if self.has_mask else 0, self.max_lq, self.max_lk,
                triton.next_power_of_2(max(self.max_lq, 1)), triton.next_power_of_2(max(self.max_lk, 1)))

    def constexprs(self, dtype):
        block_d = max(16, triton.next_power_of_2(self.Dh))
        return dict(DH=self.Dh, BLOCK_D=block_d, EVEN_D=block_d == self.Dh, HAS_MASK=self.has_mask,
                    CAUSAL=self.causal, VARLEN=self.varlen, DOT_PRECISION=backend.dot_precision(dtype))


def _forward(q, k, v, mask, scale, causal, cu_q=None, cu_k=None, max_q=0, max_k=0):
    q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
    pb = _Problem(q, k, mask, causal, cu_q, cu_k, max_q, max_k)
    if pb.varlen:
        out = torch.zeros_like(q)
        lse = torch.full((pb.H, q.shape[0]), float("-inf"), device=q.device, dtype=torch.float32)
        lse_strides = (0, lse.stride(0))
    else:
        out = torch.empty((pb.B, pb.max_lq, pb.H, pb.Dh), device=q.device, dtype=q.dtype).transpose(1, 2)
        lse = torch.empty((pb.B, pb.H, pb.max_lq), device=q.device, dtype=torch.float32)
        lse_strides = (lse.stride(0), lse.stride(1))
    if pb.empty:
        return out, lse
    _attn_fwd[_grid(pb.max_lq, pb)](
        q, k, v, out, lse, *pb.pointers(),
        *_rows(q, pb.varlen), *_rows(k, pb.varlen), *_rows(v, pb.varlen), *_rows(out, pb.varlen),
        *lse_strides, *pb.sizes(), scale * LOG2E, **pb.constexprs(q.dtype))
    return out, lse


def _backward(do, q, k, v, out, lse, mask, scale, causal, cu_q=None, cu_k=None, max_q=0, max_k=0):
    do, q, k, v, out = (_last_dim_contiguous(t) for t in (do, q, k, v, out))
    pb = _Problem(q, k, mask, causal, cu_q, cu_k, max_q, max_k)
    new = torch.zeros_like if pb.varlen or pb.empty or pb.max_lk == 0 else torch.empty_like
    dq, dk, dv = (new(t, memory_format=torch.contiguous_format) for t in (q, k, v))
    if pb.empty or pb.max_lk == 0:
        return dq, dk, dv
    lse_strides = (0, lse.stride(0)) if pb.varlen else (lse.stride(0), lse.stride(1))
    delta = torch.empty_like(lse)
    const = pb.constexprs(q.dtype)
    _bwd_preprocess[(triton.cdiv(pb.max_lq, 64) * pb.B, pb.H)](
        out, do, delta, pb.cu[0], *_rows(out, pb.varlen), *_rows(do, pb.varlen), *lse_strides,
        pb.max_lq, DH=pb.Dh, BLOCK_D=const["BLOCK_D"], VARLEN=pb.varlen, BLOCK_M=64)
    strides = (*_rows(q, pb.varlen), *_rows(k, pb.varlen), *_rows(v, pb.varlen), *_rows(do, pb.varlen))
    _attn_bwd_dkdv[_grid(pb.max_lk, pb, "BLOCK_N")](
        q, k, v, do, lse, delta, dk, dv, *pb.pointers(), *strides, *_rows(dk, pb.varlen), *lse_strides,
        *pb.sizes(), scale, scale * LOG2E, **const)
    _attn_bwd_dq[_grid(pb.max_lq, pb)](
        q, k, v, do, lse, delta, dq, *pb.pointers(), *strides, *_rows(dq, pb.varlen), *lse_strides,
        *pb.sizes(), scale, scale * LOG2E, **const)
    return dq, dk, dv


# --- torch.library ops --------------------------------------------------------------------

@torch.library.custom_op("mcr_kernels::flash_attn_fwd", mutates_args=())
def flash_attn_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_padding_mask: torch.Tensor | None,
                   softmax_scale: float, causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """q [B, H, Lq, Dh], k/v [B, H, Lk, Dh] -> (out [B, H, Lq, Dh], lse float32 [B, H, Lq])."""
    return _forward(q, k, v, key_padding_mask, softmax_scale, causal)


@flash_attn_fwd.register_fake
def _(q, k, v, key_padding_mask, softmax_scale, causal):
    B, H, Lq, Dh = q.shape
    out = q.new_empty((B, Lq, H, Dh)).transpose(1, 2)
    return out, q.new_empty((B, H, Lq), dtype=torch.float32)


@torch.library.custom_op("mcr_kernels::flash_attn_bwd", mutates_args=())
def flash_attn_bwd(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                   lse: torch.Tensor, key_padding_mask: torch.Tensor | None, softmax_scale: float,
                   causal: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv), contiguous, in the dtypes of q, k, v."""
    return _backward(grad_out, q, k, v, out, lse, key_padding_mask, softmax_scale, causal)


@flash_attn_bwd.register_fake
def _(grad_out, q, k, v, out, lse, key_padding_mask, softmax_scale, causal):
    return (torch.empty_like(q, memory_format=torch.contiguous_format),
            torch.empty_like(k, memory_format=torch.contiguous_format),
            torch.empty_like(v, memory_format=torch.contiguous_format))


def _fwd_setup(ctx, inputs, output):
    q, k, v, mask, scale, causal = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, mask)
    ctx.scale, ctx.causal = scale, causal
    ctx.mark_non_differentiable(lse)


def _fwd_backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse, mask = ctx.saved_tensors
    dq, dk, dv = flash_attn_bwd(grad_out, q, k, v, out, lse, mask, ctx.scale, ctx.causal)
    return dq, dk, dv, None, None, None


flash_attn_fwd.register_autograd(_fwd_backward, setup_context=_fwd_setup)


@torch.library.custom_op("mcr_kernels::flash_attn_varlen_fwd", mutates_args=())
def flash_attn_varlen_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                          cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int,
                          softmax_scale: float, causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """q [total_q, H, Dh], k/v [total_k, H, Dh] -> (out [total_q, H, Dh], lse float32 [H, total_q])."""
    return _forward(q, k, v, None, softmax_scale, causal, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)


@flash_attn_varlen_fwd.register_fake
def _(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal):
    return torch.empty_like(q), q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32)


@torch.library.custom_op("mcr_kernels::flash_attn_varlen_bwd", mutates_args=())
def flash_attn_varlen_bwd(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                          out: torch.Tensor, lse: torch.Tensor, cu_seqlens_q: torch.Tensor,
                          cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int,
                          softmax_scale: float, causal: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _backward(grad_out, q, k, v, out, lse, None, softmax_scale, causal,
                     cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)


@flash_attn_varlen_bwd.register_fake
def _(grad_out, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal):
    return (torch.empty_like(q, memory_format=torch.contiguous_format),
            torch.empty_like(k, memory_format=torch.contiguous_format),
            torch.empty_like(v, memory_format=torch.contiguous_format))


def _varlen_setup(ctx, inputs, output):
    q, k, v, cu_q, cu_k, max_q, max_k, scale, causal = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, cu_q, cu_k)
    ctx.args = (max_q, max_k, scale, causal)
    ctx.mark_non_differentiable(lse)


def _varlen_backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse, cu_q, cu_k = ctx.saved_tensors
    dq, dk, dv = flash_attn_varlen_bwd(grad_out, q, k, v, out, lse, cu_q, cu_k, *ctx.args)
    return dq, dk, dv, None, None, None, None, None, None


flash_attn_varlen_fwd.register_autograd(_varlen_backward, setup_context=_varlen_setup)


# --- backend functions --------------------------------------------------------------------

def _backward_launches(q):
    """False when a gradient will be asked for and no backward tile fits the device (fp32 at
    head dim 256 on an A100): then the op runs the reference, not a kernel that cannot launch."""
    needs_grad = torch.is_grad_enabled() and q.requires_grad
    return not needs_grad or backward_fits(q, max(16, triton.next_power_of_2(q.shape[-1])))


def flash_attention(q, k, v, *, key_padding_mask=None, softmax_scale=None, causal=False, return_lse=False):
    """Triton backend of mcr_kernels.flash_attention (float64 goes to the reference)."""
    if q.dtype == torch.float64 or not _backward_launches(q):
        return reference.flash_attention(q, k, v, key_padding_mask=key_padding_mask,
                                         softmax_scale=softmax_scale, causal=causal, return_lse=return_lse)
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else float(softmax_scale)
    out, lse = flash_attn_fwd(q, k, v, key_padding_mask, scale, causal)
    return (out, lse) if return_lse else out


def flash_attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, *,
                           softmax_scale=None, causal=False):
    """Triton backend of mcr_kernels.flash_attention_varlen (float64 goes to the reference)."""
    if q.dtype == torch.float64 or not _backward_launches(q):
        return reference.flash_attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                                softmax_scale=softmax_scale, causal=causal)
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else float(softmax_scale)
    out, _ = flash_attn_varlen_fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, int(max_seqlen_q), int(max_seqlen_k),
                                   scale, causal)
    return out



# --- compile check ------------------------------------------------------------------------
# What the launchers above pass, for python -m mcr_kernels.compile_check (every autotune config
# that _prune keeps is compiled for sm_80 and sm_90). Head dims: MCR's 32 and 64, an uneven
# 96 (BLOCK_D 128 with column masks), 128 and the largest allowed, 256. Masks: the dense path
# with a key padding mask and causal (every masking branch), and varlen causal.
_HEAD_DIMS = (128, 64, 32, 96, 256)  # 128 first: the subset compiles the first variant only
_TILE_STRIDES = tuple(f"stride_{t}{a}" for t in ("q", "k", "v", "o", "do", "dk", "dq") for a in ("b", "h", "m", "n"))


def _attention_variants(dtype, with_mask=True):
    """Dense (with a mask, if the kernel takes one) then varlen, causal, every head dim; for fp32
    exact products (torch's default) before tf32."""
    precisions = ("ieee", "tf32") if dtype == "fp32" else ("tf32",)
    return [dict(DH=dh, BLOCK_D=max(16, triton.next_power_of_2(dh)), EVEN_D=dh == max(16, triton.next_power_of_2(dh)),
                 HAS_MASK=with_mask and not varlen, CAUSAL=True, VARLEN=varlen, DOT_PRECISION=precision)
            for precision in precisions for varlen in (False, True) for dh in _HEAD_DIMS]


_ATTENTION_POINTERS = dict(Q="*{dtype}", K="*{dtype}", V="*{dtype}", O="*{dtype}", DO="*{dtype}", DQ="*{dtype}",
                           DK="*{dtype}", DV="*{dtype}", LSE="*fp32", DELTA="*fp32", MASK="*u8", Q_LEN="*i32",
                           KV_LEN="*i32", KV_FULL="*i32", CU_Q="*i32", CU_K="*i32", qk_scale="fp32",
                           sm_scale="fp32")
COMPILE_SPECS = [
    *(dict(kernel=kernel, dtypes=("fp16", "bf16", "fp32"), signature=_ATTENTION_POINTERS,
           divisible=_TILE_STRIDES, variants=_attention_variants)
      for kernel in (_attn_fwd, _attn_bwd_dkdv, _attn_bwd_dq)),
    dict(kernel=_bwd_preprocess, dtypes=("fp16", "bf16", "fp32"), signature=_ATTENTION_POINTERS,
         divisible=_TILE_STRIDES,
         variants=lambda dtype: [dict(DH=v["DH"], BLOCK_D=v["BLOCK_D"], VARLEN=v["VARLEN"], BLOCK_M=64)
                                 for v in _attention_variants("bf16", with_mask=False)]),
    dict(kernel=_mask_info_kernel, dtypes=("u8",), signature=_ATTENTION_POINTERS,
         variants=[dict(SAME_LEN=same, BLOCK_B=32, BLOCK_L=128, num_warps=4) for same in (True, False)]),
]
