"""Configuration: the model and training dataclasses, the presets, and `resolve_config`.

Every field carries its help text (and, for a closed set, its choices; for a size, its
minimum) in `field(metadata=...)`; mcr.cli turns the fields into command-line flags, so a
field added here is a flag with its help, nothing else to write. A TrainConfig is always
complete: fields left at None take the preset's value when it is built (`resolve_config`
runs in `__post_init__`), so `TrainConfig(preset="paper", model={"variant": "abm"})` is the
paper-shaped abm model with the paper's recipe, whoever builds it (the CLI, a study, a test).

What comes from the paper and what this project chose is in docs/method.md.
"""
import dataclasses
import math
import numbers
from dataclasses import dataclass, field

from mcr.data.registry import DATASETS

VARIANTS = ("mcr", "dual-stream", "abm", "mpma", "reclf")
MASK_SAMPLINGS = ("random", "balanced")
POS_EMBEDS = ("learned", "sincos")
PRECISIONS = ("auto", "bf16", "fp32")
DEVICE_KINDS = ("auto", "cpu", "cuda", "cuda:N")  # checked by mcr.distributed.pick_device
HEAD_ACTIVATIONS = ("gelu", "gelu_tanh", "relu", "none")  # mcr_kernels.ProjectionHead's
COMPILE_BACKENDS = ("inductor", "aot_eager", "eager")


def option(default, help, choices=None, minimum=None, maximum=None):
    """A config field and its flag: help text, closed set of values, inclusive bounds."""
    meta = {"help": help, "choices": choices, "min": minimum, "max": maximum}
    return field(default=default, metadata=meta)


def from_preset(help, minimum=None):
    """A training field whose default is the preset's recipe (TRAINING_PRESETS)."""
    return option(None, help, minimum=minimum)


def section(cls, prefix, help):
    """A ModelConfig field holding one variant's settings (dataclass `cls`, made with its
    defaults); its fields' flags are --<prefix><field>."""
    return field(default_factory=cls, metadata={"help": help, "prefix": prefix})


@dataclass
class LocalConfig:
    """The local (word-to-region) alignment of the mpma and reclf variants (docs/method.md);
    flags --local-<field>."""
    attn_scale: float = option(4.0, "mpma/reclf: scale of the word-to-region attention logits (GLoRIA's gamma1)")
    attn: str = option("regions", "mpma/reclf: the word-to-region attention: regions (one softmax over the "
                       "regions of the cosines) or words_then_regions (GLoRIA's order: a softmax over the "
                       "report's words for each region first)", ("regions", "words_then_regions"))
    word_scale: float = option(1.0, "mpma/reclf: scale of the cosines in the softmax over words of "
                               "--local-attn words_then_regions", minimum=1e-4)
    agg_scale: float = option(5.0, "mpma: scale of the log-sum-exp over a pair's word matchings (GLoRIA's "
                              "gamma2)", minimum=1e-4)
    logit_scale: float = option(10.0, "mpma/reclf: the local loss's logits are the local matching scores times "
                                "this (GLoRIA's gamma3); the initial value when learnable", minimum=1e-4)
    scale_learnable: bool = option(False, "mpma/reclf: learn the local logit scale (log-parametrized, capped at 100)")
    match_masked: bool = option(True, "mpma/reclf: the local loss matches a masked report's [MASK] positions as "
                                "words too (no: only the positions whose token is seen)")
    merge_pieces: bool = option(True, "mpma/reclf: the local loss matches words, each the sum of its WordPiece "
                                "pieces (GLoRIA's aggregate_tokens; no: every piece on its own)")
    own_heads: bool = option(False, "mpma/reclf: map the local loss's tokens with projection heads of its own "
                             "(GLoRIA's local embedders) instead of the global MbA heads")
    group_size: int = option(16, "mpma/reclf: the global batch is cut into contiguous groups of this many pairs, "
                             "and each pair's local negatives are the rest of its group (0: the whole batch, "
                             "every pair scored, as GLoRIA)", minimum=0)


@dataclass
class MPMAConfig:
    """MA-CMF, the memory-augmented fusion of the mpma variant's report reconstruction."""
    memory_slots: int = option(16, "mpma: slots S of MA-CMF's learned cross-modal memory", minimum=1)
    memory_depth: int = option(1, "mpma: cross-attention blocks from report tokens to [visible image tokens; "
                               "memory]", minimum=1)


@dataclass
class RECLFConfig:
    """The word weights of the reclf variant's local loss."""
    irm_hidden: int = option(64, "reclf: hidden width of the IRM head (a non-negative importance per word)",
                             minimum=1)
    srm_mix: float = option(0.5, "reclf: share of a word's weight that SRM takes from its related words "
                            "(0 = IRM only)", minimum=0, maximum=1)
    srm_temperature: float = option(0.1, "reclf: temperature of SRM's row-softmax over the report's token "
                                    "cosine similarities", minimum=1e-4)
    reasoning_over: str = option("words", "reclf: what SRM and IRM reason over: words (a weight per word, the "
                                 "same for every image) or matchings (each image-word matching: SRM mixes them, "
                                 "IRM weighs each from its word and its score)", ("words", "matchings"))


@dataclass
class ModelConfig:
    """Shapes and method choices of the MCR model (defaults: the small preset)."""
    variant: str = option("mcr", "mcr: masked-only MCR; dual-stream: unmasked second pass for the "
                          "contrastive loss (baseline); abm: aggregate, then map (ablation); mpma, reclf: "
                          "MCR plus a local word-to-region loss (docs/method.md)", VARIANTS)
    image_size: int = option(96, "square image side (px), a multiple of --patch-size", minimum=1)
    patch_size: int = option(16, "ViT patch side (px)", minimum=1)
    in_chans: int = option(1, "image channels: 1 grayscale patch embedding, 3 replicated (timm weights)",
                           minimum=1)
    vit_width: int = option(128, "ViT width (embedding dim)", minimum=1)
    vit_depth: int = option(4, "ViT blocks", minimum=1)
    vit_heads: int = option(4, "ViT attention heads", minimum=1)
    decoder_width: int = option(96, "MAE decoder width", minimum=1)
    decoder_depth: int = option(1, "MAE decoder blocks", minimum=1)
    decoder_heads: int = option(4, "MAE decoder attention heads", minimum=1)
    text_width: int = option(128, "BERT width", minimum=1)
    text_depth: int = option(2, "BERT layers", minimum=1)
    text_heads: int = option(4, "BERT attention heads", minimum=1)
    text_intermediate: int = option(512, "BERT feed-forward width", minimum=1)
    max_text_len: int = option(128, "report tokens kept (truncation), [CLS] and [SEP] included", minimum=3)
    vocab_size: int = option(2048, "WordPiece vocabulary size to train (a loaded tokenizer sets it)",
                             minimum=16)
    embed_dim: int = option(128, "joint embedding space (MbA heads' output)", minimum=1)
    head_hidden: int = option(0, "MbA head hidden width; 0 = the encoder's width", minimum=0)
    head_activation: str = option("gelu", "MbA head activation", HEAD_ACTIVATIONS)
    pos_embed: str = option("learned", "image position embeddings of the ViT and the MAE decoder: learned (timm's, "
                            "initialised at std 0.02) or sincos (MAE's fixed 2-D sine-cosine)", POS_EMBEDS)
    image_mask_ratio: float = option(0.5, "share of image patches dropped, in (0, 1)")
    text_mask_ratio: float = option(0.25, "share of report tokens masked, in (0, 1)")
    text_mask_replace: bool = option(False, "BERT's 80/10/10 replacement of masked tokens (else always [MASK])")
    norm_pix_loss: bool = option(False, "MAE's per-patch normalized pixel target")
    image_conditioned_mrm: bool = option(True, "add the mean image latent to the MRM decoder's input")
    mrm_decoder_depth: int = option(1, "MRM decoder blocks", minimum=0)
    init_temperature: float = option(0.07, "initial InfoNCE temperature", minimum=1e-4)
    mask_sampling: str = option("random", "image masks: random (MAE's uniform choice) or balanced (as many kept "
                                "patches in each 2x2 block)", MASK_SAMPLINGS)
    pool_text_masked: bool = option(True, "MbA pools the report's [MASK] positions too (no: unmasked tokens only)")
    pool_image_cls: bool = option(False, "MbA pools the CLS token with the kept patches")
    embed_masks: int = option(0, "retrieval embeddings: 0 = of the unmasked inputs; n = mean over n masks at the "
                              "training ratios", minimum=0)
    local: LocalConfig = section(LocalConfig, "local_", "mpma/reclf: the local word-to-region alignment")
    mpma: MPMAConfig = section(MPMAConfig, "", "mpma: the memory-augmented fusion MA-CMF")
    reclf: RECLFConfig = section(RECLFConfig, "", "reclf: the IRM and SRM word weights")

def model_sections():
    """(section name, its dataclass, its flag prefix) of each variant section of ModelConfig."""
    return [(f.name, f.type, f.metadata["prefix"]) for f in dataclasses.fields(ModelConfig) if "prefix" in f.metadata]


def section_flat_names():
    """{flat name: (section, field)}: the flag-style names of the section fields (local_attn_scale,
    memory_slots, ...), the names a flat config.yaml (written before the sections) uses."""
    return {prefix + f.name: (name, f.name) for name, cls, prefix in model_sections() for f in dataclasses.fields(cls)}


def nest_sections(values):
    """A copy of model field values with flat section names (memory_slots: 3) moved into their
    section ({"mpma": {"memory_slots": 3}})."""
    values = dict(values)
    for flat, (name, field_name) in section_flat_names().items():
        if flat in values and flat not in {f.name for f in dataclasses.fields(ModelConfig)}:
            values[name] = {**(values.get(name) or {}), field_name: values.pop(flat)}
    return values


PRESETS = {
    # small: 15% of the patches and 15% of the report tokens masked, not 50% / 25% (with every
    # 4th step unmasked, see TRAINING_PRESETS): docs/study.md; paper: the paper's
    # 50% / 25% (ModelConfig's defaults)
    "small": ModelConfig(image_mask_ratio=0.15, text_mask_ratio=0.15),
    "paper": ModelConfig(
        image_size=224, patch_size=16, in_chans=3, vit_width=768, vit_depth=12, vit_heads=12,
        decoder_width=512, decoder_depth=8, decoder_heads=16, text_width=768, text_depth=12,
        text_heads=12, text_intermediate=3072, vocab_size=30522, embed_dim=512),
}


@dataclass
class TrainConfig:
    """Everything `python -m mcr.train` takes; every field is a --flag (model: ModelConfig's)."""
    preset: str = option("small", "model shape and training recipe: small (2 CPU cores, minutes) or "
                         "paper (ViT-B/16 at 224 px, BERT-base, the paper's loss weights)", ("small", "paper"))
    data: str = option("synthetic", "dataset (mcr.data.registry)", DATASETS)
    data_root: str = option("", "root folder of --data (not synthetic)")
    data_options: str = option("", 'reader options, e.g. "views=PA,AP;images=all" (mcr.data.registry)')
    train_size: int = option(20000, "training pairs of --data synthetic", minimum=1)
    val_size: int = from_preset("validation pairs of --data synthetic", minimum=1)
    out_dir: str = option("runs/default", "run folder: metrics.jsonl, config.yaml, tokenizer/, checkpoints/")
    resume: bool = option(False, "continue the run in --out-dir from its newest complete checkpoint")
    overwrite: bool = option(False, "delete the checkpoints and metrics in --out-dir and start over")
    tokenizer: str = option("auto", "auto: for --data synthetic the WordPiece vocabulary shipped with the "
                            "package (when --vocab-size >= its 569 tokens), else WordPiece trained on the "
                            "training reports; train: always train one; else a local Hugging Face "
                            "tokenizer folder")
    image_weights: str = option("", "pretrained timm ViT / MAE weights file (.safetensors, .pth); its tensors set "
                                "--vit-width, --vit-depth and --patch-size, and --vit-heads is width/64 (timm's "
                                "ViTs) or, for a width not a multiple of 64, the preset's; flags given win over "
                                "--patch-size and --vit-heads, and must agree on the rest")
    text_weights: str = option("", "pretrained BERT folder (Hugging Face layout); its config.json sets "
                               "--text-width, --text-depth, --text-heads, --text-intermediate and --vocab-size "
                               "(flags given must agree); pass its tokenizer with --tokenizer")
    batch_size: int = from_preset("global batch, split evenly over torchrun's processes", minimum=1)
    epochs: float = from_preset("epochs over the training split; > 0 overrides --max-steps", minimum=0)
    max_steps: int = from_preset("optimizer steps (when --epochs is 0)", minimum=1)
    max_minutes: float = from_preset("stop training after this wall time; 0 = no limit", minimum=0)
    lr: float = from_preset("peak AdamW learning rate (linear warm-up, cosine decay)", minimum=0)
    weight_decay: float = option(0.05, "AdamW weight decay (not on biases, norms, embeddings)", minimum=0)
    warmup_steps: int = from_preset("linear warm-up steps", minimum=0)
    grad_clip: float = option(1.0, "gradient norm clip", minimum=0)
    loss_contrastive: float = from_preset("weight of the InfoNCE loss", minimum=0)
    loss_mim: float = option(1.0, "weight of masked image modelling", minimum=0)
    loss_mrm: float = option(1.0, "weight of masked report modelling", minimum=0)
    loss_local: float = option(1.0, "weight of the local word-to-region loss (variants mpma, reclf)", minimum=0)
    unmasked_tuning: float = option(0.0, "share of the last steps trained on unmasked inputs, contrastive loss "
                                    "only (FLIP)", minimum=0, maximum=1)
    unmasked_every: int = from_preset("also every k-th step unmasked, contrastive loss only; 0 = never (the "
                                     "preset's k is not applied to dual-stream)", minimum=0)
    unmasked_until: float = option(1.0, "--unmasked-every applies to the first this share of the steps only "
                                   "(the take-off); masked-only after it", minimum=0, maximum=1)
    eval_every: int = from_preset("validate every N steps; 0 = only at the end", minimum=0)
    save_every: int = from_preset("checkpoint every N steps; 0 = only at the end", minimum=0)
    keep_checkpoints: int = option(2, "newest checkpoints kept", minimum=1)
    log_every: int = option(20, "log the training losses every N steps", minimum=1)
    seed: int = option(0, "seed of the initialisation, data order and masks")
    device: str = option("auto", f"one of {', '.join(DEVICE_KINDS)}; auto: cuda when available")
    precision: str = option("auto", "autocast: auto (bf16 on CUDA, fp32 on CPU), bf16, fp32", PRECISIONS)
    num_workers: int = option(0, "DataLoader worker processes", minimum=0)
    tensorboard: bool = option(False, "also log to out_dir/tensorboard (with the model pictures at each validation)")
    pictures: bool = option(True, "write curves, reconstruction and retrieval PNGs into out_dir at the end (mcr.plot)")
    compile: bool = option(False, "torch.compile each transformer block (fullgraph)")
    compile_backend: str = option("inductor", "torch.compile backend (aot_eager: tracing only, for tests)",
                                  COMPILE_BACKENDS)
    fsdp: bool = option(False, "under torchrun: shard parameters, gradients and AdamW state (FSDP2)")
    model: ModelConfig = option(None, "the model; None = the preset's, a dict = the preset's with these fields")

    def __post_init__(self):
        resolve_config(self)


# The training recipe of each preset: the value of every TrainConfig field left at None.
#   paper: the paper's loss ratio lambda_vrc : lambda_mim : lambda_mrm = 0.1 : 1 : 1, GPU-sized
#     batch and schedule, no wall-time limit.
#   small: contrastive weight 1 (not 0.1): at 0.1 the alignment leaves the ln(B) plateau too
#     late for a 10-minute CPU run (measured with the whole default run: image->report R@1 0.6%
#     at 0.1 vs 1.2-1.3% at 1, same tokenizer; P@5 6.3% vs 16.6-18.4%); every 4th step
#     unmasked and contrastive-only (with 15% / 15% masking, PRESETS): masked-only training sits
#     on the ln(B) plateau far longer than dual-stream here, and a few unmasked steps close
#     most of the gap; with the light masks three steps in four stay masked (the study's tenth
#     round in docs/study.md; with 25% / 25% masks half the steps had to be unmasked); a 150-step
#     warm-up, not 50: 1.13x the image->report and report->image R@1 and 1.25x P@5 at 1,500
#     steps (3 seeds; it lifts dual-stream as much); 2,000 steps, not 1,500, since the
#     unpadded reports, the decoders' loss rows and fused AdamW made a step cheaper:
#     image->report R@1 9.5 vs 6.0% (3 seeds each); the rest as the paper.
TRAINING_PRESETS = {
    "small": dict(batch_size=32, epochs=0.0, max_steps=2000, max_minutes=8.5, lr=5e-4, warmup_steps=150,
                  loss_contrastive=1.0, unmasked_every=4, eval_every=500, save_every=500, val_size=1000),
    "paper": dict(batch_size=256, epochs=50.0, max_steps=1500, max_minutes=0.0, lr=1.5e-4, warmup_steps=2000,
                  loss_contrastive=0.1, unmasked_every=0, eval_every=2000, save_every=2000, val_size=5000),
}


def flag(name):
    """The command-line spelling of a field name."""
    return "--" + name.replace("_", "-")


TYPE_NAMES = {bool: "true or false", int: "an integer", float: "a finite number", str: "a string"}


def checked_type(name, kind, value):
    """`value` as field `name`'s type `kind` (bool, int, float or str), or a ValueError naming
    the flag: no strings for numbers or booleans (YAML's "no" is a string), no bools for
    numbers, integral values within 64 bits only for ints, finite values only (no inf, nan,
    1e400)."""
    ok = isinstance(value, kind) and (kind is bool or not isinstance(value, bool))
    if kind in (int, float) and isinstance(value, numbers.Real) and not isinstance(value, bool):
        try:  # an int beyond float's range is an overflow too (numpy's numbers are numbers too)
            ok = math.isfinite(float(value)) and (kind is float or (float(value).is_integer()
                                                                    and abs(value) < 2 ** 63))
        except OverflowError:
            ok = False
    if not ok:
        got = repr(value) if len(repr(value)) <= 40 else repr(value)[:37] + "..."
        if not isinstance(value, numbers.Real):
            got += f" ({type(value).__name__})"
        elif not isinstance(value, bool) and abs(value) >= 2 ** 63:
            got += " (out of range)"
        raise ValueError(f"{flag(name)} expects {TYPE_NAMES[kind]}, got {got}")
    return kind(value)


def check_types(cfg, prefix=""):
    """Convert every set field of `cfg` to its declared type in place (8.0 -> 8 for an int);
    ValueError naming the flag (checked_type) otherwise. A nested section (`model`) must be
    its dataclass, a mapping of its fields, or None; prefix: the flag prefix of a section's
    fields."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if value is None:
            continue
        if dataclasses.is_dataclass(f.type):
            if not isinstance(value, (f.type, dict)):
                raise ValueError(f"{f.name} expects a mapping of {f.type.__name__} fields (field: value), got "
                                 f"{value!r} ({type(value).__name__})")
        elif f.type in TYPE_NAMES:
            setattr(cfg, f.name, checked_type(prefix + f.name, f.type, value))


def check_fields(cfg, prefix=""):
    """ValueError naming the flag when a value has the wrong type or is outside its choices
    or bounds (the fields of a ModelConfig's sections too; prefix: the flag prefix of a
    section's fields)."""
    check_types(cfg, prefix)
    for f in dataclasses.fields(cfg):
        value, meta = getattr(cfg, f.name), f.metadata
        if "prefix" in meta:
            check_fields(value, meta["prefix"])
            continue
        if value is None or isinstance(value, (ModelConfig, dict)):
            continue
        name = flag(prefix + f.name)
        if meta.get("choices") and value not in meta["choices"]:
            raise ValueError(f"{name} {value!r} is not one of: {', '.join(meta['choices'])}")
        if meta.get("min") is not None and value < meta["min"]:
            raise ValueError(f"{name} must be >= {meta['min']}, got {value}")
        if meta.get("max") is not None and value > meta["max"]:
            raise ValueError(f"{name} must be <= {meta['max']}, got {value}")


def validate(cfg):
    """ValueError for a ModelConfig whose values cannot build a model."""
    check_fields(cfg)
    if cfg.image_size % cfg.patch_size:
        raise ValueError(f"--image-size {cfg.image_size} must be a multiple of --patch-size {cfg.patch_size}")
    for name in ("image_mask_ratio", "text_mask_ratio"):
        if not 0.0 < getattr(cfg, name) < 1.0:
            raise ValueError(f"{flag(name)} must be in (0, 1), got {getattr(cfg, name)}")
    if cfg.mask_sampling == "balanced":
        grid = cfg.image_size // cfg.patch_size
        blocks = (grid // 2) ** 2
        keep = int(grid * grid * (1 - cfg.image_mask_ratio))
        if grid % 2 or keep % blocks:
            raise ValueError(f"--mask-sampling balanced needs an even patch grid ({grid}x{grid} here) and a kept "
                             f"count ({keep}) divisible by its {blocks} 2x2 blocks")
    if cfg.pos_embed == "sincos":
        for width in ("vit_width", "decoder_width"):
            if getattr(cfg, width) % 4:
                raise ValueError(f"--pos-embed sincos needs {flag(width)} divisible by 4, got {getattr(cfg, width)}")
    for width, heads in (("vit_width", "vit_heads"), ("decoder_width", "decoder_heads"),
                         ("text_width", "text_heads")):
        if getattr(cfg, width) % getattr(cfg, heads):
            raise ValueError(f"{flag(width)} {getattr(cfg, width)} must be a multiple of "
                             f"{flag(heads)} {getattr(cfg, heads)}")


def preset(name, **overrides):
    """A copy of preset `name`'s ModelConfig with fields replaced (a section by a dict of its
    fields, or its fields by their flat names: memory_slots=3); ValueError names what is unknown."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; presets are {', '.join(PRESETS)}")
    overrides = nest_sections(overrides)
    unknown = set(overrides) - {f.name for f in dataclasses.fields(ModelConfig)}
    base = PRESETS[name]
    for section_name, cls, _ in model_sections():
        values = overrides.get(section_name, {})
        if isinstance(values, dict):  # a copy: no two configs share a section
            unknown |= {f"{section_name}.{k}" for k in set(values) - {f.name for f in dataclasses.fields(cls)}}
            if not unknown:
                overrides[section_name] = dataclasses.replace(getattr(base, section_name), **values)
    if unknown:
        raise ValueError(f"unknown model config fields {sorted(unknown)}")
    cfg = dataclasses.replace(base, **overrides)
    validate(cfg)
    return cfg


def resolve_config(cfg):
    """Fill `cfg`'s None fields from its preset, build its ModelConfig, validate; returns cfg.

    Idempotent; TrainConfig calls it when built, so every entry point goes through it."""
    check_types(cfg)
    if cfg.preset not in TRAINING_PRESETS:
        raise ValueError(f"--preset {cfg.preset!r} is not one of: {', '.join(TRAINING_PRESETS)}")
    left_to_preset = {name for name in TRAINING_PRESETS[cfg.preset] if getattr(cfg, name) is None}
    for name in left_to_preset:
        setattr(cfg, name, TRAINING_PRESETS[cfg.preset][name])
    if cfg.model is None or isinstance(cfg.model, dict):
        cfg.model = preset(cfg.preset, **(cfg.model or {}))
    else:
        validate(cfg.model)
    if "unmasked_every" in left_to_preset and cfg.model.variant == "dual-stream":
        cfg.unmasked_every = 0  # the baseline: its clean pass and its reconstructions at every step
    check_fields(cfg)
    if cfg.resume and cfg.overwrite:
        raise ValueError("--resume and --overwrite exclude each other: continue the run, or start it over")
    if cfg.data != "synthetic" and not cfg.data_root:
        raise ValueError(f"--data {cfg.data} needs --data-root DIR")
    return cfg


def config_to_dict(cfg):
    """A TrainConfig as plain nested dicts (YAML / JSON)."""
    return dataclasses.asdict(cfg)


def config_from_dict(values):
    """A TrainConfig from config_to_dict's output or a part of it (missing fields: defaults).
    ValueError names unknown fields; a checkpoint's top-level `variant` (before it moved
    into the model) is read into the model."""
    values = dict(values)
    model = values.pop("model", None)
    if model is not None and not isinstance(model, dict):
        raise ValueError(f"model expects a mapping of ModelConfig fields (field: value), got {model!r} "
                         f"({type(model).__name__})")
    model = dict(model or {})
    if "variant" in values:  # config.yaml / state.json written before variant lived in ModelConfig
        model.setdefault("variant", values.pop("variant"))
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    model_fields = {f.name for f in dataclasses.fields(ModelConfig)} | set(section_flat_names())
    for name in [k for k in values if k not in known and k in model_fields]:
        model[name] = values.pop(name)  # a flat file may name model fields at top level
    model = nest_sections(model)  # a file written before the variant sections names their fields flat
    unknown = sorted(set(values) - known, key=str) + sorted(set(model) - model_fields, key=str)
    if unknown:
        raise ValueError(f"unknown config fields {unknown}")
    return TrainConfig(**values, model=model)


def is_unmasked_step(cfg, step, total_steps):
    """Whether training step `step` (0-based) of `total_steps` is an unmasked, contrastive-only
    step: the last `unmasked_tuning` share of the steps, and every `unmasked_every`-th step of
    the first `unmasked_until` share."""
    if step >= total_steps - round(cfg.unmasked_tuning * total_steps):
        return True
    early = step < round(cfg.unmasked_until * total_steps)
    return early and cfg.unmasked_every > 0 and step % cfg.unmasked_every == cfg.unmasked_every - 1


def unmasked_share(cfg):
    """The share of training steps that are unmasked (is_unmasked_step), for cost accounting."""
    every = 1 / cfg.unmasked_every if cfg.unmasked_every > 0 else 0.0
    return cfg.unmasked_tuning + min(cfg.unmasked_until, 1 - cfg.unmasked_tuning) * every
