"""The paper's retrieval protocols, on any dataset with labels (MIMIC-CXR, OpenI, shards,
the embedded corpus).

(a) full: every pair of a split (e.g. MIMIC-CXR's official test split); image->report and
    report->image R@1/5/10, mean and median rank. Identical report texts: a report with the
    same text as the query's true report counts as a hit (mcr.evaluate's documented choice;
    many MIMIC-CXR reports are verbatim "No acute cardiopulmonary process.").
(b) 5x200: studies positive for exactly one of Atelectasis, Cardiomegaly, Consolidation,
    Edema, Pleural Effusion; `per_class` (200) drawn per class with a seeded generator; the
    selected images and reports are queries and gallery. Precision@1/5/10 = share of the top
    K retrieved items of the query's class, per class and averaged over classes, both
    directions. On the embedded corpus the synthetic findings map onto the five classes
    (SYNTHETIC_TO_FIVE); readers of real data are frontal-only by default.

    python -m mcr.evaluate --checkpoint RUN --split test --protocol 5x200
"""
import sys

import numpy as np
import torch

from mcr.evaluate import KS, embed_dataset, identical_texts, retrieval_metrics

FIVE_CLASSES = ("Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion")
SYNTHETIC_TO_FIVE = {
    "atelectasis_left": "Atelectasis", "atelectasis_right": "Atelectasis",
    "cardiomegaly": "Cardiomegaly",
    "consolidation_left_upper": "Consolidation", "consolidation_left_lower": "Consolidation",
    "consolidation_right_upper": "Consolidation", "consolidation_right_lower": "Consolidation",
    "pulmonary_edema": "Edema",
    "pleural_effusion_left": "Pleural Effusion", "pleural_effusion_right": "Pleural Effusion",
}


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

    P@K of a query = share of its top-K gallery items (K capped at G) with the query's class."""
    top = sim.float().topk(min(max(ks), sim.shape[1]), dim=1).indices
    relevant = (gallery_classes[top] == query_classes[:, None]).float()
    out = {}
    for k in ks:
        per_query = relevant[:, :k].mean(1)
        per_class = {FIVE_CLASSES[c]: 100.0 * per_query[query_classes == c].mean().item()
                     for c in query_classes.unique().tolist()}
        out[f"P@{k}"] = sum(per_class.values()) / len(per_class)
        out.update({f"P@{k}/{name}": v for name, v in per_class.items()})
    return out


def full_retrieval(image_emb, text_emb, reports, labels=None):
    """Protocol (a) on embeddings [N, E] of a whole split: {"i2t": ..., "t2i": ...}."""
    hits = identical_texts(reports)
    sim = image_emb @ text_emb.T
    return {"i2t": retrieval_metrics(sim, hits, labels), "t2i": retrieval_metrics(sim.T, hits.T, labels)}


def five_by_200(image_emb, text_emb, classes):
    """Protocol (b) on the embeddings [M, E] of the selected rows and their classes [M]."""
    sim = image_emb @ text_emb.T
    return {"i2t": precision_by_class(sim, classes, classes), "t2i": precision_by_class(sim.T, classes, classes)}


def run(model, dataset, collate, device, protocol="full", per_class=200, seed=0, label_names=None,
        batch_size=256, autocast_dtype=None):
    """Embed the needed rows of `dataset` and run one protocol; returns its results dict."""
    label_names = label_names or getattr(dataset, "label_names", None)
    if protocol == "5x200":
        if label_names is None:
            raise ValueError("the 5x200 protocol needs a dataset with label_names")
        labels = np.asarray(dataset.labels) if hasattr(dataset, "labels") \
            else np.stack([dataset[i].labels for i in range(len(dataset))])
        indices, classes = select_5x200(labels, label_names, per_class, seed)
        subset = torch.utils.data.Subset(dataset, indices.tolist())
        loader = torch.utils.data.DataLoader(subset, batch_size=batch_size, collate_fn=collate)
        img, txt, _ = embed_dataset(model, loader, device, autocast_dtype)
        results = five_by_200(img, txt, classes)
        results["counts"] = {cls: int((classes == c).sum()) for c, cls in enumerate(FIVE_CLASSES)}
        return results
    if protocol != "full":
        raise ValueError(f"protocol must be 'full' or '5x200', got {protocol!r}")
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, collate_fn=collate)
    img, txt, labels = embed_dataset(model, loader, device, autocast_dtype)
    reports = getattr(dataset, "reports", None) or [dataset[i].report for i in range(len(dataset))]
    return full_retrieval(img, txt, reports, labels)


def format_5x200(results):
    """Plain-text table: one row per direction, P@K mean and per class."""
    cols = [f"P@{k}" for k in KS] + [f"P@1/{c}" for c in FIVE_CLASSES]
    lines = [f"{'direction':<10}" + "".join(f"{c.replace('P@1/', ''):>18}" for c in cols)]
    for direction in ("i2t", "t2i"):
        row = results[direction]
        lines.append(f"{direction:<10}" + "".join(f"{row.get(c, float('nan')):>18.2f}" for c in cols))
    return "\n".join(lines) + "\n(per-class columns are P@1)"
