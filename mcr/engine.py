"""The engine: optimizer and schedule, the training step and loop. Validation runs the one
evaluation path, mcr.eval.embedding.evaluate.

Reproducibility by construction: the data order of an epoch is a function of (seed, epoch)
and the masks of a step are drawn for the global batch from a generator seeded by (seed,
step), so N processes, a resumed run and one uninterrupted process train the same model.
"""
import json
import math
import os
import time

import torch
from tqdm import tqdm

from mcr import checkpoint, masking
from mcr.config import config_to_dict, is_unmasked_step
from mcr.distributed import (
    full_value,
    mean_over_ranks,
    rank0_decides,
)
from mcr.eval.embedding import evaluate, flatten_results, format_results


def autocast_dtype(precision, device):
    """The autocast dtype of --precision on `device` (None: float32, no autocast)."""
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


def compile_blocks(model, backend="inductor"):
    """torch.compile every transformer block (fullgraph: no graph break on the hot path)."""
    for block in model.transformer_blocks():
        block.compile(fullgraph=True, backend=backend)


def build_optimizer(model, cfg):
    """AdamW over the trained parameters; no weight decay on biases, norms, embeddings, tokens
    and the temperature. torch's fused kernel where it applies (plain CPU or CUDA parameters;
    FSDP's DTensors take the default): on a CPU the default is a per-parameter loop, 0.5 s
    slower per paper-preset step at batch 4 (benchmarks/bench_train_step.py --adamw)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:  # fixed sin-cos position embeddings
            continue
        (no_decay if p.ndim < 2 or "embed" in name or "token" in name else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    fused = all(type(p) is torch.nn.Parameter and p.device.type in ("cpu", "cuda") for p in decay + no_decay)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95), fused=fused)


def lr_at(step, cfg, total_steps):
    """Linear warm-up, then cosine decay to 0."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps)
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def batches_for_epoch(num_samples, batch_size, seed, epoch):
    """The shuffled index batches of one epoch, a pure function of (seed, epoch)."""
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    order = torch.randperm(num_samples, generator=g).tolist()
    return [order[i:i + batch_size] for i in range(0, num_samples - batch_size + 1, batch_size)]


def step_generator(seed, step, device):
    """The generator of one step's masks: a function of (seed, step) alone, so that ranks,
    world sizes and resumed runs all draw the same masks."""
    return torch.Generator(device=device).manual_seed(seed * 1_000_003 + step)


# --- training --------------------------------------------------------------------------

class MetricsLog:
    """Appends one JSON object per line to metrics.jsonl (and TensorBoard if asked)."""

    def __init__(self, out_dir, tensorboard=False):
        self.path = os.path.join(out_dir, "metrics.jsonl")
        self.writer = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(os.path.join(out_dir, "tensorboard"))

    def write(self, step, kind, values):
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, "kind": kind, "time": time.time(), **values}) + "\n")
        if self.writer is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)):
                    self.writer.add_scalar(f"{kind}/{key}", value, step)


def train_step(runner, model, optimizer, batch, cfg, step, total_steps, ctx):
    """One optimizer step on this rank's rows of the global batch; returns (losses, total,
    grad_norm). runner: the model, or its DDP wrapper. Unmasked steps: is_unmasked_step."""
    per_rank = cfg.batch_size // ctx.world
    rows = slice(ctx.rank * per_rank, (ctx.rank + 1) * per_rank)
    masks = masking.draw(cfg.model, cfg.batch_size, device=ctx.device,
                         generator=step_generator(cfg.seed, step, ctx.device)).rows(rows)
    amp_dtype = autocast_dtype(cfg.precision, ctx.device)
    with torch.autocast(ctx.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        losses = runner(batch, masks=masks, unmasked=is_unmasked_step(cfg, step, total_steps))
    weights = {"contrastive": cfg.loss_contrastive, "mim": cfg.loss_mim, "mrm": cfg.loss_mrm,
               "local": cfg.loss_local}
    total = sum(weights[k] * v for k, v in losses.items())
    optimizer.zero_grad(set_to_none=True)
    total.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    optimizer.step()
    return losses, total, grad_norm


class LossWindow:
    """Means of the losses over the steps since the last log line: the contrastive loss and
    the total over every step, the reconstruction losses over the masked steps only (an
    unmasked step computes none; a window without masked steps logs none)."""

    RECONSTRUCTION = ("mim", "mrm")

    def __init__(self):
        self.sums, self.counts = {}, {}

    def add(self, losses, total, unmasked):
        for name, value in [*losses.items(), ("loss", total)]:
            if unmasked and name in self.RECONSTRUCTION:
                continue
            self.sums[name] = self.sums.get(name, 0.0) + value.detach().float()
            self.counts[name] = self.counts.get(name, 0) + 1

    def means(self):
        """(names, float32 tensor of their means), then starts a new window."""
        names = list(self.sums)
        means = torch.stack([self.sums[n] / self.counts[n] for n in names])
        self.sums, self.counts = {}, {}
        return names, means


class Diverged(RuntimeError):
    """Training met a non-finite loss or weights; raised on every rank before anything of the
    diverged model is logged, validated or saved."""


def fit(cfg, model, runner, optimizer, train_set, val_set, collate, ctx, start_step=0, on_validate=None):
    """The training loop from `start_step` to the end of the schedule (or the time limit):
    logs, validates, checkpoints, and returns the final validation results (every rank).
    on_validate(writer, model, val_set, collate, device, step, amp_dtype, num_workers): called
    on every rank after each validation, with the TensorBoard writer on rank 0 and None
    elsewhere (mcr.eval.pictures.log_to_tensorboard). Raises Diverged at the first log,
    validation or save after a non-finite loss, and instead of saving non-finite weights."""
    steps_per_epoch = len(train_set) // cfg.batch_size
    total_steps = math.ceil(cfg.epochs * steps_per_epoch) if cfg.epochs > 0 else cfg.max_steps
    amp_dtype = autocast_dtype(cfg.precision, ctx.device)
    log = MetricsLog(cfg.out_dir, cfg.tensorboard) if ctx.is_main else None
    per_rank = cfg.batch_size // ctx.world
    if ctx.is_main:
        print(f"MCR variant={cfg.model.variant} preset={cfg.preset} device={ctx.device} processes={ctx.world} "
              f"{'FSDP ' if ctx.sharded else ''}"
              f"params={sum(p.numel() for p in model.parameters()) / 1e6:.1f}M steps={total_steps} "
              f"batch={cfg.batch_size} train={len(train_set)} val={len(val_set)}")

    nonfinite_steps = torch.zeros((), device=ctx.device)  # counted on the device: no sync per step

    def stop_if_diverged(step, weights_finite=True):
        """Raise Diverged on every rank (a collective) when a loss so far, or the weights
        (weights_finite, rank 0's verdict), were not finite."""
        diverged = mean_over_ranks(nonfinite_steps.reshape(1).clone()).item() > 0 or not weights_finite
        if diverged:
            last = checkpoint.latest_checkpoint(cfg.out_dir)
            raise Diverged(f"training diverged by step {step}: the loss or the weights are NaN or infinite "
                           f"(--lr {cfg.lr:g}); nothing of it was saved, "
                           + (f"the last good checkpoint is {last}" if last else "no checkpoint was written"))

    def validate(step):
        stop_if_diverged(step)
        if ctx.sharded:
            model.unshard()  # the root unit's weights; the blocks gather their own
        results = evaluate(model, val_set, collate, ctx.device, amp_dtype, num_workers=cfg.num_workers)
        if on_validate is not None:  # every rank: its embedding (and forward under FSDP) are collectives
            on_validate(log.writer if ctx.is_main else None, model, val_set, collate, ctx.device, step, amp_dtype,
                        cfg.num_workers)
        if ctx.sharded:
            model.reshard()
        if ctx.is_main:
            log.write(step, "val", flatten_results(results))
        return results

    def save(step):
        """Full tensors gathered from every rank; rank 0 writes, only finite weights."""
        model_state, optimizer_state = checkpoint.full_state_dicts(model, optimizer)
        finite = not ctx.is_main or all(t.isfinite().all() for t in model_state.values() if t.is_floating_point())
        stop_if_diverged(step, rank0_decides(finite, ctx))
        if ctx.is_main:
            state = {"config": config_to_dict(cfg), "variant": cfg.model.variant, "world_size": ctx.world,
                     "fsdp": ctx.sharded}
            checkpoint.save_checkpoint(cfg.out_dir, step, model, model_state, optimizer_state, state,
                                       keep=cfg.keep_checkpoints)

    model.train()
    step, started = start_step, time.time()
    bar = tqdm(total=total_steps, initial=start_step, desc="train", dynamic_ncols=True, mininterval=2,
               disable=not ctx.is_main)
    window_time, window_samples = time.time(), 0
    window = LossWindow()
    while step < total_steps:
        epoch, offset = divmod(step, steps_per_epoch)
        batches = batches_for_epoch(len(train_set), cfg.batch_size, cfg.seed, epoch)[offset:]
        loader = torch.utils.data.DataLoader(
            train_set, batch_sampler=[b[ctx.rank * per_rank:(ctx.rank + 1) * per_rank] for b in batches],
            collate_fn=collate, num_workers=cfg.num_workers,
            generator=torch.Generator().manual_seed(cfg.seed + epoch))  # leaves the global RNG alone
        for batch in loader:
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, cfg, total_steps)
            batch = {k: v.to(ctx.device, non_blocking=True) for k, v in batch.items()}
            losses, total, grad_norm = train_step(runner, model, optimizer, batch, cfg, step, total_steps, ctx)
            window.add(losses, total, unmasked=is_unmasked_step(cfg, step, total_steps))
            nonfinite_steps += ~torch.isfinite(total.detach())
            step += 1
            window_samples += cfg.batch_size
            bar.update(1)
            if step % cfg.log_every == 0 or step == total_steps:  # collectives: every rank takes part
                stop_if_diverged(step)
                grad_norm, logit_scale = full_value(grad_norm), full_value(model.logit_scale.detach())
                names, means = window.means()
                logged = mean_over_ranks(means)
                if ctx.is_main:
                    rate = window_samples / (time.time() - window_time)
                    values = dict(zip(names, logged.tolist()))
                    values.update(lr=optimizer.param_groups[0]["lr"], grad_norm=grad_norm.item(),
                                  temperature=(-logit_scale).exp().item(), samples_per_s=rate)
                    log.write(step, "train", values)
                    bar.set_postfix(loss=f"{values['loss']:.3f}", con=f"{values['contrastive']:.2f}",
                                    mim=f"{values.get('mim', float('nan')):.3f}",
                                    mrm=f"{values.get('mrm', float('nan')):.2f}", sps=f"{rate:.0f}")
                    window_time, window_samples = time.time(), 0
            out_of_time = cfg.max_minutes > 0 and rank0_decides(time.time() - started > 60 * cfg.max_minutes, ctx)
            if step < total_steps and not out_of_time:
                if cfg.eval_every and step % cfg.eval_every == 0:
                    r = validate(step)["i2t"]
                    if ctx.is_main:
                        tqdm.write(f"step {step}: val i2t R@1 {r['R@1']:.2f}% R@5 {r['R@5']:.2f}% "
                                   f"P@5 {r['P@5']:.2f}%")
                if cfg.save_every and step % cfg.save_every == 0:
                    save(step)
            if step >= total_steps or out_of_time:
                total_steps = step
                break
    bar.close()
    if step > start_step:  # a finished run resumed has its last checkpoint already
        save(step)
    results = validate(step)
    if ctx.is_main:
        minutes = (time.time() - started) / 60
        print(f"final validation after {step} steps ({minutes:.1f} min), {len(val_set)} pairs:")
        print(format_results(results))
        with open(os.path.join(cfg.out_dir, "final.json"), "w") as f:
            json.dump({"step": step, "minutes": minutes, **results}, f, indent=1)
    return results
