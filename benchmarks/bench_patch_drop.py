"""Patch dropping: forward, backward and forward+backward time, peak memory and achieved
GB/s of every available backend (triton, native, reference) at MCR shapes, against the
eager reference and the device's measured copy bandwidth.

    python benchmarks/bench_patch_drop.py            # GPU: B in {64, 256}, bf16, ~1 minute
    python benchmarks/bench_patch_drop.py --quick    # tiny shapes, runs on CPU

Cases (ratio 0.5, N = 196 patches, K = 98 kept):
  indices  random_keep_indices(B, 196, 98)                       (forward only)
  gather   gather_tokens(x [B, 196, 768], ids_keep)               the encoder's patch drop
  masking  random_masking(x [B, 196, 768], 0.5, prefix 0)         indices + gather, as the model calls it
  restore  restore_tokens(latent[:, 1:] of [B, 99, 512], ids_restore, mask_token [512])  the decoder
GB/s counts the bytes each pass must move at least (rows read + rows written + int64 ids,
benchmarks/roofline.py); pct_copy_bw is fwd+bwd GB/s over copy_bandwidth_gbs(); roofline_frac is
the H100/H200 roofline time (HBM datasheet bandwidth) over the measured fwd+bwd time. Rows go
to benchmarks/results/ via write_results.
"""
import argparse
import pathlib
import sys

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import roofline  # noqa: E402
from _common import copy_bandwidth_gbs, device_name, is_oom, peak_bytes, print_table, time_ms, write_results  # noqa: E402

import mcr_kernels  # noqa: E402

OPS = ("random_keep_indices", "gather_tokens", "restore_tokens")


def make_case(case, B, N, K, D, dtype, device):
    """(forward closure, inputs needing grad, grad_out shape, bytes fwd, bytes bwd) for one case."""
    es = torch.empty((), dtype=dtype).element_size()
    if case == "indices":
        return (lambda: mcr_kernels.random_keep_indices(B, N, K, device=device)), [], None, \
            roofline.keep_indices(B, N, K).bytes, 0
    if case in ("gather", "masking"):
        x = torch.randn(B, N, D, device=device, dtype=dtype, requires_grad=True)
        ids_keep, _ = mcr_kernels.random_keep_indices(B, N, K, device=device)
        if case == "gather":
            fwd = lambda: mcr_kernels.gather_tokens(x, ids_keep)  # noqa: E731
        else:
            fwd = lambda: mcr_kernels.random_masking(x, 1 - K / N, num_prefix_tokens=0)[0]  # noqa: E731
        return (fwd, [x], (B, K, D), roofline.gather_tokens(B, N, K, D, es).bytes,
                roofline.gather_tokens(B, N, K, D, es, backward=True).bytes)
    latent = torch.randn(B, K + 1, D, device=device, dtype=dtype, requires_grad=True)
    mask_token = torch.randn(D, device=device, dtype=dtype, requires_grad=True)
    _, ids_restore = mcr_kernels.random_keep_indices(B, N, K, device=device)
    fwd = lambda: mcr_kernels.restore_tokens(latent[:, 1:], ids_restore, mask_token)  # noqa: E731
    restore_bytes = roofline.restore_tokens(B, N, K, D, es).bytes
    return fwd, [latent, mask_token], (B, N, D), restore_bytes, restore_bytes


def measure(case, name, B, N, K, D, dtype, device, timing):
    fwd, inputs, grad_shape, bytes_fwd, bytes_bwd = make_case(case, B, N, K, D, dtype, device)
    row = {"case": case, "backend": name, "B": B, "N": N, "K": K, "D": D, "dtype": str(dtype).split(".")[-1]}
    with mcr_kernels.use_backend(name, *[op for op in OPS if name in mcr_kernels.registered_backends(op)]):
        row["fwd_ms"] = time_ms(fwd, **timing)
        row["fwd_gbs"] = bytes_fwd / row["fwd_ms"] / 1e6
        if inputs:
            grad_out = torch.randn(grad_shape, device=device, dtype=dtype)
            out = fwd()
            bwd = lambda: torch.autograd.grad(out, inputs, grad_out, retain_graph=True)  # noqa: E731
            fwd_bwd = lambda: torch.autograd.grad(fwd(), inputs, grad_out)  # noqa: E731
            row["bwd_ms"] = time_ms(bwd, **timing)
            row["fwd_bwd_ms"] = time_ms(fwd_bwd, **timing)
            row["bwd_gbs"] = bytes_bwd / row["bwd_ms"] / 1e6
            del out
            row["peak_mb"] = peak_bytes(fwd_bwd) / 2 ** 20
        else:
            row["fwd_bwd_ms"] = row["fwd_ms"]
            row["peak_mb"] = peak_bytes(fwd) / 2 ** 20
        row["fwd_bwd_gbs"] = (bytes_fwd + bytes_bwd) / row["fwd_bwd_ms"] / 1e6
        gpu = roofline.device_for(device_name(device))
        row["roofline_frac"] = roofline.fraction(roofline.Work({}, bytes_fwd + bytes_bwd), gpu, row["fwd_bwd_ms"])
    return row


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny shapes and few repeats (CPU check)")
    parser.add_argument("--no-write", action="store_true", help="print only, write no result files")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.quick:
        batches, N, K, dims, dtype = (2,), 16, 8, {"encoder": 64, "decoder": 32}, torch.float32
        timing, copy_bytes = dict(warmup=1, repeats=3), 1 << 24
    else:
        batches, N, K, dims, dtype = (64, 256), 196, 98, {"encoder": 768, "decoder": 512}, torch.bfloat16
        timing, copy_bytes = dict(warmup=10, repeats=50), 1 << 30
    copy_gbs = copy_bandwidth_gbs(copy_bytes)
    print(f"device {device}: copy bandwidth {copy_gbs:.0f} GB/s")

    rows = []
    for case in ("indices", "gather", "masking", "restore"):
        D = dims["decoder"] if case == "restore" else dims["encoder"]
        op = {"indices": "random_keep_indices", "restore": "restore_tokens"}.get(case, "gather_tokens")
        for B in batches:
            case_rows = []
            for name in ("reference", "triton", "native"):
                if name not in mcr_kernels.available_backends(op, device):
                    continue
                try:
                    case_rows.append(measure(case, name, B, N, K, D, dtype, device, timing))
                except RuntimeError as error:
                    if not is_oom(error):
                        raise
                    print(f"{case} {name} B={B}: out of memory")
                    torch.cuda.empty_cache()
            ref = next((r for r in case_rows if r["backend"] == "reference"), None)
            for r in case_rows:
                r["pct_copy_bw"] = 100 * r["fwd_bwd_gbs"] / copy_gbs
                if ref is not None:
                    for key in ("fwd_ms", "bwd_ms", "fwd_bwd_ms"):
                        if key in r:
                            r[f"speedup_{key[:-3]}"] = ref[key] / r[key]
            rows += case_rows

    print_table(rows, ["case", "backend", "B", "D", "fwd_ms", "bwd_ms", "fwd_bwd_ms", "peak_mb", "fwd_bwd_gbs",
                       "pct_copy_bw", "roofline_frac", "speedup_fwd", "speedup_bwd", "speedup_fwd_bwd"])
    print(f"roofline_frac: fraction of the {roofline.device_for(device_name(device)).name} HBM bound "
          "(datasheet bandwidth; on a CPU this only checks the arithmetic)")
    if not args.no_write:
        paths = write_results("patch_drop", rows, extra={"copy_bandwidth_gbs": copy_gbs, "quick": args.quick})
        print("wrote", *paths)


if __name__ == "__main__":
    main()
