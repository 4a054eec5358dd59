"""Retrieval protocols: hand-computed P@K by class, the seeded 5x200 selection, full-split
retrieval with identical texts, and both through the evaluation path and `python -m mcr.evaluate`."""
import json
import os

import numpy as np
import pytest
import torch

from mcr import evaluate
from mcr.data.batching import Collate
from mcr.data.common import CHEXPERT_LABELS
from mcr.data.fake import make_mimic_tree
from mcr.data.synthetic import FINDINGS, SyntheticCXR, labels_from_names
from mcr.data.tokenizer import train_wordpiece
from mcr.eval import protocols
from mcr.eval.embedding import evaluate as evaluate_split
from mcr.eval.protocols import FIVE_CLASSES, five_class_matrix, precision_by_class, select_5x200
from mcr.models.mcr import MCR
from mcr.train import main as train_main


def test_precision_by_class_hand_computed():
    sim = torch.tensor([[0.9, 0.8, 0.1, 0.0],    # class 0: order g0 g1 g2 g3 -> relevant 1 0 1 0
                        [0.1, 0.9, 0.2, 0.8],    # class 0: g1 g3 g2 g0 -> 0 0 1 1
                        [0.5, 0.4, 0.3, 0.2],    # class 1: g0 g1 g2 g3 -> 0 1 0 1
                        [0.0, 1.0, 0.2, 0.9]])   # class 1: g1 g3 g2 g0 -> 1 1 0 0
    out = precision_by_class(sim, torch.tensor([0, 0, 1, 1]), torch.tensor([0, 1, 0, 1]), ks=(1, 2, 3))
    expected = {"P@1/Atelectasis": 50.0, "P@2/Atelectasis": 25.0, "P@3/Atelectasis": 50.0,
                "P@1/Cardiomegaly": 50.0, "P@2/Cardiomegaly": 75.0, "P@3/Cardiomegaly": 50.0,
                "P@1": 50.0, "P@2": 50.0, "P@3": 50.0, "chance_P@K": 50.0}
    assert out.keys() == expected.keys()
    for key, value in expected.items():
        assert out[key] == pytest.approx(value), key
    # K beyond the gallery is capped: every query sees all 4 items, half of them relevant
    assert precision_by_class(sim, torch.tensor([0, 0, 1, 1]), torch.tensor([0, 1, 0, 1]), ks=(10,))["P@10"] == 50.0


def test_precision_by_class_shares_tied_places_instead_of_taking_the_first_items():
    classes = torch.tensor([0, 0, 1, 1, 2])  # a model that scores everything alike sits at chance
    out = precision_by_class(torch.zeros(5, 5), classes, classes, ks=(1, 3))
    for k in (1, 3):
        assert out[f"P@{k}"] == pytest.approx(out["chance_P@K"])
        assert out[f"P@{k}/{FIVE_CLASSES[0]}"] == pytest.approx(40.0)


def test_full_retrieval_counts_identical_texts_as_hits():
    image = torch.eye(3)
    text = torch.eye(3)[[2, 1, 0]]  # image 0 is closest to text 2, whose report equals report 0
    out = protocols.full_retrieval(image, text, ["a", "b", "a"])
    assert out["i2t"]["R@1"] == out["t2i"]["R@1"] == 100.0 and out["i2t"]["median_rank"] == 1.0
    out = protocols.full_retrieval(image, text, ["a", "b", "c"])
    # queries 0 and 2: their true item scores 0, one non-hit scores 1 and one ties at 0: rank 3 each
    assert out["i2t"]["R@1"] == pytest.approx(100 / 3) and out["i2t"]["mean_rank"] == pytest.approx(7 / 3)


def chexpert_rows(*positives):
    labels = np.zeros((len(positives), len(CHEXPERT_LABELS)), dtype=np.float32)
    for row, names in enumerate(positives):
        for name in names:
            labels[row, CHEXPERT_LABELS.index(name)] = 1.0
    return labels


def test_5x200_selects_exactly_one_positive_seeded(capsys):
    rows = [("Atelectasis",)] * 6 + [("Cardiomegaly", "Support Devices")] * 5 + [("Consolidation",)] * 4 \
        + [("Edema",)] * 5 + [("Pleural Effusion",)] * 5 + [("Edema", "Pleural Effusion")] * 3 + [("No Finding",)] * 4
    labels = chexpert_rows(*rows)
    labels[0, CHEXPERT_LABELS.index("Cardiomegaly")] = -1.0  # uncertain is not positive
    indices, classes = select_5x200(labels, CHEXPERT_LABELS, per_class=5, seed=0)
    counts = np.bincount(classes.numpy(), minlength=5).tolist()
    assert counts == [5, 5, 4, 5, 5]  # Consolidation has only 4
    assert "only 4 studies positive for exactly Consolidation" in capsys.readouterr().err
    five = five_class_matrix(labels, CHEXPERT_LABELS)
    assert (five[indices.numpy()].sum(1) == 1).all()
    assert (five[indices.numpy(), classes.numpy()]).all()
    assert not set(indices.tolist()) & set(range(25, 32))  # the two-class and normal rows
    again, _ = select_5x200(labels, CHEXPERT_LABELS, per_class=5, seed=0)
    other, _ = select_5x200(labels, CHEXPERT_LABELS, per_class=5, seed=1)
    assert again.tolist() == indices.tolist() and other.tolist() != indices.tolist()  # 6 Atelectasis: choose 5
    with pytest.raises(ValueError, match="no study"):
        select_5x200(chexpert_rows(("No Finding",)), CHEXPERT_LABELS)


def test_synthetic_findings_map_onto_the_five_classes():
    labels = np.stack([labels_from_names(["pleural_effusion_left"]), labels_from_names(["atelectasis_right"]),
                       labels_from_names(["consolidation_left_upper", "cardiomegaly"]), labels_from_names([])])
    five = five_class_matrix(labels, FINDINGS)
    assert five.tolist() == [[False, False, False, False, True], [True, False, False, False, False],
                             [False, True, True, False, False], [False] * 5]
    with pytest.raises(ValueError, match="no column for 'Atelectasis'"):
        five_class_matrix(labels[:, :2], ["a", "b"])


def test_run_both_protocols_on_the_embedded_corpus(tiny_config):
    dataset = SyntheticCXR(300, split="val", image_size=32)
    tokenizer = train_wordpiece((dataset[i].report for i in range(100)), 128)
    model = MCR(tiny_config(vocab_size=len(tokenizer)), pad_token_id=tokenizer.pad_token_id,
                mask_token_id=tokenizer.mask_token_id)
    collate = Collate(tokenizer, 48)
    out = evaluate_split(model, dataset, collate, torch.device("cpu"), protocol="5x200", per_class=4, seed=0)
    assert out["counts"] == dict.fromkeys(FIVE_CLASSES, 4)
    assert {"P@1", "P@5", "P@10", "P@1/Edema"} <= set(out["i2t"]) and 0 <= out["t2i"]["P@5"] <= 100
    assert "P@1" in protocols.format_5x200(out)
    small = SyntheticCXR(12, split="val", image_size=32)
    full = evaluate_split(model, small, collate, torch.device("cpu"), protocol="full")
    assert 0 <= full["i2t"]["R@1"] <= 100 and full["t2i"]["median_rank"] >= 1
    with pytest.raises(ValueError, match="protocol"):
        evaluate_split(model, small, collate, torch.device("cpu"), protocol="7x100")


def test_evaluate_cli_protocols(tmp_path):
    flags = ["--image-size", "32", "--vit-width", "32", "--vit-depth", "1", "--vit-heads", "2", "--decoder-width",
             "32", "--decoder-depth", "1", "--decoder-heads", "2", "--text-width", "32", "--text-depth", "1",
             "--text-heads", "2", "--text-intermediate", "64", "--embed-dim", "16", "--vocab-size", "200",
             "--train-size", "16", "--val-size", "8", "--batch-size", "8", "--max-steps", "1", "--eval-every", "0"]
    run = tmp_path / "run"
    train_main(flags + ["--out-dir", str(run)])
    out = evaluate.main(["--checkpoint", str(run), "--protocol", "5x200", "--size", "300", "--per-class", "3"])
    assert sum(out["counts"].values()) == 15
    saved = [n for n in os.listdir(os.path.join(run, "checkpoints", "step_00000001")) if n.startswith("eval_")]
    assert saved == ["eval_val_5x200.json"]
    tree = make_mimic_tree(str(tmp_path / "mimic"), image_size=40)
    out = evaluate.main(["--checkpoint", str(run), "--split", "test", "--data", "mimic-cxr", "--data-root", tree,
                         "--output", str(tmp_path / "mimic.json")])
    result = json.load(open(tmp_path / "mimic.json"))
    assert result["pairs"] == 2 and result["data"] == "mimic-cxr" and result["i2t"] == out["i2t"]
