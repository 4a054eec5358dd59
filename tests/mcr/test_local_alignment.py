"""The local word-to-region loss of mpma and reclf: groups of the global batch as negatives,
against a float64 oracle on every backend of local_matching, and on 2 gloo processes
against 1 process."""
import os

import pytest
import torch
import torch.nn.functional as F

import mcr_kernels
from mcr.config import preset
from mcr.models.local import LocalAlignment
from mcr_kernels import reference

WORLD = 2
ATOL, RTOL = 2e-5, 1e-4  # float32 inputs against the float64 oracle


def alignment(group_size, **kw):
    return LocalAlignment(preset("small", local_group_size=group_size, **kw))


def feature_weighted(matchings, word_mask, feature):
    """An aggregate of per-word matchings [m_i, m_t, L] by a per-report feature [m_t, L, 1]."""
    return (matchings * feature[None, ..., 0] * word_mask).sum(-1)


def local_loss(module, img, txt, word_mask, agg, weights):
    """The module's loss; agg "aggregate": feature_weighted, the weights as the report feature."""
    if agg == "aggregate":
        return module(img, txt, word_mask, aggregate=feature_weighted, report_features=(weights[..., None],))
    return module(img, txt, word_mask, agg=agg, word_weights=weights)


def oracle(module, img, txt, word_mask, agg="lse", word_weights=None):
    """Every pair scored by the eager reference in float64 (agg "aggregate": feature_weighted
    of its per-word matchings); each group's block of the [B, B] scores is its cross-entropy
    in both directions; the mean over the B rows."""
    local = module.cfg.local
    attention = dict(attn_scale=local.attn_scale, attn=local.attn, word_scale=local.word_scale)
    if agg == "aggregate":
        matchings = reference.local_matching(img, None, txt, word_mask, agg="none", **attention)
        scores = feature_weighted(matchings, word_mask, word_weights[..., None])
    else:
        scores = reference.local_matching(img, None, txt, word_mask, agg=agg, agg_scale=local.agg_scale,
                                          word_weights=word_weights, **attention)
    logits = module.log_scale.double().exp() * scores
    B = img.shape[0]
    size = local.group_size or B
    total = 0
    for start in range(0, B, size):
        block = logits[start:start + size, start:start + size]
        labels = torch.arange(block.shape[0])
        total = total + F.cross_entropy(block, labels, reduction="sum") + F.cross_entropy(block.T, labels,
                                                                                         reduction="sum")
    return total / (2 * B)


def inputs(B, K=5, L=7, E=12, weighted=False):
    img, txt = torch.randn(B, K, E), torch.randn(B, L, E)
    word_mask = torch.rand(B, L) > 0.3
    word_mask[:, 0] = True
    weights = torch.rand(B, L) * word_mask if weighted else None
    return img, txt, word_mask, weights


def leaves(*tensors, dtype):
    return [None if t is None else t.to(dtype).requires_grad_() for t in tensors]


@pytest.mark.parametrize("backend", mcr_kernels.registered_backends("local_matching"))
@pytest.mark.parametrize("B,group_size,attention", [
    (1, 0, {}), (1, 16, {}), (5, 0, {}), (7, 3, {}), (7, 1, {}), (32, 16, {}), (6, 4, {}), (9, 20, {}),
    (7, 3, dict(local_attn="words_then_regions", local_word_scale=3.0))])
@pytest.mark.parametrize("agg", ["lse", "weighted", "aggregate"])
def test_groups_match_the_float64_oracle_with_gradients(backend, B, group_size, attention, agg):
    """Every group size, each local attention (--local-attn), every aggregate."""
    if backend == "triton" and not os.environ.get("TRITON_INTERPRET") and not torch.cuda.is_available():
        pytest.skip("triton on the CPU needs TRITON_INTERPRET=1")
    img, txt, word_mask, weights = inputs(B, weighted=agg != "lse")
    module = alignment(group_size, **attention)
    assert module.cfg.local.attn == attention.get("local_attn", "regions")
    got_leaves = leaves(img, txt, weights, dtype=torch.float32)
    with mcr_kernels.use_backend(backend, "local_matching"):
        got = local_loss(module, *got_leaves[:2], word_mask, agg, got_leaves[2])
    want_leaves = leaves(img, txt, weights, dtype=torch.float64)
    want = oracle(module, want_leaves[0], want_leaves[1], word_mask, agg, want_leaves[2])
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, atol=ATOL, rtol=RTOL)
    used = [i for i, t in enumerate(got_leaves) if t is not None]
    got_grads = torch.autograd.grad(got, [got_leaves[i] for i in used])
    want_grads = torch.autograd.grad(want, [want_leaves[i] for i in used])
    for i, g, w in zip(used, got_grads, want_grads):
        torch.testing.assert_close(g.double(), w, atol=ATOL, rtol=RTOL, msg=lambda m, i=i: f"grad {i}: {m}")


def test_attention_order_changes_the_loss():
    """--local-attn words_then_regions reaches local_matching: the loss differs from the default's."""
    img, txt, word_mask, _ = inputs(6)
    default = alignment(3)(img, txt, word_mask)
    gloria = alignment(3, local_attn="words_then_regions", local_word_scale=3.0)(img, txt, word_mask)
    assert not torch.allclose(default, gloria)


def test_a_group_of_one_pair_has_no_negatives_and_no_loss():
    img, txt, word_mask, _ = inputs(5)
    assert alignment(1)(img, txt, word_mask).item() == 0.0


def test_groups_are_independent_batches():
    """Groups of 3 of a batch of 6: the mean of the two halves' losses, each half scored alone."""
    img, txt, word_mask, _ = inputs(6)
    halves = [alignment(0)(img[rows], txt[rows], word_mask[rows]) for rows in (slice(0, 3), slice(3, 6))]
    torch.testing.assert_close(alignment(3)(img, txt, word_mask), sum(halves) / 2)


# --- torch.distributed: groups spanning the ranks --------------------------------------------

CASES = [  # (group size, agg): 0 and 4 span the ranks (rows 0-2 | 3-5), 3 stays on each rank
    (0, "lse"), (4, "lse"), (3, "lse"), (0, "weighted"), (4, "weighted"), (4, "aggregate")]
LENGTHS = (5, 7)  # each rank's reports padded to its own longest: the gather pads them again


def rank_rows(rank, img, txt, word_mask, weights):
    b = img.shape[0] // WORLD
    rows, length = slice(rank * b, (rank + 1) * b), LENGTHS[rank]
    return (img[rows], txt[rows, :length], word_mask[rows, :length],
            None if weights is None else weights[rows, :length])


def global_inputs(weighted):
    img, txt, word_mask, weights = inputs(6, L=max(LENGTHS), weighted=weighted)
    word_mask[:3, LENGTHS[0]:] = False  # rank 0's reports are shorter
    if weights is not None:
        weights = weights * word_mask
    return img, txt, word_mask, weights


def dist_worker(rank, port, out_dir, data):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        results = {}
        for group_size, agg in CASES:
            tensors = rank_rows(rank, *data[agg])
            own = leaves(*tensors[:2], tensors[3], dtype=torch.float32)
            loss = local_loss(alignment(group_size), own[0], own[1], tensors[2], agg, own[2])
            grads = torch.autograd.grad(loss, [t for t in own if t is not None])
            results[group_size, agg] = (loss.detach(), *grads)
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_gloo_processes_match_one_process(tmp_path, free_port):
    """Each rank's loss covers its rows, so the mean over ranks is the one-process loss;
    all_gather's backward sums the ranks' gradients, so each rank's are WORLD x the
    one-process loss's gradients of its rows (DDP's averaging then gives the one-process
    step)."""
    import torch.multiprocessing as mp

    data = {agg: global_inputs(agg != "lse") for agg in ("lse", "weighted", "aggregate")}
    mp.spawn(dist_worker, args=(free_port, str(tmp_path), data), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    for group_size, agg in CASES:
        img, txt, word_mask, weights = data[agg]
        one = leaves(img, txt, weights, dtype=torch.float64)
        module = alignment(group_size)
        want = oracle(module, one[0], one[1], word_mask, agg, one[2])
        want_grads = torch.autograd.grad(want, [t for t in one if t is not None])
        what = f"group_size={group_size} agg={agg}"
        losses = torch.stack([r[group_size, agg][0] for r in ranks])
        torch.testing.assert_close(losses.mean().double(), want, atol=ATOL, rtol=RTOL, msg=what)
        for rank, result in enumerate(ranks):
            wanted = rank_rows(rank, *want_grads[:2], word_mask, want_grads[2] if len(want_grads) == 3 else None)
            for got, mine in zip(result[group_size, agg][1:], [wanted[0], wanted[1], wanted[3]]):
                torch.testing.assert_close(got.double() / WORLD, mine, atol=ATOL, rtol=RTOL,
                                           msg=lambda m, what=what, rank=rank: f"{what} rank {rank}: {m}")
