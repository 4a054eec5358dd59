"""Local pretrained weights: `--image-weights PATH` and `--text-weights DIR`.

Image: a timm ViT checkpoint or an MAE checkpoint (facebookresearch/mae layout, {"model": ...}),
as .safetensors or .pth/.pt/.bin. The encoder keys (patch_embed, cls_token, pos_embed,
blocks, norm) go into model.vit; MAE decoder keys (decoder_*, mask_token) into MCR's MAE
decoder where shapes allow. Position embeddings are interpolated (bicubic, timm) when the
patch grid differs, the patch projection is resampled when the patch size differs and
summed over RGB (timm's adapt_input_conv) when in_chans differs.

Text: a local Hugging Face BERT directory (config.json + model.safetensors or
pytorch_model.bin, e.g. BioClinicalBERT); `bert.*` keys go into model.bert and a `cls.*`
MLM head, when present, into model.mlm_head. Nothing is downloaded.

The shape comes from the weights before any model is built: `text_shape` reads BERT's width,
depth, heads, feed-forward width and vocabulary from config.json (transformers' BertConfig;
another model_type is refused), `image_shape` the ViT's width, depth and patch size from the
tensors (heads are not in them: `vit_heads_for`); mcr.cli fills the flags the user left out.

Loading never unpickles arbitrary objects (safetensors, or torch.load(weights_only=True)),
and every mismatch is a ValueError that names the keys (and the flags to change).
"""
import glob
import json
import os

import torch
from safetensors import safe_open
from safetensors.torch import load_file

IMAGE_ENCODER_PREFIXES = ("patch_embed.", "cls_token", "pos_embed", "blocks.", "norm.")
MAE_DECODER_PREFIXES = ("decoder_embed.", "decoder_blocks.", "decoder_norm.", "decoder_pred.", "decoder_pos_embed",
                        "mask_token")
IGNORED_PREFIXES = ("head.", "fc_norm.", "head_drop", "pooler.", "bert.pooler.", "position_ids",
                    "embeddings.position_ids", "bert.embeddings.position_ids")
WRAPPER_KEYS = ("model", "state_dict", "model_state", "module")
KEY_PREFIXES = ("module.", "model.", "vit.", "encoder.", "visual.")


def read_state_dict(path, shapes_only=False):
    """{name: tensor} of a .safetensors or weights-only torch file (wrappers unwrapped).
    shapes_only: a .safetensors file's tensors as meta tensors of their shapes, read from its
    header alone (what the shape checks need; a torch file is still read whole)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"weights file {path!r} does not exist")
    if path.endswith(".safetensors"):
        try:
            if shapes_only:
                with safe_open(path, framework="pt") as f:
                    state = {k: torch.empty(f.get_slice(k).get_shape(), device="meta") for k in f.keys()}
            else:
                state = load_file(path)
        except Exception as err:  # safetensors raises its own SafetensorError for a damaged file
            raise ValueError(f"{path!r} is not a readable .safetensors file ({_one_line(err)})") from None
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception:  # torch raises UnpicklingError and friends for non-tensor objects
            raise ValueError(f"{path!r} is not a weights-only checkpoint (it pickles other objects, or is "
                             f"damaged); save just its state dict, or convert it to .safetensors") from None
    for key in WRAPPER_KEYS:
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path!r} does not hold a state dict of tensors")
    return state


def _one_line(err):
    """The first line of an exception's message (libraries' messages run over several)."""
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


def _strip(key):
    for prefix in KEY_PREFIXES:
        if key.startswith(prefix):
            return key[len(prefix):]
    return key


def _grid(n):
    g = int(round(n ** 0.5))
    return g if g * g == n else None


def resize_pos_embed(pos, target_tokens, num_prefix):
    """[1, P + G*G, D] (P = 0 or 1) -> [1, num_prefix + g*g, D] with the grid resampled
    bicubically (timm's resample_abs_pos_embed); a missing class-token slot is zero."""
    from timm.layers import resample_abs_pos_embed

    src_prefix = 0 if _grid(pos.shape[1]) else 1
    src_grid, dst_grid = _grid(pos.shape[1] - src_prefix), _grid(target_tokens - num_prefix)
    if src_grid is None or dst_grid is None:
        raise ValueError(f"pos_embed with {pos.shape[1]} tokens is not a square grid (+ class token)")
    if src_grid != dst_grid:
        pos = resample_abs_pos_embed(pos.float(), [dst_grid, dst_grid], [src_grid, src_grid],
                                     num_prefix_tokens=src_prefix)
    if src_prefix < num_prefix:
        pos = torch.cat([pos.new_zeros(1, num_prefix - src_prefix, pos.shape[2]), pos], dim=1)
    elif src_prefix > num_prefix:
        pos = pos[:, src_prefix - num_prefix:]
    return pos


def adapt_patch_embed(weight, in_chans, patch_size):
    """Conv weight [D, C, p, p] -> [D, in_chans, patch_size, patch_size]."""
    from timm.layers import resample_patch_embed
    from timm.models import adapt_input_conv

    if weight.shape[-1] != patch_size or weight.shape[-2] != patch_size:
        weight = resample_patch_embed(weight.float(), [patch_size, patch_size])
    if weight.shape[1] != in_chans:
        weight = adapt_input_conv(in_chans, weight)
    return weight


def _check_shapes(state, target, what, hint=""):
    bad = [f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(target[k].shape)}"
           for k, v in state.items() if k in target and v.shape != target[k].shape]
    if bad:
        raise ValueError(f"{what} do not fit the model: {'; '.join(bad)}{hint}")


def load_image_weights(model, path):
    """Load a timm / MAE ViT checkpoint into an MCR model; returns {"loaded", "adapted",
    "skipped", "ignored"} key lists. Missing or unknown encoder keys raise ValueError."""
    state = {_strip(k): v for k, v in read_state_dict(path).items()}
    cfg = model.cfg
    encoder = {k: v for k, v in state.items() if k.startswith(IMAGE_ENCODER_PREFIXES)}
    decoder = {k: v for k, v in state.items() if k.startswith(MAE_DECODER_PREFIXES)}
    ignored = sorted(k for k in state if k.startswith(IGNORED_PREFIXES))
    unknown = sorted(set(state) - set(encoder) - set(decoder) - set(ignored))
    target = model.vit.state_dict()
    unknown += sorted(k for k in encoder if k not in target)
    missing = sorted(set(target) - set(encoder))
    if missing or unknown:
        raise ValueError(f"{path}: not a checkpoint of this ViT: missing {missing}, unexpected {unknown}")
    adapted = []
    if "pos_embed" in encoder and encoder["pos_embed"].shape != target["pos_embed"].shape:
        encoder["pos_embed"] = resize_pos_embed(encoder["pos_embed"], target["pos_embed"].shape[1], 1)
        adapted.append("pos_embed")
    w = encoder["patch_embed.proj.weight"]
    if w.shape[1:] != target["patch_embed.proj.weight"].shape[1:]:
        encoder["patch_embed.proj.weight"] = adapt_patch_embed(w, cfg.in_chans, cfg.patch_size)
        adapted.append("patch_embed.proj.weight")
    _check_shapes(encoder, target, f"image weights {path}",
                  " (match the ViT shape with --vit-width / --vit-depth / --vit-heads)")
    model.vit.load_state_dict(encoder, strict=True)

    skipped = []
    if decoder:
        if "mask_token" in decoder:
            decoder["mask_token"] = decoder["mask_token"].reshape(-1)
        own = model.state_dict()
        same_width = "decoder_pos_embed" in decoder and \
            decoder["decoder_pos_embed"].shape[2] == own["decoder_pos_embed"].shape[2]
        if same_width:
            if decoder["decoder_pos_embed"].shape != own["decoder_pos_embed"].shape:
                decoder["decoder_pos_embed"] = resize_pos_embed(decoder["decoder_pos_embed"],
                                                                own["decoder_pos_embed"].shape[1], 1)
                adapted.append("decoder_pos_embed")
        fits = {k: v for k, v in decoder.items() if k in own and v.shape == own[k].shape}
        skipped = sorted(set(decoder) - set(fits))
        model.load_state_dict(fits, strict=False)
        decoder = fits
    return {"loaded": sorted(encoder) + sorted(decoder), "adapted": adapted, "skipped": skipped, "ignored": ignored}


# HF config field -> ModelConfig field
_TEXT_FIELDS = {"hidden_size": "text_width", "num_hidden_layers": "text_depth",
                "num_attention_heads": "text_heads", "intermediate_size": "text_intermediate"}


def read_bert_config(path):
    """The transformers BertConfig of the local HF folder `path` (its config.json); ValueError
    or FileNotFoundError naming --text-weights for a missing folder or file, a config that is
    not JSON or not BERT's (model_type other than bert), or values BertConfig refuses."""
    from transformers import BertConfig

    if not os.path.isdir(path):
        raise FileNotFoundError(f"--text-weights {path!r} does not exist (or is not a folder)")
    config_path = os.path.join(path, "config.json")
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"--text-weights {path!r} has no config.json")
    try:
        with open(config_path, encoding="utf-8") as f:
            raw = json.load(f)
    except (OSError, ValueError) as err:  # ValueError: bad JSON or bytes that are not UTF-8
        raise ValueError(f"--text-weights {config_path}: not a readable JSON config ({_one_line(err)})") from None
    if not isinstance(raw, dict):
        raise ValueError(f"--text-weights {config_path}: expected a JSON object, got {type(raw).__name__}")
    if raw.get("model_type", "bert") != "bert":  # configs older than model_type are BERT's
        raise ValueError(f"--text-weights {config_path}: model_type {raw['model_type']!r}, not a BERT model "
                         f"(model_type 'bert')")
    try:
        config = BertConfig.from_pretrained(path, local_files_only=True)
    except Exception as err:  # transformers validates field types with its own exceptions
        raise ValueError(f"--text-weights {config_path}: not a usable BertConfig ({_one_line(err)})") from None
    for name in (*_TEXT_FIELDS, "vocab_size", "max_position_embeddings"):
        value = getattr(config, name, None)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"--text-weights {config_path}: {name} must be a positive integer, got {value!r}")
    return config


def _read_hf_dir(path, shapes_only=False):
    """(BertConfig, state dict) of a local HF model directory (shapes_only: see read_state_dict)."""
    config = read_bert_config(path)
    files = sorted(glob.glob(os.path.join(path, "*.safetensors"))) or \
        sorted(glob.glob(os.path.join(path, "pytorch_model*.bin")))
    if not files:
        raise FileNotFoundError(f"--text-weights {path!r} has no *.safetensors or pytorch_model*.bin")
    state = {}
    for file in files:
        state.update(read_state_dict(file, shapes_only))
    return config, state


def text_shape(path):
    """The ModelConfig fields that the BERT in HF folder `path` fixes: text_width, text_depth,
    text_heads, text_intermediate and vocab_size from its config.json, checked against its
    word embeddings; also "max_positions" (not a field: the longest --max-text-len).
    Reads the weights (never unpickling code); ValueError / FileNotFoundError otherwise."""
    try:
        config, state = _read_hf_dir(path, shapes_only=True)
    except ValueError as err:
        raise ValueError(f"--text-weights {err}" if not str(err).startswith("--") else str(err)) from None
    shape = {ours: getattr(config, hf) for hf, ours in _TEXT_FIELDS.items()}
    shape["vocab_size"] = config.vocab_size
    words = state.get("bert.embeddings.word_embeddings.weight", state.get("embeddings.word_embeddings.weight"))
    want = (config.vocab_size, config.hidden_size)
    if words is None or tuple(words.shape) != want:
        got = "no embeddings.word_embeddings.weight" if words is None else f"word embeddings {tuple(words.shape)}"
        raise ValueError(f"--text-weights {path}: {got}, but its config.json says vocab_size x hidden_size {want}")
    _check_numbered(state, "encoder.layer.", config.num_hidden_layers, f"--text-weights {path}",
                    "num_hidden_layers in its config.json")
    shape["max_positions"] = config.max_position_embeddings
    return shape


def _check_numbered(state, prefix, count, what, source):
    """ValueError unless the keys <prefix>N.* (any leading 'bert.' dropped) are numbered 0 ...
    count-1 and every N holds the same tensor names (a whole checkpoint, not a part)."""
    names = {}
    for key in state:
        key = key[len("bert."):] if key.startswith("bert.") else key
        index, _, rest = key[len(prefix):].partition(".")
        if key.startswith(prefix) and index.isdigit():
            names.setdefault(int(index), set()).add(rest)
    if sorted(names) != list(range(count)):
        raise ValueError(f"{what}: {prefix}N numbered {sorted(names)}, expected 0 ... {count - 1} ({source})")
    odd = [n for n in names if names[n] != names[0]]
    if odd:
        raise ValueError(f"{what}: {prefix}{odd[0]} holds {sorted(names[odd[0]] ^ names[0])} unlike {prefix}0")


def image_shape(path):
    """The ModelConfig fields that a timm / MAE ViT checkpoint fixes, from its tensors:
    vit_width and patch_size (patch_embed.proj.weight [D, C, p, p]) and vit_depth (the
    blocks.N keys). Heads cannot be read from tensors (see vit_heads_for). ValueError /
    FileNotFoundError naming --image-weights otherwise."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--image-weights {path!r} does not exist (or is not a file)")
    try:
        state = {_strip(k): v for k, v in read_state_dict(path, shapes_only=True).items()}
    except ValueError as err:
        raise ValueError(f"--image-weights {err}") from None
    proj = state.get("patch_embed.proj.weight")
    if proj is None or proj.ndim != 4 or proj.shape[-1] != proj.shape[-2]:
        raise ValueError(f"--image-weights {path}: not a timm or MAE ViT checkpoint (no patch_embed.proj.weight "
                         f"[width, channels, patch, patch])")
    missing = [k for k in ("cls_token", "pos_embed", "norm.weight", "norm.bias") if k not in state]
    if missing:
        raise ValueError(f"--image-weights {path}: not a whole timm or MAE ViT checkpoint: no {missing}")
    depth = len({k.split(".")[1] for k in state if k.startswith("blocks.")})
    if not depth:
        raise ValueError(f"--image-weights {path}: not a whole timm or MAE ViT checkpoint: no blocks.N")
    _check_numbered(state, "blocks.", depth, f"--image-weights {path}", "the blocks it holds")
    return {"vit_width": int(proj.shape[0]), "vit_depth": depth, "patch_size": int(proj.shape[-1])}


def vit_heads_for(width, heads):
    """ViT attention heads for pretrained weights of `width`, which tensors do not record:
    timm's convention width / 64 when width is a multiple of 64 (ViT-S/B/L: 6, 12, 16), else
    `heads` (the preset's) when it divides width; ValueError asking for --vit-heads otherwise."""
    if width % 64 == 0:
        return width // 64
    if width % heads == 0:
        return heads
    raise ValueError(f"--image-weights: width {width} is not a multiple of 64 nor of --vit-heads {heads}: "
                     f"pass the checkpoint's --vit-heads")




def load_text_weights(model, path):
    """Load a local HF BERT directory into model.bert (and model.mlm_head when the checkpoint
    has an MLM head); returns {"loaded", "ignored"} key lists."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"text weights directory {path!r} does not exist")
    config, state = _read_hf_dir(path)
    differs = [f"{hf}={getattr(config, hf)} (now --{ours.replace('_', '-')} {getattr(model.cfg, ours)})"
               for hf, ours in _TEXT_FIELDS.items() if getattr(config, hf) != getattr(model.cfg, ours)]
    if differs:
        raise ValueError(f"text weights {path} have another BERT shape: {', '.join(differs)}")
    if config.vocab_size != model.bert_config.vocab_size:
        raise ValueError(f"text weights {path} have vocab_size {config.vocab_size}, the tokenizer has "
                         f"{model.bert_config.vocab_size}: pass --tokenizer {path}")
    bert, head, ignored = {}, {}, []
    for key, value in state.items():
        name = key[len("bert."):] if key.startswith("bert.") else key
        if key.startswith("cls.predictions."):
            head[key[len("cls."):]] = value
        elif name.startswith(("embeddings.", "encoder.")) and not name.endswith("position_ids"):
            bert[name] = value
        else:
            ignored.append(key)
    target = model.bert.state_dict()
    emb = "embeddings.position_embeddings.weight"
    if emb in bert and bert[emb].shape[0] < model.cfg.max_text_len:
        raise ValueError(f"text weights {path} have {bert[emb].shape[0]} positions, the model "
                         f"{model.cfg.max_text_len}: use --max-text-len <= {bert[emb].shape[0]}")
    if emb in bert:  # rows past the checkpoint's (past --max-text-len, never used) keep their initialisation
        rows = target[emb].shape[0]
        bert[emb] = torch.cat([bert[emb][:rows], target[emb][bert[emb].shape[0]:]])
    missing, unexpected = sorted(set(target) - set(bert)), sorted(set(bert) - set(target))
    if missing or unexpected:
        raise ValueError(f"text weights {path} do not match the BERT encoder: missing {missing}, "
                         f"unexpected {unexpected}")
    _check_shapes(bert, target, f"text weights {path}")
    model.bert.load_state_dict(bert, strict=True)
    loaded = sorted("bert." + k for k in bert)
    if head:
        head.setdefault("predictions.decoder.weight", bert["embeddings.word_embeddings.weight"])
        head.setdefault("predictions.decoder.bias", head.get("predictions.bias"))
        own = model.mlm_head.state_dict()
        head = {k: v for k, v in head.items() if k in own and v is not None}
        _check_shapes(head, own, f"MLM head of {path}")
        model.mlm_head.load_state_dict(head, strict=False)
        loaded += sorted("mlm_head." + k for k in head)
    return {"loaded": loaded, "ignored": sorted(ignored)}


def load_pretrained(model, image_weights="", text_weights=""):
    """The training hook: load whichever of the two is given and print what happened."""
    if image_weights:
        info = load_image_weights(model, image_weights)
        print(f"image weights {image_weights}: {len(info['loaded'])} tensors loaded"
              + (f", adapted {info['adapted']}" if info["adapted"] else "")
              + (f", skipped (shape) {info['skipped']}" if info["skipped"] else "")
              + (f", ignored {info['ignored']}" if info["ignored"] else ""))
    if text_weights:
        info = load_text_weights(model, text_weights)
        print(f"text weights {text_weights}: {len(info['loaded'])} tensors loaded"
              + (f", ignored {info['ignored']}" if info["ignored"] else ""))
