"""Masked-token attention: mcr_kernels (Triton) vs SDPA's backends (and flash-attn if installed).

For each MCR shape: forward, backward and forward+backward time, TFLOP/s with
FlashAttention's counting (4·H·Dh·pairs forward, 2.5× that backward, pairs = non-padded
(query, key) pairs only) and peak memory of forward+backward.

    python benchmarks/bench_attention.py            # GPU, bf16, < 3 min
    python benchmarks/bench_attention.py --quick    # tiny shapes, CPU ok (Triton interpreter)

Shapes: image encoder (B=256, H=12, L=99, Dh=64), MAE decoder (B=256, H=16, L=197, Dh=32),
reports (B=256, H=12, Lmax=128, lengths ~ N(60, 20) clipped to [8, 128], Dh=64, padding
mask), long (B=8, H=16, L=2048, Dh=64; FA2's published setting of 16k tokens); --quick
adds a causal shape. The first call of each (dtype, head dim, mask mode) compiles and
autotunes the kernels (most of the run time; Triton caches the binaries on disk).
roofline_* is the H100/H200 roofline time of the same work (benchmarks/roofline.py: the
FLOPs above at the dense bf16 peak, or the bytes of q, k, v, out, grads at HBM bandwidth,
whichever is slower) over the measured time.
Results: benchmarks/results/attention-<device>-<date>.{json,csv}.
"""
import argparse
import os
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # Triton kernels on CPU tensors (slow, --quick)

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import roofline  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from _common import device_name, is_oom, peak_bytes, print_table, time_ms, write_results  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402

import mcr_kernels  # noqa: E402

try:
    from flash_attn import flash_attn_func, flash_attn_varlen_func
except ImportError:
    flash_attn_func = flash_attn_varlen_func = None

SDPA_BACKENDS = {"sdpa-flash": SDPBackend.FLASH_ATTENTION, "sdpa-efficient": SDPBackend.EFFICIENT_ATTENTION,
                 "sdpa-cudnn": SDPBackend.CUDNN_ATTENTION, "sdpa-math": SDPBackend.MATH}


def shapes(quick):
    if quick:
        return [dict(name="image", B=2, H=2, L=19, Dh=32), dict(name="reports", B=3, H=2, L=24, Dh=32, padded=True),
                dict(name="long-causal", B=1, H=2, L=40, Dh=32, causal=True)]
    return [dict(name="image", B=256, H=12, L=99, Dh=64),
            dict(name="decoder", B=256, H=16, L=197, Dh=32),
            dict(name="reports", B=256, H=12, L=128, Dh=64, padded=True),
            dict(name="long", B=8, H=16, L=2048, Dh=64)]


def report_lengths(B, L, generator):
    """Realistic report lengths: normal around 60 ± 20 tokens, clipped to [8, L] (scaled for small L)."""
    mean, std = 60 * L / 128, 20 * L / 128
    lengths = (torch.randn(B, generator=generator) * std + mean).round().clamp(max(1, L // 16), L).long()
    lengths[0] = L  # the batch is padded to its longest report
    return lengths


def candidates(q, k, v, mask, causal, lengths):
    """name -> fn() returning the output [B, H, L, Dh] (or packed), differentiable in q, k, v."""
    B, H, L, Dh = q.shape
    sdpa_mask = None if mask is None else mask[:, None, None, :]
    fns = {"mcr-triton": lambda: mcr_kernels.flash_attention(q, k, v, key_padding_mask=mask, causal=causal)}
    for name, kind in SDPA_BACKENDS.items():
        def run(kind=kind):
            with sdpa_kernel(kind):
                return F.scaled_dot_product_attention(q, k, v, attn_mask=sdpa_mask, is_causal=causal)
        fns[name] = run
    if mask is not None:  # packed layout: the unpadding is done once, outside the timing
        cu = F.pad(lengths.cumsum(0), (1, 0)).to(torch.int32).to(q.device)
        keep = mask.flatten().nonzero().flatten()
        packed = [t.transpose(1, 2).reshape(B * L, H, Dh)[keep].detach().requires_grad_() for t in (q, k, v)]
        max_len = int(lengths.max())
        fns["mcr-triton-varlen"] = (lambda: mcr_kernels.flash_attention_varlen(*packed, cu, cu, max_len, max_len,
                                                                                 causal=causal), packed)
        if flash_attn_varlen_func is not None:
            fns["flash-attn-varlen"] = (lambda: flash_attn_varlen_func(*packed, cu, cu, max_len, max_len,
                                                                         causal=causal), packed)
    elif flash_attn_func is not None:
        qt, kt, vt = (t.transpose(1, 2).detach().contiguous().requires_grad_() for t in (q, k, v))
        fns["flash-attn"] = (lambda: flash_attn_func(qt, kt, vt, causal=causal), [qt, kt, vt])
    return fns


def measure(fn, inputs, reps):
    out = fn()
    grad = torch.randn_like(out)
    fwd = time_ms(fn, **reps)
    out = fn()
    bwd = time_ms(lambda: torch.autograd.grad(out, inputs, grad, retain_graph=True), **reps)

    def step():
        torch.autograd.grad(fn(), inputs, grad)
    return fwd, bwd, time_ms(step, **reps), peak_bytes(step)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny shapes (CPU ok)")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    reps = dict(warmup=1, repeats=2) if args.quick else dict(warmup=5, repeats=20)
    g = torch.Generator().manual_seed(0)
    gpu = roofline.device_for(device_name(device))
    rows = []
    with mcr_kernels.use_backend("triton", "flash_attention", "flash_attention_varlen"):
        for shape in shapes(args.quick):
            B, H, L, Dh = shape["B"], shape["H"], shape["L"], shape["Dh"]
            causal = shape.get("causal", False)
            q, k, v = (torch.randn(B, H, L, Dh, generator=g).to(device, dtype).requires_grad_() for _ in range(3))
            lengths = report_lengths(B, L, g) if shape.get("padded") else torch.full((B,), L)
            mask = (torch.arange(L)[None] < lengths[:, None]).to(device) if shape.get("padded") else None
            pairs = int((lengths * lengths).sum()) if not causal else int((lengths * (lengths + 1) // 2).sum())
            fwd_flop = 4 * H * Dh * pairs
            tokens, precision = int(lengths.sum()), roofline.matmul_precision(str(dtype)[6:])
            work_fwd = roofline.attention(pairs, tokens, H, Dh, q.element_size(), precision)
            work_bwd = roofline.attention(pairs, tokens, H, Dh, q.element_size(), precision, backward=True)
            for name, fn in candidates(q, k, v, mask, causal, lengths).items():
                fn, inputs = fn if isinstance(fn, tuple) else (fn, [q, k, v])
                row = dict(shape=shape["name"], B=B, H=H, L=L, Dh=Dh, causal=causal, dtype=str(dtype)[6:],
                           mean_len=round(float(lengths.float().mean()), 1), impl=name)
                try:
                    fwd, bwd, total, peak = measure(fn, inputs, reps)
                except RuntimeError as error:  # a backend that refuses the shape or mask
                    if is_oom(error):
                        torch.cuda.empty_cache()
                    row["error"] = str(error).splitlines()[0][:80]
                    rows.append(row)
                    continue
                row.update(fwd_ms=fwd, bwd_ms=bwd, fwd_bwd_ms=total, fwd_tflops=fwd_flop / fwd / 1e9,
                           bwd_tflops=2.5 * fwd_flop / bwd / 1e9, fwd_bwd_tflops=3.5 * fwd_flop / total / 1e9,
                           peak_mib=peak / 2 ** 20, roofline_fwd=roofline.fraction(work_fwd, gpu, fwd),
                           roofline_bwd=roofline.fraction(work_bwd, gpu, bwd),
                           roofline_fwd_bwd=roofline.fraction(work_fwd + work_bwd, gpu, total))
                rows.append(row)
            torch.cuda.empty_cache() if device == "cuda" else None
    summary = speedups(rows)
    print_table(rows, ["shape", "impl", "mean_len", "fwd_ms", "bwd_ms", "fwd_bwd_ms", "fwd_tflops",
                       "bwd_tflops", "fwd_bwd_tflops", "roofline_fwd", "roofline_bwd", "roofline_fwd_bwd", "peak_mib",
                       "error"])
    print(f"roofline_*: fraction of the {gpu.name} roofline (datasheet peaks; a CPU run only checks the arithmetic)")
    print_table(summary)
    if not args.quick or device == "cuda":
        paths = write_results("attention", rows, extra={"speedups": summary})
        print("wrote", *paths)


def speedups(rows):
    """mcr-triton vs the best SDPA backend (and flash-attn) per shape, fwd and fwd+bwd."""
    out = []
    for shape in dict.fromkeys(r["shape"] for r in rows):
        done = {r["impl"]: r for r in rows if r["shape"] == shape and "error" not in r}
        ours = done.get("mcr-triton")
        sdpa = [r for name, r in done.items() if name.startswith("sdpa")]
        if ours is None or not sdpa:
            continue
        row = dict(shape=shape)
        for key in ("fwd_ms", "fwd_bwd_ms"):
            best = min(sdpa, key=lambda r: r[key])
            row[f"{key[:-3]}_vs_best_sdpa"] = best[key] / ours[key]
            row[f"{key[:-3]}_best_sdpa"] = best["impl"]
        ref = done.get("flash-attn-varlen") or done.get("flash-attn")
        mine = done.get("mcr-triton-varlen") or ours
        if ref is not None:
            row["fwd_bwd_vs_flash_attn"] = ref["fwd_bwd_ms"] / mine["fwd_bwd_ms"]
        out.append(row)
    return out


if __name__ == "__main__":
    main()
