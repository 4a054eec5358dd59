"""The tenth round's step-cost measurement: one interleaved step_costs run (experiments/study.py) of the
ninth round's default, both dual-streams and the light-mask rows, every flag explicit (so it
does not depend on the preset of the day). Prints JSON with each row's ratio to the study's
dual-stream rows and to dual-stream reconstructing at every step.

    python experiments/study-2026-12-06-2000/costs_round10.py THREADS ROUNDS
"""
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # experiments/: the study runner
from study import step_costs, vocab_size  # noqa: E402

LIGHT = ["--text-mask-ratio", "0.15", "--image-mask-ratio", "0.15"]
ROWS = {
    "default(ninth)": ["--text-mask-ratio", "0.25", "--image-mask-ratio", "0.25", "--unmasked-every", "2"],
    "dual-stream": ["--variant", "dual-stream", "--text-mask-ratio", "0.25", "--image-mask-ratio", "0.25",
                    "--unmasked-every", "2"],  # the study's dual-stream rows: the preset's flags of rounds 2-9
    "dual-stream-every-step": ["--variant", "dual-stream", "--unmasked-every", "0"] + LIGHT,
    "txt15-img15": LIGHT + ["--unmasked-every", "2"],
    "txt15-img15-u3": LIGHT + ["--unmasked-every", "3"],
    "txt15-img15-u4": LIGHT + ["--unmasked-every", "4"],
    "txt15-img15-masked-only": LIGHT + ["--unmasked-every", "0"],
    "abm-txt15-img15-u3": ["--variant", "abm"] + LIGHT + ["--unmasked-every", "3"],
}


def main(threads, rounds):
    torch.set_num_threads(threads)
    common = ["--eval-every", "0"]
    costs = step_costs(ROWS, common, vocab_size(common), 32, repeats=rounds)
    dual, every = costs["dual-stream"], costs["dual-stream-every-step"]
    out = {"measured": f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, torch {torch.__version__}, "
                       f"{threads} torch thread(s), batch 32, {rounds} interleaved rounds, training's fused AdamW"}
    for name, cost in costs.items():
        out[name] = dict(cost, step_vs_dual=cost["step_s"] / dual["step_s"],
                         activation_vs_dual=cost["activation_bytes_per_sample"] / dual["activation_bytes_per_sample"],
                         step_vs_dual_every_step=cost["step_s"] / every["step_s"],
                         activation_vs_dual_every_step=cost["activation_bytes_per_sample"]
                         / every["activation_bytes_per_sample"])
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]))
