"""Export a trained run's encoders in the formats the next step reads, without mcr:

    python -m mcr.export --checkpoint runs/default --out exported/

    exported/text_encoder/     Hugging Face BERT and its tokenizer:
                               BertModel.from_pretrained(...), AutoTokenizer.from_pretrained(...)
    exported/image_encoder/    timm ViT: model.safetensors and timm's config.json
                               (timm.create_model("local-dir:exported/image_encoder", pretrained=True)),
                               vision_transformer_args.json (VisionTransformer(**args), then load_state_dict)
    exported/heads.safetensors the MbA heads (image_head.*, text_head.*) and logit_scale
    exported/heads.json        how to use them: widths, activation, pooling, image preprocessing
    exported/README.md         model card: data, steps, time, retrieval and downstream figures with chance

The encoders are rebuilt from the run's ModelConfig (stock timm VisionTransformer, stock
BertModel without pooler), their weights loaded strictly from the model's `vit` and `bert`
state dicts, and saved with timm's and transformers' own save functions.
"""
import json
import os
import shutil
import sys
import tempfile

import yaml
from safetensors.torch import save_file

from mcr import cli, run
from mcr.data.batching import IMAGE_MEAN, IMAGE_STD
from mcr.models.mcr import bert_config

IMAGE_ARCHITECTURE = "vit_base_patch16_224"  # a timm name whose arguments the export's model_args replace


def vision_transformer_args(model_cfg):
    """The timm VisionTransformer arguments of the model's image encoder."""
    return {"img_size": model_cfg.image_size, "patch_size": model_cfg.patch_size, "in_chans": model_cfg.in_chans,
            "embed_dim": model_cfg.vit_width, "depth": model_cfg.vit_depth, "num_heads": model_cfg.vit_heads,
            "num_classes": 0, "global_pool": "token", "class_token": True}


def heads_description(model_cfg, model):
    """heads.json: what the heads are and how retrieval embeddings are computed from them."""
    def head(prefix, width):
        fc2 = getattr(model, prefix).fc2
        return {"in_features": width, "hidden_features": None if fc2 is None else fc2.in_features,
                "out_features": model_cfg.embed_dim, "activation": getattr(model, prefix).activation,
                "weights": [f"{prefix}.fc1.weight", f"{prefix}.fc1.bias"]
                + ([] if fc2 is None else [f"{prefix}.fc2.weight", f"{prefix}.fc2.bias"])}

    abm = model_cfg.variant == "abm"
    return {
        "variant": model_cfg.variant,
        "image_head": head("image_head", model_cfg.vit_width),
        "text_head": head("text_head", model_cfg.text_width),
        "head": "fc2(activation(fc1(x))) (fc1(x) without fc2); activation gelu = torch's exact erf GELU",
        "pooling": ("AbM: mean of the tokens, then the head" if abm else
                    "MbA: the head on every token, then the mean over the tokens"),
        "image_tokens": ("CLS and patch tokens" if model_cfg.pool_image_cls else "patch tokens (CLS left out)")
        + " of the ViT's final norm (forward_features)",
        "text_tokens": "BERT last_hidden_state at every position where attention_mask is 1 ([CLS] and [SEP] too)",
        "embedding": "L2-normalized; similarity = cosine; logit = exp(logit_scale) (at most 100) * cosine",
        "image_preprocessing": {"grayscale": True, "scale": "pixel / 255", "mean": IMAGE_MEAN, "std": IMAGE_STD,
                                "size": model_cfg.image_size, "channels": model_cfg.in_chans,
                                "note": "the grey channel is repeated when channels > 1"},
        "max_text_len": model_cfg.max_text_len,
    }


def export_image_encoder(model, model_cfg, folder):
    """Stock timm ViT with the model's `vit` weights, saved by timm's save_for_hf."""
    import timm
    from timm.models import save_for_hf

    args = vision_transformer_args(model_cfg)
    vit = timm.create_model(IMAGE_ARCHITECTURE, pretrained=False, **args)
    vit.load_state_dict(model.vit.state_dict(), strict=True)
    pretrained = {"tag": "mcr", "mean": [IMAGE_MEAN] * model_cfg.in_chans, "std": [IMAGE_STD] * model_cfg.in_chans,
                  "crop_pct": 1.0, "interpolation": "bilinear", "license": "see README.md"}
    save_for_hf(vit, folder, model_config={"pretrained_cfg": pretrained}, safe_serialization=True)
    with open(os.path.join(folder, "vision_transformer_args.json"), "w") as f:
        json.dump(args, f, indent=1)


def export_text_encoder(model, model_cfg, tokenizer, folder):
    """Stock BertModel (no pooler) with the model's `bert` weights, and the run's tokenizer."""
    from transformers import BertModel

    bert = BertModel(bert_config(model_cfg, tokenizer.pad_token_id), add_pooling_layer=False)
    bert.load_state_dict(model.bert.state_dict(), strict=True)
    bert.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def model_card(cfg, checkpoint_path, run_dir, results):
    """README.md text: what the model was trained on, for how long, and its figures."""
    final = read_json(os.path.join(run_dir, "final.json")) or {}
    state = read_json(os.path.join(checkpoint_path, "state.json")) or {}
    data = cfg.data if cfg.data != "synthetic" else f"the embedded synthetic corpus (mcr.data.synthetic, " \
                                                   f"{cfg.train_size} training pairs, corpus seed {cfg.seed})"
    lines = ["# MCR image and report encoders", "",
             f"Pretrained with mcr (masked contrastive reconstruction), variant `{cfg.model.variant}`, preset "
             f"`{cfg.preset}`, on {data}.", "",
             f"- training: {state.get('step', final.get('step', '?'))} steps of batch {cfg.batch_size}"
             + (f", {final['minutes']:.1f} minutes" if "minutes" in final else "")
             + f", seed {cfg.seed}, loss weights contrastive {cfg.loss_contrastive} : MIM {cfg.loss_mim} : "
               f"MRM {cfg.loss_mrm}",
             f"- image encoder: ViT {cfg.model.vit_width}×{cfg.model.vit_depth} at {cfg.model.image_size} px, "
             f"patch {cfg.model.patch_size}, {cfg.model.in_chans} channel(s)",
             f"- report encoder: BERT {cfg.model.text_width}×{cfg.model.text_depth}, "
             f"vocabulary {cfg.model.vocab_size}", ""]
    if "i2t" in final:
        lines += [f"## Retrieval (validation split, {cfg.val_size} pairs, from the run's final.json)", "",
                  "| direction | R@1 % | R@5 % | R@10 % | chance R@1 % | P@5 % | chance P@K % |",
                  "|---|---|---|---|---|---|---|"]
        for direction in ("i2t", "t2i"):
            r = final[direction]
            lines.append(f"| {direction} | {r['R@1']:.2f} | {r['R@5']:.2f} | {r['R@10']:.2f} | {r['chance_R@1']:.2f} "
                         f"| {r.get('P@5', float('nan')):.2f} | {r.get('chance_P@K', float('nan')):.2f} |")
        lines.append("")
    for result in results:
        if result.get("task") == "zero-shot":
            lines += [f"## Zero-shot classification ({result['data']}, split {result['split']}, "
                      f"{result.get('images', '?')} images)", "",
                      f"Mean AUROC over classes {result['mean_auroc']:.3f} (chance {result['chance_auroc']})"
                      + (f"; 5-class accuracy {result['accuracy']:.1f}% (chance {result['chance_accuracy']:.1f}%)"
                         if "accuracy" in result else "") + ".", ""]
        elif result.get("task") == "linear-probe":
            lines += [f"## Linear probe ({result['data']}, split {result['split']}, pooling {result['pooling']})", "",
                      "| labels | training rows | draws | mean AUROC ± std over draws (chance 0.5) |",
                      "|---|---|---|---|"]
            for fraction, row in result["fractions"].items():
                lines.append(f"| {fraction} | {row['rows']} | {row['draws']} | "
                             f"{row['mean_auroc']:.3f} ± {row['mean_auroc_std']:.3f} |")
            lines.append("")
    lines += ["## Loading without mcr", "", "```python",
              "from transformers import AutoTokenizer, BertModel",
              "import timm",
              "text = BertModel.from_pretrained('text_encoder'); tokenizer = AutoTokenizer.from_pretrained("
              "'text_encoder')",
              "image = timm.create_model('local-dir:image_encoder', pretrained=True)",
              "```", "", "heads.json says how heads.safetensors maps the encoders' tokens into the joint space.", ""]
    return "\n".join(lines)


def export(checkpoint, out, results_files=(), device="cpu"):
    """Write the export of `checkpoint` (a run or checkpoint folder) to the new folder `out`."""
    model, cfg, tokenizer, device, path = run.load_trained(checkpoint, device)
    model.eval()
    results = []
    for name in results_files:
        result = read_json(name)
        if result is None:
            raise ValueError(f"--results {name}: not a readable JSON file")
        results.append(result)
    run_dir = os.path.dirname(os.path.dirname(os.path.abspath(path)))
    parent = os.path.dirname(os.path.abspath(out))
    staging = tempfile.mkdtemp(prefix=".export-", dir=parent)
    try:
        export_text_encoder(model, cfg.model, tokenizer, os.path.join(staging, "text_encoder"))
        export_image_encoder(model, cfg.model, os.path.join(staging, "image_encoder"))
        heads = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()
                 if k.startswith(("image_head.", "text_head.")) or k == "logit_scale"}
        save_file(heads, os.path.join(staging, "heads.safetensors"))
        with open(os.path.join(staging, "heads.json"), "w") as f:
            json.dump(heads_description(cfg.model, model), f, indent=1)
        with open(os.path.join(staging, "training_config.yaml"), "w") as f:
            yaml.safe_dump(checkpoint_config(path), f, sort_keys=False)
        with open(os.path.join(staging, "README.md"), "w") as f:
            f.write(model_card(cfg, path, run_dir, results))
        if os.path.isdir(out):
            os.rmdir(out)  # empty (checked): replaced by the finished export
        os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


def checkpoint_config(path):
    with open(os.path.join(path, "state.json")) as f:
        return json.load(f)["config"]


def build_parser():
    p = cli.Parser(prog="python -m mcr.export", description=__doc__, formatter_class=cli.HelpFormatter)
    p.add_argument("--checkpoint", required=True, help="checkpoint folder, or a run folder (its newest intact one)")
    p.add_argument("--out", required=True, help="folder to create (absent or empty)")
    p.add_argument("--results", nargs="*", default=[], metavar="JSON",
                   help="downstream results of mcr.evaluate --task zero-shot / linear-probe for the model card")
    return p


def main(argv=None):
    """Console entry point (mcr-export)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if os.path.exists(args.out) and (not os.path.isdir(args.out) or os.listdir(args.out)):
            raise ValueError(f"--out {args.out!r} exists and is not an empty folder (nothing is written over)")
        if not os.path.isdir(os.path.dirname(os.path.abspath(args.out))):
            raise ValueError(f"--out {args.out!r}: its parent folder does not exist")
        for name in args.results:
            if not os.path.isfile(name):
                raise ValueError(f"--results {name!r}: no such file")
        out = export(args.checkpoint, args.out, args.results)
    except (ValueError, FileNotFoundError) as err:
        cli.fail(parser.prog, err)
    print(f"wrote {out}", file=sys.stderr)
    return out


if __name__ == "__main__":
    main()
