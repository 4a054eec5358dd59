"""Retrieval metrics against hand-computed cases; the evaluation path shared by several processes."""
import os

import pytest
import torch

from mcr.distributed import rank_slice
from mcr.eval import protocols
from mcr.eval.embedding import embed, evaluate
from mcr.eval.protocols import identical_texts, retrieval_metrics


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
    # a random ranking: label set [1, 0] is 3 of the 4 gallery items, [0, 1] one of them
    assert m["chance_P@K"] == pytest.approx(100 * (3 + 3 + 1 + 3) / 16)


def test_query_without_hit_is_an_error():
    with pytest.raises(ValueError, match="at least one correct"):
        retrieval_metrics(torch.rand(2, 2), torch.tensor([[True, False], [False, False]]))


def reference_ranks(sim, hits):
    """float64 loop: 1 + the non-hits scored at or above the query's best hit (ties count against)."""
    ranks = []
    for scores, is_hit in zip(sim.double().tolist(), hits.tolist()):
        best = max(s for s, h in zip(scores, is_hit) if h)
        ranks.append(1 + sum(s >= best and not h for s, h in zip(scores, is_hit)))
    return torch.tensor(ranks, dtype=torch.float64)


def sampled_precision(sim, relevant, k, draws=4000):
    """P@K averaged over `draws` random orders of the ties (a random key below the scores' spacing)."""
    g = torch.Generator().manual_seed(5)
    keys = sim.double()[None] + 1e-6 * torch.rand(draws, *sim.shape, generator=g, dtype=torch.float64)
    top = keys.topk(min(k, sim.shape[1]), dim=2).indices
    return torch.gather(relevant[None].expand(draws, -1, -1), 2, top).double().mean(2).mean(0)


@pytest.mark.parametrize("queries,gallery", [(1, 1), (1, 5), (7, 3), (13, 13)])
def test_ties_count_against_the_query_on_fresh_tied_scores(queries, gallery):
    sim = torch.randint(0, 3, (queries, gallery)).float()  # three levels: ties everywhere
    hits = torch.rand(queries, gallery) < 0.3
    hits[torch.arange(queries), torch.randint(0, gallery, (queries,))] = True
    m = retrieval_metrics(sim, hits, ks=(1, 2))
    want = reference_ranks(sim, hits)
    assert m["mean_rank"] == pytest.approx(want.mean().item())
    assert m["R@1"] == pytest.approx(100 * (want <= 1).double().mean().item())
    assert m["R@2"] == pytest.approx(100 * (want <= 2).double().mean().item())


def test_all_equal_scores_rank_last_not_first():
    n = 6
    m = retrieval_metrics(torch.zeros(n, n), torch.eye(n, dtype=torch.bool), torch.eye(n), ks=(1, 5))
    assert m["R@1"] == 0.0 and m["R@5"] == 0.0 and m["mean_rank"] == n
    assert m["P@1"] == pytest.approx(m["chance_P@K"]) and m["P@5"] == pytest.approx(m["chance_P@K"])


@pytest.mark.parametrize("queries,gallery,k", [(1, 1, 1), (4, 7, 3), (9, 5, 10), (6, 11, 5)])
def test_label_precision_shares_the_tied_places(queries, gallery, k):
    sim = torch.randint(0, 3, (queries, gallery)).float()
    relevant = torch.rand(queries, gallery) < 0.5
    got = protocols.precision_at_k(sim, relevant, k).double()
    torch.testing.assert_close(got, sampled_precision(sim, relevant, k), rtol=0, atol=0.03)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_similarities_are_an_error(bad):
    sim = torch.rand(4, 4)
    sim[2, 1] = bad
    with pytest.raises(ValueError, match="similarities: 1 of 16 values are NaN or infinite"):
        retrieval_metrics(sim, torch.eye(4, dtype=torch.bool))
    with pytest.raises(ValueError, match="NaN or infinite"):
        retrieval_metrics(torch.full((3, 3), float("nan")), torch.eye(3, dtype=torch.bool))


def test_full_retrieval_names_the_non_finite_side():
    image, text = torch.randn(5, 4), torch.randn(5, 4)
    reports = [f"report {i}" for i in range(5)]
    with pytest.raises(ValueError, match="^image embeddings"):
        protocols.full_retrieval(image.masked_fill(torch.eye(5, 4, dtype=torch.bool), float("nan")), text, reports)
    with pytest.raises(ValueError, match="^report embeddings"):
        protocols.full_retrieval(image, torch.full_like(text, float("nan")), reports)
    with pytest.raises(ValueError, match=r"^image->report similarities"):  # finite embeddings, overflowing scores
        protocols.full_retrieval(image * 1e30, text * 1e30, reports)
    with pytest.raises(ValueError, match="^image embeddings"):
        protocols.five_by_200(torch.full_like(image, float("inf")), text, torch.tensor([0, 0, 1, 1, 2]))


class _PairEmbedder(torch.nn.Module):
    """A stand-in for MCR.embed: unit vectors from the image and the token ids."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.image = torch.nn.Linear(12, 5)
        self.text = torch.nn.Linear(4, 5)

    def embed(self, image, input_ids, attention_mask):
        txt = self.text((input_ids * attention_mask).float())
        return torch.nn.functional.normalize(self.image(image.flatten(1)), dim=-1), \
            torch.nn.functional.normalize(txt, dim=-1)


class _Pairs(torch.utils.data.Dataset):
    """n pairs as batch dicts (default collate) with report texts."""

    def __init__(self, n, reports):
        g = torch.Generator().manual_seed(1)
        self.items = [{"image": torch.randn(3, 4, generator=g), "input_ids": torch.randint(1, 50, (4,), generator=g),
                       "attention_mask": torch.ones(4, dtype=torch.long),
                       "labels": torch.randint(0, 2, (3,), generator=g)} for _ in range(n)]
        self.reports = reports

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def _eval_worker(rank, world, port, out_dir, pairs):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        embedded = embed(_PairEmbedder(), pairs, None, torch.device("cpu"), batch_size=2)
        results = evaluate(_PairEmbedder(), pairs, None, torch.device("cpu"), batch_size=2)
        torch.save((embedded, results), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_ranks_embed_their_slices_and_all_get_the_whole_split(tmp_path, free_port):
    import torch.multiprocessing as mp

    n, world = 7, 3  # slices of 2, 2 and 3 pairs, batches of 2: a ragged last batch
    pairs = _Pairs(n, [f"report {i % 5}" for i in range(n)])
    want_embedded = embed(_PairEmbedder(), pairs, None, torch.device("cpu"), batch_size=2)
    want = evaluate(_PairEmbedder(), pairs, None, torch.device("cpu"), batch_size=2)
    mp.spawn(_eval_worker, args=(world, free_port, str(tmp_path), pairs), nprocs=world, join=True)
    for rank in range(world):
        embedded, results = torch.load(tmp_path / f"rank{rank}.pt")
        for got, expected in zip(embedded, want_embedded):
            torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
        for direction in ("i2t", "t2i"):
            assert results[direction] == pytest.approx(want[direction])


def test_rank_slices_cover_the_split_once():
    for n, world in [(1, 1), (7, 3), (10, 4), (1000, 8)]:
        covered = [i for rank in range(world) for i in rank_slice(n, rank, world)]
        assert covered == list(range(n))
    with pytest.raises(ValueError, match="3 pairs cannot be shared by 4 processes"):
        rank_slice(3, 0, 4)
