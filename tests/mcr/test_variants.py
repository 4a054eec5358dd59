"""The mpma and reclf variants: losses, gradients, their modules' behaviour, the CLI."""
import pytest
import torch

import mcr_kernels
from mcr import checkpoint
from mcr.config import VARIANTS
from mcr.models import VARIANT_MODELS, AbM, DualStream, build_model
from mcr.models.mcr import MCR
from mcr.models.mpma import MPMA, CrossAttentionBlock
from mcr.models.reclf import RECLF
from mcr.train import main


def model_of(tiny_config, token_ids, variant, **kw):
    return build_model(tiny_config(variant=variant, **kw), pad_token_id=token_ids.pad, mask_token_id=token_ids.mask)


def test_every_variant_is_a_subclass_of_mcr_built_in_one_place(tiny_config, token_ids):
    assert tuple(VARIANT_MODELS) == VARIANTS
    for variant, cls in (("mcr", MCR), ("dual-stream", DualStream), ("abm", AbM), ("mpma", MPMA),
                         ("reclf", RECLF)):
        model = model_of(tiny_config, token_ids, variant)
        assert type(model) is cls and isinstance(model, MCR)
    with pytest.raises(ValueError, match="--variant"):
        build_model(tiny_config().__class__(variant="nope"))


@pytest.mark.parametrize("variant", VARIANTS)
def test_transformer_blocks_names_every_block(tiny_config, variant, token_ids):
    """FSDP's units and --compile's graphs: every attention block of the model, MPMA's fusion too."""
    from mcr.models.blocks import Block
    from mcr.models.encoders import BertLayer

    model = model_of(tiny_config, token_ids, variant, mrm_decoder_depth=2)
    blocks = model.transformer_blocks()
    every = [m for m in model.modules() if isinstance(m, (Block, BertLayer, CrossAttentionBlock))]
    assert len(blocks) == len(set(map(id, blocks))) and set(map(id, blocks)) == set(map(id, every))
    assert len(every) == 1 + 1 + 2 + 1 + (2 if variant == "mpma" else 0)


@pytest.mark.parametrize("variant,extra", [
    ("mpma", ["memory", "memory_read.kv.weight", "fusion_blocks.0.q.weight", "image_to_text.weight"]),
    ("reclf", ["irm.0.weight", "irm.2.weight"]),
    ("reclf-matchings", ["irm.0.weight", "irm.2.weight", "irm_matching.weight"]),
])
def test_forward_backward_reaches_every_new_module(tiny_config, variant, extra, make_batch, draw, token_ids):
    variant, _, reasoning_over = variant.partition("-")
    model = model_of(tiny_config, token_ids, variant, local_scale_learnable=True, **(
        dict(reasoning_over=reasoning_over) if reasoning_over else {}))
    losses = model(make_batch(model.cfg), draw(model.cfg, 4))
    assert set(losses) == {"contrastive", "mim", "mrm", "local"}
    for value in losses.values():
        assert value.dim() == 0 and torch.isfinite(value)
    sum(losses.values()).backward()
    params = dict(model.named_parameters())
    for name in ["local_alignment.log_scale", "image_head.fc1.weight", "text_head.fc2.weight", *extra]:
        assert params[name].grad is not None and params[name].grad.abs().sum() > 0, name


def test_local_loss_gradient_reaches_the_encoders_through_local_matching(tiny_config, make_batch, draw, token_ids):
    model = model_of(tiny_config, token_ids, "mpma")
    model(make_batch(model.cfg), draw(model.cfg, 4))["local"].backward()
    for name in ["vit.blocks.0.attn.qkv.weight", "bert.encoder.layer.0.attention.self.query.weight"]:
        assert dict(model.named_parameters())[name].grad.abs().sum() > 0, name


def test_local_loss_is_log_batch_for_identical_pairs(tiny_config, token_ids):
    """Every image and report the same: all scores tie, so the local loss is ln B."""
    model = model_of(tiny_config, token_ids, "mpma")
    img, txt = torch.randn(1, 5, 16).expand(6, -1, -1), torch.randn(1, 7, 16).expand(6, -1, -1)
    loss = model.local_alignment(img, txt, torch.ones(6, 7, dtype=torch.bool))
    assert loss.item() == pytest.approx(torch.log(torch.tensor(6.0)).item(), abs=1e-5)


def test_mpma_reconstruction_reads_the_image_and_the_memory(tiny_config, token_ids):
    model = model_of(tiny_config, token_ids, "mpma", memory_slots=3, memory_depth=2).eval()
    assert isinstance(model, MPMA) and len(model.fusion_blocks) == 2
    cfg = model.cfg
    text, latent = torch.randn(2, 6, cfg.text_width), torch.randn(2, 4, cfg.vit_width)
    states, packing = packed(text, torch.tensor([[1, 1, 1, 1, 0, 0], [1] * 6], dtype=torch.bool))
    base = model.condition_report(states, packing, latent)
    assert not torch.allclose(base, model.condition_report(states, packing, latent + 1.0))
    with torch.no_grad():
        model.memory.add_(1.0)
    assert not torch.allclose(base, model.condition_report(states, packing, latent))


def packed(tokens, mask):
    """(packed tokens, Packing) of tokens [B, L, D] at mask bool [B, L]."""
    from mcr.models.encoders import Packing

    x, indices, cu_seqlens, max_seqlen = mcr_kernels.unpad_input(tokens, mask)
    return x, Packing(indices, cu_seqlens, max_seqlen, *mask.shape)


def test_cross_attention_on_packed_reports_equals_the_padded_batch():
    """Each packed report attends to its own context: the rows of the padded computation
    (float64), gradients included."""
    torch.manual_seed(0)
    block = CrossAttentionBlock(16, 2).double()
    tokens, context = torch.randn(3, 5, 16, dtype=torch.float64), torch.randn(3, 4, 16, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 0, 0, 0, 0], [1, 1, 1, 0, 0]], dtype=torch.bool)
    x, packing = packed(tokens, mask)
    got = block(x, context, varlen=packing.varlen)
    want = block(tokens, context)[mask]
    torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-10)
    g = torch.randn_like(got)
    got_grads = torch.autograd.grad((got * g).sum(), list(block.parameters()))
    want_grads = torch.autograd.grad((want * g).sum(), list(block.parameters()))
    for a, b in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-9)


def test_reclf_word_weights_irm_and_srm(tiny_config, token_ids):
    model = model_of(tiny_config, token_ids, "reclf", srm_mix=0.0)
    assert isinstance(model, RECLF)
    tokens = torch.randn(3, 6, model.cfg.text_width)
    word_mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1], [0, 0, 1, 0, 0, 0]], dtype=torch.bool)
    importance = model.word_weights(tokens, word_mask)       # IRM alone
    assert (importance >= 0).all() and (importance[~word_mask] == 0).all()
    model.cfg.reclf.srm_mix = 1.0                            # SRM alone: R u with R row-stochastic
    propagated = model.word_weights(tokens, word_mask)
    assert (propagated[~word_mask] == 0).all() and propagated[2, 2] == 0  # no other word to relate to
    assert propagated[:2].sum(1).max() <= importance[:2].sum(1).max() * 3
    # a word's propagated weight is a convex mix of the other valid words' importance
    for b in range(2):
        valid = word_mask[b].nonzero().flatten()
        for k in valid:
            others = importance[b, valid[valid != k]]
            assert others.min() - 1e-6 <= propagated[b, k] <= others.max() + 1e-6


def reasoning_oracle(model, matchings, word_mask, tokens):
    """RECLF's reasoning over matchings, one (image, report) pair and one word at a time."""
    cfg, irm = model.cfg.reclf, model.irm
    scores = torch.zeros(matchings.shape[:2], dtype=matchings.dtype)
    for j in range(matchings.shape[1]):
        words = word_mask[j].nonzero().flatten().tolist()
        for i in range(matchings.shape[0]):
            s = matchings[i, j]
            mixed, weights = {}, {}
            for k in words:
                others = [other for other in words if other != k]
                related = 0.0
                if others:
                    cos = torch.stack([torch.cosine_similarity(tokens[j, k], tokens[j, other], 0) for other in others])
                    related = (torch.softmax(cos / cfg.srm_temperature, 0) * s[others]).sum()
                mixed[k] = (1 - cfg.srm_mix) * s[k] + cfg.srm_mix * related
                hidden = irm[0](tokens[j, k]) + model.irm_matching.weight[:, 0] * s[k]
                weights[k] = torch.nn.functional.softplus(irm[2](torch.nn.functional.gelu(hidden)))[0]
            total = sum(weights.values(), torch.zeros((), dtype=s.dtype))
            if total > 0:
                scores[i, j] = sum(weights[k] * mixed[k] for k in words) / total
    return scores


def test_reclf_reasoning_over_matchings_matches_a_plain_oracle(tiny_config, token_ids):
    """--reasoning-over matchings: SRM mixes each pair's matchings over related words and IRM
    weighs every matching from its word and its score; float64, gradients included, with a
    report of no word and one of one word."""
    model = model_of(tiny_config, token_ids, "reclf", reasoning_over="matchings").double()
    tokens = torch.randn(3, 6, model.cfg.text_width, dtype=torch.float64)
    word_mask = torch.tensor([[1, 1, 1, 0, 1, 0], [0, 0, 0, 0, 0, 0], [0, 0, 1, 0, 0, 0]], dtype=torch.bool)
    matchings = (torch.rand(4, 3, 6, dtype=torch.float64) * 2 - 1) * word_mask
    matchings.requires_grad_()
    features = (torch.nn.functional.normalize(tokens, dim=-1), model.irm[0](tokens))
    got = model.aggregate_matchings(matchings, word_mask, *features)
    want = reasoning_oracle(model, matchings, word_mask, tokens)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    assert (got[:, 1] == 0).all()
    params = [matchings, model.irm_matching.weight, model.irm[2].weight]
    g = torch.randn_like(got)
    for a, b in zip(torch.autograd.grad((got * g).sum(), params), torch.autograd.grad((want * g).sum(), params)):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_reclf_reasoning_over_matchings_without_srm_or_scores_is_reasoning_over_words(tiny_config, make_batch,
                                                                                       draw, token_ids):
    """With srm_mix 0 and IRM blind to the scores (irm_matching = 0), each matching's weight is
    its word's importance: the local loss equals --reasoning-over words' with the same weights."""
    words = model_of(tiny_config, token_ids, "reclf", srm_mix=0.0)
    matchings = model_of(tiny_config, token_ids, "reclf", srm_mix=0.0, reasoning_over="matchings")
    missing, unexpected = matchings.load_state_dict(words.state_dict(), strict=False)
    assert missing == ["irm_matching.weight"] and not unexpected
    torch.nn.init.zeros_(matchings.irm_matching.weight)
    batch, masks = make_batch(words.cfg), draw(words.cfg, 4)
    torch.testing.assert_close(matchings(batch, masks)["local"], words(batch, masks)["local"])
    torch.nn.init.normal_(matchings.irm_matching.weight)
    assert not torch.allclose(matchings(batch, masks)["local"], words(batch, masks)["local"])


def test_reclf_unmasked_setting_sees_every_patch(tiny_config, make_batch, token_ids):
    """RECLF's original setting (--unmasked-tuning 1): unmasked inputs, global and local losses."""
    model = model_of(tiny_config, token_ids, "reclf")
    seen = []
    model.vit.blocks[0].register_forward_hook(lambda m, i, o: seen.append(o.shape[1]))
    losses = model(make_batch(model.cfg), unmasked=True)
    assert seen == [model.vit.patch_embed.num_patches + 1]
    assert losses["mim"] == 0 and losses["mrm"] == 0 and losses["local"] > 0


@pytest.mark.parametrize("variant,flags", [("mpma", []), ("reclf", []), ("reclf", ["--unmasked-tuning", "1"]),
                                           ("reclf", ["--reasoning-over", "matchings"]),
                                           ("mpma", ["--local-attn", "words_then_regions", "--local-word-scale", "5"])])
def test_cli_trains_each_variant(tmp_path, variant, flags, run_args):
    results = main(run_args(tmp_path, "--max-steps", "2", "--eval-every", "0", "--variant", variant,
                            "--memory-slots", "4", "--loss-local", "0.5", *flags))
    assert 0 <= results["i2t"]["R@1"] <= 100
    assert checkpoint.read_state(checkpoint.latest_checkpoint(tmp_path))["variant"] == variant


def flatten_sections(config):
    """A config dict as written before the variant sections: their fields flat in `model`."""
    model = dict(config["model"])
    model.update(memory_slots=model["mpma"]["memory_slots"], memory_depth=model["mpma"]["memory_depth"],
                 **{f"local_{k}": v for k, v in model.pop("local").items()}, **model.pop("reclf"))
    del model["mpma"]
    return {**config, "model": model}


def test_run_folder_written_before_the_sections_loads_and_resumes(tmp_path, run_args):
    """config.yaml and state.json with flat variant fields: the run loads with its settings,
    and --resume continues it to the same weights as an uninterrupted run."""
    import json
    import shutil

    import yaml
    from safetensors.torch import load_file

    from mcr.run import load_trained

    full, old = tmp_path / "full", tmp_path / "old"
    flags = ["--max-steps", "4", "--save-every", "2", "--eval-every", "0", "--keep-checkpoints", "5",
             "--variant", "mpma", "--memory-slots", "3", "--local-attn-scale", "3.0"]
    main(run_args(full, *flags))
    shutil.copytree(full, old)
    shutil.rmtree(old / "checkpoints" / "step_00000004")
    (old / "checkpoints" / "latest").write_text("step_00000002\n")
    config_path, state_path = old / "config.yaml", old / "checkpoints" / "step_00000002" / "state.json"
    config_path.write_text(yaml.safe_dump(flatten_sections(yaml.safe_load(config_path.read_text()))))
    state = json.loads(state_path.read_text())
    state_path.write_text(json.dumps({**state, "config": flatten_sections(state["config"])}))
    assert "memory_slots: 3" in config_path.read_text()
    model, cfg, *_ = load_trained(str(old))
    assert (cfg.model.mpma.memory_slots, cfg.model.local.attn_scale) == (3, 3.0) and model.memory.shape[0] == 3
    main(["--config", str(config_path), "--out-dir", str(old), "--resume", "--max-steps", "4", "--no-pictures"])
    a = load_file(full / "checkpoints" / "step_00000004" / "model.safetensors")
    b = load_file(old / "checkpoints" / "step_00000004" / "model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)


@pytest.mark.parametrize("variant", ["mpma", "reclf"])
def test_local_words_leave_out_the_mask_positions_on_request(tiny_config, variant, make_batch, draw, token_ids):
    """--no-local-match-masked: the local loss matches only the positions whose token is seen;
    by default the [MASK] positions are words too."""
    seen = {}
    for match_masked in (True, False):
        model = model_of(tiny_config, token_ids, variant, local_match_masked=match_masked)
        batch, masks = make_batch(model.cfg), draw(model.cfg, 4)
        captured = {}
        original = model.alignment_losses

        def capture(img, txt, txt_mask, word_mask, word_ids, captured=captured, original=original):
            captured["words"] = word_mask
            return original(img, txt, txt_mask, word_mask, word_ids)

        model.alignment_losses = capture
        model(batch, masks)
        seen[match_masked] = captured["words"]
        _, labels = model.mask_text(batch["input_ids"], batch["attention_mask"], batch["special_tokens_mask"], masks)
    masked = labels != -100
    assert masked.any()
    assert torch.equal(seen[False], seen[True] & ~masked) and (seen[True] & masked).any()


def test_mpma_fuse_gives_each_report_token_its_image(tiny_config, token_ids, make_batch):
    """The fused representation of unmasked pairs: one row per report token, zeros at padding,
    changed by the image, and the MRM path's conditioning of the same states."""
    model = model_of(tiny_config, token_ids, "mpma").eval()
    batch = make_batch(model.cfg)
    imgs, ids, attn = batch["image"], batch["input_ids"], batch["attention_mask"]
    fused = model.fuse(imgs, ids, attn)
    assert fused.shape == (*ids.shape, model.cfg.text_width)
    assert not fused.requires_grad and (fused[attn == 0] == 0).all()
    assert not torch.allclose(fused[attn == 1], model.fuse(imgs.flip(0), ids, attn)[attn == 1])
    states, packing = model.encode_text(ids, attn)
    want = packing.pad(model.condition_report(states, packing, model.encode_image(imgs)))
    torch.testing.assert_close(fused, want.detach())


@pytest.mark.parametrize("variant", ["mpma", "reclf"])
def test_local_loss_own_heads_leave_the_global_heads_to_the_global_loss(tiny_config, variant, make_batch, draw,
                                                                       token_ids):
    """--local-own-heads: the local loss maps tokens with heads of its own; its gradient
    reaches them and not the MbA heads (default: it reaches the MbA heads)."""
    for own in (False, True):
        model = model_of(tiny_config, token_ids, variant, local_own_heads=own)
        model(make_batch(model.cfg), draw(model.cfg, 4))["local"].backward()
        params = dict(model.named_parameters())
        assert ("local_alignment.image_head.fc1.weight" in params) == own
        global_grad = params["image_head.fc1.weight"].grad
        assert (global_grad is None or not global_grad.any()) == own
        if own:
            for name in ("local_alignment.image_head.fc1.weight", "local_alignment.text_head.fc2.weight"):
                assert params[name].grad.abs().sum() > 0, name
