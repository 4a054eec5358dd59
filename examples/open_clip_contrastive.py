"""An open_clip contrastive training step with mcr_kernels: `apply_to_open_clip(model)` puts
our attention in both towers and our patch dropout in the image tower, and
`mcr_kernels.ClipLoss` replaces open_clip's ClipLoss (same constructor and call).

    python examples/open_clip_contrastive.py                    # ViT-B-32, random init, CPU
    python examples/open_clip_contrastive.py --device cuda
    python examples/open_clip_contrastive.py --tiny --steps 2   # seconds, what the tests run

The images are noise and the captions fixed strings: the script shows the wiring.
"""
import argparse

import open_clip
import torch

import mcr_kernels
from mcr_kernels.integrations import apply_to_open_clip

CAPTIONS = ["a chest x-ray with no acute findings", "a left pleural effusion",
            "an enlarged cardiac silhouette", "a right upper lobe consolidation"]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cuda")
    parser.add_argument("--steps", type=int, default=5, help="optimizer steps")
    parser.add_argument("--batch-size", type=int, default=8, help="image-caption pairs per step")
    parser.add_argument("--patch-dropout", type=float, default=0.5, help="fraction of image patches dropped")
    parser.add_argument("--tiny", action="store_true", help="a 2-layer, width-64 open_clip CLIP at 32 px")
    return parser.parse_args(argv)


def build_model(args):
    if not args.tiny:
        return open_clip.create_model("ViT-B-32", pretrained=None, force_patch_dropout=args.patch_dropout), 224
    vision = open_clip.CLIPVisionCfg(layers=2, width=64, head_width=16, patch_size=8, image_size=32,
                                     patch_dropout=args.patch_dropout)
    text = open_clip.CLIPTextCfg(context_length=77, vocab_size=49408, width=64, heads=4, layers=2)
    return open_clip.CLIP(embed_dim=32, vision_cfg=vision, text_cfg=text), 32


def main(argv=None):
    args = parse_args(argv)
    model, image_size = build_model(args)
    print("patched:", apply_to_open_clip(model))  # the one line
    model.to(args.device).train()
    tokenizer = open_clip.get_tokenizer("ViT-B-32")  # ships with open_clip
    loss_fn = mcr_kernels.ClipLoss()  # was: open_clip.loss.ClipLoss()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    texts = tokenizer([CAPTIONS[i % len(CAPTIONS)] for i in range(args.batch_size)]).to(args.device)
    for step in range(args.steps):
        images = torch.randn(args.batch_size, 3, image_size, image_size, device=args.device)
        image_features, text_features, logit_scale = model(images, texts)
        loss = loss_fn(image_features, text_features, logit_scale)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        print(f"step {step} contrastive loss {loss.item():.4f}")
    return loss.item()


if __name__ == "__main__":
    main()
