"""The MCR model: shapes, gradients and loss behaviour for every variant."""
import pytest
import torch

from mcr.models.mcr import MCR, mask_report_tokens

PAD, CLS, SEP, MASK = 0, 2, 3, 4


def make_batch(cfg, B=4, L=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([L, L - 3, 5, L - 1][:B] + [L] * max(0, B - 4))
    ids = torch.randint(5, cfg.vocab_size, (B, L), generator=g)
    positions = torch.arange(L)
    attn = (positions < lengths[:, None]).long()
    ids[:, 0] = CLS
    ids[torch.arange(B), lengths - 1] = SEP
    ids = ids.masked_fill(attn == 0, PAD)
    special = ((ids == CLS) | (ids == SEP) | (ids == PAD)).long()
    return {"image": torch.randn(B, cfg.in_chans, cfg.image_size, cfg.image_size, generator=g),
            "input_ids": ids, "attention_mask": attn, "special_tokens_mask": special}


@pytest.mark.parametrize("variant", ["mcr", "dual-stream", "abm"])
def test_forward_backward_every_variant(tiny_config, variant):
    cfg = tiny_config(variant=variant)
    model = MCR(cfg, pad_token_id=PAD, mask_token_id=MASK)
    losses = model(make_batch(cfg))
    assert set(losses) == {"contrastive", "mim", "mrm"}
    for value in losses.values():
        assert value.dim() == 0 and torch.isfinite(value)
    sum(losses.values()).backward()
    for name in ["vit.blocks.0.attn.qkv.weight", "bert.encoder.layer.0.attention.self.query.weight",
                 "decoder_blocks.0.attn.qkv.weight", "mask_token", "image_head.fc1.weight",
                 "text_head.fc2.weight", "logit_scale", "mlm_head.predictions.transform.dense.weight"]:
        grad = dict(model.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name


def test_encoder_sees_only_kept_patches(tiny_config):
    cfg = tiny_config(image_size=64, image_mask_ratio=0.75)  # 16 patches, keep 4 + CLS
    model = MCR(cfg, pad_token_id=PAD, mask_token_id=MASK)
    seen = []
    model.vit.blocks[0].register_forward_hook(lambda m, i, o: seen.append(o.shape[1]))
    model(make_batch(cfg))
    assert seen == [5]
    seen.clear()
    model.cfg.variant = "dual-stream"
    model(make_batch(cfg))
    assert seen == [5, 17]  # masked pass, then the unmasked pass for alignment


def test_each_loss_reacts_to_its_inputs(tiny_config):
    cfg = tiny_config()
    model = MCR(cfg, pad_token_id=PAD, mask_token_id=MASK).eval()
    batch = make_batch(cfg)

    def run(b, seed=1):
        torch.manual_seed(seed)
        return {k: v.item() for k, v in model(b).items()}

    base = run(batch)
    assert run(batch) == base  # same randomness, same losses
    brighter = dict(batch, image=batch["image"] + 3.0)
    assert run(brighter)["mim"] != pytest.approx(base["mim"])
    swapped = dict(batch, image=batch["image"].flip(0))
    assert run(swapped)["contrastive"] != pytest.approx(base["contrastive"])
    other_text = dict(batch, input_ids=torch.where(batch["special_tokens_mask"].bool(), batch["input_ids"],
                                                   (batch["input_ids"] + 7) % cfg.vocab_size).clamp(min=5))
    assert run(other_text)["mrm"] != pytest.approx(base["mrm"])


def test_mask_report_tokens_masks_a_quarter_of_ordinary_tokens():
    B, L = 3, 40
    ids = torch.randint(5, 100, (B, L))
    attn = torch.ones(B, L, dtype=torch.long)
    attn[1, 20:] = 0
    special = torch.zeros(B, L, dtype=torch.long)
    special[:, 0] = 1
    masked, labels = mask_report_tokens(ids, attn, special, 0.25, MASK, 100)
    chosen = labels != -100
    assert chosen.sum(1).tolist() == [round(39 * 0.25), round(19 * 0.25), round(39 * 0.25)]
    assert not (chosen & (special.bool() | ~attn.bool())).any()
    assert (masked[chosen] == MASK).all() and (masked[~chosen] == ids[~chosen]).all()
    assert (labels[chosen] == ids[chosen]).all()


def test_short_training_lowers_the_loss(tiny_config):
    cfg = tiny_config()
    model = MCR(cfg, pad_token_id=PAD, mask_token_id=MASK)
    batch = make_batch(cfg, B=8, seed=3)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    totals = []
    for step in range(40):
        torch.manual_seed(step)
        losses = model(batch)
        total = 0.1 * losses["contrastive"] + losses["mim"] + losses["mrm"]
        opt.zero_grad()
        total.backward()
        opt.step()
        totals.append(total.item())
    assert sum(totals[-5:]) / 5 < 0.7 * sum(totals[:5]) / 5
