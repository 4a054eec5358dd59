"""Pretrain MCR.  `python -m mcr.train` trains the small preset on the embedded synthetic
corpus (2 CPU cores, a few minutes) and reports retrieval on 1,000 held-out pairs.

Every TrainConfig field is a flag (--batch-size 64); ModelConfig fields too (--image-size,
--vit-depth ...), overriding the preset. Outputs under --out-dir: metrics.jsonl,
tokenizer/, checkpoints/ (see mcr.checkpoint), final.json.

Several processes: `torchrun --nproc_per_node=N -m mcr.train ...` (multi-node with torchrun's
rendezvous flags). DDP, gloo on CPU and NCCL on GPU; --batch-size is the global batch, split
evenly over the ranks; masks are drawn per global batch and the InfoNCE takes its negatives
from every rank, so N processes train the same model as one process would (up to float
summation order), and a run resumes on another world size. Each rank evaluates its slice of
the validation split; rank 0 alone logs and writes checkpoints. --fsdp shards parameters, gradients and optimizer state over the
ranks instead of replicating them (FSDP2, one unit per transformer block), for the paper
preset and larger; its checkpoints hold full tensors, so either mode resumes the other.
"""
import argparse
import dataclasses
import json
import math
import os
import sys
import time

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from mcr import checkpoint, plot
from mcr.config import TRAINING_PRESETS, VARIANTS, ModelConfig, TrainConfig, is_unmasked_step, preset
from mcr.data.batching import Collate
from mcr.data.registry import open_dataset
from mcr.evaluate import evaluate_retrieval, format_table, rank_slice
from mcr.models.mcr import MCR
from mcr.models.weights import load_pretrained


# --- configuration --------------------------------------------------------------------

def _flag(name):
    return "--" + name.replace("_", "-")


def _add_fields(parser, cls, group_defaults_none=False, skip=("model",)):
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        default = None if group_defaults_none else f.default
        if f.type in (bool, "bool"):
            parser.add_argument(_flag(f.name), type=lambda s: s.lower() in ("1", "true", "yes", "on"),
                                nargs="?", const=True, default=default, metavar="BOOL")
        else:
            kind = {"int": int, "float": float, "str": str}.get(f.type if isinstance(f.type, str) else f.type.__name__, str)
            parser.add_argument(_flag(f.name), type=kind, default=default)


def parse_args(argv=None):
    """argv -> TrainConfig (model fields start from the preset, flags override)."""
    parser = argparse.ArgumentParser(prog="python -m mcr.train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_fields(parser, TrainConfig, group_defaults_none=True)
    model_flags = parser.add_argument_group("model (override the preset)")
    _add_fields(model_flags, ModelConfig, group_defaults_none=True, skip=("variant",))
    args = vars(parser.parse_args(argv))
    model_names = {f.name for f in dataclasses.fields(ModelConfig)} - {"variant"}
    overrides = {k: v for k, v in args.items() if k in model_names and v is not None}
    preset_name = args["preset"] or TrainConfig.preset
    if preset_name not in TRAINING_PRESETS:
        parser.error(f"unknown --preset {preset_name!r}; presets are {', '.join(sorted(TRAINING_PRESETS))}")
    given = {k: v for k, v in args.items() if k not in model_names and v is not None}
    cfg = TrainConfig(**{**TRAINING_PRESETS[preset_name], **given})
    if cfg.variant not in VARIANTS:
        parser.error(f"unknown --variant {cfg.variant!r}; variants are {', '.join(VARIANTS)}")
    try:
        cfg.model = preset(cfg.preset, **overrides, variant=cfg.variant)
    except ValueError as err:
        parser.error(str(err))
    return cfg


# --- data -----------------------------------------------------------------------------

def build_dataset(cfg, split, size):
    """The records of one split for cfg.data (size: synthetic only; see mcr.data.registry)."""
    return open_dataset(cfg.data, cfg.data_root, split, cfg.model.image_size, cfg.data_options, size, cfg.seed)


def build_tokenizer(cfg, train_set, rank=0):
    """The run's tokenizer, saved under out_dir/tokenizer (rank 0 builds, the others load)."""
    from mcr.data.tokenizer import load_tokenizer, train_wordpiece

    saved = os.path.join(cfg.out_dir, "tokenizer")
    if rank > 0:
        dist.barrier()
        return load_tokenizer(saved)
    if cfg.resume and os.path.isdir(saved):
        tok = load_tokenizer(saved)
        _release_waiting_ranks()
        return tok
    if cfg.tokenizer:
        tok = load_tokenizer(cfg.tokenizer)
    else:
        texts = getattr(train_set, "reports", None) or (train_set[i].report for i in range(min(len(train_set), 4000)))
        tok = train_wordpiece(texts, cfg.model.vocab_size)
    tok.save_pretrained(saved)
    _release_waiting_ranks()
    return tok


def _release_waiting_ranks():
    if dist.is_initialized():
        dist.barrier()


def batches_for_epoch(num_samples, batch_size, seed, epoch):
    """The shuffled index batches of one epoch, a pure function of (seed, epoch)."""
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    order = torch.randperm(num_samples, generator=g).tolist()
    return [order[i:i + batch_size] for i in range(0, num_samples - batch_size + 1, batch_size)]


def build_eval(cfg, tokenizer, split="val", size=None, rank=0, world=1):
    """(loader over this rank's slice, the whole split's report texts), in order."""
    dataset = build_dataset(cfg, split, size or cfg.val_size)
    reports = getattr(dataset, "reports", None) or [dataset[i].report for i in range(len(dataset))]
    if world > 1:
        dataset = torch.utils.data.Subset(dataset, rank_slice(len(dataset), rank, world))
    loader = torch.utils.data.DataLoader(dataset, batch_size=256, collate_fn=Collate(
        tokenizer, cfg.model.max_text_len, cfg.model.in_chans), num_workers=cfg.num_workers)
    return loader, reports


# --- model and optimisation ------------------------------------------------------------

def pick_device(name, local_rank=0):
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank)
    return device


def init_distributed(device_name):
    """(rank, world size, device): joins torchrun's process group when WORLD_SIZE > 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(device_name, local_rank)
    if world == 1:
        return 0, 1, device
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), world, device


def step_generator(cfg, step, device):
    """The generator of one step's masks: a function of (seed, step) alone, so that ranks,
    world sizes and resumed runs all draw the same masks."""
    return torch.Generator(device=device).manual_seed(cfg.seed * 1_000_003 + step)


def transformer_blocks(model):
    return [*model.vit.blocks, *model.decoder_blocks, *model.mrm_blocks, *model.bert.encoder.layer]


def compile_blocks(model, backend="inductor"):
    """torch.compile every transformer block (fullgraph: no graph break on the hot path)."""
    for block in transformer_blocks(model):
        block.compile(fullgraph=True, backend=backend)


def shard_model(model, device):
    """FSDP (fully_shard): each transformer block is a unit whose parameters, gradients and
    AdamW state are split over the ranks and gathered around its forward and backward; the
    root unit holds the rest (embeddings, heads, temperature)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    for block in transformer_blocks(model):
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)


def full_value(tensor):
    """A plain tensor from a (possibly FSDP-sharded) one; a collective under FSDP."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def autocast_dtype(cfg, device):
    if cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda"):
        return torch.bfloat16
    if cfg.precision not in ("auto", "fp32", "bf16"):
        raise ValueError(f"--precision must be auto, bf16 or fp32, got {cfg.precision!r}")
    return None


def build_optimizer(model, cfg):
    """AdamW; no weight decay on biases, norms, embeddings, tokens and the temperature."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim < 2 or "embed" in name or "token" in name else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95))


def lr_at(step, cfg, total_steps):
    """Linear warm-up, then cosine decay to 0."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps)
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def model_config_dict(cfg):
    return dataclasses.asdict(cfg.model)


def load_trained(path):
    """(model, TrainConfig, tokenizer, device, checkpoint path) from a checkpoint or run folder."""
    from mcr.data.tokenizer import load_tokenizer

    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint {path!r} does not exist")
    if not os.path.isfile(os.path.join(path, "state.json")):
        path = checkpoint.latest_checkpoint(path) or path
    state = checkpoint.read_state(path)
    train_fields = dict(state["config"])
    model_cfg = ModelConfig(**train_fields.pop("model"))
    cfg = TrainConfig(**train_fields, model=model_cfg)
    tokenizer = load_tokenizer(os.path.join(cfg.out_dir, "tokenizer")
                               if os.path.isdir(os.path.join(cfg.out_dir, "tokenizer"))
                               else os.path.join(os.path.dirname(os.path.dirname(path)), "tokenizer"))
    device = pick_device(cfg.device)
    model = MCR(model_cfg, pad_token_id=tokenizer.pad_token_id, mask_token_id=tokenizer.mask_token_id).to(device)
    checkpoint.load_checkpoint(path, model)
    return model, cfg, tokenizer, device, path


# --- the loop ----------------------------------------------------------------------------

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


def flatten_eval(results):
    return {f"{direction}_{k}": v for direction, row in results.items() for k, v in row.items()}


def train(cfg):
    """Train with `cfg` (one process, or one rank under torchrun); returns the final
    evaluation results (rank 0; None on the other ranks)."""
    rank, world, device = init_distributed(cfg.device)
    is_main = rank == 0
    if cfg.batch_size % world:
        raise ValueError(f"--batch-size {cfg.batch_size} (the global batch) must be divisible by the "
                         f"number of processes, {world}")
    torch.manual_seed(cfg.seed)
    amp_dtype = autocast_dtype(cfg, device)
    os.makedirs(cfg.out_dir, exist_ok=True)
    resume_path = checkpoint.latest_checkpoint(cfg.out_dir) if cfg.resume else None
    if cfg.resume and resume_path is None and is_main:
        print(f"--resume: no checkpoint under {cfg.out_dir}, starting fresh", file=sys.stderr)

    train_set = build_dataset(cfg, "train", cfg.train_size)
    tokenizer = build_tokenizer(cfg, train_set, rank)
    cfg.model = dataclasses.replace(cfg.model, vocab_size=len(tokenizer))
    collate = Collate(tokenizer, cfg.model.max_text_len, cfg.model.in_chans)
    sharded = cfg.fsdp and world > 1
    if cfg.fsdp and world == 1 and is_main:
        print("--fsdp: one process, nothing to shard; training unsharded", file=sys.stderr)
    val_loader, val_reports = build_eval(cfg, tokenizer, rank=rank, world=world)

    model = MCR(cfg.model, pad_token_id=tokenizer.pad_token_id, mask_token_id=tokenizer.mask_token_id)
    load_pretrained(model, cfg.image_weights, cfg.text_weights)
    model = model.to(device)
    if cfg.compile:
        compile_blocks(model, cfg.compile_backend)
    if sharded:
        shard_model(model, device)
    optimizer = build_optimizer(model, cfg)
    steps_per_epoch = len(train_set) // cfg.batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"--train-size {cfg.train_size} is smaller than one batch of {cfg.batch_size}")
    total_steps = math.ceil(cfg.epochs * steps_per_epoch) if cfg.epochs > 0 else cfg.max_steps
    start_step = 0
    if resume_path:
        saved = checkpoint.read_state(resume_path)
        checkpoint.check_same_config(saved["config"]["model"], model_config_dict(cfg))
        checkpoint.load_checkpoint(resume_path, model, optimizer, restore_rng=True)
        start_step = saved["step"]
        saved_world = saved.get("world_size", 1)
        if is_main:
            print(f"resumed from {resume_path} at step {start_step}"
                  + (f" (saved with {saved_world} processes, now {world}: same global batch and "
                     f"masks, so training continues the same run)" if saved_world != world else ""))
    runner = model
    if world > 1 and not sharded:
        # unmasked tuning steps leave the reconstruction heads without gradients
        runner = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                         find_unused_parameters=cfg.unmasked_tuning > 0 or cfg.unmasked_every > 0)

    log = MetricsLog(cfg.out_dir, cfg.tensorboard) if is_main else None
    if is_main:
        print(f"MCR variant={cfg.variant} preset={cfg.preset} device={device} processes={world} "
              f"{'FSDP ' if sharded else ''}"
              f"params={sum(p.numel() for p in model.parameters()) / 1e6:.1f}M steps={total_steps} "
              f"batch={cfg.batch_size} train={len(train_set)} val={len(val_reports)}")
    weights = {"contrastive": cfg.loss_contrastive, "mim": cfg.loss_mim, "mrm": cfg.loss_mrm}
    per_rank = cfg.batch_size // world

    def evaluate(step):
        """Every rank embeds its slice of the split; rank 0 logs."""
        if sharded:
            model.unshard()  # the root unit's weights; the blocks gather their own
        results = evaluate_retrieval(model, val_loader, val_reports, device, amp_dtype, gather=world > 1)
        if sharded:
            model.reshard()
        if is_main:
            log.write(step, "val", flatten_eval(results))
            if log.writer is not None and not sharded:  # FSDP: rank 0 alone cannot run the model
                plot.log_to_tensorboard(log.writer, model, val_loader.dataset, val_loader.collate_fn, device, step,
                                        amp_dtype)
        model.train()
        return results

    def save(step):
        """Full tensors gathered from every rank; rank 0 writes."""
        model_state, optimizer_state = checkpoint.full_state_dicts(model, optimizer)
        if is_main:
            state = {"config": dataclasses.asdict(cfg), "variant": cfg.variant, "world_size": world,
                     "fsdp": sharded}
            checkpoint.save_checkpoint(cfg.out_dir, step, model, model_state, optimizer_state, state,
                                       keep=cfg.keep_checkpoints)

    def all_ranks_agree(flag):
        """rank 0's decision, shared (time limits must stop every rank at the same step)."""
        if world == 1:
            return flag
        decision = torch.tensor([float(flag)], device=device)
        dist.broadcast(decision, 0)
        return bool(decision.item())

    model.train()
    step, started = start_step, time.time()
    bar = tqdm(total=total_steps, initial=start_step, desc="train", dynamic_ncols=True, mininterval=2,
               disable=not is_main)
    window_time, window_samples = time.time(), 0
    while step < total_steps:
        epoch, offset = divmod(step, steps_per_epoch)
        batches = batches_for_epoch(len(train_set), cfg.batch_size, cfg.seed, epoch)[offset:]
        loader = torch.utils.data.DataLoader(
            train_set, batch_sampler=[b[rank * per_rank:(rank + 1) * per_rank] for b in batches],
            collate_fn=collate, num_workers=cfg.num_workers,
            generator=torch.Generator().manual_seed(cfg.seed + epoch))  # leaves the global RNG alone
        for batch in loader:
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, cfg, total_steps)
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
            masks = model.draw_masks(cfg.batch_size, device=device, generator=step_generator(cfg, step, device))
            masks = {k: v[rank * per_rank:(rank + 1) * per_rank] for k, v in masks.items()}
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                losses = runner(batch, masks=masks, unmasked=is_unmasked_step(cfg, step, total_steps))
            total = sum(weights[k] * v for k, v in losses.items())
            optimizer.zero_grad(set_to_none=True)
            total.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            step += 1
            window_samples += cfg.batch_size
            bar.update(1)
            log_now = step % cfg.log_every == 0 or step == total_steps
            if log_now:  # collectives: every rank takes part
                grad_norm, logit_scale = full_value(grad_norm), full_value(model.logit_scale.detach())
                names = [*losses, "loss"]
                logged = torch.stack([*losses.values(), total]).detach().float()
                if world > 1:  # each rank holds its share of the global means: average them
                    dist.all_reduce(logged)
                    logged /= world
            if is_main and log_now:
                rate = window_samples / (time.time() - window_time)
                values = dict(zip(names, logged.tolist()))
                values.update(lr=optimizer.param_groups[0]["lr"], grad_norm=grad_norm.item(),
                              temperature=1 / logit_scale.exp().item(), samples_per_s=rate)
                log.write(step, "train", values)
                bar.set_postfix(loss=f"{values['loss']:.3f}", con=f"{values['contrastive']:.2f}",
                                mim=f"{values['mim']:.3f}", mrm=f"{values['mrm']:.2f}", sps=f"{rate:.0f}")
                window_time, window_samples = time.time(), 0
            out_of_time = cfg.max_minutes > 0 and all_ranks_agree(time.time() - started > 60 * cfg.max_minutes)
            if step < total_steps and not out_of_time:
                if cfg.eval_every and step % cfg.eval_every == 0:
                    r = evaluate(step)["i2t"]
                    if is_main:
                        tqdm.write(f"step {step}: val i2t R@1 {r['R@1']:.2f}% R@5 {r['R@5']:.2f}% "
                                   f"P@5 {r['P@5']:.2f}%")
                if cfg.save_every and step % cfg.save_every == 0:
                    save(step)
            if step >= total_steps or out_of_time:
                total_steps = step
                break
    bar.close()
    save(step)
    results = evaluate(step)
    if is_main:
        print(f"final validation after {step} steps ({(time.time() - started) / 60:.1f} min), "
              f"{len(val_reports)} pairs:")
        print(format_table(results))
        with open(os.path.join(cfg.out_dir, "final.json"), "w") as f:
            json.dump({"step": step, "minutes": (time.time() - started) / 60, **results}, f, indent=1)
        if cfg.pictures:
            plot.after_training(cfg.out_dir)
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return results if is_main else None


def main(argv=None):
    return train(parse_args(argv))


if __name__ == "__main__":
    main()
