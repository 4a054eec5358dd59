"""Zero-shot classification: class prompts embedded by the report encoder (several per class,
their embeddings averaged), every image scored by cosine similarity against each class.

    python -m mcr.evaluate --task zero-shot --checkpoint runs/default

Two figures, each with its chance level: per-class AUROC over the whole split (chance 0.5),
and multiclass accuracy on a class-balanced sample, `per_class` images positive for exactly
one of the five CheXpert classes (mcr.eval.protocols.select_5x200, seeded; chance 1 / number of
classes), predicted as the class of highest similarity. The prompt sets are JSON files
(mcr/eval/prompts/): {"classes": {name: {"labels": [label columns], "prompts": [texts]}}};
a class is positive when any of its label columns is 1.
"""
import json
import os
from dataclasses import dataclass

import numpy as np
import torch

from mcr.eval import protocols
from mcr.eval.embedding import embed

PROMPTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "prompts")
PROMPT_SETS = ("synthetic", "chexpert", "rsna")  # the files shipped in PROMPTS_DIR


@dataclass(frozen=True)
class PromptRecord:
    """A record for Collate: a blank image and one prompt as the report."""

    image: np.ndarray
    report: str
    labels: np.ndarray


def load_prompts(name_or_path):
    """{class: {"labels": [...], "prompts": [...]}} of a shipped prompt set or a JSON file;
    ValueError names the file and what is wrong."""
    if name_or_path in PROMPT_SETS:
        path = os.path.join(PROMPTS_DIR, f"{name_or_path}.json")
    elif os.path.isfile(name_or_path):
        path = name_or_path
    else:
        raise ValueError(f"--prompts {name_or_path!r}: not one of {', '.join(PROMPT_SETS)} nor a JSON file")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    try:
        classes = json.loads(text)["classes"]
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"--prompts {name_or_path}: expected JSON with a 'classes' mapping ({err})") from None
    for name, spec in classes.items():
        if not isinstance(spec, dict) or not spec.get("prompts") or not isinstance(spec.get("labels"), list):
            raise ValueError(f"--prompts {name_or_path}: class {name!r} needs 'labels' (a list) and 'prompts'")
    return classes


def class_labels(labels, label_names, classes):
    """float [N, K] over the prompt classes: 1 where any of a class's label columns is 1,
    0 where all its known columns are 0, NaN where none is known. ValueError names a label
    column that the data lacks."""
    labels, names = np.asarray(labels, dtype=np.float64), list(label_names)
    out = np.full((len(labels), len(classes)), np.nan)
    for k, (cls, spec) in enumerate(classes.items()):
        missing = [c for c in spec["labels"] if c not in names]
        if missing:
            raise ValueError(f"prompt class {cls!r} needs label column(s) {missing}; the data has {names}")
        cols = labels[:, [names.index(c) for c in spec["labels"]]]
        known = ~np.isnan(cols).all(1)
        out[known, k] = (np.nan_to_num(cols[known], nan=0.0) == 1).any(1)
    return out


def class_embeddings(model, classes, collate, device, image_size, in_chans=1, amp_dtype=None):
    """float32 [K, E]: per class, the L2-normalized mean of its prompts' normalized report
    embeddings (the text side of retrieval, mcr.eval.embedding.embed)."""
    blank = np.zeros((image_size, image_size), dtype=np.uint8)
    records = [PromptRecord(blank, prompt, np.zeros(1, np.float32))
               for spec in classes.values() for prompt in spec["prompts"]]
    _, text, _ = embed(model, records, collate, device, amp_dtype)
    counts = [len(spec["prompts"]) for spec in classes.values()]
    means = torch.stack([chunk.mean(0) for chunk in text.split(counts)])
    return torch.nn.functional.normalize(means, dim=-1)


def per_class_auroc(scores, targets, names):
    """{name: AUROC} of scores [N, K] against targets [N, K] (NaN = unknown, left out);
    classes with one value only among the known rows have none."""
    from sklearn.metrics import roc_auc_score

    out = {}
    for k, name in enumerate(names):
        known = ~np.isnan(targets[:, k])
        y = targets[known, k]
        if len(y) and y.min() != y.max():
            out[name] = float(roc_auc_score(y, scores[known, k]))
    return out


def balanced_accuracy_sample(labels, label_names, classes, per_class, seed):
    """(indices int64 [M], class positions [M] into `classes`) of the seeded five-class sample
    (mcr.eval.protocols.select_5x200), or None when the prompt set lacks one of the five."""
    if not all(c in classes for c in protocols.FIVE_CLASSES):
        return None
    indices, five = protocols.select_5x200(labels, label_names, per_class, seed)
    positions = [list(classes).index(c) for c in protocols.FIVE_CLASSES]
    return indices.numpy(), np.asarray(positions)[five.numpy()]


def zero_shot(image_emb, labels, label_names, class_emb, classes, *, per_class=200, seed=0):
    """Results of zero-shot classification from image embeddings [N, E] (normalized),
    labels [N, C] with their names, and class embeddings [K, E] of `classes`:
    {"auroc": {class: AUROC}, "mean_auroc", "chance_auroc": 0.5, "accuracy" (%),
    "chance_accuracy" (%), "accuracy_per_class", "sample": {"indices", "classes"}}."""
    names = list(classes)
    scores = (image_emb.float() @ class_emb.float().T).numpy()
    auroc = per_class_auroc(scores, class_labels(labels, label_names, classes), names)
    out = {"classes": names, "auroc": auroc, "mean_auroc": float(np.mean(list(auroc.values()))) if auroc else None,
           "chance_auroc": 0.5}
    sample = balanced_accuracy_sample(np.asarray(labels), label_names, classes, per_class, seed)
    if sample is not None:
        indices, truth = sample
        five = [names.index(c) for c in protocols.FIVE_CLASSES]
        predicted = np.asarray(five)[scores[indices][:, five].argmax(1)]
        correct = predicted == truth
        present = sorted(set(truth.tolist()))
        shares = [float((truth == k).mean()) for k in present]  # chance: always the largest class
        out.update(accuracy=100.0 * float(correct.mean()), chance_accuracy=100.0 * max(shares),
                   accuracy_per_class={names[k]: 100.0 * float(correct[truth == k].mean()) for k in present},
                   sample={"per_class": per_class, "seed": seed, "indices": indices.tolist(),
                           "classes": [names[k] for k in truth]})
    return out


def format_results(results):
    """Per-class AUROC lines, then the five-class accuracy, each with its chance level."""
    lines = [f"{'class':<18}{'AUROC':>8}  (chance {results['chance_auroc']:.2f})"]
    lines += [f"{name:<18}{value:>8.3f}" for name, value in results["auroc"].items()]
    if results["mean_auroc"] is not None:
        lines.append(f"{'mean':<18}{results['mean_auroc']:>8.3f}")
    if "accuracy" in results:
        n = len(results["sample"]["indices"])
        lines.append(f"5-class accuracy on {n} images: {results['accuracy']:.1f}% "
                     f"(chance {results['chance_accuracy']:.1f}%)")
    return "\n".join(lines)
