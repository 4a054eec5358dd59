"""Retrieval metrics and the paper's two protocols, computed from embeddings (the model
is embedded once by mcr.eval.embedding.evaluate, on every dataset with labels: MIMIC-CXR, OpenI,
shards, the embedded corpus).

(a) full: every pair of a split (e.g. MIMIC-CXR's official test split); image->report and
    report->image R@1/5/10, mean and median rank, label Precision@K, and their chance
    levels. Identical report texts: a report whose text equals the query's true report is
    a hit (image->report), and so is every image whose report text equals the query report
    (report->image); many MIMIC-CXR reports are verbatim "No acute cardiopulmonary
    process.". A query's rank is pessimistic: 1 + the number of non-hits scored at or above
    its best hit, so a tie counts against the query (a model that scores everything alike
    ranks last, not first). Precision@K counts retrieved items whose finding-label set
    equals the query's; items tied at the K-th score share the remaining places evenly (the
    mean over every order of the tie).
(b) 5x200: studies positive for exactly one of Atelectasis, Cardiomegaly, Consolidation,
    Edema, Pleural Effusion; `per_class` (200) drawn per class with a seeded generator; the
    selected images and reports are queries and gallery. Precision@1/5/10 = share of the top
    K retrieved items of the query's class, per class and averaged over classes, both
    directions. On the embedded corpus the synthetic findings map onto the five classes
    (SYNTHETIC_TO_FIVE); readers of real data are frontal-only by default.

Non-finite embeddings or similarities are an error naming them: a broken model never scores.

    python -m mcr.evaluate --checkpoint RUN --split test --protocol 5x200
"""
import sys

import numpy as np
import torch

KS = (1, 5, 10)

FIVE_CLASSES = ("Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion")
SYNTHETIC_TO_FIVE = {
    "atelectasis_left": "Atelectasis", "atelectasis_right": "Atelectasis",
    "cardiomegaly": "Cardiomegaly",
    "consolidation_left_upper": "Consolidation", "consolidation_left_lower": "Consolidation",
    "consolidation_right_upper": "Consolidation", "consolidation_right_lower": "Consolidation",
    "pulmonary_edema": "Edema",
    "pleural_effusion_left": "Pleural Effusion", "pleural_effusion_right": "Pleural Effusion",
}

DIRECTIONS = {"i2t": "image->report", "t2i": "report->image"}


def require_finite(tensor, what):
    """ValueError naming `what` unless every value of `tensor` is finite."""
    bad = int((~torch.isfinite(tensor)).sum())
    if bad:
        raise ValueError(f"{what}: {bad} of {tensor.numel()} values are NaN or infinite (a diverged or broken model)")


def precision_at_k(sim, relevant, k):
    """sim [Q, G] float, relevant [Q, G] bool -> per-query P@K float [Q] (a share, K capped at
    G): the items scored above the K-th score count fully, those tied with it share the
    remaining places (the mean over every order of the tie)."""
    k = min(k, sim.shape[1])
    kth = sim.topk(k, dim=1).values[:, -1:]
    above, tied = sim > kth, sim == kth
    places_left = k - above.sum(1)
    tied_relevant = (tied & relevant).sum(1) / tied.sum(1)
    return ((above & relevant).sum(1) + places_left * tied_relevant) / k


def retrieval_metrics(sim, hits, labels=None, ks=KS, what="similarities"):
    """sim [Q, G] float; hits [Q, G] bool (True = correct gallery item); labels [Q=G, C] or None.

    Returns R@K (%), mean_rank, median_rank, chance_R@1 (%), and with labels P@K (%) and
    chance_P@K (%): the share of the gallery with the query's label set, averaged over
    queries (what P@K of a random ranking is, for every K). A query's rank is pessimistic:
    1 + the number of non-hits scored >= its best hit (ties count against it). ValueError
    naming `what` when a similarity is not finite."""
    sim, hits = sim.float(), hits.bool()
    require_finite(sim, what)
    if not hits.any(dim=1).all():
        raise ValueError("every query needs at least one correct gallery item in hits")
    best_hit = sim.masked_fill(~hits, float("-inf")).amax(dim=1, keepdim=True)
    ranks = 1 + ((sim >= best_hit) & ~hits).sum(dim=1).float()
    out = {f"R@{k}": 100.0 * (ranks <= k).float().mean().item() for k in ks}
    out["mean_rank"] = ranks.mean().item()
    out["median_rank"] = ranks.median().item()
    out["chance_R@1"] = 100.0 * hits.float().sum(1).div(sim.shape[1]).mean().item()
    if labels is not None:
        same_labels = (labels[:, None, :] == labels[None, :, :]).all(-1)
        for k in ks:
            out[f"P@{k}"] = 100.0 * precision_at_k(sim, same_labels, k).mean().item()
        out["chance_P@K"] = 100.0 * same_labels.float().mean().item()
    return out


def identical_texts(reports):
    """[N, N] bool: report i and report j have the same text."""
    index = {}
    ids = torch.tensor([index.setdefault(r, len(index)) for r in reports])
    return ids[:, None] == ids[None, :]


def five_class_matrix(labels, label_names):
    """labels [N, C] (1 = positive) with column names -> bool [N, 5] over FIVE_CLASSES.

    Columns are matched by CheXpert name, or through SYNTHETIC_TO_FIVE (OR of the columns)."""
    labels = np.asarray(labels)
    names = list(label_names)
    out = np.zeros((labels.shape[0], len(FIVE_CLASSES)), dtype=bool)
    for c, cls in enumerate(FIVE_CLASSES):
        cols = [names.index(cls)] if cls in names else [names.index(n) for n, m in SYNTHETIC_TO_FIVE.items()
                                                         if m == cls and n in names]
        if not cols:
            raise ValueError(f"labels have no column for {cls!r} (label names: {names})")
        out[:, c] = (labels[:, cols] == 1).any(axis=1)
    return out


def select_5x200(labels, label_names, per_class=200, seed=0):
    """(indices int64 [M], classes int64 [M]): up to `per_class` rows per class positive for
    exactly that one of the five, drawn without replacement with numpy's seeded generator,
    class-major and ascending within a class. Warns when a class has fewer rows."""
    five = five_class_matrix(labels, label_names)
    single = five.sum(1) == 1
    rng = np.random.default_rng(seed)
    indices, classes = [], []
    for c, cls in enumerate(FIVE_CLASSES):
        pool = np.flatnonzero(single & five[:, c])
        if len(pool) < per_class:
            print(f"warning: 5x{per_class}: only {len(pool)} studies positive for exactly {cls}", file=sys.stderr)
        chosen = np.sort(rng.choice(pool, size=min(per_class, len(pool)), replace=False))
        indices.append(chosen)
        classes.append(np.full(len(chosen), c))
    indices, classes = np.concatenate(indices), np.concatenate(classes)
    if len(indices) == 0:
        raise ValueError("5x200: no study is positive for exactly one of " + ", ".join(FIVE_CLASSES))
    return torch.from_numpy(indices).long(), torch.from_numpy(classes).long()


def precision_by_class(sim, query_classes, gallery_classes, ks=KS):
    """sim [Q, G]; classes int64 [Q], [G]. P@K (%) per class name and 'mean' over classes present.

    P@K of a query = share of its top-K gallery items (K capped at G) with the query's class,
    items tied at the K-th score sharing the remaining places (precision_at_k)."""
    sim = sim.float()
    require_finite(sim, "similarities")
    relevant = gallery_classes[None, :] == query_classes[:, None]
    out = {}
    for k in ks:
        per_query = precision_at_k(sim, relevant, k)
        per_class = {FIVE_CLASSES[c]: 100.0 * per_query[query_classes == c].mean().item()
                     for c in query_classes.unique().tolist()}
        out[f"P@{k}"] = sum(per_class.values()) / len(per_class)
        out.update({f"P@{k}/{name}": v for name, v in per_class.items()})
    chance = relevant.float().mean(1)
    per_class = [chance[query_classes == c].mean().item() for c in query_classes.unique().tolist()]
    out["chance_P@K"] = 100.0 * sum(per_class) / len(per_class)
    return out


def full_retrieval(image_emb, text_emb, reports, labels=None):
    """Protocol (a) on embeddings [N, E] of a whole split: {"i2t": ..., "t2i": ...}.
    ValueError naming the embeddings when one is not finite."""
    require_finite(image_emb, "image embeddings")
    require_finite(text_emb, "report embeddings")
    hits = identical_texts(reports)
    sim = image_emb @ text_emb.T
    return {d: retrieval_metrics(s, h, labels, what=f"{DIRECTIONS[d]} similarities")
            for d, s, h in (("i2t", sim, hits), ("t2i", sim.T, hits.T))}


def five_by_200(image_emb, text_emb, classes):
    """Protocol (b) on the embeddings [M, E] of the selected rows and their classes [M].
    ValueError naming the embeddings when one is not finite."""
    require_finite(image_emb, "image embeddings")
    require_finite(text_emb, "report embeddings")
    sim = image_emb @ text_emb.T
    return {"i2t": precision_by_class(sim, classes, classes), "t2i": precision_by_class(sim.T, classes, classes)}


def format_table(results):
    """A plain-text table of full_retrieval's output."""
    cols = ["R@1", "R@5", "R@10", "chance_R@1", "median_rank", "mean_rank", "P@1", "P@5", "P@10", "chance_P@K"]
    lines = [f"{'direction':<10}" + "".join(f"{c:>12}" for c in cols)]
    for name in ("i2t", "t2i"):
        row = results[name]
        lines.append(f"{name:<10}" + "".join(f"{row.get(c, float('nan')):>12.2f}" for c in cols))
    return "\n".join(lines)


def format_5x200(results):
    """Plain-text table: one row per direction, P@K mean and per class."""
    cols = [f"P@{k}" for k in KS] + ["chance_P@K"] + [f"P@1/{c}" for c in FIVE_CLASSES]
    lines = [f"{'direction':<10}" + "".join(f"{c.replace('P@1/', ''):>18}" for c in cols)]
    for direction in ("i2t", "t2i"):
        row = results[direction]
        lines.append(f"{direction:<10}" + "".join(f"{row.get(c, float('nan')):>18.2f}" for c in cols))
    return "\n".join(lines) + "\n(per-class columns are P@1)"
