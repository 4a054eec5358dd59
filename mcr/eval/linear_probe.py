"""Linear probing of the frozen image encoder, as CLIP_benchmark does it: features computed
once, scikit-learn's LogisticRegression per label on 1%, 10% and 100% of the labelled
training split, per-label AUROC on the test split (chance 0.5), mean and standard deviation
over several draws of the label subset.

    python -m mcr.evaluate --task linear-probe --checkpoint runs/default

Features (`image_features`): the CLS token, the mean of the patch tokens, or the MbA joint
embedding (the image side of retrieval), computed once per (checkpoint file checksum,
data, pooling) and cached as safetensors; a cache file that cannot be read is recomputed
with a warning.
"""
import hashlib
import json
import os
import sys
import warnings

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from mcr.eval.embedding import embed

POOLINGS = ("cls", "mean", "joint")
FRACTIONS = (0.01, 0.1, 1.0)


@torch.no_grad()
def image_features(model, dataset, collate, device, pooling, amp_dtype=None, batch_size=256):
    """(features float32 [N, D], labels float32 [N, C]) of every record of `dataset`.

    pooling: "cls" (the encoder's normalized CLS token, D = vit width), "mean" (mean of its
    normalized patch tokens) or "joint" (the L2-normalized MbA embedding, D = embed_dim)."""
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {', '.join(POOLINGS)}, got {pooling!r}")
    if pooling == "joint":
        image, _, labels = embed(model, dataset, collate, device, amp_dtype, batch_size)
        return image, labels.float()
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, collate_fn=collate)
    was_training = model.training
    model.eval()
    features, labels = [], []
    for batch in loader:
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            latent = model.encode_image(batch["image"].to(device))
        pooled = latent[:, 0] if pooling == "cls" else latent[:, 1:].mean(1)
        features.append(pooled.float().cpu())
        labels.append(batch["labels"].float())
    model.train(was_training)
    return torch.cat(features), torch.cat(labels)


def cached(cache_dir, key, compute):
    """compute() -> (features, labels), memoized in cache_dir under the sha256 of `key` (a
    JSON-able dict naming everything the features depend on). A cache file that cannot be
    read, or holds other tensors, is recomputed with a warning."""
    name = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]
    path = os.path.join(cache_dir, f"features-{name}.safetensors")
    if os.path.exists(path):
        try:
            tensors = load_file(path)
            features, labels = tensors["features"], tensors["labels"]
            if features.ndim != 2 or labels.ndim != 2 or len(features) != len(labels):
                raise ValueError("tensors of the wrong shape")
            return features, labels
        except Exception as err:  # any unreadable file: a corrupt cache is never fatal
            warnings.warn(f"feature cache {path} is broken ({err}); recomputing", stacklevel=2)
    features, labels = compute()
    os.makedirs(cache_dir, exist_ok=True)
    temporary = f"{path}.tmp{os.getpid()}"
    save_file({"features": features.contiguous(), "labels": labels.contiguous()}, temporary,
              metadata={"key": json.dumps(key, sort_keys=True)})
    os.replace(temporary, path)
    return features, labels


def draw_subset(num_rows, fraction, rng):
    """Sorted row indices of a uniform draw of max(1, round(fraction * num_rows)) rows."""
    size = max(1, round(fraction * num_rows))
    return np.sort(rng.choice(num_rows, size=size, replace=False))


def auroc_per_label(scores, labels, names):
    """{name: AUROC} over the rows whose label is known (not NaN); labels whose known rows
    are all of one class are left out (no AUROC exists)."""
    from sklearn.metrics import roc_auc_score

    out = {}
    for c, name in enumerate(names):
        known = ~np.isnan(labels[:, c])
        y = labels[known, c]
        if y.min() != y.max():
            out[name] = float(roc_auc_score(y, scores[known, c]))
    return out


def fit_and_score(train_x, train_y, test_x, names, C, max_iter):
    """Test scores [N_test, C]: one standardized LogisticRegression per label on its known
    training rows; a label whose rows are all one class scores every test row the same."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    scores = np.zeros((len(test_x), len(names)))
    for c in range(len(names)):
        known = ~np.isnan(train_y[:, c])
        y = train_y[known, c]
        if len(y) == 0 or y.min() == y.max():
            continue  # constant score: AUROC 0.5 on that label
        probe = make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=max_iter))
        probe.fit(train_x[known], y)
        scores[:, c] = probe.decision_function(test_x)
    return scores


def linear_probe(train_x, train_y, test_x, test_y, names, *, fractions=FRACTIONS, draws=3, seed=0, C=1.0,
                 max_iter=1000):
    """Per-label test AUROC of probes trained on `fractions` of the training rows.

    train_x float [N, D], train_y float [N, C] (NaN = unknown), test likewise. Returns
    {"1%": {"mean_auroc": m, "mean_auroc_std": s, "auroc": {name: m}, "auroc_std": {...},
    "rows": n, "draws": [...]}, ...}; each draw's subset is drawn with numpy's generator
    seeded by (seed, draw); 100% is one draw (every subset is the whole split)."""
    train_x, train_y = np.asarray(train_x, np.float64), np.asarray(train_y, np.float64)
    test_x, test_y = np.asarray(test_x, np.float64), np.asarray(test_y, np.float64)
    out = {}
    for fraction in fractions:
        per_draw = []
        for draw in range(draws if fraction < 1 else 1):
            rows = draw_subset(len(train_x), fraction, np.random.default_rng([seed, draw]))
            scores = fit_and_score(train_x[rows], train_y[rows], test_x, names, C, max_iter)
            per_draw.append(auroc_per_label(scores, test_y, names))
        labels = list(per_draw[0])
        means = [np.mean([d[n] for n in labels]) for d in per_draw]
        out[f"{fraction * 100:g}%"] = {
            "rows": int(max(1, round(fraction * len(train_x)))), "draws": len(per_draw),
            "mean_auroc": float(np.mean(means)), "mean_auroc_std": float(np.std(means)),
            "auroc": {n: float(np.mean([d[n] for d in per_draw])) for n in labels},
            "auroc_std": {n: float(np.std([d[n] for d in per_draw])) for n in labels},
            "chance_auroc": 0.5}
    return out


def format_results(results):
    """One line per label fraction: mean AUROC +- std over draws, chance beside it."""
    lines = [f"{'labels':<8}{'rows':>8}{'draws':>7}{'mean AUROC':>14}{'chance':>9}"]
    for fraction, row in results.items():
        lines.append(f"{fraction:<8}{row['rows']:>8}{row['draws']:>7}"
                     f"{row['mean_auroc']:>8.3f} ± {row['mean_auroc_std']:.3f}{row['chance_auroc']:>7.2f}")
    return "\n".join(lines)


def warn_missing_labels(names, results):
    """Say which labels had no AUROC (one class only in the test split)."""
    scored = set(next(iter(results.values()))["auroc"])
    missing = [n for n in names if n not in scored]
    if missing:
        print(f"linear probe: no AUROC for {', '.join(missing)} (one class only among the test rows)",
              file=sys.stderr)
