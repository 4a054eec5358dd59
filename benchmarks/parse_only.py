"""Parse a benchmark's command line with the benchmark's own parser, and run nothing else:
exit 0 when it parses, 2 (argparse's error, naming the argument) when it does not.

    python benchmarks/parse_only.py benchmarks/bench_train_step.py --shapes paper:64

gpu_proof.sh --dry-run uses it, so that a step whose arguments its script does not take fails
on the CPU, not on a lent GPU (`--help` would exit before reading the other arguments).
"""
import argparse
import runpy
import sys


def parse_and_exit(self, args=None, namespace=None):
    parsed = original(self, args, namespace)
    print(f"{sys.argv[0]}: {vars(parsed)}")
    raise SystemExit(0)


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit("usage: python benchmarks/parse_only.py SCRIPT [ARGS...]")
    original = argparse.ArgumentParser.parse_args
    argparse.ArgumentParser.parse_args = parse_and_exit
    sys.argv = sys.argv[1:]
    runpy.run_path(sys.argv[0], run_name="__main__")
    sys.exit(f"{sys.argv[0]} never parsed its arguments")
