"""MAE pretraining steps (He et al. 2022) on a timm ViT with mcr_kernels: `apply_to_timm`
for the encoder's and decoder's attention, `random_masking` (MAE's, fused) to drop 75% of
the patches, `restore_tokens` to put mask tokens back for the decoder.

    python examples/timm_mae_step.py                     # ViT-B/16 at 224, CPU
    python examples/timm_mae_step.py --device cuda
    python examples/timm_mae_step.py --tiny --steps 2    # seconds, what the tests run

The images are noise: the script shows the wiring and that the loss goes down.
"""
import argparse

import timm
import torch
from timm.models.vision_transformer import Block
from torch import nn

import mcr_kernels
from mcr_kernels.integrations import apply_to_timm


class MAE(nn.Module):
    """timm ViT encoder on the kept patches + a small decoder predicting the dropped ones."""

    def __init__(self, encoder, mask_ratio, decoder_width, decoder_depth, decoder_heads):
        super().__init__()
        self.encoder = encoder
        self.patch_size = encoder.patch_embed.patch_size[0]
        self.mask_ratio = mask_ratio
        self.decoder_embed = nn.Linear(encoder.embed_dim, decoder_width)
        self.mask_token = nn.Parameter(torch.zeros(decoder_width))
        self.decoder_pos_embed = nn.Parameter(torch.randn(1, encoder.patch_embed.num_patches, decoder_width) * 0.02)
        self.decoder_blocks = nn.Sequential(*[Block(decoder_width, decoder_heads, qkv_bias=True)
                                              for _ in range(decoder_depth)])
        self.decoder_pred = nn.Linear(decoder_width, self.patch_size ** 2 * 3)

    def patchify(self, images):
        """[B, 3, H, W] -> [B, N, p*p*3], row-major patches (MAE's target layout)."""
        p = self.patch_size
        B, C, H, W = images.shape
        x = images.reshape(B, C, H // p, p, W // p, p)
        return torch.einsum("bchpwq->bhwpqc", x).reshape(B, (H // p) * (W // p), p * p * C)

    def forward(self, images):
        enc = self.encoder
        x = enc.patch_embed(images) + enc.pos_embed[:, enc.num_prefix_tokens:]  # before the drop
        x, mask, ids_restore = mcr_kernels.random_masking(x, self.mask_ratio, num_prefix_tokens=0)
        cls = (enc.cls_token + enc.pos_embed[:, :1]).expand(x.shape[0], -1, -1)
        x = enc.norm(enc.blocks(torch.cat([cls, x], dim=1)))
        y = mcr_kernels.restore_tokens(self.decoder_embed(x[:, 1:]), ids_restore, self.mask_token)
        pred = self.decoder_pred(self.decoder_blocks(y + self.decoder_pos_embed))
        per_patch = ((pred - self.patchify(images)) ** 2).mean(-1)
        return (per_patch * mask).sum() / mask.sum()  # dropped patches only (mask 1 = dropped)

def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cuda")
    parser.add_argument("--steps", type=int, default=5, help="optimizer steps")
    parser.add_argument("--batch-size", type=int, default=8, help="images per step")
    parser.add_argument("--mask-ratio", type=float, default=0.75, help="fraction of patches dropped")
    parser.add_argument("--tiny", action="store_true", help="a 2-layer, width-64 ViT on 32 px images")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.tiny:
        encoder = timm.create_model("vit_base_patch16_224", pretrained=False, img_size=32, patch_size=8,
                                    embed_dim=64, depth=2, num_heads=4, num_classes=0)
        decoder = {"decoder_width": 32, "decoder_depth": 1, "decoder_heads": 2}
    else:
        encoder = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0)
        decoder = {"decoder_width": 512, "decoder_depth": 8, "decoder_heads": 16}
    model = MAE(encoder, args.mask_ratio, **decoder)
    print("patched:", apply_to_timm(model))  # the one line: encoder and decoder attention
    model.to(args.device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1.5e-4)
    size = encoder.patch_embed.img_size[0]
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(args.batch_size, 3, size, size, generator=generator).to(args.device)
    for step in range(args.steps):
        loss = model(images)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        print(f"step {step} reconstruction loss {loss.item():.4f}")
    return loss.item()


if __name__ == "__main__":
    main()
