"""Gradient norms of one run's checkpoint on the same 6 training batches of 32: a masked step
(all losses), its contrastive loss alone, and an unmasked contrastive-only step.

    python experiments/study-2026-12-03-sincos/grad_probe.py runs/screen-sincos/default/seed0
"""
import sys

import torch

from mcr.run import build_dataset, collate_for, load_trained


def main(run_dir):
    torch.set_num_threads(2)
    model, cfg, tokenizer, _, _ = load_trained(run_dir, "cpu")
    train_set, collate = build_dataset(cfg, "train"), collate_for(cfg, tokenizer)
    draw = torch.Generator().manual_seed(1)
    norms = {"masked, all losses": [], "masked, contrastive only": [], "unmasked, contrastive only": []}
    for i in range(6):
        batch = collate([train_set[j] for j in torch.randint(0, len(train_set), (32,), generator=draw).tolist()])
        for kind, values in norms.items():
            model.zero_grad()
            losses = model(batch, unmasked=kind.startswith("unmasked"), generator=torch.Generator().manual_seed(i))
            (sum(losses.values()) if kind.endswith("all losses") else losses["contrastive"]).backward()
            values.append(torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None]))
    for kind, values in norms.items():
        print(f"{kind:28s}", " ".join(f"{v:.2f}" for v in values), f"mean {sum(values) / len(values):.2f}")


if __name__ == "__main__":
    main(sys.argv[1])
