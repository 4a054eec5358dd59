"""linear_cross_entropy against the full-vocabulary logits it replaces: forward + backward of
the masked report modelling loss (decoder [V, D] with bias), side by side in one run.

    all-positions   F.cross_entropy over F.linear logits at every position, ignore_index on the
                    unmasked ones (what the MLM head computed before, and what the plain
                    PyTorch peer of bench_train_step computes)
    masked-logits   full logits of the masked rows only (the `reference` backend)
    fused           mcr_kernels.linear_cross_entropy on the masked rows (the default backend:
                    chunked on CPU, Triton on CUDA)

Shapes: report length 128, 25% of positions masked; `paper` is BERT-base's width and
vocabulary (768, 30,522), `small` this project's small preset (128, 2,048). Time: median of
--repeats forward + backward passes, the configurations taking turns. Peak: memory one
forward + backward adds above its inputs and parameters (weight gradient included), each
configuration in a fresh process (see benchmarks/_common.py: cpu_peak_bytes on CPU,
max_memory_allocated on CUDA); `peak_vs_all_positions` is a configuration's peak over that of
the full-vocabulary logits at every position (the first configuration).

    python benchmarks/bench_linear_cross_entropy.py
    python benchmarks/bench_linear_cross_entropy.py --shapes small:8 --repeats 2 --no-write
"""
import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "kernels"), str(ROOT / "benchmarks")]  # this checkout, whatever is installed
from _common import CPU_MALLOC_ENV, cpu_peak_bytes, environment, print_table, write_results  # noqa: E402

import mcr_kernels  # noqa: E402

WIDTH_VOCAB = {"paper": (768, 30522), "small": (128, 2048)}
LENGTH, MASK_RATIO = 128, 0.25
CONFIGS = ("all-positions", "masked-logits", "fused")


def make_inputs(shape, batch, device):
    D, V = WIDTH_VOCAB[shape]
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(batch * LENGTH, D, generator=g).to(device).requires_grad_()
    weight = (torch.randn(V, D, generator=g) / D ** 0.5).to(device).requires_grad_()
    bias = torch.zeros(V, device=device, requires_grad=True)
    labels = torch.randint(0, V, (batch * LENGTH,), generator=g)
    labels[torch.rand(batch * LENGTH, generator=g) >= MASK_RATIO] = -100
    return hidden, weight, bias, labels.to(device)


def loss_and_backward(config, hidden, weight, bias, labels):
    for t in (hidden, weight, bias):
        t.grad = None
    if config == "all-positions":
        loss = F.cross_entropy(F.linear(hidden, weight, bias).float(), labels, ignore_index=-100)
    else:
        chosen = labels != -100
        with mcr_kernels.use_backend("reference" if config == "masked-logits" else None, "linear_cross_entropy"):
            loss = mcr_kernels.linear_cross_entropy(hidden[chosen], weight, bias, labels[chosen])
    loss.backward()
    if hidden.is_cuda:
        torch.cuda.synchronize()
    return float(loss.detach())


def peak_mib(shape, batch, config, device):
    inputs = make_inputs(shape, batch, device)
    loss_and_backward(config, *inputs)  # warm-up
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        loss_and_backward(config, *inputs)
        return (torch.cuda.max_memory_allocated() - before) / 2**20
    return cpu_peak_bytes(lambda: loss_and_backward(config, *inputs)) / 2**20


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="small:32,paper:4,paper:16",
                        help=f"comma-separated shape:batch pairs, shapes {tuple(WIDTH_VOCAB)}")
    parser.add_argument("--repeats", type=int, default=5, help="timed passes per configuration (median)")
    parser.add_argument("--no-write", action="store_true", help="print only; write no results file")
    parser.add_argument("--child-memory", help=argparse.SUPPRESS)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.child_memory:
        shape, batch, config = args.child_memory.split(":")
        print(json.dumps({"peak_mib": peak_mib(shape, int(batch), config, device)}))
        return
    print(environment(), flush=True)
    rows = []
    for item in args.shapes.split(","):
        shape, batch = item.split(":")
        batch = int(batch)
        inputs = make_inputs(shape, batch, device)
        losses = {c: loss_and_backward(c, *inputs) for c in CONFIGS}  # also the warm-up
        times = {c: [] for c in CONFIGS}
        for r in range(args.repeats):
            for config in CONFIGS[r % 3:] + CONFIGS[:r % 3]:
                t0 = time.perf_counter()
                loss_and_backward(config, *inputs)
                times[config].append(1e3 * (time.perf_counter() - t0))
        del inputs
        D, V = WIDTH_VOCAB[shape]
        logits_mib = batch * LENGTH * V * 4 / 2**20
        for config in CONFIGS:
            env = {**os.environ, **CPU_MALLOC_ENV}
            out = subprocess.run([sys.executable, __file__, "--child-memory", f"{shape}:{batch}:{config}"],
                                 env=env, capture_output=True, text=True, check=True)
            rows.append({"shape": shape, "batch": batch, "rows": batch * LENGTH, "width": D, "vocab": V,
                         "config": config, "ms": statistics.median(times[config]), "loss": losses[config],
                         "all_logits_fp32_mib": logits_mib,
                         **json.loads(out.stdout.strip().splitlines()[-1])})
            print_table([rows[-1]])
        base = rows[-3]
        for r in rows[-3:]:
            r["time_vs_all_positions"] = r["ms"] / base["ms"]
            r["peak_vs_all_positions"] = r["peak_mib"] / base["peak_mib"]
    print()
    print_table(rows, ["shape", "batch", "config", "ms", "time_vs_all_positions", "peak_mib",
                       "peak_vs_all_positions", "all_logits_fp32_mib", "loss"])
    if not args.no_write:
        print("wrote", *write_results("linear_cross_entropy", rows))


if __name__ == "__main__":
    main()
