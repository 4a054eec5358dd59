"""Configuration: model presets and the training config (a dataclass; argparse flags in mcr.train)."""
import dataclasses
from dataclasses import dataclass, field

VARIANTS = ("mcr", "dual-stream", "abm")
MASK_SAMPLINGS = ("random", "balanced")


@dataclass
class ModelConfig:
    """Shapes and method choices of the MCR model (see docs/method in ../shared/docs)."""
    image_size: int = 96
    patch_size: int = 16
    in_chans: int = 1                 # 1: grayscale patch embedding; 3: replicated (timm weights)
    vit_width: int = 128
    vit_depth: int = 4
    vit_heads: int = 4
    decoder_width: int = 96
    decoder_depth: int = 1
    decoder_heads: int = 4
    text_width: int = 128
    text_depth: int = 2
    text_heads: int = 4
    text_intermediate: int = 512
    max_text_len: int = 128
    vocab_size: int = 2048            # of the tokenizer trained on the corpus; a loaded one sets it
    embed_dim: int = 128              # joint space E
    head_hidden: int = 0              # MbA head hidden width; 0 = model width
    head_activation: str = "gelu"
    image_mask_ratio: float = 0.5
    text_mask_ratio: float = 0.25
    text_mask_replace: bool = False   # BERT's 80/10/10 replacement; False = always [MASK]
    norm_pix_loss: bool = False
    image_conditioned_mrm: bool = True
    mrm_decoder_depth: int = 1
    variant: str = "mcr"              # mcr | dual-stream | abm
    init_temperature: float = 0.07
    mask_sampling: str = "random"     # random: MAE's uniform choice; balanced: as many kept in each 2x2 block of patches
    pool_text_masked: bool = True     # MbA pools the report's [MASK] positions too (False: unmasked tokens only)
    pool_image_cls: bool = False      # MbA pools the CLS token with the kept patches
    embed_masks: int = 0              # retrieval embeddings: 0 = unmasked inputs; n = mean over n masks at the training ratios


PRESETS = {
    "small": ModelConfig(),
    "paper": ModelConfig(
        image_size=224, patch_size=16, in_chans=3, vit_width=768, vit_depth=12, vit_heads=12,
        decoder_width=512, decoder_depth=8, decoder_heads=16, text_width=768, text_depth=12,
        text_heads=12, text_intermediate=3072, vocab_size=30522, embed_dim=512),
}


def preset(name, **overrides):
    """A copy of preset `name` with fields replaced; ValueError names what is unknown."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; presets are {sorted(PRESETS)}")
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = set(overrides) - fields
    if unknown:
        raise ValueError(f"unknown model config fields {sorted(unknown)}")
    cfg = dataclasses.replace(PRESETS[name], **overrides)
    validate(cfg)
    return cfg


def validate(cfg):
    if cfg.variant not in VARIANTS:
        raise ValueError(f"unknown variant {cfg.variant!r}; variants are {VARIANTS}")
    if cfg.image_size % cfg.patch_size:
        raise ValueError(f"image_size {cfg.image_size} must be a multiple of patch_size {cfg.patch_size}")
    if not 0.0 < cfg.image_mask_ratio < 1.0:
        raise ValueError(f"image_mask_ratio must be in (0, 1), got {cfg.image_mask_ratio}")
    if cfg.mask_sampling not in MASK_SAMPLINGS:
        raise ValueError(f"mask_sampling must be one of {MASK_SAMPLINGS}, got {cfg.mask_sampling!r}")
    if cfg.mask_sampling == "balanced":
        grid = cfg.image_size // cfg.patch_size
        blocks = (grid // 2) ** 2
        keep = int(grid * grid * (1 - cfg.image_mask_ratio))
        if grid % 2 or keep % blocks:
            raise ValueError(f"mask_sampling 'balanced' needs an even patch grid ({grid}x{grid} here) and a kept "
                             f"count ({keep}) divisible by its {blocks} 2x2 blocks")
    if not 0.0 < cfg.text_mask_ratio < 1.0:
        raise ValueError(f"text_mask_ratio must be in (0, 1), got {cfg.text_mask_ratio}")


@dataclass
class TrainConfig:
    """Everything `python -m mcr.train` takes; every field is a --flag."""
    preset: str = "small"
    variant: str = "mcr"
    data: str = "synthetic"
    data_root: str = ""
    data_options: str = ""           # reader options, e.g. "views=PA,AP;images=all" (mcr.data.registry)
    train_size: int = 20000           # synthetic corpus sizes
    val_size: int = 1000
    out_dir: str = "runs/default"
    tokenizer: str = ""               # local HF tokenizer dir; empty = train WordPiece on the corpus
    image_weights: str = ""
    text_weights: str = ""
    batch_size: int = 32              # the global batch (split over torchrun's processes)
    epochs: float = 0.0               # if > 0, overrides max_steps
    max_steps: int = 1500
    max_minutes: float = 8.5          # stop training after this wall time (0 = no limit)
    lr: float = 5e-4
    weight_decay: float = 0.05
    warmup_steps: int = 50
    grad_clip: float = 1.0
    loss_contrastive: float = 1.0     # the paper's 0.1 : 1 : 1 is the paper preset's (TRAINING_PRESETS)
    loss_mim: float = 1.0
    loss_mrm: float = 1.0
    unmasked_tuning: float = 0.0      # share of the last steps trained on unmasked inputs, contrastive loss only (FLIP)
    unmasked_every: int = 0           # also every k-th step unmasked, contrastive loss only (0 = never)
    eval_every: int = 500
    save_every: int = 500
    keep_checkpoints: int = 2
    log_every: int = 20
    resume: bool = False
    seed: int = 0
    device: str = "auto"
    precision: str = "auto"           # auto (bf16 on CUDA) | bf16 | fp32
    num_workers: int = 0
    tensorboard: bool = False         # also log to out_dir/tensorboard (with pictures at each validation)
    pictures: bool = True             # write curves/reconstructions/retrieval PNGs at the end (mcr.plot)
    compile: bool = False             # torch.compile each transformer block (fullgraph)
    compile_backend: str = "inductor" # torch.compile backend (aot_eager: trace only, for tests)
    fsdp: bool = False                # under torchrun: shard parameters, gradients, AdamW state
    model: ModelConfig = field(default_factory=ModelConfig)


# The training recipe of each preset: TrainConfig's defaults (the 2-CPU-core recipe of the
# small preset) replaced by these; any flag given on the command line wins.
#   paper: the paper's loss ratio lambda_vrc : lambda_mim : lambda_mrm = 0.1 : 1 : 1, GPU-sized
#     batch and schedule, no wall-time limit.
#   small: contrastive weight 1 (not 0.1): at 0.1 the alignment leaves the ln(B) plateau too
#     late for a 10-minute CPU run (measured with the whole default run: image->report R@1 0.6%
#     at 0.1 vs 1.2-1.3% at 1, same tokenizer; P@5 6.3% vs 16.6-18.4%); the rest as the paper.
TRAINING_PRESETS = {
    "small": {},
    "paper": dict(batch_size=256, epochs=50, lr=1.5e-4, warmup_steps=2000, max_minutes=0.0,
                  loss_contrastive=0.1, eval_every=2000, save_every=2000, val_size=5000),
}


def is_unmasked_step(cfg, step, total_steps):
    """Whether training step `step` (0-based) of `total_steps` is an unmasked, contrastive-only
    step: the last `unmasked_tuning` share of the steps, and every `unmasked_every`-th step."""
    if step >= total_steps - round(cfg.unmasked_tuning * total_steps):
        return True
    return cfg.unmasked_every > 0 and step % cfg.unmasked_every == cfg.unmasked_every - 1


def unmasked_share(cfg):
    """The share of training steps that are unmasked (is_unmasked_step), for cost accounting."""
    every = 1 / cfg.unmasked_every if cfg.unmasked_every > 0 else 0.0
    return cfg.unmasked_tuning + (1 - cfg.unmasked_tuning) * every
