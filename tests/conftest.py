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
