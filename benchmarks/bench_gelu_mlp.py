"""gelu_mlp against the same MLP through autograd (F.linear -> F.gelu -> F.linear), forward +
backward side by side in one run.

    autograd    mcr_kernels' `reference` backend: autograd keeps x, fc1(x) and gelu(fc1(x))
    recompute   the default backend: keeps x and fc1(x), recomputes gelu in backward

Shapes (tokens = batch x sequence): vit-b (768 -> 3072, 4 images x 99 kept tokens, the paper
preset at batch 4), bert-base (768 -> 3072, 4 x 128 tokens), small (128 -> 512, 32 x 28 kept
image tokens, this project's small preset). Time: median of --repeats forward + backward
passes, the configurations taking turns. `saved_mib`: what the forward pass leaves for the
backward pass beyond the inputs and parameters, counted exactly from autograd's saved
tensors (torch.autograd.graph.saved_tensors_hooks, one count per storage): the memory a
model holds per MLP between its forward and backward passes, on any device.

    python benchmarks/bench_gelu_mlp.py
    python benchmarks/bench_gelu_mlp.py --shapes small --repeats 2 --no-write
"""
import argparse
import pathlib
import sys

import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "kernels"), str(ROOT / "benchmarks")]  # this checkout, whatever is installed
from _common import autograd_vs_recompute, environment, print_table, write_results  # noqa: E402

import mcr_kernels  # noqa: E402

SHAPES = {"vit-b": (4 * 99, 768, 3072), "bert-base": (4 * 128, 768, 3072), "small": (32 * 28, 128, 512)}


def make_inputs(shape, device):
    tokens, D, hidden = SHAPES[shape]
    g = torch.Generator().manual_seed(0)
    tensors = (torch.randn(tokens, D, generator=g), torch.randn(hidden, D, generator=g) / D ** 0.5,
               torch.randn(hidden, generator=g), torch.randn(D, hidden, generator=g) / hidden ** 0.5,
               torch.randn(D, generator=g))
    return [t.to(device).requires_grad_() for t in tensors]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default=",".join(SHAPES), help=f"comma-separated subset of {tuple(SHAPES)}")
    parser.add_argument("--repeats", type=int, default=9, help="timed passes per configuration (median)")
    parser.add_argument("--no-write", action="store_true", help="print only; write no results file")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    print(environment(), flush=True)
    rows = []
    for shape in args.shapes.split(","):
        tokens, D, hidden = SHAPES[shape]
        measured = autograd_vs_recompute("gelu_mlp", mcr_kernels.gelu_mlp, make_inputs(shape, device), args.repeats)
        rows += [{"shape": shape, "tokens": tokens, "width": D, "hidden": hidden, **row} for row in measured]
        print_table(rows[-2:])
    print()
    print_table(rows)
    if not args.no_write:
        print("wrote", *write_results("gelu_mlp", rows, {"repeats": args.repeats}))


if __name__ == "__main__":
    main()
