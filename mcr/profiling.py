"""Deterministic cost proxies of one training step, measurable on a CPU.

- activation bytes saved for backward (saved-tensor hooks; parameters excluded, each
  storage counted once), per sample;
- FLOPs of forward + backward (torch.utils.flop_counter), per sample.
They compare variants (MCR vs dual-stream, MbA vs AbM) without a GPU; wall time and peak
memory on a GPU are in benchmarks/bench_train_step.py.
"""
import argparse

import torch
from torch.utils.flop_counter import FlopCounterMode

from mcr import masking
from mcr.data.batching import one_word_per_token

PAD, CLS, SEP, MASK = 0, 2, 3, 4  # token ids of random_batch (a WordPiece vocabulary's order)


def seeded_masks(model, batch, seed=0):
    """The masks of `batch` drawn from a generator seeded with `seed` (mcr.masking.draw)."""
    device = batch["image"].device
    return masking.draw(model.cfg, batch["image"].shape[0], device=device,
                        generator=torch.Generator(device=device).manual_seed(seed))


def saved_activation_bytes(model, batch, unmasked=False):
    """Bytes of distinct non-parameter tensors autograd saves for one masked forward of
    `model` on `batch` (seeded_masks), or one unmasked, contrastive-only forward."""
    param_ptrs = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = {}

    def pack(t):
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in param_ptrs and ptr not in seen:
            seen[ptr] = storage.nbytes()
        return t

    masks = None if unmasked else seeded_masks(model, batch)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        losses = model(batch, masks, unmasked=unmasked)
    del losses
    return sum(seen.values())


def step_flops(model, batch, weights=None):
    """FLOPs of forward + backward of the weighted loss sum of a masked step on `batch`."""
    weights = weights or {"contrastive": 0.1, "mim": 1.0, "mrm": 1.0}
    masks = seeded_masks(model, batch)
    counter = FlopCounterMode(display=False)
    with counter:
        losses = model(batch, masks)
        sum(weights[k] * v for k, v in losses.items()).backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def step_costs(model, batch):
    """{"activation_bytes_per_sample", "flops_per_sample"} of one training step on `batch`."""
    batch_size = batch["image"].shape[0]
    act = saved_activation_bytes(model, batch)
    flops = step_flops(model, batch)
    return {"activation_bytes_per_sample": act / batch_size, "flops_per_sample": flops / batch_size}


def random_batch(cfg, batch_size, device="cpu", seed=0):
    """Random images and reports whose lengths follow a report-like distribution (median
    ~60% of max_text_len), right-padded to the longest; token ids PAD/CLS/SEP as above, each
    other token a word of its own."""
    g = torch.Generator().manual_seed(seed)
    L = cfg.max_text_len
    lengths = (torch.randn(batch_size, generator=g) * 0.15 * L + 0.6 * L).round().clamp(8, L).long()
    attention = (torch.arange(int(lengths.max())) < lengths[:, None]).long()
    ids = torch.randint(5, cfg.vocab_size, attention.shape, generator=g)
    ids[:, 0] = CLS
    ids[torch.arange(batch_size), lengths - 1] = SEP
    ids = ids.masked_fill(attention == 0, PAD)
    special = ((ids == CLS) | (ids == SEP) | (ids == PAD)).long()
    image = torch.randn(batch_size, cfg.in_chans, cfg.image_size, cfg.image_size, generator=g)
    batch = {"image": image, "input_ids": ids, "attention_mask": attention, "special_tokens_mask": special,
             "word_ids": one_word_per_token(special == 0)}
    return {k: v.to(device) for k, v in batch.items()}


def proxy_table(preset_names=("small", "paper"), variants=("dual-stream", "mcr", "abm"), batch_size=4):
    """Rows of per-sample activation bytes and FLOPs, with ratios to dual-stream."""
    from mcr.config import preset
    from mcr.models import build_model

    rows = []
    for name in preset_names:
        costs = {}
        for variant in variants:
            torch.manual_seed(0)
            cfg = preset(name, variant=variant)
            model = build_model(cfg, pad_token_id=PAD, mask_token_id=MASK)
            costs[variant] = step_costs(model, random_batch(cfg, batch_size))
        base = costs["dual-stream"]
        for variant, c in costs.items():
            rows.append({"preset": name, "variant": variant,
                         "activation_MiB_per_sample": c["activation_bytes_per_sample"] / 2**20,
                         "GFLOPs_per_sample": c["flops_per_sample"] / 1e9,
                         "activation_vs_dual_stream":
                             c["activation_bytes_per_sample"] / base["activation_bytes_per_sample"],
                         "flops_vs_dual_stream": c["flops_per_sample"] / base["flops_per_sample"]})
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m mcr.profiling", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", default="small,paper", help="comma-separated presets (mcr.config.PRESETS)")
    parser.add_argument("--batch-size", type=int, default=4, help="samples of the measured step")
    args = parser.parse_args(argv)
    rows = proxy_table(args.presets.split(","), batch_size=args.batch_size)
    keys = list(rows[0])
    print("| " + " | ".join(keys) + " |")
    print("|" + " --- |" * len(keys))
    for r in rows:
        print("| " + " | ".join(f"{v:.3f}" if isinstance(v, float) else str(v) for v in r.values()) + " |")
    return rows


if __name__ == "__main__":
    main()
