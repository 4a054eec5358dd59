"""Run assembly: the run folder, its data, tokenizer and model, `train(cfg)` and
`load_trained(path)`. The CLIs (mcr.train, mcr.evaluate) and the studies call these.

Run folder policy: a folder that holds a run (checkpoints, metrics.jsonl or final.json) is
never written over unless asked: `resume=True` continues from the newest intact checkpoint
(`latest`, or a scan of the step_* folders when it is missing or broken), `overwrite=True`
deletes the run's files (checkpoints/, metrics.jsonl, final.json, config.yaml, tokenizer/,
tensorboard/; nothing else) and starts over; neither is an InputError that spells out the
choice. Every input is checked before any work (paths, device, the run folder, the
pretrained weights against the model config and tokenizer, the checkpoint's model config):
`check_inputs` raises InputError, the CLIs exit with status 2; the training split is opened
(`open_training_split`) before the run folder is touched.

One writer per run folder: the training process (rank 0 under torchrun) holds an exclusive
flock on out_dir/run.lock while it trains; a second one is an InputError naming the holder.
A resumed run first cuts metrics.jsonl back to the rows its checkpoint had seen, so that
the steps it trains again are not logged twice.
"""
import dataclasses
import fcntl
import json
import os
import shutil
import socket
import sys
import time

import torch
import yaml
from torch.nn.parallel import DistributedDataParallel

from mcr import checkpoint, distributed, engine
from mcr.config import config_from_dict, config_to_dict, flag, resolve_config
from mcr.data.batching import Collate
from mcr.data.registry import open_dataset
from mcr.data.tokenizer import load_tokenizer, shipped_tokenizer, train_wordpiece
from mcr.models import build_model as build_variant
from mcr.models.weights import image_shape, load_pretrained, text_shape

RUN_FILES = ("checkpoints", "metrics.jsonl", "final.json", "config.yaml", "tokenizer", "tensorboard")
LOCK_FILE = "run.lock"


class InputError(ValueError):
    """A value given to train or evaluate is unusable; raised before any work."""


# --- checks before any work ---------------------------------------------------------------

def check_out_dir(out_dir):
    """InputError unless `out_dir` is (or can be made) a writable folder."""
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise InputError(f"--out-dir {out_dir!r} is a file, not a folder")
    existing = out_dir
    while not os.path.exists(existing):
        existing = os.path.dirname(os.path.abspath(existing))
    if not os.path.isdir(existing) or not os.access(existing, os.W_OK | os.X_OK):
        raise InputError(f"--out-dir {out_dir!r}: {existing!r} is not a writable folder")


def holds_run(out_dir):
    """Whether `out_dir` holds a run's files (a checkpoint, metrics.jsonl or final.json)."""
    root = os.path.join(out_dir, "checkpoints")
    has_checkpoints = os.path.isdir(root) and any(n.startswith("step_") or n == "latest" for n in os.listdir(root))
    return has_checkpoints or any(os.path.exists(os.path.join(out_dir, n)) for n in ("metrics.jsonl", "final.json"))


def check_inputs(cfg):
    """Every check that needs no data: the config's values, files it names exist, the
    device is there, the run folder may be used as asked. Returns the checkpoint to resume
    (or None); InputError naming the flag otherwise."""
    try:
        return _check_inputs(cfg)
    except (ValueError, FileNotFoundError) as err:
        raise InputError(str(err)) from None


def _check_inputs(cfg):
    resolve_config(cfg)
    for name, path, want_dir in (("--image-weights", cfg.image_weights, False),
                                 ("--text-weights", cfg.text_weights, True),
                                 ("--data-root", cfg.data_root, True)):
        if path and not (os.path.isdir(path) if want_dir else os.path.isfile(path)):
            raise FileNotFoundError(f"{name} {path!r} does not exist"
                                    + (" (or is not a folder)" if want_dir else " (or is not a file)"))
    if cfg.tokenizer not in ("auto", "train") and not os.path.isdir(cfg.tokenizer):
        raise FileNotFoundError(f"--tokenizer {cfg.tokenizer!r} is not a folder (nor auto or train)")
    distributed.pick_device(cfg.device)
    check_out_dir(cfg.out_dir)
    resuming = holds_run(cfg.out_dir) and cfg.resume
    check_pretrained(cfg, os.path.join(cfg.out_dir, "tokenizer") if resuming else cfg.tokenizer)
    if not holds_run(cfg.out_dir):
        return None
    if not (cfg.resume or cfg.overwrite):
        newest = checkpoint.newest_intact(cfg.out_dir, quiet=True)
        what = f"checkpoints up to {os.path.basename(newest)}" if newest else "a run (metrics.jsonl)"
        raise InputError(f"--out-dir {cfg.out_dir!r} holds {what}: pass --resume to continue it, or "
                             f"--overwrite to delete it and start over (or choose another --out-dir)")
    if cfg.overwrite:
        return None
    path = checkpoint.newest_intact(cfg.out_dir, quiet=int(os.environ.get("RANK", "0")) > 0)
    if path is None and checkpoint.step_folders(cfg.out_dir):
        raise InputError(f"--resume: no intact checkpoint under {cfg.out_dir!r} (see above); pass --overwrite "
                         f"to start over")
    if path is not None:
        saved = checkpoint.read_state(path)["config"]
        saved_model = config_from_dict(saved).model
        try:
            checkpoint.check_same_config(  # the vocabulary size comes from the run's own tokenizer
                {**dataclasses.asdict(saved_model), "vocab_size": None},
                {**dataclasses.asdict(cfg.model), "vocab_size": None})
        except ValueError as err:
            raise InputError(f"{err}; --config {os.path.join(cfg.out_dir, 'config.yaml')} --resume continues "
                             f"with the run's own config") from None
    return path


def check_pretrained(cfg, tokenizer):
    """InputError unless --text-weights / --image-weights are readable and fit cfg.model (the
    CLI takes their shape when no flag sets it; mcr.cli.pretrained_shape) and the text
    weights come with a tokenizer folder of their vocabulary size (`tokenizer`: the one the
    run will use). Reads the files; builds nothing."""
    if cfg.text_weights:
        path = cfg.text_weights
        shape = text_shape(path)
        max_positions, vocab_size = shape.pop("max_positions"), shape.pop("vocab_size")
        check_weights_agree(cfg.model, shape, f"--text-weights {path} (config.json)")
        if cfg.model.max_text_len > max_positions:
            raise InputError(f"--max-text-len {cfg.model.max_text_len} exceeds the {max_positions} positions of "
                             f"--text-weights {path}")
        if tokenizer in ("auto", "train"):
            raise InputError(f"--text-weights {path} needs the tokenizer it was trained with: pass --tokenizer "
                             f"{path} (or that tokenizer's folder)")
        if not os.path.isdir(tokenizer):
            raise InputError(f"--tokenizer {tokenizer!r} is not a folder")
        size = len(load_tokenizer(tokenizer))
        if size != vocab_size:
            raise InputError(f"--tokenizer {tokenizer} has {size} tokens, the vocabulary of --text-weights {path} "
                             f"{vocab_size}: pass the tokenizer the weights were trained with")
    if cfg.image_weights:
        shape = image_shape(cfg.image_weights)
        shape.pop("patch_size")  # another patch size is resampled (mcr.models.weights.adapt_patch_embed)
        check_weights_agree(cfg.model, shape, f"--image-weights {cfg.image_weights}")


def check_weights_agree(model_cfg, shape, source):
    """InputError naming every field of `shape` ({field: value of the weights}) that model_cfg sets otherwise."""
    differs = [f"{flag(name)} {getattr(model_cfg, name)} (the weights: {value})"
               for name, value in shape.items() if getattr(model_cfg, name) != value]
    if differs:
        raise InputError(f"{source} has another shape than {', '.join(differs)}; leave those flags out to take "
                         f"the shape from the weights")


def claim_run_folder(cfg, ctx):
    """Rank 0 makes the folder, deletes the old run with --overwrite and the temporary
    folders of killed saves; every rank waits for it."""
    if ctx.is_main:
        if cfg.overwrite:
            for name in RUN_FILES:
                path = os.path.join(cfg.out_dir, name)
                shutil.rmtree(path) if os.path.isdir(path) else os.path.exists(path) and os.remove(path)
        os.makedirs(cfg.out_dir, exist_ok=True)
        for removed in checkpoint.remove_stale_temporaries(cfg.out_dir):
            print(f"removed {removed} (a checkpoint save that was killed)", file=sys.stderr)
    distributed.barrier()


def lock_run_folder(out_dir):
    """Hold out_dir/LOCK_FILE (an exclusive fcntl.flock) for as long as the returned file stays
    open; release_run_folder lets go. The kernel drops the flock when its process dies, kill -9
    included: a lock file left by a dead process is taken over, said in one line on stderr.
    InputError naming the holder (pid, host, start time) while a live process holds it."""
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, LOCK_FILE)
    while True:
        lock = open(path, "a+")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            holder = lock.read().strip() or "another process"
            lock.close()
            raise InputError(f"--out-dir {out_dir!r} is in use: {holder} trains in it ({path}); wait for it to "
                             f"end or stop it, or choose another --out-dir") from None
        try:  # a holder that released the lock removed the file we opened: lock the new one
            if os.stat(path).st_ino == os.fstat(lock.fileno()).st_ino:
                break
        except FileNotFoundError:
            pass
        lock.close()
    lock.seek(0)
    previous = lock.read().strip()
    if previous:
        print(f"{path}: taking over the lock of {previous}, a process that ended without releasing it",
              file=sys.stderr)
    lock.seek(0)
    lock.truncate()
    lock.write(f"pid {os.getpid()} on {socket.gethostname()} since "
               f"{time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}\n")
    lock.flush()
    return lock


def release_run_folder(lock):
    """Remove the lock file lock_run_folder returned, then let go of its flock."""
    os.remove(lock.name)
    lock.close()


def truncate_log(out_dir, state):
    """Cut out_dir/metrics.jsonl back to what it held when the checkpoint with JSON state
    `state` was saved (its `log_rows`; for a checkpoint that does not record them, the rows
    up to its step), or to nothing when `state` is None (a fresh start): the rows a resumed
    run logs again are never doubled. A torn last row (a kill while writing) is dropped too.
    Atomic (written aside, then renamed). Returns how many rows were dropped."""
    path = os.path.join(out_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        return 0
    with open(path, encoding="utf-8", errors="replace") as f:
        lines = f.read().splitlines(keepends=True)
    keep = []
    if state is not None:
        for line in lines[:state.get("log_rows", len(lines))]:
            try:
                row = json.loads(line)
            except ValueError:
                break
            if not line.endswith("\n") or not isinstance(row, dict) or row.get("step", 0) > state["step"]:
                break
            keep.append(line)
    if len(keep) == len(lines):
        return 0
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(keep)
    os.replace(tmp, path)
    return len(lines) - len(keep)


def write_config(cfg):
    """out_dir/config.yaml: the resolved config (`--config` reads it back)."""
    with open(os.path.join(cfg.out_dir, "config.yaml"), "w") as f:
        yaml.safe_dump(config_to_dict(cfg), f, sort_keys=False)


# --- data, tokenizer, model -------------------------------------------------------------

def build_dataset(cfg, split, size=None):
    """The records of one split for cfg.data (size: synthetic only; see mcr.data.registry)."""
    size = size or (cfg.train_size if split == "train" else cfg.val_size)
    return open_dataset(cfg.data, cfg.data_root, split, cfg.model.image_size, cfg.data_options, size, cfg.seed)


def open_training_split(cfg):
    """The training split, opened before the run folder is touched: a source that cannot be
    read (a missing file or CSV column) or is smaller than one batch is an InputError."""
    try:
        train_set = build_dataset(cfg, "train")
    except (ValueError, FileNotFoundError) as err:
        raise InputError(f"--data {cfg.data} --data-root {cfg.data_root}: {err}") from None
    if len(train_set) < cfg.batch_size:
        raise InputError(f"the training split has {len(train_set)} pairs, fewer than one batch of {cfg.batch_size}")
    return train_set


def configured_tokenizer(cfg):
    """The tokenizer cfg names without training one: --tokenizer DIR, or the shipped vocabulary
    of the embedded corpus (auto); None when one must be trained on the reports."""
    if cfg.tokenizer not in ("auto", "train"):
        return load_tokenizer(cfg.tokenizer)
    if cfg.tokenizer == "auto" and cfg.data == "synthetic" and cfg.model.vocab_size >= len(shipped_tokenizer()):
        return shipped_tokenizer()
    return None


def build_tokenizer(cfg, train_set, ctx, resuming=False):
    """The run's tokenizer, saved under out_dir/tokenizer (rank 0 builds, the others load):
    the run's own when resuming; --tokenizer DIR; the shipped vocabulary of the embedded
    corpus (--data synthetic, --vocab-size at least its size: the corpus's whole WordPiece
    vocabulary); else WordPiece trained on the training reports."""
    saved = os.path.join(cfg.out_dir, "tokenizer")
    if ctx.rank > 0:
        distributed.barrier()
        return load_tokenizer(saved)
    if resuming and os.path.isdir(saved):
        tok = load_tokenizer(saved)
    else:
        tok = configured_tokenizer(cfg)
    if tok is None:
        texts = getattr(train_set, "reports", None) or (train_set[i].report for i in range(min(len(train_set), 4000)))
        tok = train_wordpiece(texts, cfg.model.vocab_size)
    if not (resuming and os.path.isdir(saved)):
        tok.save_pretrained(saved)
    distributed.barrier()
    return tok


def build_model(model_cfg, tokenizer):
    """The model of model_cfg.variant (mcr.models.build_model) with the tokenizer's special ids."""
    return build_variant(model_cfg, pad_token_id=tokenizer.pad_token_id, mask_token_id=tokenizer.mask_token_id)


def collate_for(cfg, tokenizer):
    return Collate(tokenizer, cfg.model.max_text_len, cfg.model.in_chans)


# --- training -------------------------------------------------------------------------

def train(cfg, on_validate=None):
    """Train with `cfg` (one process, or one rank under torchrun); returns the final
    validation results {"i2t": {...}, "t2i": {...}} (on every rank). on_validate: see
    engine.fit (mcr.train passes mcr.eval.pictures.log_to_tensorboard). Rank 0 holds the run
    folder's lock (lock_run_folder) from after the checks and the opening of the training
    split until it returns or raises."""
    resume_path = check_inputs(cfg)
    train_set = open_training_split(cfg)
    lock = lock_run_folder(cfg.out_dir) if int(os.environ.get("RANK", "0")) == 0 else None
    try:
        return _train(cfg, resume_path, train_set, on_validate)
    finally:
        if lock is not None:
            release_run_folder(lock)


def _train(cfg, resume_path, train_set, on_validate):
    """train's work once the inputs are checked, the training split is open and the run
    folder is locked."""
    ctx = distributed.init_distributed(cfg.device)
    if cfg.batch_size % ctx.world:
        raise InputError(f"--batch-size {cfg.batch_size} (the global batch) must be divisible by the "
                         f"number of processes, {ctx.world}")
    ctx.sharded = cfg.fsdp and ctx.world > 1
    if cfg.fsdp and ctx.world == 1:
        print("--fsdp: one process, nothing to shard; training unsharded", file=sys.stderr)
    claim_run_folder(cfg, ctx)
    if cfg.resume and resume_path is None and ctx.is_main:
        print(f"--resume: no checkpoint under {cfg.out_dir}, starting fresh", file=sys.stderr)
    if cfg.resume and ctx.is_main:
        dropped = truncate_log(cfg.out_dir, checkpoint.read_state(resume_path) if resume_path else None)
        if dropped:
            print(f"--resume: removed {dropped} metrics.jsonl rows logged after "
                  f"{os.path.basename(resume_path) if resume_path else 'the start'} (they are logged again)",
                  file=sys.stderr)
    torch.manual_seed(cfg.seed)

    tokenizer = build_tokenizer(cfg, train_set, ctx, resuming=resume_path is not None)
    cfg.model = dataclasses.replace(cfg.model, vocab_size=len(tokenizer))
    if ctx.is_main:
        write_config(cfg)
    val_set = build_dataset(cfg, "val")

    model = build_model(cfg.model, tokenizer)
    load_pretrained(model, cfg.image_weights, cfg.text_weights)
    model = model.to(ctx.device)
    if cfg.compile:
        engine.compile_blocks(model, cfg.compile_backend)
    if ctx.sharded:
        distributed.shard_model(model, ctx.device)
    optimizer = engine.build_optimizer(model, cfg)
    start_step = 0
    if resume_path:
        saved = checkpoint.load_checkpoint(resume_path, model, optimizer, restore_rng=True)
        start_step = saved["step"]
        saved_world = saved.get("world_size", 1)
        if ctx.is_main:
            print(f"resumed from {resume_path} at step {start_step}"
                  + (f" (saved with {saved_world} processes, now {ctx.world}: same global batch and "
                     f"masks, so training continues the same run)" if saved_world != ctx.world else ""))
    runner = model
    if ctx.world > 1 and not ctx.sharded:
        # unmasked tuning steps leave the reconstruction heads without gradients
        runner = DistributedDataParallel(model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None,
                                         find_unused_parameters=cfg.unmasked_tuning > 0 or cfg.unmasked_every > 0)
    results = engine.fit(cfg, model, runner, optimizer, train_set, val_set, collate_for(cfg, tokenizer), ctx,
                         start_step, on_validate=on_validate)
    distributed.finish(ctx)
    return results


# --- a trained run ----------------------------------------------------------------------

def load_trained(path, device=None):
    """(model, TrainConfig, tokenizer, device, checkpoint path) from a checkpoint folder or a
    run folder (its newest intact checkpoint), on `device` (default: auto). The tokenizer is
    the run folder's own: the one two levels above the checkpoint. ValueError when a weight
    is not finite (a diverged run must not be evaluated)."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint {path!r} does not exist")
    if not os.path.isfile(os.path.join(path, "state.json")):
        found = checkpoint.newest_intact(path)
        if found is None:
            raise FileNotFoundError(f"{path!r} holds no intact checkpoint (checkpoints/step_*)")
        path = found
    checkpoint.check_intact(path)
    cfg = config_from_dict(checkpoint.read_state(path)["config"])
    tokenizer = load_tokenizer(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(path))), "tokenizer"))
    device = distributed.pick_device(device or "auto")
    model = build_model(cfg.model, tokenizer).to(device)
    checkpoint.load_checkpoint(path, model)
    nonfinite = [name for name, t in model.state_dict().items() if t.is_floating_point() and not t.isfinite().all()]
    if nonfinite:
        raise ValueError(f"checkpoint {path!r} holds non-finite weights (NaN or inf) in {len(nonfinite)} tensors, "
                         f"e.g. {nonfinite[0]}: a diverged run, nothing to evaluate")
    return model, cfg, tokenizer, device, path
