"""End to end: one training step (forward, backward, AdamW) of four configurations on the
same device, data and preset, side by side in one run.

    dual-stream/reference  unmasked contrastive pass + masked reconstruction, eager PyTorch ops
    mcr/reference          masked inputs only (MCR), eager PyTorch reference ops
    mcr/kernels            MCR with mcr_kernels' default (fastest) backends
    mcr/kernels+compile    the same with every transformer block torch.compile'd (fullgraph)

For each: median step time and samples/s after warm-up, peak memory (model, optimizer
state and activations), and model FLOPs utilization = counted model FLOPs per step /
step time / the measured bf16 matmul rate. FLOPs are counted once per (preset, variant)
with torch.utils.flop_counter on the reference ops (the same math as the kernels).

    python benchmarks/bench_train_step.py                                  # GPU, bf16
    python benchmarks/bench_train_step.py --presets small --batches 8 --steps 2 --quick   # CPU
"""
import argparse
import pathlib
import statistics
import sys
import time

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import mcr_kernels  # noqa: E402
from _common import environment, is_oom, matmul_tflops, print_table, write_results  # noqa: E402
from mcr.config import preset  # noqa: E402
from mcr.models.mcr import MCR  # noqa: E402
from mcr.profiling import MASK, PAD, random_batch, step_flops  # noqa: E402
from mcr.engine import compile_blocks  # noqa: E402

CONFIGS = {  # name: (variant, backend forced for every op or None = default, compile)
    "dual-stream/reference": ("dual-stream", "reference", False),
    "mcr/reference": ("mcr", "reference", False),
    "mcr/kernels": ("mcr", None, False),
    "mcr/kernels+compile": ("mcr", None, True),
}
WEIGHTS = {"contrastive": 0.1, "mim": 1.0, "mrm": 1.0}


def build(preset_name, variant, compiled, device):
    torch.manual_seed(0)
    cfg = preset(preset_name, variant=variant)
    model = MCR(cfg, pad_token_id=PAD, mask_token_id=MASK).to(device)
    if compiled:
        compile_blocks(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    return cfg, model, optimizer


def train_step(model, optimizer, batch, amp_dtype, device):
    with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        losses = model(batch)
    loss = sum(WEIGHTS[k] * v for k, v in losses.items())
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss


def measure(preset_name, config, batch_size, steps, warmup, device, amp_dtype):
    """One row: step time, samples/s, peak memory of `config` at `batch_size` (or OOM)."""
    variant, forced, compiled = CONFIGS[config]
    row = {"preset": preset_name, "config": config, "batch": batch_size}
    model = optimizer = None
    try:
        cfg, model, optimizer = build(preset_name, variant, compiled, device)
        batch = random_batch(cfg, batch_size, device)
        with mcr_kernels.use_backend(forced) if forced else _nothing():
            for _ in range(warmup):
                train_step(model, optimizer, batch, amp_dtype, device)
            _sync(device)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            times = []
            for _ in range(steps):
                t0 = time.perf_counter()
                loss = train_step(model, optimizer, batch, amp_dtype, device)
                _sync(device)
                times.append(time.perf_counter() - t0)
        ms = 1e3 * statistics.median(times)
        row.update(step_ms=ms, samples_per_s=batch_size / ms * 1e3, loss=float(loss),
                   peak_gib=torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan"))
    except (torch.OutOfMemoryError, RuntimeError) as err:
        if not is_oom(err):
            raise
        row.update(step_ms=float("nan"), samples_per_s=float("nan"), peak_gib=float("nan"), oom=True)
    finally:
        del model, optimizer
        if device.type == "cuda":
            torch.cuda.empty_cache()
        torch._dynamo.reset()
    return row


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def flops_per_sample(preset_name, variant, device, amp_dtype, batch_size=4):
    """Model FLOPs of one step per sample (reference ops, counted by FlopCounterMode)."""
    cfg, model, _ = build(preset_name, variant, False, device)
    batch = random_batch(cfg, batch_size, device)
    with mcr_kernels.use_backend("reference"), torch.autocast(
            device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        flops = step_flops(model, batch, WEIGHTS)
    del model
    return flops / batch_size


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", default="paper,small")
    parser.add_argument("--configs", default=",".join(CONFIGS))
    parser.add_argument("--batches", default="64,256", help="comma-separated batch sizes")
    parser.add_argument("--find-max", action="store_true",
                        help="also double the batch from the largest given until each config runs out of memory")
    parser.add_argument("--max-batch", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="CPU smoke run: no matmul-rate measurement")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    amp_dtype = torch.bfloat16 if device.type == "cuda" else None
    peak_tflops = float("nan") if args.quick else matmul_tflops()
    print(f"{environment()}  bf16 matmul {peak_tflops:.0f} TFLOP/s", flush=True)
    configs = args.configs.split(",")
    rows = []
    for preset_name in args.presets.split(","):
        flops = {v: flops_per_sample(preset_name, v, device, amp_dtype) for v in {CONFIGS[c][0] for c in configs}}
        for config in configs:
            variant = CONFIGS[config][0]

            def run(batch_size):
                row = measure(preset_name, config, batch_size, args.steps, args.warmup, device, amp_dtype)
                row["gflops_per_sample"] = flops[variant] / 1e9
                row["mfu_pct"] = 100 * flops[variant] * row["samples_per_s"] / (peak_tflops * 1e12)
                rows.append(row)
                print_table([row])
                return row

            sizes = [int(b) for b in args.batches.split(",")]
            for batch_size in sizes:
                row = run(batch_size)
            batch_size = sizes[-1]
            while args.find_max and not row.get("oom") and batch_size < args.max_batch:
                batch_size *= 2
                row = run(batch_size)
    base = {(r["preset"], r["batch"]): r for r in rows if r["config"] == "dual-stream/reference"}
    ref = {(r["preset"], r["batch"]): r for r in rows if r["config"] == "mcr/reference"}
    for r in rows:
        key = (r["preset"], r["batch"])
        if key in base and not base[key].get("oom"):
            r["time_vs_dual_stream"] = r["step_ms"] / base[key]["step_ms"]
            r["memory_vs_dual_stream"] = r["peak_gib"] / base[key]["peak_gib"]
        if key in ref and not ref[key].get("oom"):
            r["speedup_vs_mcr_reference"] = r["samples_per_s"] / ref[key]["samples_per_s"]
    largest = {}
    for r in rows:
        if not r.get("oom"):
            k = (r["preset"], r["config"])
            largest[k] = max(largest.get(k, 0), r["batch"])
    print("\nall rows:")
    print_table(rows, ["preset", "config", "batch", "step_ms", "samples_per_s", "peak_gib", "mfu_pct",
                       "time_vs_dual_stream", "memory_vs_dual_stream", "speedup_vs_mcr_reference", "oom"])
    print("largest batch that ran:", {f"{p}:{c}": b for (p, c), b in largest.items()})
    if not args.no_write:
        paths = write_results("train_step", rows, {"bf16_matmul_tflops": peak_tflops,
                                                   "largest_batch": {f"{p}:{c}": b for (p, c), b in largest.items()}})
        print("wrote", *paths)


if __name__ == "__main__":
    main()
