"""Cross-modal retrieval evaluation: Recall@K, mean/median rank, label-aware Precision@K.

    python -m mcr.evaluate --checkpoint runs/default/checkpoints/step_00001200
    python -m mcr.evaluate --checkpoint runs/mimic --split test --protocol 5x200   (mcr.protocols)

Ties of identical report texts: a report whose text equals the query's true report is
counted as a hit (image->report), and so is every image whose report text equals the query
report (report->image). A query's rank is 1 + the number of non-hits scored above its best
hit. Precision@K counts retrieved items whose finding-label set equals the query's.
"""
import argparse
import json
import os

import torch
import torch.distributed as dist

KS = (1, 5, 10)


def retrieval_metrics(sim, hits, labels=None, ks=KS):
    """sim [Q, G] float; hits [Q, G] bool (True = correct gallery item); labels [Q=G, C] or None.

    Returns R@K (%), mean_rank, median_rank, chance_R@1 (%), and P@K (%) when labels given.
    """
    sim, hits = sim.float(), hits.bool()
    if not hits.any(dim=1).all():
        raise ValueError("every query needs at least one correct gallery item in hits")
    best_hit = sim.masked_fill(~hits, float("-inf")).amax(dim=1, keepdim=True)
    ranks = 1 + ((sim > best_hit) & ~hits).sum(dim=1).float()
    out = {f"R@{k}": 100.0 * (ranks <= k).float().mean().item() for k in ks}
    out["mean_rank"] = ranks.mean().item()
    out["median_rank"] = ranks.median().item()
    out["chance_R@1"] = 100.0 * hits.float().sum(1).div(sim.shape[1]).mean().item()
    if labels is not None:
        same_labels = (labels[:, None, :] == labels[None, :, :]).all(-1)
        top = sim.topk(min(max(ks), sim.shape[1]), dim=1).indices
        relevant = torch.gather(same_labels, 1, top).float()
        for k in ks:
            out[f"P@{k}"] = 100.0 * relevant[:, :k].mean().item()
        # same-label-set chance: the share of the gallery with the query's label set
        out["chance_P@K"] = 100.0 * same_labels.float().mean().item()
    return out


def identical_texts(reports):
    """[N, N] bool: report i and report j have the same text."""
    index = {}
    ids = torch.tensor([index.setdefault(r, len(index)) for r in reports])
    return ids[:, None] == ids[None, :]


@torch.no_grad()
def embed_dataset(model, loader, device, autocast_dtype=None, gather=False):
    """Unmasked embeddings of every pair: (image [N, E], text [N, E] float32, labels [N, C]).

    gather: under torch.distributed, `loader` holds this rank's slice (rank_slice) and every
    rank receives the whole split's embeddings in rank order (a collective)."""
    model.eval()
    images, texts, labels = [], [], []
    for batch in loader:
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            special = {"special_tokens_mask": batch["special_tokens_mask"].to(device)} \
                if "special_tokens_mask" in batch else {}  # needed to embed masked views
            img, txt = model.embed(batch["image"].to(device), batch["input_ids"].to(device),
                                   batch["attention_mask"].to(device), **special)
        images.append(img.float().cpu())
        texts.append(txt.float().cpu())
        labels.append(batch["labels"])
    local = torch.cat(images), torch.cat(texts), torch.cat(labels)
    if not gather:
        return local
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, local)
    return tuple(torch.cat(column) for column in zip(*parts))


def rank_slice(num_items, rank, world):
    """The contiguous indices of one rank's share of an evaluation split."""
    if num_items < world:
        raise ValueError(f"an evaluation split of {num_items} pairs cannot be shared by {world} processes")
    return range(rank * num_items // world, (rank + 1) * num_items // world)


def evaluate_retrieval(model, loader, reports, device, autocast_dtype=None, gather=False):
    """Both directions on one split: {"i2t": {...}, "t2i": {...}}. reports: the whole
    split's texts; gather: as in embed_dataset (every rank gets the results)."""
    img, txt, labels = embed_dataset(model, loader, device, autocast_dtype, gather)
    hits = identical_texts(reports)
    sim = img @ txt.T
    return {"i2t": retrieval_metrics(sim, hits, labels), "t2i": retrieval_metrics(sim.T, hits.T, labels)}


def format_table(results):
    """A plain-text table of evaluate_retrieval's output."""
    cols = ["R@1", "R@5", "R@10", "median_rank", "mean_rank", "P@1", "P@5", "P@10", "chance_R@1"]
    lines = [f"{'direction':<10}" + "".join(f"{c:>12}" for c in cols)]
    for name, row in results.items():
        lines.append(f"{name:<10}" + "".join(f"{row.get(c, float('nan')):>12.2f}" for c in cols))
    return "\n".join(lines)


def main(argv=None):
    from mcr import protocols
    from mcr.data.batching import Collate
    from mcr.train import build_dataset, load_trained

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="checkpoint folder, or a run folder (its latest)")
    parser.add_argument("--split", default="val", help="held-out split to evaluate (val or test)")
    parser.add_argument("--size", type=int, default=0, help="number of pairs (synthetic data; 0 = config's)")
    parser.add_argument("--protocol", choices=("full", "5x200"), default="full",
                        help="full: R@K over the whole split; 5x200: P@K by class (mcr.protocols)")
    parser.add_argument("--per-class", type=int, default=200, help="5x200: studies per class")
    parser.add_argument("--seed", type=int, default=0, help="5x200: selection seed")
    parser.add_argument("--data", default="", help="evaluate on another dataset than the training one")
    parser.add_argument("--data-root", default="", help="its root (with --data)")
    parser.add_argument("--data-options", default=None, help="its reader options (with --data)")
    parser.add_argument("--output", default="", help="JSON file to write (default: beside the checkpoint)")
    args = parser.parse_args(argv)
    model, cfg, tokenizer, device, path = load_trained(args.checkpoint)
    if args.data:
        cfg.data, cfg.data_root = args.data, args.data_root
        cfg.data_options = args.data_options or ""
    dataset = build_dataset(cfg, args.split, args.size or cfg.val_size)
    collate = Collate(tokenizer, cfg.model.max_text_len, cfg.model.in_chans)
    results = protocols.run(model, dataset, collate, device, args.protocol, args.per_class, args.seed)
    print(f"checkpoint {path}, {cfg.data} split {args.split}, protocol {args.protocol}, {len(dataset)} pairs")
    print(protocols.format_5x200(results) if args.protocol == "5x200" else format_table(results))
    suffix = "" if args.protocol == "full" else f"_{args.protocol}"
    output = args.output or os.path.join(path, f"eval_{args.split}{suffix}.json")
    with open(output, "w") as f:
        json.dump({"checkpoint": path, "data": cfg.data, "split": args.split, "protocol": args.protocol,
                   "pairs": len(dataset), **results}, f, indent=1)
    print(f"wrote {output}")
    return results


if __name__ == "__main__":
    main()
