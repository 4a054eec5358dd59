"""The linear probe: features against the model's own encoder, the content-keyed cache,
the probe's AUROC on features with and without signal, and the CLI on a labelled set."""
import json
import os
import warnings

import numpy as np
import pytest
import torch

from mcr import run
from mcr.eval import linear_probe
from mcr.eval.embedding import embed
from mcr.evaluate import main


@pytest.mark.parametrize("size", [1, 5])
def test_features_match_the_encoder(tiny_run, size):
    model, cfg, tokenizer, device, _ = run.load_trained(str(tiny_run), "cpu")
    dataset = run.build_dataset(cfg, "test", size)
    collate = run.collate_for(cfg, tokenizer)
    batch = collate([dataset[i] for i in range(size)])
    model.eval()
    with torch.no_grad():
        latent = model.encode_image(batch["image"])
    cls, labels = linear_probe.image_features(model, dataset, collate, device, "cls", batch_size=2)
    torch.testing.assert_close(cls, latent[:, 0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(labels, batch["labels"])
    mean, _ = linear_probe.image_features(model, dataset, collate, device, "mean", batch_size=3)
    torch.testing.assert_close(mean, latent[:, 1:].mean(1), rtol=1e-5, atol=1e-5)
    joint, _ = linear_probe.image_features(model, dataset, collate, device, "joint")
    torch.testing.assert_close(joint, embed(model, dataset, collate, device)[0])
    with pytest.raises(ValueError, match="pooling must be one of"):
        linear_probe.image_features(model, dataset, collate, device, "max")


def test_cache_hits_misses_and_recovers_from_a_broken_file(tmp_path):
    calls = []

    def compute():
        calls.append(1)
        return torch.randn(4, 3), torch.ones(4, 2)

    first = linear_probe.cached(str(tmp_path), {"weights": "a", "pooling": "cls"}, compute)
    again = linear_probe.cached(str(tmp_path), {"pooling": "cls", "weights": "a"}, compute)
    assert len(calls) == 1
    torch.testing.assert_close(first[0], again[0])
    linear_probe.cached(str(tmp_path), {"weights": "b", "pooling": "cls"}, compute)
    assert len(calls) == 2
    for p in tmp_path.iterdir():
        p.write_bytes(b"\x00garbage")
    with pytest.warns(UserWarning, match="is broken"):
        linear_probe.cached(str(tmp_path), {"weights": "a", "pooling": "cls"}, compute)
    assert len(calls) == 3
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        linear_probe.cached(str(tmp_path), {"weights": "a", "pooling": "cls"}, compute)  # repaired
    assert len(calls) == 3


def test_probe_finds_signal_and_not_noise():
    rng = np.random.default_rng(0)
    n, d = 800, 6
    y = (rng.random((n, 2)) < 0.3).astype(np.float64)
    signal = np.concatenate([y * 2.0, np.zeros((n, d - 2))], axis=1) + rng.normal(size=(n, d))
    noise = rng.normal(size=(n, d))
    y_known = y.copy()
    y_known[:50, 1] = np.nan  # unknown labels are left out
    good = linear_probe.linear_probe(signal[:600], y_known[:600], signal[600:], y[600:], ["a", "b"], draws=3)
    bad = linear_probe.linear_probe(noise[:600], y[:600], noise[600:], y[600:], ["a", "b"], draws=3)
    assert good["100%"]["mean_auroc"] > 0.85 and abs(bad["100%"]["mean_auroc"] - 0.5) < 0.1
    assert [good[f]["rows"] for f in ("1%", "10%", "100%")] == [6, 60, 600]
    assert good["1%"]["draws"] == 3 and good["100%"]["draws"] == 1 and good["100%"]["mean_auroc_std"] == 0
    assert good["1%"]["chance_auroc"] == 0.5


def test_one_class_subsets_score_at_chance():
    x = np.arange(20, dtype=float)[:, None]
    y = np.zeros((20, 1))
    y[-1] = 1.0  # a 1% draw of 20 rows holds one row: one class only
    out = linear_probe.linear_probe(x, y, x, y, ["a"], fractions=(0.01,), draws=2)
    assert out["1%"]["mean_auroc"] == 0.5


def test_linear_probe_cli_on_a_labelled_tree(tiny_run, tmp_path, chexpert):
    root = tmp_path / "chexpert"
    rows = {"train": [], "test": []}
    for i in range(24):
        split = "train" if i < 16 else "test"
        rel = f"CheXpert-v1.0-small/{split}/patient{i:05d}/study1/view1_frontal.jpg"
        chexpert.write_image(str(root / rel), value=40 + 8 * i)
        rows[split].append(chexpert.row(rel, Cardiomegaly=str(float(i % 2)), Edema=["1.0", "0.0", "-1.0"][i % 3]))
    (root / "train.csv").write_text("\n".join([chexpert.header, *rows["train"]]) + "\n")
    (root / "valid.csv").write_text("\n".join([chexpert.header, *rows["test"]]) + "\n")
    output = tmp_path / "lp.json"
    args = ["--checkpoint", str(tiny_run), "--task", "linear-probe", "--split", "test", "--labelled-root", str(root),
            "--labelled-options", "uncertain=ignore", "--pooling", "mean", "--cache-dir", str(tmp_path / "cache"),
            "--output", str(output)]
    main(args)
    saved = json.loads(output.read_text())
    assert saved["train_images"] == 16 and saved["test_images"] == 8
    assert set(saved["fractions"]) == {"1%", "10%", "100%"}
    assert set(saved["fractions"]["100%"]["auroc"]) == {"Cardiomegaly", "Edema"}
    assert len(list((tmp_path / "cache").iterdir())) == 2  # train and test features
    main(args)  # cached: same figures
    assert json.loads(output.read_text())["fractions"] == saved["fractions"]
    with pytest.raises(SystemExit) as exit_info:
        main([*args[:4], "--split", "train", *args[6:]])
    assert exit_info.value.code == 2


def test_study_table_reads_the_raw_results(tmp_path):
    """experiments/downstream-2026-12-06/table.py on two seeds of two rows: means, chance, checks."""
    import subprocess
    import sys

    def write(name, seed, zs_auroc, lp_1):
        fractions = {f: {"mean_auroc": lp_1 + 0.1 * k} for k, f in enumerate(("1%", "10%", "100%"))}
        (tmp_path / f"{name}-seed{seed}-zero-shot.json").write_text(json.dumps(
            {"mean_auroc": zs_auroc, "accuracy": 50.0, "chance_accuracy": 20.0, "seconds": 10.0}))
        (tmp_path / f"{name}-seed{seed}-linear-probe.json").write_text(json.dumps(
            {"fractions": fractions, "seconds": 20.0}))

    for seed in (0, 1):
        write("default", seed, 0.8 + 0.02 * seed, 0.80)
        write("random-init", seed, 0.5, 0.60)
    script = os.path.join(os.path.dirname(__file__), os.pardir, os.pardir, "experiments", "downstream-2026-12-06",
                          "table.py")
    table = subprocess.run([sys.executable, script, str(tmp_path)],
                           capture_output=True, text=True, check=True).stdout
    assert "| MCR, the default (2,000 steps) | 2 | 0.810 ± 0.010 | 50.0 ± 0.0 (20.0) | 0.800 ± 0.000 |" in table
    assert "random-init + 0.15: 0.800, target 0.750, met (margin +0.050)" in table
    assert "dual-stream at equal wall time: not measured" in table
    assert "≤ 120: 30.000, target 120.000, met (margin +90.000)" in table
