"""Fine-grained retrieval on the embedded corpus: can the model tell a study from the same
study with one attribute changed?

For each of `num_studies` held-out studies with findings, the generator draws its
counterfactuals (mcr.data.synthetic.make_counterfactuals): the same patient, exposure and
report phrasing with exactly one finding's laterality, lung zone or severity changed.
  image -> report: the study's image ranks its own report against the counterfactual reports;
  report -> image: the study's report ranks its own image against the counterfactual images.
R@1 is the share of queries whose true item scores above every counterfactual (chance: the
mean of 1 / (1 + counterfactuals)); pairwise accuracy is the share of (true, counterfactual)
pairs where the true item scores higher (chance 50%), overall and per attribute. This is
what MbA claims to help with: the global pooled embedding must keep where and how severe.
"""
import torch

from mcr.data.synthetic import ATTRIBUTES, SPLIT_OFFSETS, make_counterfactuals
from mcr.eval.embedding import embed
from mcr.eval.protocols import require_finite


def counterfactual_sets(num_studies, *, split="val", seed=0, image_size=96):
    """[(study, [(attribute, counterfactual study), ...])] for the first `num_studies`
    studies of `split` that have at least one counterfactual (normal studies have none)."""
    sets, index = [], SPLIT_OFFSETS[split]
    while len(sets) < num_studies:
        study, cfs = make_counterfactuals(index, seed=seed, image_size=image_size)
        if cfs:
            sets.append((study, cfs))
        index += 1
    return sets


def finegrained_metrics(true_scores, cf_scores, attributes):
    """true_scores [Q]; cf_scores: list of Q tensors [n_q]; attributes: list of Q lists of
    names. -> R@1, pairwise accuracy (overall and per attribute) and their chance, in %."""
    wins = [true > cf for true, cf in zip(true_scores.tolist(), cf_scores)]
    out = {"R@1": 100.0 * sum(bool(w.all()) for w in wins) / len(wins),
           "chance_R@1": 100.0 * sum(1.0 / (1 + len(w)) for w in wins) / len(wins),
           "pairwise": 100.0 * torch.cat(wins).float().mean().item(), "chance_pairwise": 50.0}
    for name in ATTRIBUTES:
        picked = [w[[a == name for a in attrs]] for w, attrs in zip(wins, attributes)]
        picked = torch.cat(picked)
        if picked.numel():
            out[f"pairwise_{name}"] = 100.0 * picked.float().mean().item()
    return out


def evaluate_finegrained(model, collate, device, *, num_studies=300, split="val", seed=0, image_size=96,
                         autocast_dtype=None):
    """{"i2t": {...}, "t2i": {...}, "queries": Q, "pairs": P} on the embedded corpus; a
    tie with a counterfactual counts against the true item. ValueError naming the
    embeddings when one is not finite."""
    sets = counterfactual_sets(num_studies, split=split, seed=seed, image_size=image_size)
    studies = [s for study, cfs in sets for s in (study, *(c for _, c in cfs))]
    img, txt, _ = embed(model, studies, collate, device, autocast_dtype, batch_size=128)
    require_finite(img, "image embeddings")
    require_finite(txt, "report embeddings")
    start, results = 0, {"i2t": ([], [], []), "t2i": ([], [], [])}
    for _, cfs in sets:
        n = len(cfs)
        attrs = [a for a, _ in cfs]
        for direction, query, gallery in (("i2t", img[start], txt), ("t2i", txt[start], img)):
            scores = gallery[start:start + 1 + n] @ query
            results[direction][0].append(scores[0])
            results[direction][1].append(scores[1:])
            results[direction][2].append(attrs)
        start += 1 + n
    out = {d: finegrained_metrics(torch.stack(t), c, a) for d, (t, c, a) in results.items()}
    out["queries"], out["pairs"] = len(sets), sum(len(c) for _, c in sets)
    return out
