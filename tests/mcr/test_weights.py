"""Local weights: timm / MAE ViT checkpoints (.safetensors, .pth, weights_only) with
pos-embed interpolation and in_chans adaptation, HF BERT directories, tokenizer round trip,
mismatches that name the keys, and the training flags end to end."""
import os

import pytest
import torch
from safetensors.torch import save_file
from timm.models.vision_transformer import VisionTransformer
from transformers import BertConfig, BertForMaskedLM

from mcr.data.tokenizer import load_tokenizer, train_wordpiece
from mcr.models.mcr import MCR
from mcr.models.weights import load_image_weights, load_text_weights, read_state_dict, resize_pos_embed
from mcr.train import main

TRAIN_FLAGS = ["--train-size", "16", "--val-size", "8", "--batch-size", "8", "--max-steps", "1", "--eval-every", "0"]


def timm_vit(img_size=32, in_chans=3, width=32, depth=1, patch=16):
    return VisionTransformer(img_size=img_size, patch_size=patch, in_chans=in_chans, embed_dim=width, depth=depth,
                             num_heads=2, num_classes=10)


def test_timm_safetensors_same_shape_loads_exactly(tiny_config, tmp_path):
    model = MCR(tiny_config(in_chans=3))
    source = timm_vit()
    path = str(tmp_path / "vit.safetensors")
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, path)
    info = load_image_weights(model, path)
    assert info["ignored"] == ["head.bias", "head.weight"] and not info["adapted"]
    for key, value in source.state_dict().items():
        if not key.startswith("head."):
            torch.testing.assert_close(model.vit.state_dict()[key], value, rtol=0, atol=0, msg=key)


def test_pth_at_another_resolution_and_rgb_is_adapted(tiny_config, tmp_path):
    model = MCR(tiny_config(image_size=48, in_chans=1))  # grid 3x3 from a 2x2 RGB checkpoint
    source = timm_vit(img_size=32, in_chans=3)
    path = str(tmp_path / "vit.pth")
    torch.save({"state_dict": {"module." + k: v for k, v in source.state_dict().items()}}, path)
    info = load_image_weights(model, path)
    assert info["adapted"] == ["pos_embed", "patch_embed.proj.weight"]
    weight = source.state_dict()["patch_embed.proj.weight"]
    torch.testing.assert_close(model.vit.patch_embed.proj.weight, weight.sum(1, keepdim=True))  # timm's RGB->1
    pos = model.vit.pos_embed.detach()
    assert pos.shape == (1, 1 + 9, 32)
    torch.testing.assert_close(pos[:, 0], source.pos_embed[:, 0].detach())  # class token untouched
    # a grid resampled to itself is the identity; a 2x2 grid of one value stays that value
    same = source.pos_embed.detach()
    torch.testing.assert_close(resize_pos_embed(same, 5, 1), same)
    flat = torch.ones(1, 5, 4)
    torch.testing.assert_close(resize_pos_embed(flat, 10, 1)[:, 1:], torch.ones(1, 9, 4))
    # a checkpoint without class-token position (grid only) gets a zero slot
    assert resize_pos_embed(torch.randn(1, 4, 4), 10, 1)[0, 0].abs().sum() == 0


def test_mae_checkpoint_fills_encoder_and_decoder(tiny_config, tmp_path):
    model, donor = MCR(tiny_config()), MCR(tiny_config())
    encoder = {k: v for k, v in donor.vit.state_dict().items()}
    decoder = {k: v for k, v in donor.state_dict().items() if k.startswith(("decoder_", "mask_token"))}
    decoder["mask_token"] = decoder["mask_token"].reshape(1, 1, -1)  # MAE's shape
    decoder["decoder_pred.weight"] = torch.zeros(16 * 16 * 3, 32)  # RGB pixels: does not fit in_chans=1
    path = str(tmp_path / "mae.pth")
    torch.save({"model": {**encoder, **decoder}}, path)
    info = load_image_weights(model, path)
    assert info["skipped"] == ["decoder_pred.weight"]
    own = model.state_dict()
    for key in ("mask_token", "decoder_pos_embed", "decoder_embed.weight", "blocks.0.attn.qkv.weight"):
        name = key if key in own else "vit." + key
        torch.testing.assert_close(own[name], donor.state_dict()[name], rtol=0, atol=0, msg=key)


def test_image_weight_mismatches_name_the_keys(tiny_config, tmp_path):
    model = MCR(tiny_config())
    wide = str(tmp_path / "wide.safetensors")
    save_file({k: v.contiguous() for k, v in timm_vit(width=64).state_dict().items()}, wide)
    with pytest.raises(ValueError, match=r"cls_token: checkpoint \(1, 1, 64\) vs model \(1, 1, 32\).*--vit-width"):
        load_image_weights(model, wide)
    deep = str(tmp_path / "deep.safetensors")
    save_file({k: v.contiguous() for k, v in timm_vit(depth=2).state_dict().items()}, deep)
    with pytest.raises(ValueError, match=r"unexpected \['blocks.1.attn.proj.bias"):
        load_image_weights(model, deep)
    partial = str(tmp_path / "partial.safetensors")
    save_file({k: v.contiguous() for k, v in timm_vit().state_dict().items() if k != "norm.weight"}, partial)
    with pytest.raises(ValueError, match=r"missing \['norm.weight'\]"):
        load_image_weights(model, partial)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_image_weights(model, str(tmp_path / "none.pth"))


class Payload:
    """Anything but tensors: weights_only loading must refuse to build it."""

    def __reduce__(self):
        return (print, ("unpickled!",))


def test_arbitrary_pickles_are_refused(tmp_path, capsys):
    path = str(tmp_path / "evil.pth")
    torch.save({"model": {"w": torch.zeros(1)}, "args": Payload()}, path)
    with pytest.raises(ValueError, match="not a weights-only checkpoint"):
        read_state_dict(path)
    assert "unpickled!" not in capsys.readouterr().out


def bert_dir(path, vocab_size, width=32, depth=1, heads=2, intermediate=64, safetensors=True):
    config = BertConfig(vocab_size=vocab_size, hidden_size=width, num_hidden_layers=depth, num_attention_heads=heads,
                        intermediate_size=intermediate, max_position_embeddings=512)
    donor = BertForMaskedLM(config)
    with torch.no_grad():
        for p in donor.parameters():
            p.add_(torch.randn_like(p) * 0.1)  # nothing left at its default
    donor.save_pretrained(path)
    if not safetensors:  # the older layout (e.g. BioClinicalBERT): a pickled state dict, tied keys included
        os.remove(os.path.join(path, "model.safetensors"))
        torch.save(donor.state_dict(), os.path.join(path, "pytorch_model.bin"))
    return donor


@pytest.mark.parametrize("safetensors", [True, False])
def test_hf_bert_directory_loads_encoder_and_mlm_head(tiny_config, tmp_path, safetensors):
    model = MCR(tiny_config(vocab_size=128))
    donor = bert_dir(str(tmp_path), 128, safetensors=safetensors)
    assert os.path.isfile(tmp_path / ("model.safetensors" if safetensors else "pytorch_model.bin"))
    info = load_text_weights(model, str(tmp_path))
    for key, value in donor.bert.state_dict().items():
        if key in model.bert.state_dict():
            torch.testing.assert_close(model.bert.state_dict()[key], value, rtol=0, atol=0, msg=key)
    torch.testing.assert_close(model.mlm_head.predictions.transform.dense.weight,
                               donor.cls.predictions.transform.dense.weight, rtol=0, atol=0)
    torch.testing.assert_close(model.mlm_head.predictions.decoder.weight,
                               donor.bert.embeddings.word_embeddings.weight, rtol=0, atol=0)  # tied
    assert any(k.startswith("mlm_head.") for k in info["loaded"])


def test_text_weight_mismatches_name_fields_and_flags(tiny_config, tmp_path):
    bert_dir(str(tmp_path / "wide"), 128, width=48, heads=2, intermediate=64)
    with pytest.raises(ValueError, match=r"hidden_size=48 \(now --text-width 32\)"):
        load_text_weights(MCR(tiny_config(vocab_size=128)), str(tmp_path / "wide"))
    bert_dir(str(tmp_path / "vocab"), 100)
    with pytest.raises(ValueError, match="vocab_size 100.*--tokenizer"):
        load_text_weights(MCR(tiny_config(vocab_size=128)), str(tmp_path / "vocab"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_text_weights(MCR(tiny_config()), str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_text_weights(MCR(tiny_config()), str(tmp_path / "empty"))


def test_tokenizer_round_trip(tmp_path):
    texts = ["FINDINGS: Small left pleural effusion. IMPRESSION: Effusion.", "Heart size is normal."] * 20
    tok = train_wordpiece(texts, 80)
    tok.save_pretrained(str(tmp_path))
    again = load_tokenizer(str(tmp_path))
    for text in texts[:2] + ["unseen words entirely"]:
        assert again(text)["input_ids"] == tok(text)["input_ids"]
    assert again.mask_token_id == tok.mask_token_id and again.pad_token_id == tok.pad_token_id


def test_a_slow_tokenizer_is_refused_by_name(tmp_path, monkeypatch):
    """The collate function needs word_ids(), which only fast (tokenizers-backed) tokenizers
    give; a Python-backed one is refused when loaded."""
    import transformers

    class PythonWordPiece:  # what AutoTokenizer returns for a tokenizer without a fast form
        mask_token_id, pad_token_id, is_fast = 4, 0, False

    train_wordpiece(["FINDINGS: Small effusion."] * 20, 60).save_pretrained(str(tmp_path))
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda *a, **k: PythonWordPiece())
    with pytest.raises(ValueError, match="must be a fast tokenizer.*PythonWordPiece"):
        load_tokenizer(str(tmp_path))


def test_training_flags_load_both(tmp_path, capsys, tiny_flags):
    texts = [f"FINDINGS: finding number {i}. IMPRESSION: normal." for i in range(50)]
    tok = train_wordpiece(texts, 90)
    tok.save_pretrained(str(tmp_path / "bert"))
    bert_dir(str(tmp_path / "bert"), len(tok))
    vit = str(tmp_path / "vit.safetensors")
    save_file({k: v.contiguous() for k, v in timm_vit(img_size=64, in_chans=3).state_dict().items()}, vit)
    main(tiny_flags + TRAIN_FLAGS + ["--out-dir", str(tmp_path / "run"), "--image-weights", vit,
                       "--text-weights", str(tmp_path / "bert"), "--tokenizer", str(tmp_path / "bert")])
    out = capsys.readouterr().out
    assert "image weights" in out and "adapted ['pos_embed', 'patch_embed.proj.weight']" in out
    assert "text weights" in out


# --- the model's shape taken from the weights ----------------------------------------

RUN_FLAGS = ["--image-size", "32", "--decoder-width", "32", "--decoder-depth", "1", "--decoder-heads", "2",
             "--embed-dim", "16", "--max-text-len", "48", "--train-size", "16", "--val-size", "8", "--batch-size", "8",
             "--max-steps", "1", "--eval-every", "0", "--no-pictures"]


@pytest.fixture
def odd_bert(tmp_path):
    """A BERT folder of a shape no preset has (3 layers, 48 wide, 3 heads, 96 feed-forward,
    64 positions) with its own tokenizer saved beside it."""
    tok = train_wordpiece([f"FINDINGS: finding number {i}. IMPRESSION: normal." for i in range(50)], 90)
    path = str(tmp_path / "bert")
    tok.save_pretrained(path)
    config = BertConfig(vocab_size=len(tok), hidden_size=48, num_hidden_layers=3, num_attention_heads=3,
                        intermediate_size=96, max_position_embeddings=64)
    donor = BertForMaskedLM(config)
    donor.save_pretrained(path)
    return path, donor


def test_text_weights_set_the_bert_shape_and_vocabulary(odd_bert, tmp_path):
    from mcr import cli
    from mcr.run import load_trained

    path, donor = odd_bert
    run = str(tmp_path / "run")
    argv = RUN_FLAGS + ["--lr", "0", "--out-dir", run, "--text-weights", path, "--tokenizer", path]
    cfg = cli.parse_train_args(argv)
    assert (cfg.model.text_width, cfg.model.text_depth, cfg.model.text_heads, cfg.model.text_intermediate,
            cfg.model.vocab_size) == (48, 3, 3, 96, donor.config.vocab_size)
    main(argv)
    model, saved, _, _, _ = load_trained(run)  # what mcr.evaluate builds: the shape read back from the run
    assert saved.model == cfg.model
    for key, value in donor.bert.state_dict().items():
        if key in model.bert.state_dict() and key != "embeddings.position_embeddings.weight":
            torch.testing.assert_close(model.bert.state_dict()[key], value, rtol=0, atol=0, msg=key)  # lr 0
    positions = model.bert.state_dict()["embeddings.position_embeddings.weight"]
    torch.testing.assert_close(positions[:64], donor.bert.embeddings.position_embeddings.weight, rtol=0, atol=0)
    # the same command continues the run
    main(argv[:argv.index("--max-steps")] + ["--max-steps", "2"] + argv[argv.index("--max-steps") + 2:]
         + ["--resume"])
    assert load_trained(run)[4].endswith("step_00000002")


def vit_state(width=48, depth=2, patch=8, mae=False):
    """A timm ViT's state dict (64 px), or an MAE checkpoint ({"model": encoder + decoder})."""
    vit = VisionTransformer(img_size=64, patch_size=patch, in_chans=3, embed_dim=width, depth=depth, num_heads=2,
                            num_classes=0)
    state = {k: v.contiguous() for k, v in vit.state_dict().items()}
    if mae:
        grid = (64 // patch) ** 2
        decoder = {"mask_token": torch.zeros(1, 1, 32), "decoder_pos_embed": torch.zeros(1, grid + 1, 32),
                   "decoder_embed.weight": torch.zeros(32, width), "decoder_embed.bias": torch.zeros(32)}
        state = {"model": {**state, **decoder}}
    return state


@pytest.mark.parametrize("layout", ["timm.safetensors", "timm.pth", "mae.pth"])
def test_image_weights_set_the_vit_shape(tmp_path, layout, capsys):
    from mcr import cli

    path = str(tmp_path / f"vit-{layout}")
    state = vit_state(mae=layout.startswith("mae"))
    save_file(state, path) if path.endswith(".safetensors") else torch.save(state, path)
    run = str(tmp_path / "run")
    cfg = cli.parse_train_args(RUN_FLAGS + ["--out-dir", run, "--image-weights", path])
    # 48 is no multiple of 64: the preset's 4 heads, which divide it
    assert (cfg.model.vit_width, cfg.model.vit_depth, cfg.model.patch_size, cfg.model.vit_heads) == (48, 2, 8, 4)
    main(RUN_FLAGS + ["--out-dir", run, "--image-weights", path])
    assert "image weights" in capsys.readouterr().out


def test_vit_heads_follow_timm_and_flags_win_where_the_loader_adapts(tmp_path):
    from mcr import cli

    path = str(tmp_path / "vit.safetensors")
    save_file(vit_state(width=128), path)
    cfg = cli.parse_train_args(RUN_FLAGS + ["--image-weights", path])
    assert (cfg.model.vit_width, cfg.model.vit_heads) == (128, 2)  # timm's width / 64
    cfg = cli.parse_train_args(RUN_FLAGS + ["--image-weights", path, "--vit-heads", "8", "--patch-size", "16"])
    assert (cfg.model.vit_heads, cfg.model.patch_size, cfg.model.vit_depth) == (8, 16, 2)
    config = tmp_path / "c.yaml"
    config.write_text("model: {patch_size: 16}\n")  # a --config field is given as a flag is
    assert cli.parse_train_args(RUN_FLAGS + ["--config", str(config), "--image-weights", path]).model.patch_size == 16


@pytest.mark.parametrize("flags, message", [
    (["--text-width", "64"], "--text-width 64 contradicts --text-weights {bert} (config.json), which has 48"),
    (["--text-depth", "3", "--text-heads", "4"], "--text-heads 4 contradicts --text-weights {bert} (config.json)"),
    (["--vocab-size", "2048"], "--vocab-size 2048 contradicts --text-weights {bert}"),
    (["--vit-width", "64"], "--vit-width 64 contradicts --image-weights {vit}, which has 48"),
    (["--vit-heads", "5"], "--vit-width 48 must be a multiple of --vit-heads 5 (with the shape taken from the "
                           "pretrained weights"),
    (["--max-text-len", "100"], "--max-text-len 100 exceeds the 64 positions of --text-weights {bert}"),
    (["--tokenizer", "auto"], "--text-weights {bert} needs the tokenizer it was trained with: pass --tokenizer"),
])
def test_flags_that_contradict_the_weights_exit_2_before_any_work(odd_bert, tmp_path, capsys, flags, message):
    path, _ = odd_bert
    vit = str(tmp_path / "vit.safetensors")
    save_file(vit_state(), vit)
    run = tmp_path / "run"
    argv = RUN_FLAGS + ["--out-dir", str(run), "--text-weights", path, "--tokenizer", path, "--image-weights", vit]
    with pytest.raises(SystemExit) as exit_info:
        main(argv + flags)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1, err
    assert message.format(bert=path, vit=vit) in err
    assert not run.exists()


def test_library_configs_are_checked_against_the_weights(odd_bert, tmp_path):
    from mcr.config import TrainConfig
    from mcr.run import InputError, check_inputs

    path, _ = odd_bert
    cfg = TrainConfig(out_dir=str(tmp_path / "run"), text_weights=path, tokenizer=path)
    with pytest.raises(InputError, match=r"another shape than --text-width 128 \(the weights: 48\), --text-depth 2"):
        check_inputs(cfg)
    cfg = TrainConfig(out_dir=str(tmp_path / "run"), text_weights=path, tokenizer=path, model=dict(
        text_width=48, text_depth=3, text_heads=3, text_intermediate=96, max_text_len=64))
    assert check_inputs(cfg) is None
    other = str(tmp_path / "other")
    train_wordpiece(["another vocabulary entirely"] * 10, 40).save_pretrained(other)
    cfg.tokenizer = other
    with pytest.raises(InputError, match=f"--tokenizer {other} has .* tokens, the vocabulary of --text-weights"):
        check_inputs(cfg)
    assert not os.path.exists(tmp_path / "run")
