"""Fixtures shared by the mcr tests: tiny run flags and run folders cut short."""
import os
import shutil

import pytest

# the model part of every tiny training run: 32 px images, one block per tower, width 32
TINY_MODEL_FLAGS = ["--image-size", "32", "--vit-width", "32", "--vit-depth", "1", "--vit-heads", "2",
                    "--decoder-width", "32", "--decoder-depth", "1", "--decoder-heads", "2", "--text-width", "32",
                    "--text-depth", "1", "--text-heads", "2", "--text-intermediate", "64", "--embed-dim", "16"]
# a tiny run on the synthetic corpus: 64 training pairs, 24 for validation, no pictures
SYNTHETIC_RUN_FLAGS = ["--vocab-size", "200", "--train-size", "64", "--val-size", "24", "--batch-size", "8",
                       "--log-every", "2", "--warmup-steps", "2", "--no-pictures"]


@pytest.fixture
def tiny_flags():
    """The model flags of a tiny training run (a list of str, a fresh copy)."""
    return list(TINY_MODEL_FLAGS)


@pytest.fixture(scope="session")
def run_args():
    """`run_args(out_dir, *extra)`: the argv of a tiny synthetic-corpus run writing to `out_dir`."""
    def run_args(out_dir, *extra):
        return TINY_MODEL_FLAGS + SYNTHETIC_RUN_FLAGS + ["--out-dir", str(out_dir), *extra]
    return run_args


@pytest.fixture(scope="session")
def killed_after():
    """`killed_after(full, resumed, step)`: fill `resumed` with what a run killed after `full`'s
    step-`step` checkpoint left."""
    def killed_after(full, resumed, step):
        name = f"step_{step:08d}"
        os.makedirs(resumed / "checkpoints")
        shutil.copytree(full / "tokenizer", resumed / "tokenizer")
        shutil.copytree(full / "checkpoints" / name, resumed / "checkpoints" / name)
        (resumed / "checkpoints" / "latest").write_text(name + "\n")
    return killed_after
