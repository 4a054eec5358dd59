"""Shared test fixtures: tiny model configs that run in seconds on a CPU.

Without a GPU, Triton kernels run under the interpreter (TRITON_INTERPRET=1, set here
before any kernel module is imported) on CPU tensors; with one they run for real. Tests
marked `cuda` are skipped when no CUDA device is available.
"""
import os
import socket

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from mcr import masking  # noqa: E402  (after TRITON_INTERPRET is set)
from mcr.config import preset  # noqa: E402
from mcr.data.batching import one_word_per_token  # noqa: E402

TINY = dict(image_size=32, patch_size=16, vit_width=32, vit_depth=1, vit_heads=2, decoder_width=32,
            decoder_depth=1, decoder_heads=2, text_width=32, text_depth=1, text_heads=2,
            text_intermediate=64, embed_dim=16, vocab_size=128, max_text_len=48)


def pytest_collection_modifyitems(config, items):
    """Skip the tests marked `cuda` when no CUDA device is available."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if item.get_closest_marker("cuda"):
            item.add_marker(skip)


@pytest.fixture
def tiny_config():
    return lambda **kw: preset("small", **{**TINY, **kw})


@pytest.fixture
def free_port():
    """A free TCP port on 127.0.0.1, for a gloo process group's init_method."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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


@pytest.fixture(scope="session")
def token_ids():
    """The tokenizer's special ids as ints: .pad, .cls, .sep, .mask."""
    from types import SimpleNamespace

    from mcr.data.tokenizer import SPECIAL_TOKENS

    names = ("pad", "cls", "sep", "mask")
    return SimpleNamespace(**{name: SPECIAL_TOKENS.index(f"[{name.upper()}]") for name in names})


@pytest.fixture(scope="session")
def make_batch(token_ids):
    """`make_batch(cfg, B=4, L=12, seed=0)`: a batch of B random images ([B, C, H, W] float32) and
    reports of lengths L, L-3, 5, L-1, L, ... (input_ids, attention_mask, special_tokens_mask,
    word_ids: [B, L] int64), [CLS] first, [SEP] last, [PAD] after, each other token a word."""
    def make_batch(cfg, B=4, L=12, seed=0):
        pad, cls, sep = token_ids.pad, token_ids.cls, token_ids.sep
        g = torch.Generator().manual_seed(seed)
        lengths = torch.tensor([L, L - 3, 5, L - 1][:B] + [L] * max(0, B - 4))
        ids = torch.randint(5, cfg.vocab_size, (B, L), generator=g)
        positions = torch.arange(L)
        attn = (positions < lengths[:, None]).long()
        ids[:, 0] = cls
        ids[torch.arange(B), lengths - 1] = sep
        ids = ids.masked_fill(attn == 0, pad)
        special = ((ids == cls) | (ids == sep) | (ids == pad)).long()
        return {"image": torch.randn(B, cfg.in_chans, cfg.image_size, cfg.image_size, generator=g),
                "input_ids": ids, "attention_mask": attn, "special_tokens_mask": special,
                "word_ids": one_word_per_token(special == 0)}
    return make_batch


@pytest.fixture(scope="session")
def draw():
    """`draw(cfg, batch_size, seed=0)`: the Masks of a batch from a generator seeded with `seed`."""
    def draw(cfg, batch_size, seed=0):
        return masking.draw(cfg, batch_size, generator=torch.Generator().manual_seed(seed))
    return draw
