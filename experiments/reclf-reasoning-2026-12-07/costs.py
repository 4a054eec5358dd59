"""Step time and activation bytes of reclf reasoning over the matchings, beside reclf over the
words, MCR and dual-stream: one interleaved experiments/study.py step_costs run (batch 32, the
small preset's recipe, training's fused AdamW). A row trained on unmasked steps only also gets
the activation bytes of its unmasked forward. Prints JSON with each row's ratio to dual-stream.

    python experiments/reclf-reasoning-2026-12-07/costs.py THREADS ROUNDS > costs-THREADSthread.json
"""
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # experiments/: the study runner
from study import row_model, step_costs, train_config, vocab_size  # noqa: E402

from mcr.config import unmasked_share  # noqa: E402
from mcr.profiling import random_batch, saved_activation_bytes  # noqa: E402

ROWS = {
    "dual-stream": ["--variant", "dual-stream"],
    "default": [],
    "reclf": ["--variant", "reclf"],
    "reclf-matchings": ["--variant", "reclf", "--reasoning-over", "matchings"],
    "reclf-matchings-unmasked": ["--variant", "reclf", "--reasoning-over", "matchings", "--unmasked-tuning", "1"],
}


def main(threads, rounds):
    torch.set_num_threads(threads)
    common = ["--eval-every", "0"]
    vocab = vocab_size(common)
    costs = step_costs(ROWS, common, vocab, 32, repeats=rounds)
    dual = costs["dual-stream"]
    out = {"measured": f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, torch {torch.__version__}, "
                       f"{threads} torch thread(s), batch 32, {rounds} interleaved rounds, training's fused AdamW"}
    for name, cost in costs.items():
        row = dict(cost, step_vs_dual=cost["step_s"] / dual["step_s"],
                   activation_vs_dual=cost["activation_bytes_per_sample"] / dual["activation_bytes_per_sample"])
        cfg = train_config(common + ROWS[name])
        if unmasked_share(cfg) >= 1:
            model = row_model(cfg, vocab)
            unmasked = saved_activation_bytes(model, random_batch(cfg.model, 32), unmasked=True) / 32
            row.update(unmasked_activation_bytes_per_sample=unmasked,
                       unmasked_activation_vs_dual=unmasked / dual["activation_bytes_per_sample"])
        out[name] = row
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]))
