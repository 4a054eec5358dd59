"""mcr.plot: the pictures a run writes (curves, MAE reconstructions, retrieval grid), their
TensorBoard copies, and the pieces they are drawn from."""
import json
import os
import shutil
import struct

import pytest
import torch

pytest.importorskip("matplotlib")

from mcr import masking, plot
from mcr.eval import pictures
from mcr.eval.protocols import retrieval_metrics
from mcr.models.mcr import MCR


def png_size(path):
    """(width, height) from a PNG's IHDR chunk; fails unless the file is a PNG."""
    with open(path, "rb") as f:
        head = f.read(24)
    assert head[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    assert head[12:16] == b"IHDR"
    return struct.unpack(">II", head[16:24])


def pixels(size):
    return round(size[0] * pictures.DPI), round(size[1] * pictures.DPI)


def test_tiny_run_writes_every_png(tiny_run):
    expected = {"curves.png": pictures.CURVES_SIZE, "reconstructions.png": pictures.RECONSTRUCTION_SIZE,
                "retrieval.png": pictures.RETRIEVAL_SIZE}
    for name, size in expected.items():
        assert png_size(tiny_run / name) == pixels(size), name
        assert os.path.getsize(tiny_run / name) > 20_000, f"{name} looks empty"
    assert not [n for n in os.listdir(tiny_run) if ".tmp" in n], "a temporary PNG was left behind"


def test_tensorboard_gets_the_pictures_at_each_validation(tiny_run):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tiny_run / "tensorboard"), size_guidance={"images": 0})
    events.Reload()
    for tag in ("val/reconstructions", "val/retrieval"):
        images = events.Images(tag)
        assert [image.step for image in images] == [2, 4], tag
        assert all(image.width > 500 and image.height > 500 for image in images)


def test_plot_cli_overlays_runs_and_rejects_a_non_run(tiny_run, tmp_path, capsys):
    other = tmp_path / "other"
    other.mkdir()
    rows = [json.loads(line) for line in open(tiny_run / "metrics.jsonl")]
    with open(other / "metrics.jsonl", "w") as f:
        for row in rows:
            f.write(json.dumps({k: v * 0.5 if isinstance(v, float) and k != "time" else v
                                for k, v in row.items()}) + "\n")
    written = plot.main([str(tiny_run), str(other), "--curves-only", "--out", str(tmp_path)])
    assert str(tmp_path / "curves_overlay.png") in written
    assert png_size(tmp_path / "curves_overlay.png") == pixels(pictures.CURVES_SIZE)
    assert png_size(other / "curves.png") == pixels(pictures.CURVES_SIZE)
    with pytest.raises(SystemExit) as err:
        plot.main([str(tmp_path / "missing")])
    assert err.value.code == 2 and "RUN_DIR" in capsys.readouterr().err


def test_plot_cli_redraws_the_model_pictures(tiny_run, tmp_path):
    run = tmp_path / "copy"
    shutil.copytree(tiny_run, run, ignore=shutil.ignore_patterns("*.png", "tensorboard"))
    written = plot.main([str(run)])
    assert sorted(os.path.basename(p) for p in written) == ["curves.png", "reconstructions.png", "retrieval.png"]
    assert png_size(run / "retrieval.png") == pixels(pictures.RETRIEVAL_SIZE)


def test_read_metrics_keeps_the_last_row_per_step_and_skips_a_torn_line(tmp_path):
    lines = [{"step": 2, "kind": "train", "loss": 3.0}, {"step": 4, "kind": "train", "loss": 2.0},
             {"step": 4, "kind": "val", "i2t_R@1": 5.0}, {"step": 4, "kind": "train", "loss": 1.5}]
    with open(tmp_path / "metrics.jsonl", "w") as f:
        f.write("".join(json.dumps(row) + "\n" for row in lines) + '{"step": 6, "kind": "tr')
    metrics = pictures.read_metrics(tmp_path)
    assert [(r["step"], r["loss"]) for r in metrics["train"]] == [(2, 3.0), (4, 1.5)]
    assert [r["i2t_R@1"] for r in metrics["val"]] == [5.0]


@pytest.mark.parametrize("in_chans,image_size", [(1, 48), (3, 32)])
def test_unpatchify_inverts_patchify(tiny_config, in_chans, image_size):
    model = MCR(tiny_config(in_chans=in_chans, image_size=image_size))
    images = torch.randn(3, in_chans, image_size, image_size)
    torch.testing.assert_close(pictures.unpatchify(model.patchify(images), 16, in_chans), images, rtol=0, atol=0)


def test_reconstruction_error_is_the_models_mim_loss(tiny_run):
    """reconstruct() with seed s draws the masks the model draws from that seed: the MSE of
    its prediction over the dropped pixels is the MIM loss of the model's own forward."""
    from mcr.run import build_dataset, collate_for, load_trained

    model, cfg, tokenizer, device, _ = load_trained(str(tiny_run))
    batch = collate_for(cfg, tokenizer)([build_dataset(cfg, "val", 5)[i] for i in range(5)])
    mask, pred = pictures.reconstruct(model, batch["image"], seed=3)
    assert mask.shape == (5, 9) and (mask.sum(1) == 9 - int(9 * (1 - cfg.model.image_mask_ratio))).all()
    dropped = mask.reshape(5, 3, 3).repeat_interleave(16, 1).repeat_interleave(16, 2).bool()
    mse = ((pred[:, 0] - batch["image"][:, 0]) ** 2)[dropped].mean()
    masks = masking.draw(cfg.model, 5, generator=torch.Generator().manual_seed(3))
    model.eval()
    with torch.no_grad():
        losses = model(batch, masks=masks)
    torch.testing.assert_close(mse, losses["mim"], rtol=1e-4, atol=1e-6)


def test_best_true_rank_agrees_with_evaluation_ranks():
    sim = torch.randn(7, 11, dtype=torch.float64)
    hits = torch.rand(7, 11) < 0.3
    hits[torch.arange(7), torch.arange(7)] = True
    ranks = [pictures.best_true_rank(sim[q], hits[q]) for q in range(7)]
    assert sum(ranks) / 7 == pytest.approx(retrieval_metrics(sim, hits)["mean_rank"])
    assert sum(r == 1 for r in ranks) / 7 * 100 == pytest.approx(retrieval_metrics(sim, hits)["R@1"])


def test_label_text_and_report_excerpt():
    names = ("normal", "pleural_effusion_left", "cardiomegaly")
    assert pictures.label_text([0, 1, 1], names) == "pleural effusion left, cardiomegaly"
    assert pictures.label_text([0, 0, 0], names) == "(no labels)"
    assert pictures.label_text([1, 0], None) == ""
    report = "FINDINGS: " + "word " * 50 + "IMPRESSION: Small left pleural effusion."
    assert pictures.report_excerpt(report, 40, 3) == "IMPRESSION: Small left pleural effusion."
    lines = pictures.report_excerpt(report, 20, 3, impression_only=False).split("\n")
    assert len(lines) == 3 and lines[-1].endswith("…") and all(len(line) <= 20 for line in lines)


def test_spaced_indices_are_distinct_and_in_range():
    assert pictures.spaced(24, 6) == [0, 4, 8, 12, 16, 20]
    assert pictures.spaced(24, 3, offset=0.5) == [4, 12, 20]
    assert pictures.spaced(2, 6) == [0, 1]


def test_best_true_rank_counts_ties_against_the_query():
    is_true = torch.tensor([False, False, True, False, False])
    assert pictures.best_true_rank(torch.zeros(5), is_true) == 5  # everything alike: last, not "rank 1"
    assert pictures.best_true_rank(torch.tensor([0.1, 0.5, 0.5, 0.2, 0.5]), is_true) == 3


def test_pictures_refuse_non_finite_embeddings(tiny_run):
    from mcr.run import build_dataset, collate_for, load_trained

    model, cfg, tokenizer, device, _ = load_trained(str(tiny_run))
    with torch.no_grad():
        model.vit.patch_embed.proj.weight.fill_(float("nan"))
    with pytest.raises(ValueError, match="image embeddings: .* NaN or infinite"):
        pictures.validation_pictures(model, build_dataset(cfg, "val", 6), collate_for(cfg, tokenizer), device)


@pytest.mark.parametrize("content", [b"", b"\x89PNG\r\n\x1a\n\x00\xff\xfe binary", b"[1, 2]\nnull\n\"text\"\n"])
def test_plot_cli_refuses_a_metrics_file_without_rows(tiny_run, tmp_path, capsys, content):
    run = tmp_path / "copy"
    shutil.copytree(tiny_run, run, ignore=shutil.ignore_patterns("*.png", "tensorboard"))
    (run / "metrics.jsonl").write_bytes(content)
    for flags in ([], ["--curves-only"]):
        with pytest.raises(SystemExit) as err:
            plot.main([str(run), *flags])
        message = capsys.readouterr().err
        assert err.value.code == 2 and "metrics.jsonl holds no metrics rows" in message
        assert len(message.strip().splitlines()) == 1
    assert not list(run.glob("*.png"))


def test_plot_cli_refuses_a_run_whose_only_checkpoint_is_truncated(tiny_run, tmp_path, capsys):
    run = tmp_path / "copy"
    shutil.copytree(tiny_run, run, ignore=shutil.ignore_patterns("*.png", "tensorboard"))
    steps = sorted((run / "checkpoints").glob("step_*"))
    for older in steps[:-1]:
        shutil.rmtree(older)
    model_file = steps[-1] / "model.safetensors"
    model_file.write_bytes(model_file.read_bytes()[:1000])
    with pytest.raises(SystemExit) as err:
        plot.main([str(run)])
    message = capsys.readouterr().err
    assert err.value.code == 2 and "no intact checkpoint" in message and len(message.strip().splitlines()) == 1
    assert not list(run.glob("*.png"))
    assert [os.path.basename(p) for p in plot.main([str(run), "--curves-only"])] == ["curves.png"]


def test_plot_cli_refuses_non_finite_weights(tiny_run, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    run = tmp_path / "copy"
    shutil.copytree(tiny_run, run, ignore=shutil.ignore_patterns("*.png", "tensorboard"))
    for model_file in (run / "checkpoints").glob("step_*/model.safetensors"):
        weights = load_file(model_file)
        weights = {name: torch.full_like(t, float("nan")) if "patch_embed" in name else t
                   for name, t in weights.items()}
        save_file(weights, model_file)
    with pytest.raises(SystemExit) as err:
        plot.main([str(run)])
    message = capsys.readouterr().err
    assert err.value.code == 2 and "non-finite weights" in message and len(message.strip().splitlines()) == 1
    assert not list(run.glob("*.png"))
