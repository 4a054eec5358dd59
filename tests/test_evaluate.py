"""Retrieval metrics against hand-computed cases."""
import pytest
import torch

from mcr.evaluate import identical_texts, retrieval_metrics


def test_recall_and_ranks_by_hand():
    # query 0: true item ranked 1st; query 1: 2nd; query 2: 3rd
    sim = torch.tensor([[0.9, 0.1, 0.0],
                        [0.8, 0.5, 0.1],
                        [0.7, 0.6, 0.2]])
    hits = torch.eye(3, dtype=torch.bool)
    m = retrieval_metrics(sim, hits, ks=(1, 2))
    assert m["R@1"] == pytest.approx(100 / 3)
    assert m["R@2"] == pytest.approx(200 / 3)
    assert m["mean_rank"] == pytest.approx(2.0)
    assert m["median_rank"] == pytest.approx(2.0)
    assert m["chance_R@1"] == pytest.approx(100 / 3)


def test_identical_texts_count_as_hits():
    reports = ["no acute process.", "left effusion.", "no acute process."]
    hits = identical_texts(reports)
    assert hits.tolist() == [[True, False, True], [False, True, False], [True, False, True]]
    sim = torch.tensor([[0.1, 0.0, 0.9],   # best item 2 has query 0's text: rank 1
                        [0.5, 0.4, 0.3],   # rank 2
                        [0.0, 0.9, 0.1]])  # best hit 0.1 > 0.0 (item 0 is a hit): rank 2
    m = retrieval_metrics(sim, hits, ks=(1,))
    assert m["R@1"] == pytest.approx(100 / 3)
    assert m["mean_rank"] == pytest.approx(5 / 3)
    assert m["chance_R@1"] == pytest.approx(100 * (2 + 1 + 2) / 9)


def test_label_precision_by_hand():
    sim = torch.tensor([[0.9, 0.8, 0.1, 0.0],
                        [0.1, 0.9, 0.8, 0.0],
                        [0.0, 0.1, 0.9, 0.8],
                        [0.8, 0.1, 0.0, 0.9]])
    labels = torch.tensor([[1, 0], [1, 0], [0, 1], [1, 0]]).float()
    m = retrieval_metrics(sim, torch.eye(4, dtype=torch.bool), labels, ks=(1, 2))
    assert m["P@1"] == pytest.approx(100.0)  # each query's top item is itself
    # top-2: q0 {0,1}: 2 same; q1 {1,2}: 1; q2 {2,3}: 1; q3 {3,0}: 2
    assert m["P@2"] == pytest.approx(100 * (2 + 1 + 1 + 2) / 8)


def test_query_without_hit_is_an_error():
    with pytest.raises(ValueError, match="at least one correct"):
        retrieval_metrics(torch.rand(2, 2), torch.tensor([[True, False], [False, False]]))
