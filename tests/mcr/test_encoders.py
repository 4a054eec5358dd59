"""The model's own blocks and encoders against the libraries whose layout they keep: their
state dicts load strictly into timm's VisionTransformer and Block and into Hugging Face's
BertModel, which then compute the same outputs and gradients (the independent reference),
and a seed gives the libraries' initial weights."""
import pytest
import torch
from timm.models.vision_transformer import Block as TimmBlock
from timm.models.vision_transformer import VisionTransformer as TimmViT
from transformers import BertModel

import mcr_kernels
from mcr.models import build_model
from mcr.models.blocks import Block
from mcr.models.encoders import ReportEncoder, VisionTransformer
from mcr.models.mcr import bert_config

# float64: the same computation up to rounding; float32: the 1e-5 an exported encoder keeps
TOLERANCES = {torch.float64: dict(atol=1e-10, rtol=1e-9), torch.float32: dict(atol=1e-5, rtol=1e-5)}


def timm_vit(cfg):
    return TimmViT(img_size=cfg.image_size, patch_size=cfg.patch_size, in_chans=cfg.in_chans, embed_dim=cfg.vit_width,
                   depth=cfg.vit_depth, num_heads=cfg.vit_heads, num_classes=0, global_pool="token", class_token=True)


def hf_bert(cfg, pad_token_id):
    return BertModel(bert_config(cfg, pad_token_id), add_pooling_layer=False)


def assert_same_grads(ours, theirs, tol):
    theirs = dict(theirs.named_parameters())
    for name, p in ours.named_parameters():
        if p.grad is None:
            assert theirs[name].grad is None or theirs[name].grad.abs().max() == 0, name
        else:
            torch.testing.assert_close(p.grad, theirs[name].grad, **tol, msg=name)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_image_encoder_is_timms_vision_transformer(tiny_config, dtype, token_ids):
    cfg = tiny_config(image_size=48, vit_depth=2)  # 3 x 3 patches: an odd count
    model = build_model(cfg, pad_token_id=token_ids.pad, mask_token_id=token_ids.mask).to(dtype)
    reference = timm_vit(cfg).to(dtype).eval()
    reference.load_state_dict(model.vit.state_dict(), strict=True)
    imgs = torch.randn(3, cfg.in_chans, 48, 48, dtype=dtype)
    ours, theirs = model.encode_image(imgs), reference.forward_features(imgs)
    torch.testing.assert_close(ours, theirs, **TOLERANCES[dtype])
    g = torch.randn_like(ours)
    (ours * g).sum().backward()
    (theirs * g).sum().backward()
    assert_same_grads(model.vit, reference, TOLERANCES[dtype])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_report_encoder_is_hf_bert_on_the_non_padding_tokens(tiny_config, dtype, token_ids, make_batch):
    cfg = tiny_config(text_depth=2)
    model = build_model(cfg, pad_token_id=token_ids.pad, mask_token_id=token_ids.mask).to(dtype)
    reference = hf_bert(cfg, token_ids.pad).to(dtype).eval()
    reference.load_state_dict(model.bert.state_dict(), strict=True)
    batch = make_batch(cfg, B=5, L=13, seed=1)
    batch["attention_mask"][2, 1:] = 0  # a report of one token
    states, packing = model.encode_text(batch["input_ids"], batch["attention_mask"])
    assert packing.cu_seqlens.tolist() == [0, 13, 23, 24, 36, 49]
    want = reference(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    keep = batch["attention_mask"].bool()
    torch.testing.assert_close(states, want[keep], **TOLERANCES[dtype])
    torch.testing.assert_close(packing.pad(states)[keep], want[keep], atol=0, rtol=0)
    assert (packing.pad(states)[~keep] == 0).all()
    g = torch.randn_like(states)
    (states * g).sum().backward()
    (want[keep] * g).sum().backward()
    assert_same_grads(model.bert, reference, TOLERANCES[dtype])


def test_block_is_timms_block_padded_packed_and_on_a_few_rows():
    """One Block against timm's Block (its state dict loaded strictly), float64: padded; packed
    sequences against each sequence alone; out_rows against the rows of the full output."""
    torch.manual_seed(0)
    block = Block(24, 3).double()
    reference = TimmBlock(24, 3, qkv_bias=True).double().eval()
    reference.load_state_dict(block.state_dict(), strict=True)
    x = torch.randn(2, 7, 24, dtype=torch.float64)
    torch.testing.assert_close(block(x), reference(x), **TOLERANCES[torch.float64])
    rows = torch.tensor([[0, 6, 3], [5, 5, 1]])
    torch.testing.assert_close(block(x, out_rows=rows), reference(x).gather(1, rows[..., None].expand(-1, -1, 24)),
                               **TOLERANCES[torch.float64])
    lengths = [7, 1, 4]
    packed = torch.randn(sum(lengths), 24, dtype=torch.float64)
    cu_seqlens = torch.tensor([0, 7, 8, 12], dtype=torch.int32)
    want = torch.cat([reference(part[None])[0] for part in packed.split(lengths)])
    torch.testing.assert_close(block(packed, varlen=(cu_seqlens, 7)), want, **TOLERANCES[torch.float64])
    packed_rows = torch.tensor([2, 7, 9, 11])  # in sequence order: 1 of the first, 1, then 2
    cu_seqlens_out = torch.tensor([0, 1, 2, 4], dtype=torch.int32)
    out = block(packed, varlen=(cu_seqlens, 7), out_rows=(packed_rows, cu_seqlens_out, 2))
    torch.testing.assert_close(out, want[packed_rows], **TOLERANCES[torch.float64])


def test_a_seed_gives_the_libraries_initial_weights(tiny_config, token_ids):
    cfg = tiny_config(vit_depth=2, text_depth=2)
    for ours, theirs in ((lambda: VisionTransformer(cfg.image_size, cfg.patch_size, cfg.in_chans, cfg.vit_width,
                                                    cfg.vit_depth, cfg.vit_heads), lambda: timm_vit(cfg)),
                         (lambda: ReportEncoder(bert_config(cfg, token_ids.pad)), lambda: hf_bert(cfg, token_ids.pad))):
        torch.manual_seed(3)
        a = ours().state_dict()
        torch.manual_seed(3)
        b = theirs().state_dict()
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), key


def test_packed_reports_are_packed_once_per_step(tiny_config, monkeypatch, token_ids, make_batch, draw):
    """A masked step packs the reports once (the report encoder) and never pads them back for
    the MRM decoder; the alignment reads them padded back."""

    cfg = tiny_config()
    model = build_model(cfg, pad_token_id=token_ids.pad, mask_token_id=token_ids.mask)
    calls = []
    unpad = mcr_kernels.unpad_input
    monkeypatch.setattr(mcr_kernels, "unpad_input", lambda *a: calls.append("unpad") or unpad(*a))
    model(make_batch(cfg), draw(cfg, 4))
    assert calls == ["unpad"]
