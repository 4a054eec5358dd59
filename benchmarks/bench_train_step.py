"""One training step (forward, backward, AdamW) of MCR against the same model written without
this package, side by side in one run, on the same device, data, masks and preset.

    mcr            (a) MCR with mcr_kernels' default backends (on CPU: the `cpu` backends)
    peer           (b) the same model as a user would write it without this package: timm
                   Attention and HF BERT on torch's SDPA, torch.gather masking and restoring,
                   full-vocabulary MLM logits at every position, per-token heads then a masked
                   mean, open_clip's ClipLoss
    dual-stream    (c) the baseline method (an unmasked second pass per modality for the
                   contrastive loss), with mcr_kernels' default backends
    mcr-reference  MCR with every op forced to the `reference` backend (the unfused ops)
    mcr-autograd-blocks  MCR with gelu_mlp and layer_norm_linear on `reference` (autograd keeps
                   the GELU outputs and the normalized inputs: what their recompute costs)

Step time: one set of parameters and one optimizer (torch's fused AdamW; --adamw for-loop for
torch's CPU default) serve every configuration (the peer's timm ViT and Blocks and HF BertModel,
on "sdpa", and the dual-stream model hold the MCR model's own Parameter objects), and the
configurations take turns step by step, in a rotating order, for --repeats rounds; the median per configuration
is reported, and each one's ratio to the peer.
Peak memory: each configuration in a fresh process (started with glibc returning freed blocks
to the kernel, see benchmarks/_common.py). On CPU `step_peak_mib` is the resident memory
one step adds above what the process holds between steps (model, gradients, AdamW state),
read from the kernel's high-water mark; `process_peak_mib` is the whole process's. On CUDA
both come from torch.cuda.max_memory_allocated.

    python benchmarks/bench_train_step.py                          # CPU: small at 32, paper at 4
    python benchmarks/bench_train_step.py --shapes small:8 --repeats 2 --no-write   # smoke run
    python benchmarks/bench_train_step.py --flops   # FLOPs of one forward + backward instead

FLOPs (--flops): torch.utils.flop_counter over one forward + backward of each configuration,
every mcr_kernels op on its reference backend (the counter cannot see inside custom ops; the
default backends do the same matmuls, plus gelu_mlp's elementwise recompute).
"""
import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "kernels"), str(ROOT / "benchmarks")]  # this checkout, whatever is installed
from _common import CPU_MALLOC_ENV, cpu_peak_bytes, environment, print_table, write_results  # noqa: E402

import mcr_kernels  # noqa: E402
from mcr import masking  # noqa: E402
from mcr.config import preset  # noqa: E402
from mcr.models import build_model  # noqa: E402
from mcr.models.mcr import global_mean  # noqa: E402
from mcr.profiling import MASK, PAD, random_batch  # noqa: E402

CONFIGS = ("mcr", "peer", "dual-stream", "mcr-reference", "mcr-autograd-blocks")
WEIGHTS = {"contrastive": 0.1, "mim": 1.0, "mrm": 1.0}


def share_parameters(module, owner):
    """Make `module`'s parameters the very Parameter objects of `owner` (same names): both
    compute with the same weights, and their gradients land on `owner`'s parameters."""
    params = dict(owner.named_parameters())
    for name, _ in list(module.named_parameters()):
        path, _, attr = name.rpartition(".")
        setattr(module.get_submodule(path) if path else module, attr, params[name])
    return module


class Peer(torch.nn.Module):
    """The encoders and decoder blocks as timm and transformers define them (timm's fused SDPA
    attention, BERT on "sdpa"), holding the MCR model's parameters."""

    def __init__(self, model):
        from timm.models.vision_transformer import Block, VisionTransformer
        from transformers import BertModel

        super().__init__()
        cfg = model.cfg
        self.vit = share_parameters(VisionTransformer(
            img_size=cfg.image_size, patch_size=cfg.patch_size, in_chans=cfg.in_chans, embed_dim=cfg.vit_width,
            depth=cfg.vit_depth, num_heads=cfg.vit_heads, num_classes=0, global_pool="token", class_token=True),
            model.vit)
        self.decoder_blocks = torch.nn.ModuleList(share_parameters(Block(cfg.decoder_width, cfg.decoder_heads,
                                                                         qkv_bias=True), blk)
                                                  for blk in model.decoder_blocks)
        self.mrm_blocks = torch.nn.ModuleList(share_parameters(Block(cfg.text_width, cfg.text_heads, qkv_bias=True),
                                                               blk) for blk in model.mrm_blocks)
        self.bert = share_parameters(BertModel(model.bert_config, add_pooling_layer=False), model.bert)
        self.bert.set_attn_implementation("sdpa")
        for module in self.modules():
            if hasattr(module, "fused_attn"):
                module.fused_attn = True


def peer_losses(model, peer, batch, masks, clip_loss):
    """The MCR losses as plain PyTorch + timm + HF + open_clip compute them (`peer`: the
    model's encoders and blocks as those libraries define them)."""
    vit = peer.vit
    imgs, ids, attn = batch["image"], batch["input_ids"], batch["attention_mask"]
    ids_keep, ids_restore = masks.ids_keep, masks.ids_restore
    x = vit.patch_embed(imgs) + vit.pos_embed[:, 1:]
    x = torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
    mask = masks.patch_mask(x.dtype)
    cls = (vit.cls_token + vit.pos_embed[:, :1]).expand(x.shape[0], -1, -1)
    latent = vit.norm(vit.blocks(torch.cat([cls, x], dim=1)))
    d = model.decoder_embed(latent)
    B, N = ids_restore.shape
    fill = model.mask_token.expand(B, N - ids_keep.shape[1], -1)
    patches = torch.cat([d[:, 1:], fill], dim=1)
    patches = torch.gather(patches, 1, ids_restore.unsqueeze(-1).expand(-1, -1, d.shape[-1]))
    d = torch.cat([d[:, :1], patches], dim=1) + model.decoder_pos_embed
    for blk in peer.decoder_blocks:
        d = blk(d)
    pred = model.decoder_pred(model.decoder_norm(d))[:, 1:]
    masked_ids, labels = model.mask_text(ids, attn, batch["special_tokens_mask"], masks)
    txt = peer.bert(input_ids=masked_ids, attention_mask=attn).last_hidden_state
    h = txt
    if model.image_to_text is not None:
        h = h + model.image_to_text(latent[:, 1:].mean(1)).unsqueeze(1)
    for blk in peer.mrm_blocks:
        h = blk(h, attn_mask=attn.bool()[:, None, None, :])
    logits = model.mlm_head(h)  # [B, L, V], every position
    mrm_sum = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum")
    pooled = model.text_pool_mask(attn, labels).unsqueeze(-1).to(txt.dtype)
    image_emb = model.image_head(model.image_tokens(latent)).mean(1)
    text_emb = (model.text_head(txt) * pooled).sum(1) / pooled.sum(1).clamp(min=1)
    scale = model.logit_scale.exp().clamp(max=100)
    contrastive = clip_loss(F.normalize(image_emb.float(), dim=-1), F.normalize(text_emb.float(), dim=-1), scale)
    mim = (((pred - model.patchify(imgs)) ** 2).mean(-1) * mask).sum() / mask.sum()  # MAE's loss
    return {"mim": mim, "mrm": global_mean(mrm_sum, (labels != -100).sum()),
            "contrastive": contrastive}


class Bench:
    """One model and optimizer; step(config) runs one training step as that configuration."""

    def __init__(self, preset_name, batch_size, device, amp_dtype, fused_adamw=True):
        from open_clip.loss import ClipLoss

        torch.manual_seed(0)
        self.cfg = preset(preset_name, variant="mcr")
        self.model = build_model(self.cfg, pad_token_id=PAD, mask_token_id=MASK).to(device)
        dual_stream = build_model(preset(preset_name, variant="dual-stream"), pad_token_id=PAD, mask_token_id=MASK)
        self.dual_stream = share_parameters(dual_stream.to(device), self.model)
        self.peer = Peer(self.model).to(device)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-4, fused=fused_adamw)
        self.batch = random_batch(self.cfg, batch_size, device)
        self.masks = masking.draw(self.cfg, batch_size, device=device, generator=torch.Generator(device).manual_seed(0))
        self.device, self.amp_dtype = device, amp_dtype
        self.clip_loss = ClipLoss()

    def losses(self, config, backend=None):
        """The configuration's losses; backend forces one for every op (else the config's choice)."""
        if config == "peer":
            return peer_losses(self.model, self.peer, self.batch, self.masks, self.clip_loss)
        forced = {"mcr-reference": ("reference",),
                  "mcr-autograd-blocks": ("reference", "gelu_mlp", "layer_norm_linear")}
        model = self.dual_stream if config == "dual-stream" else self.model
        with mcr_kernels.use_backend(*((backend,) if backend else forced.get(config, (None,)))):
            return model(self.batch, self.masks)

    def step(self, config):
        with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
            losses = self.losses(config)
            loss = sum(WEIGHTS[k] * v for k, v in losses.items())
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
        self.optimizer.step()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        return {k: float(v.detach()) for k, v in losses.items()}


def time_configs(preset_name, batch_size, configs, repeats, warmup, device, amp_dtype, fused_adamw):
    """Median step time per configuration, the configurations taking turns step by step."""
    bench = Bench(preset_name, batch_size, device, amp_dtype, fused_adamw)
    with torch.no_grad():
        first = {c: {k: float(v) for k, v in bench.losses(c).items()} for c in configs}
    for _ in range(warmup):
        for config in configs:
            bench.step(config)
    times = {c: [] for c in configs}
    for r in range(repeats):
        for config in configs[r % len(configs):] + configs[:r % len(configs)]:
            t0 = time.perf_counter()
            bench.step(config)
            times[config].append(time.perf_counter() - t0)
    return {c: (1e3 * statistics.median(t), 1e3 * min(t), 1e3 * max(t), first[c]) for c, t in times.items()}


def step_flops(preset_name, batch_size, configs, device, amp_dtype):
    """{config: FLOPs of one forward + backward}, through the reference ops (which the counter sees)."""
    from torch.utils.flop_counter import FlopCounterMode

    bench, flops = Bench(preset_name, batch_size, device, amp_dtype), {}
    for config in configs:
        with FlopCounterMode(display=False) as counter, mcr_kernels.use_backend("reference"):  # peer too
            losses = bench.losses(config, backend="reference")
            sum(WEIGHTS[k] * v for k, v in losses.items()).backward()
        flops[config] = counter.get_total_flops()
    return flops


def peak_memory(preset_name, batch_size, config, warmup, device, amp_dtype, fused_adamw):
    """(step peak MiB, process peak MiB) of one training step after warmup (this process)."""
    bench = Bench(preset_name, batch_size, device, amp_dtype, fused_adamw)
    for _ in range(warmup):
        bench.step(config)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        bench.step(config)
        peak = torch.cuda.max_memory_allocated()
        return (peak - before) / 2**20, peak / 2**20
    step = cpu_peak_bytes(lambda: bench.step(config))
    with open("/proc/self/status") as f:
        process = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    return step / 2**20, process / 2**10


def peak_memory_in_fresh_process(preset_name, batch_size, config, warmup, adamw):
    env = {**os.environ, **CPU_MALLOC_ENV}
    out = subprocess.run([sys.executable, __file__, "--child-memory", f"{preset_name}:{batch_size}:{config}",
                          "--warmup", str(warmup), "--threads", str(torch.get_num_threads()), "--adamw", adamw],
                         env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="small:32,paper:4",
                        help="comma-separated preset:batch pairs to measure")
    parser.add_argument("--configs", default="mcr,peer,dual-stream", help=f"comma-separated subset of {CONFIGS}")
    parser.add_argument("--repeats", type=int, default=7, help="timed steps per configuration (median)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per configuration first")
    parser.add_argument("--no-memory", action="store_true", help="skip the fresh-process peak-memory runs")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch intra-op threads in every process (0 = torch's default)")
    parser.add_argument("--no-write", action="store_true", help="print only; write no results file")
    parser.add_argument("--flops", action="store_true", help="count FLOPs per configuration; time nothing")
    parser.add_argument("--adamw", choices=("fused", "for-loop"), default="fused",
                        help="AdamW of every configuration: torch's fused kernel, or the per-parameter loop "
                             "(torch's default on a CPU, which this bench used before 2026-12-06)")
    parser.add_argument("--child-memory", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    amp_dtype = torch.bfloat16 if device.type == "cuda" else None
    if args.child_memory:
        preset_name, batch_size, config = args.child_memory.split(":")
        step, process = peak_memory(preset_name, int(batch_size), config, args.warmup, device, amp_dtype,
                                    args.adamw == "fused")
        print(json.dumps({"step_peak_mib": step, "process_peak_mib": process}))
        return
    env = environment()
    env["threads"] = torch.get_num_threads()
    print(env, flush=True)
    configs = args.configs.split(",")
    rows = []
    if args.flops:
        for shape in args.shapes.split(","):
            preset_name, batch_size = shape.split(":")
            flops = step_flops(preset_name, int(batch_size), configs, device, amp_dtype)
            rows += [{"preset": preset_name, "batch": int(batch_size), "config": c, "gflops": f / 1e9,
                      "flops_vs_peer": f / flops["peer"] if "peer" in flops else None} for c, f in flops.items()]
        print_table(rows)
        if not args.no_write:
            print("wrote", *write_results("train_step_flops", rows))
        return
    for shape in args.shapes.split(","):
        preset_name, batch_size = shape.split(":")
        batch_size = int(batch_size)
        timed = time_configs(preset_name, batch_size, configs, args.repeats, args.warmup, device, amp_dtype,
                             args.adamw == "fused")
        for config in configs:
            median, low, high, losses = timed[config]
            row = {"preset": preset_name, "batch": batch_size, "config": config, "step_ms": median,
                   "step_ms_min": low, "step_ms_max": high, **{f"loss_{k}": v for k, v in losses.items()}}
            if not args.no_memory:
                row.update(peak_memory_in_fresh_process(preset_name, batch_size, config, args.warmup, args.adamw))
            rows.append(row)
            print_table([row])
        peer = next((r for r in rows if r["preset"] == preset_name and r["config"] == "peer"), None)
        for r in rows:
            if peer is not None and r["preset"] == preset_name:
                r["time_vs_peer"] = r["step_ms"] / peer["step_ms"]
                if "step_peak_mib" in r:
                    r["step_peak_vs_peer"] = r["step_peak_mib"] / peer["step_peak_mib"]
                    r["process_peak_vs_peer"] = r["process_peak_mib"] / peer["process_peak_mib"]
        if not args.no_write:  # after every shape: a run cut short keeps what it measured
            paths = write_results("train_step", rows, {"repeats": args.repeats, "warmup": args.warmup,
                                                       "threads": env["threads"], "adamw": args.adamw})
    print("\nall rows (ratios against the peer, same preset and batch):")
    print_table(rows, ["preset", "batch", "config", "step_ms", "step_ms_min", "step_ms_max", "time_vs_peer",
                       "step_peak_mib", "step_peak_vs_peer", "process_peak_mib", "process_peak_vs_peer"])
    if not args.no_write:
        print("wrote", *paths)


if __name__ == "__main__":
    main()
