"""Fixtures shared by the mcr tests: tiny run flags, run folders cut short, CheXpert-layout CSVs."""
import os
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

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


CHEXPERT_HEADER = ("Path,Sex,Age,Frontal/Lateral,AP/PA,No Finding,Enlarged Cardiomediastinum,Cardiomegaly,"
                   "Lung Opacity,Lung Lesion,Edema,Consolidation,Pneumonia,Atelectasis,Pneumothorax,"
                   "Pleural Effusion,Pleural Other,Fracture,Support Devices")


def write_image(path, size=(40, 30), value=128):
    """A grey PNG/JPEG of `size` (w, h) at `path`, folders made."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(np.full(size[::-1], value, dtype=np.uint8)).save(path)


def chexpert_row(path, **labels):
    """One CheXpert CSV row: labels by column name, spaces and slashes as underscores."""
    cells = [labels.get(name.replace(" ", "_").replace("/", "_"), "") for name in CHEXPERT_HEADER.split(",")[5:]]
    return ",".join([path, "Female", "68", "Frontal", "AP", *cells])


@pytest.fixture(scope="session")
def chexpert():
    """CheXpert's real CSV layout: .header, .labels, .row(path, **labels), .write_image(path)."""
    return SimpleNamespace(header=CHEXPERT_HEADER, labels=CHEXPERT_HEADER.split(",")[5:], row=chexpert_row,
                           write_image=write_image)
