"""Pretrain MCR: `python -m mcr.train` trains the small preset on the embedded synthetic
corpus (2 CPU cores, under 10 minutes) and reports retrieval on 1,000 held-out pairs.

Every config field is a flag (mcr.config; --batch-size 64, --vit-depth 6 ...); --preset sets
the model shape and training recipe, --config FILE.yaml sets fields, flags override both.
Outputs under --out-dir: config.yaml, metrics.jsonl, tokenizer/, checkpoints/ (see
mcr.checkpoint), final.json. A folder that holds a run needs --resume (continue) or
--overwrite (start over).

Several processes: `torchrun --nproc_per_node=N -m mcr.train ...` (multi-node with torchrun's
rendezvous flags). DDP, gloo on CPU and NCCL on GPU; --batch-size is the global batch, split
evenly over the ranks; masks are drawn per global batch and the InfoNCE takes its negatives
from every rank, so N processes train the same model as one process would (up to float
summation order), and a run resumes on another world size. --fsdp shards parameters,
gradients and optimizer state over the ranks instead of replicating them (FSDP2).
"""
import os
import sys

from mcr import cli


def main(argv=None):
    """Console entry point (mcr-train): parse, check every input, train; final results."""
    cfg = cli.parse_train_args(argv, description=__doc__)
    # torch and the model after parsing: --help and bad flags answer at once
    from mcr import run
    from mcr.engine import Diverged
    from mcr.eval import pictures

    try:
        results = run.train(cfg, on_validate=pictures.log_to_tensorboard if cfg.tensorboard else None)
    except run.InputError as err:
        cli.fail("python -m mcr.train", err)
    except Diverged as err:  # not an input error: status 1, one line, the last good checkpoint kept
        sys.exit(f"python -m mcr.train: error: {err}")
    if cfg.pictures and int(os.environ.get("RANK", "0")) == 0:  # one process draws, after training
        pictures.after_training(cfg.out_dir)
    return results


if __name__ == "__main__":
    main()
