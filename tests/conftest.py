"""Shared test fixtures: tiny model configs that run in seconds on a CPU.

Without a GPU, Triton kernels run under the interpreter (TRITON_INTERPRET=1, set here
before any kernel module is imported) on CPU tensors; with one they run for real.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

from mcr.config import preset  # noqa: E402  (after TRITON_INTERPRET is set)

TINY = dict(image_size=32, patch_size=16, vit_width=32, vit_depth=1, vit_heads=2, decoder_width=32,
            decoder_depth=1, decoder_heads=2, text_width=32, text_depth=1, text_heads=2,
            text_intermediate=64, embed_dim=16, vocab_size=128, max_text_len=48)


@pytest.fixture
def tiny_config():
    return lambda **kw: preset("small", **{**TINY, **kw})


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """A run folder trained for 4 steps at 48 px (3 x 3 patches), validated at steps 2 and 4,
    with TensorBoard when it is installed; training writes its pictures at the end."""
    import importlib.util

    from mcr.train import main

    out = tmp_path_factory.mktemp("tiny_run")
    main(["--image-size", "48", "--vit-width", "32", "--vit-depth", "1", "--vit-heads", "2",
          "--decoder-width", "32", "--decoder-depth", "1", "--decoder-heads", "2", "--text-width", "32",
          "--text-depth", "1", "--text-heads", "2", "--text-intermediate", "64", "--embed-dim", "16",
          "--vocab-size", "200", "--train-size", "64", "--val-size", "24", "--batch-size", "8",
          "--log-every", "1", "--warmup-steps", "2", "--max-steps", "4", "--eval-every", "2",
          "--out-dir", str(out)] + (["--tensorboard"] if importlib.util.find_spec("tensorboard") else []))
    return out
