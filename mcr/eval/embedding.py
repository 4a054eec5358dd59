"""The one evaluation path: embed a split unmasked, then score it with a retrieval protocol
(mcr.eval.protocols). Training's validation, `python -m mcr.evaluate`, the retrieval
gallery, the pictures and the studies all embed through `embed`.
"""
import numpy as np
import torch

from mcr.distributed import gather_in_rank_order, rank_slice
from mcr.eval import protocols


@torch.no_grad()
def embed(model, dataset, collate, device, amp_dtype=None, batch_size=256, num_workers=0):
    """Unmasked embeddings of every pair of `dataset`, in order: (image [N, E], text [N, E]
    float32, labels [N, C]). Under torch.distributed each rank embeds its contiguous slice
    (rank_slice) and every rank receives the whole (a collective)."""
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    if world > 1:
        dataset = torch.utils.data.Subset(dataset, rank_slice(len(dataset), torch.distributed.get_rank(), world))
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, collate_fn=collate,
                                         num_workers=num_workers)
    was_training = model.training
    model.eval()
    images, texts, labels = [], [], []
    for batch in loader:
        special = {"special_tokens_mask": batch["special_tokens_mask"].to(device)} \
            if "special_tokens_mask" in batch else {}  # needed to embed masked views (embed_masks)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            img, txt = model.embed(batch["image"].to(device), batch["input_ids"].to(device),
                                   batch["attention_mask"].to(device), **special)
        images.append(img.float().cpu())
        texts.append(txt.float().cpu())
        labels.append(batch["labels"])
    model.train(was_training)
    local = torch.cat(images), torch.cat(texts), torch.cat(labels)
    return gather_in_rank_order(local) if world > 1 else local


def split_reports(dataset):
    """The report texts of `dataset`, in order."""
    return getattr(dataset, "reports", None) or [dataset[i].report for i in range(len(dataset))]


def split_labels(dataset):
    """The labels [N, C] of `dataset`, in order."""
    labels = getattr(dataset, "labels", None)
    return np.asarray(labels) if labels is not None else np.stack([dataset[i].labels for i in range(len(dataset))])


def evaluate(model, dataset, collate, device, amp_dtype=None, *, protocol="full", per_class=200, seed=0,
             batch_size=256, num_workers=0):
    """Retrieval on one split with one protocol (mcr.eval.protocols): "full" every pair, "5x200"
    the seeded five-class selection. Returns {"i2t": {...}, "t2i": {...}} (5x200: and
    "counts") on every rank; the ranks share the embedding work."""
    if protocol == "full":
        img, txt, labels = embed(model, dataset, collate, device, amp_dtype, batch_size, num_workers)
        return protocols.full_retrieval(img, txt, split_reports(dataset), labels)
    if protocol != "5x200":
        raise ValueError(f"protocol must be 'full' or '5x200', got {protocol!r}")
    label_names = getattr(dataset, "label_names", None)
    if label_names is None:
        raise ValueError("the 5x200 protocol needs a dataset with label_names")
    indices, classes = protocols.select_5x200(split_labels(dataset), label_names, per_class, seed)
    subset = torch.utils.data.Subset(dataset, indices.tolist())
    img, txt, _ = embed(model, subset, collate, device, amp_dtype, batch_size, num_workers)
    results = protocols.five_by_200(img, txt, classes)
    results["counts"] = {cls: int((classes == c).sum()) for c, cls in enumerate(protocols.FIVE_CLASSES)}
    return results


def format_results(results, protocol="full"):
    """A plain-text table of evaluate's results."""
    return protocols.format_5x200(results) if protocol == "5x200" else protocols.format_table(results)


def flatten_results(results):
    """{"i2t_R@1": ...}: evaluate's results as one flat dict (a metrics.jsonl row)."""
    return {f"{direction}_{k}": v for direction, row in results.items() for k, v in row.items()}
