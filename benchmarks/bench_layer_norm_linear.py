"""layer_norm_linear against the same layers through autograd (F.layer_norm -> F.linear),
forward + backward side by side in one run.

    autograd    mcr_kernels' `reference` backend: autograd keeps x (for the norm) and
                LayerNorm(x) (for the linear layer)
    recompute   the default backend: keeps x, recomputes LayerNorm(x) in backward

Shapes (tokens = batch x sequence; width -> output): vit-b-qkv (768 -> 2304, 4 images x 99
kept tokens, the paper preset at batch 4), decoder-qkv (512 -> 1536, 4 x 197 tokens, the MAE
decoder), small-qkv (128 -> 384, 32 x 28 kept image tokens, the small preset). Time: median
of --repeats forward + backward passes, the configurations taking turns. `saved_mib`: what
the forward pass leaves for the backward pass beyond the inputs and parameters (autograd's
saved tensors, one count per storage); x itself is among the inputs, so the autograd row
counts LayerNorm(x) and the norm's statistics, the recompute row nothing.

    python benchmarks/bench_layer_norm_linear.py
    python benchmarks/bench_layer_norm_linear.py --shapes small-qkv --repeats 2 --no-write
"""
import argparse
import pathlib
import sys

import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "kernels"), str(ROOT / "benchmarks")]  # this checkout, whatever is installed
from _common import autograd_vs_recompute, environment, print_table, write_results  # noqa: E402

import mcr_kernels  # noqa: E402

SHAPES = {"vit-b-qkv": (4 * 99, 768, 2304), "decoder-qkv": (4 * 197, 512, 1536), "small-qkv": (32 * 28, 128, 384)}


def make_inputs(shape, device):
    tokens, D, D_out = SHAPES[shape]
    g = torch.Generator().manual_seed(0)
    tensors = (torch.randn(tokens, D, generator=g), 1 + 0.1 * torch.randn(D, generator=g),
               torch.randn(D, generator=g), torch.randn(D_out, D, generator=g) / D ** 0.5,
               torch.randn(D_out, generator=g))
    return [t.to(device).requires_grad_() for t in tensors]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default=",".join(SHAPES), help=f"comma-separated subset of {tuple(SHAPES)}")
    parser.add_argument("--repeats", type=int, default=15, help="timed passes per configuration (median)")
    parser.add_argument("--no-write", action="store_true", help="print only; write no results file")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    print(environment(), flush=True)
    rows = []
    for shape in args.shapes.split(","):
        tokens, D, D_out = SHAPES[shape]
        measured = autograd_vs_recompute("layer_norm_linear", mcr_kernels.layer_norm_linear,
                                         make_inputs(shape, device), args.repeats)
        rows += [{"shape": shape, "tokens": tokens, "width": D, "out": D_out, **row} for row in measured]
        print_table(rows[-2:])
    print()
    print_table(rows)
    if not args.no_write:
        print("wrote", *write_results("layer_norm_linear", rows, {"repeats": args.repeats}))


if __name__ == "__main__":
    main()
