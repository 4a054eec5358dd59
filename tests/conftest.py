"""Shared test fixtures: tiny model configs that run in seconds on a CPU."""
import pytest
import torch

from mcr.config import preset

TINY = dict(image_size=32, patch_size=16, vit_width=32, vit_depth=1, vit_heads=2, decoder_width=32,
            decoder_depth=1, decoder_heads=2, text_width=32, text_depth=1, text_heads=2,
            text_intermediate=64, embed_dim=16, vocab_size=128, max_text_len=48)


@pytest.fixture
def tiny_config():
    return lambda **kw: preset("small", **{**TINY, **kw})


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
