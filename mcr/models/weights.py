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

Loading never unpickles arbitrary objects (safetensors, or torch.load(weights_only=True)),
and every mismatch is a ValueError that names the keys (and the flags to change).
"""
import glob
import json
import os

import torch
from safetensors.torch import load_file

IMAGE_ENCODER_PREFIXES = ("patch_embed.", "cls_token", "pos_embed", "blocks.", "norm.")
MAE_DECODER_PREFIXES = ("decoder_embed.", "decoder_blocks.", "decoder_norm.", "decoder_pred.", "decoder_pos_embed",
                        "mask_token")
IGNORED_PREFIXES = ("head.", "fc_norm.", "head_drop", "pooler.", "bert.pooler.", "position_ids",
                    "embeddings.position_ids", "bert.embeddings.position_ids")
WRAPPER_KEYS = ("model", "state_dict", "model_state", "module")
KEY_PREFIXES = ("module.", "model.", "vit.", "encoder.", "visual.")


def read_state_dict(path):
    """{name: tensor} of a .safetensors or weights-only torch file (wrappers unwrapped)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"weights file {path!r} does not exist")
    if path.endswith(".safetensors"):
        state = load_file(path)
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # torch raises UnpicklingError and friends for non-tensor objects
            raise ValueError(f"{path!r} is not a weights-only checkpoint (it pickles other objects: {err}); "
                             f"save just its state dict, or convert it to .safetensors") from err
    for key in WRAPPER_KEYS:
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path!r} does not hold a state dict of tensors")
    return state


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


def _read_hf_dir(path):
    """(config dict, state dict) of a local HF model directory."""
    config_path = os.path.join(path, "config.json")
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"text weights directory {path!r} has no config.json")
    with open(config_path) as f:
        config = json.load(f)
    files = sorted(glob.glob(os.path.join(path, "*.safetensors"))) or \
        sorted(glob.glob(os.path.join(path, "pytorch_model*.bin")))
    if not files:
        raise FileNotFoundError(f"text weights directory {path!r} has no *.safetensors or pytorch_model*.bin")
    state = {}
    for file in files:
        state.update(read_state_dict(file))
    return config, state


# HF config field -> (ModelConfig field, flag)
_TEXT_FIELDS = {"hidden_size": "text_width", "num_hidden_layers": "text_depth",
                "num_attention_heads": "text_heads", "intermediate_size": "text_intermediate"}


def load_text_weights(model, path):
    """Load a local HF BERT directory into model.bert (and model.mlm_head when the checkpoint
    has an MLM head); returns {"loaded", "ignored"} key lists."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"text weights directory {path!r} does not exist")
    config, state = _read_hf_dir(path)
    differs = [f"{hf}={config.get(hf)} (now --{ours.replace('_', '-')} {getattr(model.cfg, ours)})"
               for hf, ours in _TEXT_FIELDS.items() if config.get(hf) != getattr(model.cfg, ours)]
    if differs:
        raise ValueError(f"text weights {path} have another BERT shape: {', '.join(differs)}")
    if config.get("vocab_size") != model.bert_config.vocab_size:
        raise ValueError(f"text weights {path} have vocab_size {config.get('vocab_size')}, the tokenizer has "
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
    if emb in bert and bert[emb].shape[0] < target[emb].shape[0]:
        raise ValueError(f"text weights {path} have {bert[emb].shape[0]} positions, the model "
                         f"{target[emb].shape[0]}: use --max-text-len <= {bert[emb].shape[0]}")
    if emb in bert:
        bert[emb] = bert[emb][: target[emb].shape[0]]
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
