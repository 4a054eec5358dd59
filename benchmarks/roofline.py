"""Roofline of each op: the bytes it must move and the FLOPs it must do per call, and the time
those imply on an H100 / H200. Benchmarks divide this bound by their measured time
(`fraction = bound_ms / measured_ms`, 1.0 = at the roofline).

Minimum work only: every input read once, every output written once, no recomputation
(FlashAttention's backward recomputes P, the fused MbA backward recomputes the hidden layer;
those FLOPs are the kernels' choice, not the op's). Peaks are datasheet figures (dense, no
sparsity), not measurements:

    device        HBM TB/s   bf16/fp16 TFLOP/s   tf32 TFLOP/s   fp32 (no tensor cores)
    H100 SXM      3.35       989                 494.5          66.9
    H200 SXM      4.8        989                 494.5          66.9

    Work(flops={"bf16": 2 * m * n * k}, bytes=2 * (m * k + k * n + m * n))
    bound_ms(work, DEVICES["H100"])        # max(compute time, memory time)
"""
import dataclasses


@dataclasses.dataclass(frozen=True)
class Device:
    name: str
    hbm_bytes_per_s: float
    flops_per_s: dict  # math precision -> dense FLOP/s


_TENSOR = {"bf16": 989e12, "fp16": 989e12, "tf32": 494.5e12, "fp32": 66.9e12}
DEVICES = {"H100": Device("H100 SXM", 3.35e12, _TENSOR), "H200": Device("H200 SXM", 4.8e12, _TENSOR)}


@dataclasses.dataclass(frozen=True)
class Work:
    """FLOPs by math precision ("bf16", "fp16", "tf32", "fp32") and bytes moved to/from HBM."""
    flops: dict
    bytes: float

    def __add__(self, other):
        flops = dict(self.flops)
        for k, v in other.flops.items():
            flops[k] = flops.get(k, 0) + v
        return Work(flops, self.bytes + other.bytes)


def bound_ms(work, device):
    """Lower bound on the time of `work` in ms: the slower of its compute and its memory traffic."""
    compute_s = sum(f / device.flops_per_s[p] for p, f in work.flops.items())
    return 1e3 * max(compute_s, work.bytes / device.hbm_bytes_per_s)


def device_for(name):
    """The roofline device for a torch device name: H200 if it says so, else H100 (also the
    stand-in for any other device, so that the fractions stay comparable)."""
    return DEVICES["H200"] if "H200" in (name or "") else DEVICES["H100"]


def fraction(work, device, measured_ms):
    """Achieved fraction of the roofline: bound / measured."""
    return bound_ms(work, device) / measured_ms


def matmul_precision(dtype_name):
    """The math precision of a matmul on inputs of this dtype ("bfloat16" or "bf16", ...):
    16-bit inputs as themselves, float32 as "fp32" (the kernels' default; tf32 only when allowed)."""
    short = {"bfloat16": "bf16", "float16": "fp16", "half": "fp16", "float32": "fp32", "float": "fp32"}
    name = short.get(dtype_name, dtype_name)
    if name not in DEVICES["H100"].flops_per_s:
        raise ValueError(f"dtype_name must be one of bf16, fp16, fp32 (or torch's names), got {dtype_name!r}")
    return name


# --- patch dropping: pure data movement -----------------------------------------------------

def gather_tokens(B, N, K, D, element_size, backward=False):
    """Forward: read the B*K kept rows of x [B, N, D], write out [B, K, D] (+ int64 ids [B, K]).
    Backward: read grad [B, K, D], write the [B, N, D] gradient of x (zeros where dropped)."""
    ids = 8 * B * K
    if backward:
        return Work({}, (B * K + B * N) * D * element_size + ids)
    return Work({}, 2 * B * K * D * element_size + ids)


def restore_tokens(B, N, K, D, element_size):
    """Forward: read x_kept [B, K, D] and the mask token, write [B, N, D] (+ int64 ids [B, N]).
    Backward moves the same bytes the other way (read grad [B, N, D], write [B, K, D] and [D])."""
    return Work({}, (B * K + B * N + 1) * D * element_size + 8 * B * N)


def keep_indices(B, N, K):
    """random_keep_indices: the int64 ids_keep [B, K] and ids_restore [B, N] it writes (the noise
    and the argsort's own passes are not counted)."""
    return Work({}, 8 * B * (N + K))


# --- attention ------------------------------------------------------------------------------

def attention(pairs, tokens, H, Dh, element_size, precision="bf16", backward=False):
    """FlashAttention work for `pairs` attended (query, key) pairs in all and `tokens`
    non-padded rows per tensor (self-attention: Lq = Lk per sequence).

    FLOPs (FlashAttention's counting): forward 4 * pairs * H * Dh (QK^T and PV), backward
    2.5x that (5 matmuls). Bytes: forward reads q, k, v and writes out (+ float32 LSE);
    backward reads q, k, v, out, dout, LSE and writes dq, dk, dv.
    """
    fwd_flops = 4 * pairs * H * Dh
    row = tokens * H * Dh * element_size
    if backward:
        return Work({precision: 2.5 * fwd_flops}, 8 * row + 4 * tokens * H)
    return Work({precision: fwd_flops}, 4 * row + 4 * tokens * H)


def attention_pairs(lengths, causal=False):
    """Attended (query, key) pairs of self-attention over sequences of these lengths."""
    return sum(n * (n + 1) // 2 if causal else n * n for n in lengths)


# --- MbA pooling + InfoNCE ------------------------------------------------------------------

def mba_infonce(B, L_img, L_txt, D, E, hidden, element_size, precision="bf16"):
    """One forward + backward of mba_infonce: both towers' heads (GEMM D -> hidden, activation,
    masked mean, then hidden -> E; `hidden=None` for a linear D -> E head) and the symmetric
    InfoNCE on float32 [B, E] embeddings (tf32 products for 16-bit inputs).

    FLOPs: each GEMM 2mnk forward and 4mnk backward (dX and dW); the linear head pools first,
    so its GEMM has m = B. InfoNCE: S = img @ txt^T once (2 B^2 E) and its two gradients
    (4 B^2 E). Bytes: the tokens read in forward, read again and their gradient written in
    backward (3 passes), the weights read and their gradients written; embeddings are B x E.
    """
    work = Work({}, 0)
    for L in (L_img, L_txt):
        if hidden is None:
            gemm = 6 * B * D * E
            weights = D * E
        else:
            gemm = 6 * B * L * D * hidden + 6 * B * hidden * E
            weights = D * hidden + hidden * E
        work = work + Work({precision: gemm}, 3 * B * L * D * element_size + 2 * weights * element_size)
    nce_precision = "tf32" if precision in ("bf16", "fp16") else "fp32"
    return work + Work({nce_precision: 6 * B * B * E}, 4 * 4 * B * E)
