"""Step time and activation bytes of mpma and reclf beside MCR and dual-stream, with the local
loss's group size varied: one interleaved experiments/study.py step_costs run (batch 32, the
small preset's recipe, training's fused AdamW). Prints JSON with each row's ratio to
dual-stream.

    python experiments/variants-2026-12-07/costs.py THREADS ROUNDS > costs-THREADSthread.json
"""
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # experiments/: the study runner
from study import step_costs, vocab_size  # noqa: E402

ROWS = {
    "dual-stream": ["--variant", "dual-stream"],
    "default": [],
    "mpma": ["--variant", "mpma"],
    "reclf": ["--variant", "reclf"],
    "mpma-every-pair": ["--variant", "mpma", "--local-group-size", "0"],
    "reclf-every-pair": ["--variant", "reclf", "--local-group-size", "0"],
    "mpma-groups-of-8": ["--variant", "mpma", "--local-group-size", "8"],
    "reclf-groups-of-8": ["--variant", "reclf", "--local-group-size", "8"],
}


def main(threads, rounds):
    torch.set_num_threads(threads)
    common = ["--eval-every", "0"]
    costs = step_costs(ROWS, common, vocab_size(common), 32, repeats=rounds)
    dual = costs["dual-stream"]
    out = {"measured": f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, torch {torch.__version__}, "
                       f"{threads} torch thread(s), batch 32, {rounds} interleaved rounds, training's fused AdamW"}
    for name, cost in costs.items():
        out[name] = dict(cost, step_vs_dual=cost["step_s"] / dual["step_s"],
                         activation_vs_dual=cost["activation_bytes_per_sample"] / dual["activation_bytes_per_sample"])
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]))
