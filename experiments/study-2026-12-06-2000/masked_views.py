"""Evaluation-only diagnostic of trained runs: retrieval R@1 with each side embedded on clean
inputs or as the mean of 4 masked views at the training ratios (MCR.embed, embed_masks=4).

    python experiments/study-2026-12-06-2000/masked_views.py OUT.json RUN [RUN ...]
"""
import dataclasses
import json
import sys

import torch

from mcr import run
from mcr.eval.embedding import evaluate

VIEWS = {"clean": (False, False), "text-masked": (False, True), "image-masked": (True, False),
         "both-masked": (True, True)}  # (image masked, text masked)


def mixed_embed(model, image_masked, text_masked):
    """model.embed with the chosen sides embedded as the mean of 4 masked views."""
    clean_embed, clean_cfg = type(model).embed.__get__(model), model.cfg
    masked_cfg = dataclasses.replace(clean_cfg, embed_masks=4)

    def embed(*args, **kwargs):
        clean = clean_embed(*args, **kwargs)
        if not (image_masked or text_masked):
            return clean
        model.cfg = masked_cfg
        try:
            masked = clean_embed(*args, **kwargs)
        finally:
            model.cfg = clean_cfg
        return (masked if image_masked else clean)[0], (masked if text_masked else clean)[1]

    return embed


def main(out_path, runs):
    out = {}
    for path in runs:
        model, cfg, tokenizer, device, _ = run.load_trained(path, "cpu")
        model.eval()
        dataset = run.build_dataset(cfg, "val", cfg.val_size)
        out[path] = {}
        for name, sides in VIEWS.items():
            model.embed = mixed_embed(model, *sides)
            torch.manual_seed(0)
            results = evaluate(model, dataset, run.collate_for(cfg, tokenizer), device)
            out[path][name] = {"i2t_R@1": results["i2t"]["R@1"], "t2i_R@1": results["t2i"]["R@1"]}
        print(path, json.dumps(out[path]), flush=True)
    with open(out_path, "w") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
