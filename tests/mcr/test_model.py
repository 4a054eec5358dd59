"""The MCR model: shapes, gradients and loss behaviour for every variant."""
import math

import pytest
import torch
import torch.nn.functional as F

from mcr.engine import build_optimizer
from mcr.masking import mask_report_tokens
from mcr.models import build_model
from mcr.models.mcr import MCR, sincos_position_embedding


@pytest.mark.parametrize("variant", ["mcr", "dual-stream", "abm"])
def test_forward_backward_every_variant(tiny_config, variant, token_ids, make_batch, draw):
    cfg = tiny_config(variant=variant)
    model = build_model(cfg, pad_token_id=token_ids.pad, mask_token_id=token_ids.mask)
    losses = model(make_batch(cfg), draw(cfg, 4))
    assert set(losses) == {"contrastive", "mim", "mrm"}
    for value in losses.values():
        assert value.dim() == 0 and torch.isfinite(value)
    sum(losses.values()).backward()
    for name in ["vit.blocks.0.attn.qkv.weight", "bert.encoder.layer.0.attention.self.query.weight",
                 "decoder_blocks.0.attn.qkv.weight", "mask_token", "image_head.fc1.weight",
                 "text_head.fc2.weight", "logit_scale", "mlm_head.predictions.transform.dense.weight"]:
        grad = dict(model.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name


def plain_reconstruction(model, batch, masks):
    """MIM loss and MRM decoder states as MAE and BERT compute them: every patch predicted,
    then the masked mean over the dropped ones; the MRM blocks on each report alone (its
    non-padding tokens, no packing), then the masked positions' rows ([M, text_width])."""
    imgs, attn = batch["image"], batch["attention_mask"]
    latent = model.encode_image(imgs, masks.ids_keep)
    mask = masks.patch_mask(imgs.dtype)
    pred = model.reconstruct_image(latent, masks.ids_restore)
    mim = (((pred - model.patchify(imgs)) ** 2).mean(-1) * mask).sum() / mask.sum()
    masked_ids, labels = model.mask_text(batch["input_ids"], attn, batch["special_tokens_mask"], masks)
    states, packing = model.encode_text(masked_ids, attn)
    x = model.condition_report(states, packing, latent)
    chosen = labels != -100
    rows = []
    for b, (start, end) in enumerate(zip(packing.cu_seqlens[:-1].tolist(), packing.cu_seqlens[1:].tolist())):
        h = x[start:end].unsqueeze(0)
        for blk in model.mrm_blocks:
            h = blk(h)
        rows.append(h[0][chosen[b, :end - start]])
    return mim, torch.cat(rows), (states, packing, latent, chosen)


@pytest.mark.parametrize("depths", [(1, 1), (2, 2), (3, 0)])
def test_reconstruction_on_the_loss_rows_equals_the_full_prediction(tiny_config, depths, token_ids, make_batch, draw):
    """The last decoder blocks compute only the dropped patches and the masked report tokens:
    the MIM loss, the MRM states the MLM head reads and every gradient equal those of the full
    prediction (float64)."""
    cfg = tiny_config(image_size=48, decoder_depth=depths[0], mrm_decoder_depth=depths[1], image_mask_ratio=0.6)
    model = MCR(cfg, pad_token_id=token_ids.pad, mask_token_id=token_ids.mask).double()
    batch = make_batch(cfg, B=5, L=13, seed=3)  # lengths 13, 10, 5, 12, 13
    batch["image"] = batch["image"].double()
    masks = draw(cfg, 5, seed=2)  # 9 patches, 4 kept
    params = [p for p in model.parameters() if p.requires_grad]
    want_mim, want_hidden, (states, packing, latent, chosen) = plain_reconstruction(model, batch, masks)
    assert 0 < chosen.sum() < (batch["attention_mask"] > 0).sum()
    dropped = masks.ids_dropped
    got_mim = model.mim_loss(batch["image"], model.reconstruct_image(latent, masks.ids_restore, dropped), dropped)
    got_hidden = model.mrm_hidden(states, packing, latent, chosen)
    torch.testing.assert_close(got_mim, want_mim, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(got_hidden, want_hidden, atol=1e-12, rtol=1e-10)
    g = torch.randn_like(want_hidden)
    for got, want in ((got_mim, want_mim), ((got_hidden * g).sum(), (want_hidden * g).sum())):
        got_grads = torch.autograd.grad(got, params, allow_unused=True, retain_graph=True)
        want_grads = torch.autograd.grad(want, params, allow_unused=True, retain_graph=True)
        for p, a, b in zip(params, got_grads, want_grads, strict=True):
            if b is None:
                assert a is None or a.abs().max() == 0
            else:
                torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-9, msg=f"{tuple(p.shape)}")
    losses = model(batch, masks)  # the training step's losses are these
    torch.testing.assert_close(losses["mim"], want_mim, atol=1e-12, rtol=1e-10)
    labels = model.mask_text(batch["input_ids"], batch["attention_mask"], batch["special_tokens_mask"], masks)[1]
    want_mrm = F.cross_entropy(model.mlm_head(want_hidden).flatten(0, -2), labels[chosen])
    torch.testing.assert_close(losses["mrm"].double(), want_mrm, atol=0, rtol=1e-6)  # linear_cross_entropy: fp32


def test_encoder_sees_only_kept_patches(tiny_config, token_ids, make_batch, draw):
    seen = []
    for variant, want in (("mcr", [5]), ("dual-stream", [5, 17])):  # dual-stream: then the unmasked pass
        cfg = tiny_config(variant=variant, image_size=64, image_mask_ratio=0.75)  # 16 patches, keep 4 + token_ids.cls
        model = build_model(cfg, pad_token_id=token_ids.pad, mask_token_id=token_ids.mask)
        model.vit.blocks[0].register_forward_hook(lambda m, i, o: seen.append(o.shape[1]))
        model(make_batch(cfg), draw(cfg, 4))
        assert seen == want, variant
        seen.clear()


def test_each_loss_reacts_to_its_inputs(tiny_config, token_ids, make_batch, draw):
    cfg = tiny_config()
    model = MCR(cfg, pad_token_id=token_ids.pad, mask_token_id=token_ids.mask).eval()
    batch = make_batch(cfg)

    def run(b, seed=1):
        return {k: v.item() for k, v in model(b, draw(cfg, 4, seed)).items()}

    base = run(batch)
    assert run(batch) == base  # same randomness, same losses
    brighter = dict(batch, image=batch["image"] + 3.0)
    assert run(brighter)["mim"] != pytest.approx(base["mim"])
    swapped = dict(batch, image=batch["image"].flip(0))
    assert run(swapped)["contrastive"] != pytest.approx(base["contrastive"])
    other_text = dict(batch, input_ids=torch.where(batch["special_tokens_mask"].bool(), batch["input_ids"],
                                                   (batch["input_ids"] + 7) % cfg.vocab_size).clamp(min=5))
    assert run(other_text)["mrm"] != pytest.approx(base["mrm"])


def test_mask_report_tokens_masks_a_quarter_of_ordinary_tokens(token_ids):
    B, L = 3, 40
    ids = torch.randint(5, 100, (B, L))
    attn = torch.ones(B, L, dtype=torch.long)
    attn[1, 20:] = 0
    special = torch.zeros(B, L, dtype=torch.long)
    special[:, 0] = 1
    masked, labels = mask_report_tokens(ids, attn, special, 0.25, token_ids.mask, 100)
    chosen = labels != -100
    assert chosen.sum(1).tolist() == [round(39 * 0.25), round(19 * 0.25), round(39 * 0.25)]
    assert not (chosen & (special.bool() | ~attn.bool())).any()
    assert (masked[chosen] == token_ids.mask).all() and (masked[~chosen] == ids[~chosen]).all()
    assert (labels[chosen] == ids[chosen]).all()


def test_short_training_lowers_the_loss(tiny_config, token_ids, make_batch, draw):
    cfg = tiny_config()
    model = MCR(cfg, pad_token_id=token_ids.pad, mask_token_id=token_ids.mask)
    batch = make_batch(cfg, B=8, seed=3)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    totals = []
    for step in range(40):
        losses = model(batch, draw(cfg, 8, step))
        total = 0.1 * losses["contrastive"] + losses["mim"] + losses["mrm"]
        opt.zero_grad()
        total.backward()
        opt.step()
        totals.append(total.item())
    assert sum(totals[-5:]) / 5 < 0.7 * sum(totals[:5]) / 5


def test_text_pooling_without_mask_positions(tiny_config, token_ids, make_batch, draw):
    """pool_text_masked=False pools only the report tokens that were not masked."""
    from mcr_kernels import reference

    cfg = tiny_config(pool_text_masked=False)
    model = MCR(cfg, pad_token_id=token_ids.pad, mask_token_id=token_ids.mask)
    batch = make_batch(cfg)
    masks = draw(cfg, 4, seed=3)
    masked_ids, _ = mask_report_tokens(batch["input_ids"], batch["attention_mask"], batch["special_tokens_mask"],
                                       cfg.text_mask_ratio, token_ids.mask, cfg.vocab_size, noise=masks.text_noise)
    keep = batch["attention_mask"].bool() & (masked_ids != token_ids.mask)
    latent = model.encode_image(batch["image"], masks.ids_keep)
    txt = model.embed_reports(masked_ids, batch["attention_mask"])
    head = model.text_head
    text_emb = torch.stack([head(txt[b][keep[b]]).mean(0) for b in range(4)])
    image_emb = model.image_head(latent[:, 1:]).mean(1)
    expected = reference.infonce_loss(image_emb, text_emb, model.logit_scale.exp())
    torch.testing.assert_close(model(batch, masks)["contrastive"], expected, rtol=1e-5, atol=1e-5)
    cfg_all = tiny_config()
    model.cfg = cfg_all
    assert not torch.allclose(model(batch, masks)["contrastive"], expected)


def test_image_pooling_with_cls(tiny_config, token_ids, make_batch):
    cfg = tiny_config(pool_image_cls=True)
    model = MCR(cfg, pad_token_id=token_ids.pad, mask_token_id=token_ids.mask)
    batch = make_batch(cfg)
    img, _ = model.embed(batch["image"], batch["input_ids"], batch["attention_mask"])
    latent = model.encode_image(batch["image"])
    expected = torch.nn.functional.normalize(model.image_head(latent).mean(1), dim=-1)
    torch.testing.assert_close(img, expected, rtol=1e-5, atol=1e-5)


def test_sincos_position_embedding_matches_its_formula():
    """Every entry against the formula written out per element (float64), grid 3, width 8."""
    grid, dim = 3, 8
    table = sincos_position_embedding(grid, dim)
    assert table.shape == (1, 1 + grid * grid, dim) and table.dtype == torch.float32
    assert (table[0, 0] == 0).all()
    quarter = dim // 4
    for patch in range(grid * grid):
        row, col = divmod(patch, grid)
        expected = []
        for coordinate in (row, col):
            angles = [coordinate / 10000 ** (k / quarter) for k in range(quarter)]
            expected += [math.sin(a) for a in angles] + [math.cos(a) for a in angles]
        torch.testing.assert_close(table[0, 1 + patch].double(), torch.tensor(expected, dtype=torch.float64),
                                   rtol=0, atol=1e-6)
    assert torch.cdist(table[0, 1:], table[0, 1:]).add(torch.eye(grid * grid)).min() > 0.1  # all distinct
    with pytest.raises(ValueError, match="divisible by 4"):
        sincos_position_embedding(grid, 6)


def test_sincos_position_embeddings_stay_fixed(tiny_config, token_ids, make_batch, draw):
    """--pos-embed sincos: the encoder's and decoder's tables are the formula's, leave the
    optimizer and do not move in training, while the learned default does move."""
    for kind in ("sincos", "learned"):
        cfg = tiny_config(pos_embed=kind)
        model = MCR(cfg, pad_token_id=token_ids.pad, mask_token_id=token_ids.mask)
        tables = (model.vit.pos_embed, model.decoder_pos_embed)
        before = [t.detach().clone() for t in tables]
        opt = build_optimizer(model, type("Recipe", (), {"weight_decay": 0.05, "lr": 1e-2})())
        optimized = {id(p) for group in opt.param_groups for p in group["params"]}
        sum(model(make_batch(cfg), draw(cfg, 4)).values()).backward()
        opt.step()
        for table, old in zip(tables, before):
            if kind == "sincos":
                grid = cfg.image_size // cfg.patch_size
                torch.testing.assert_close(old, sincos_position_embedding(grid, table.shape[-1]))
                assert id(table) not in optimized and table.grad is None and torch.equal(table, old)
            else:
                assert id(table) in optimized and not torch.equal(table, old)


def test_sincos_needs_widths_divisible_by_4(tiny_config):
    with pytest.raises(ValueError, match="--pos-embed sincos needs --decoder-width"):
        tiny_config(pos_embed="sincos", decoder_width=30, decoder_heads=2)


def test_embed_on_masked_views(tiny_config, token_ids, make_batch):
    cfg = tiny_config()
    model = MCR(cfg, pad_token_id=token_ids.pad, mask_token_id=token_ids.mask).eval()
    batch = make_batch(cfg)
    args = batch["image"], batch["input_ids"], batch["attention_mask"], batch["special_tokens_mask"]
    plain = model.embed(*args)
    model.cfg = tiny_config(embed_masks=3)
    three, again = model.embed(*args), model.embed(*args)
    torch.testing.assert_close(three, again)  # masks from a fixed generator
    assert not torch.allclose(three[0], plain[0], atol=1e-3)
    torch.testing.assert_close(three[0].norm(dim=-1), torch.ones(4))
    model.cfg = tiny_config(embed_masks=1)
    assert not torch.allclose(model.embed(*args)[0], three[0], atol=1e-4)
    with pytest.raises(ValueError, match="special_tokens_mask"):
        model.embed(*args[:3])


def test_unmasked_step_encodes_everything_and_trains_alignment_only(tiny_config, token_ids, make_batch):
    cfg = tiny_config(image_size=64)
    model = MCR(cfg, pad_token_id=token_ids.pad, mask_token_id=token_ids.mask)
    seen = []
    model.vit.blocks[0].register_forward_hook(lambda m, i, o: seen.append(o.shape[1]))
    losses = model(make_batch(cfg), unmasked=True)
    assert seen == [17] and losses["mim"] == 0 and losses["mrm"] == 0 and losses["contrastive"] > 0
    sum(losses.values()).backward()
    params = dict(model.named_parameters())
    assert params["vit.blocks.0.attn.qkv.weight"].grad.abs().sum() > 0
    assert params["bert.encoder.layer.0.attention.self.query.weight"].grad.abs().sum() > 0
    assert params["decoder_blocks.0.attn.qkv.weight"].grad is None


def test_unmasked_step_schedule():
    from mcr.config import TrainConfig, is_unmasked_step, unmasked_share

    cfg = TrainConfig(unmasked_tuning=0.1, unmasked_every=0)
    assert [s for s in range(100) if is_unmasked_step(cfg, s, 100)] == list(range(90, 100))
    cfg = TrainConfig(unmasked_every=4)
    assert [s for s in range(12) if is_unmasked_step(cfg, s, 12)] == [3, 7, 11]
    cfg = TrainConfig(unmasked_tuning=0.2, unmasked_every=5)
    counted = sum(is_unmasked_step(cfg, s, 1000) for s in range(1000)) / 1000
    assert counted == pytest.approx(unmasked_share(cfg), abs=1e-3)
    cfg = TrainConfig(unmasked_every=2, unmasked_until=0.5)  # the take-off only: steps 1, 3, ..., 49 of 100
    assert [s for s in range(100) if is_unmasked_step(cfg, s, 100)] == list(range(1, 50, 2))
    assert unmasked_share(cfg) == pytest.approx(0.25)
    cfg = TrainConfig(unmasked_tuning=0.1, unmasked_every=3, unmasked_until=0.6)
    counted = sum(is_unmasked_step(cfg, s, 3000) for s in range(3000)) / 3000
    assert counted == pytest.approx(unmasked_share(cfg), abs=1e-3)
    assert not any(is_unmasked_step(TrainConfig(preset="paper"), s, 50) for s in range(50))  # the paper's recipe
    assert sum(is_unmasked_step(TrainConfig(), s, 52) for s in range(52)) == 13  # small: every 4th step


def test_loss_window_averages_reconstruction_over_masked_steps_only():
    from mcr.engine import LossWindow

    window = LossWindow()
    t = torch.tensor
    window.add({"mim": t(1.0), "mrm": t(3.0), "contrastive": t(2.0)}, t(6.0), unmasked=False)
    window.add({"mim": t(0.0), "mrm": t(0.0), "contrastive": t(4.0)}, t(4.0), unmasked=True)
    window.add({"mim": t(3.0), "mrm": t(5.0), "contrastive": t(0.0)}, t(8.0), unmasked=False)
    names, means = window.means()
    assert dict(zip(names, means.tolist())) == {"mim": 2.0, "mrm": 4.0, "contrastive": 2.0, "loss": 6.0}
    window.add({"mim": t(0.0), "mrm": t(0.0), "contrastive": t(1.0)}, t(1.0), unmasked=True)
    names, means = window.means()
    assert names == ["contrastive", "loss"] and means.tolist() == [1.0, 1.0]
