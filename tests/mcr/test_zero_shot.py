"""Zero-shot classification: per-class AUROC against a pairwise count, the five-class accuracy
on its seeded balanced sample, prompt files, and `mcr.evaluate --task zero-shot` end to end."""
import json
import os

import numpy as np
import pytest
import torch

from mcr.eval import zero_shot
from mcr.eval.protocols import FIVE_CLASSES
from mcr.evaluate import main


def pairwise_auroc(scores, targets):
    """AUROC as the share of (positive, negative) pairs ranked right, ties counting half."""
    pos, neg = scores[targets == 1], scores[targets == 0]
    return ((pos[:, None] > neg[None]).sum() + 0.5 * (pos[:, None] == neg[None]).sum()) / (len(pos) * len(neg))


def test_every_shipped_prompt_set_loads_with_several_prompts_per_class():
    for name in zero_shot.PROMPT_SETS:
        classes = zero_shot.load_prompts(name)
        assert classes and all(len(spec["prompts"]) >= 2 for spec in classes.values())
    assert set(FIVE_CLASSES) <= set(zero_shot.load_prompts("synthetic"))
    assert set(FIVE_CLASSES) <= set(zero_shot.load_prompts("chexpert"))


def test_bad_prompt_files_are_named(tmp_path):
    with pytest.raises(ValueError, match="nor a JSON file"):
        zero_shot.load_prompts(str(tmp_path / "absent.json"))
    bad = tmp_path / "bad.json"
    bad.write_text('{"classes": {"Edema": {"labels": ["Edema"]}}}')
    with pytest.raises(ValueError, match="class 'Edema' needs 'labels'"):
        zero_shot.load_prompts(str(bad))


def test_class_labels_or_columns_and_keep_unknowns():
    labels = np.array([[1, 0, 0], [0, 0, 0], [np.nan, 1, 0], [np.nan, np.nan, np.nan]])
    classes = {"A": {"labels": ["a", "b"], "prompts": ["x"]}, "C": {"labels": ["c"], "prompts": ["y"]}}
    out = zero_shot.class_labels(labels, ["a", "b", "c"], classes)
    np.testing.assert_array_equal(out[:3], [[1, 0], [0, 0], [1, 0]])
    assert np.isnan(out[3]).all()
    with pytest.raises(ValueError, match="needs label column"):
        zero_shot.class_labels(labels, ["a", "b", "z"], classes)


@pytest.mark.parametrize("n", [7, 60])
def test_auroc_and_accuracy_against_hand_counts(n):
    g = torch.Generator().manual_seed(n)
    names = list(FIVE_CLASSES) + ["Other"]
    classes = {c: {"labels": [c], "prompts": ["p"]} for c in names}
    truth = torch.randint(0, 5, (n,), generator=g)
    labels = torch.nn.functional.one_hot(truth, 6).float().numpy()
    labels[: n // 3, 5] = 1.0  # a sixth, multi-label column
    class_emb = torch.nn.functional.normalize(torch.randn(6, 8, generator=g), dim=-1)
    image_emb = torch.nn.functional.normalize(class_emb[truth] + 1.2 * torch.randn(n, 8, generator=g), dim=-1)
    out = zero_shot.zero_shot(image_emb, labels, names, class_emb, classes, per_class=3, seed=1)
    scores = (image_emb @ class_emb.T).numpy()
    for k, name in enumerate(names):
        if 0 < labels[:, k].sum() < n:
            assert out["auroc"][name] == pytest.approx(pairwise_auroc(scores[:, k], labels[:, k]), abs=1e-12)
    assert out["chance_auroc"] == 0.5
    idx = np.array(out["sample"]["indices"])
    sample_truth = truth.numpy()[idx]
    # the 5-class sample: only rows positive for exactly one of the five; at most 3 per class
    assert (np.bincount(sample_truth, minlength=5) <= 3).all()
    assert [FIVE_CLASSES[t] for t in sample_truth] == out["sample"]["classes"]
    expected = 100 * np.mean(scores[idx][:, :5].argmax(1) == sample_truth)
    assert out["accuracy"] == pytest.approx(expected)
    assert out["chance_accuracy"] == pytest.approx(100 * np.bincount(sample_truth).max() / len(idx))


def test_a_class_without_both_values_has_no_auroc():
    classes = {"Edema": {"labels": ["Edema"], "prompts": ["p"]}}
    emb = torch.nn.functional.normalize(torch.randn(1, 4), dim=-1)
    out = zero_shot.zero_shot(emb, np.ones((1, 1)), ["Edema"], emb, classes)
    assert out["auroc"] == {} and out["mean_auroc"] is None and "accuracy" not in out


def test_zero_shot_cli_writes_results_and_the_sample(tiny_run, tmp_path, capsys):
    output = tmp_path / "zs.json"
    results = main(["--checkpoint", str(tiny_run), "--task", "zero-shot", "--split", "test", "--size", "60",
                    "--per-class", "4", "--cache-dir", str(tmp_path / "cache"), "--output", str(output)])
    saved = json.loads(output.read_text())
    assert saved["task"] == "zero-shot" and saved["chance_auroc"] == 0.5
    assert set(saved["auroc"]) <= set(zero_shot.load_prompts("synthetic"))
    assert 0 <= results["mean_auroc"] <= 1
    sample = json.loads((tmp_path / saved["sample_file"]).read_text())
    assert len(sample["indices"]) == len(sample["classes"]) > 0 and sample["seed"] == 0
    assert "chance" in capsys.readouterr().out


@pytest.mark.parametrize("flags, message", [
    (["--prompts", "nonsense"], "--prompts 'nonsense'"),
    (["--labelled-root", "/nonexistent"], "--labelled-root"),
    (["--labelled-options", "uncertain=ones"], "--labelled-options needs --labelled-root"),
    (["--random-init", "-1"], "--random-init -1"),
    (["--data", "openi"], "--data"),
    (["--cache-dir", "/dev/null/cache"], "--cache-dir"),
    (["--labelled-root", "/", "--split", "test", "--labelled-options", "test=absent.csv"], "absent.csv"),
])
def test_bad_values_exit_2_before_work(tiny_run, tmp_path, flags, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--checkpoint", str(tiny_run), "--task", "zero-shot", "--cache-dir", str(tmp_path / "c"), *flags])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not os.path.exists(tmp_path / "c")
