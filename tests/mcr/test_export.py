"""The export loads with stock transformers and timm alone (mcr cannot be imported in the
loading process) and gives mcr's own retrieval embeddings to 1e-5."""
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from mcr import run
from mcr.export import main

LOADER = textwrap.dedent("""
    import importlib.abc, sys

    class NoMcr(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("mcr", "mcr_kernels"):
                raise ImportError(f"{name} is blocked: the export must load without mcr")

    sys.meta_path.insert(0, NoMcr())
    import json, torch, timm
    import torch.nn.functional as F
    from safetensors.torch import load_file
    from timm.models.vision_transformer import VisionTransformer
    from transformers import AutoTokenizer, BertModel

    out, inputs_path, result_path = sys.argv[1:]
    inputs = torch.load(inputs_path)
    tokenizer = AutoTokenizer.from_pretrained(f"{out}/text_encoder")
    enc = tokenizer(inputs["reports"], padding=True, return_tensors="pt")
    bert = BertModel.from_pretrained(f"{out}/text_encoder").eval()
    with open(f"{out}/image_encoder/vision_transformer_args.json") as f:
        vit = VisionTransformer(**json.load(f))
    vit.load_state_dict(load_file(f"{out}/image_encoder/model.safetensors"), strict=True)
    vit.eval()
    by_timm = timm.create_model(f"local-dir:{out}/image_encoder", pretrained=True).eval()
    heads = load_file(f"{out}/heads.safetensors")
    spec = json.load(open(f"{out}/heads.json"))

    def head(prefix, x):
        h = F.linear(x, heads[f"{prefix}.fc1.weight"], heads[f"{prefix}.fc1.bias"])
        return F.linear(F.gelu(h), heads[f"{prefix}.fc2.weight"], heads[f"{prefix}.fc2.bias"])

    with torch.no_grad():
        tokens = vit.forward_features(inputs["images"])
        assert torch.equal(tokens, by_timm.forward_features(inputs["images"]))
        mask = enc["attention_mask"].unsqueeze(-1).float()
        text = bert(**enc).last_hidden_state
        if spec["variant"] == "abm":
            image = head("image_head", tokens[:, 1:].mean(1))
            text = head("text_head", (text * mask).sum(1) / mask.sum(1))
        else:
            image = head("image_head", tokens[:, 1:]).mean(1)
            text = (head("text_head", text) * mask).sum(1) / mask.sum(1)
    torch.save({"image": F.normalize(image, dim=-1), "text": F.normalize(text, dim=-1),
                "input_ids": enc["input_ids"], "logit_scale": heads["logit_scale"]}, result_path)
""")


@pytest.mark.parametrize("variant", ["mcr", "abm"])
def test_export_loads_without_mcr_and_matches_its_embeddings(tmp_path, variant):
    from mcr.train import main as train

    run_dir = tmp_path / "run"
    train(["--image-size", "48", "--vit-width", "32", "--vit-depth", "1", "--vit-heads", "2", "--decoder-width", "32",
           "--decoder-depth", "1", "--decoder-heads", "2", "--text-width", "32", "--text-depth", "1", "--text-heads",
           "2", "--text-intermediate", "64", "--embed-dim", "16", "--train-size", "16", "--val-size", "8",
           "--batch-size", "8", "--max-steps", "2", "--eval-every", "0", "--no-pictures", "--variant", variant,
           "--out-dir", str(run_dir)])
    results = tmp_path / "zero_shot.json"
    results.write_text(json.dumps({"task": "zero-shot", "data": "synthetic", "split": "test", "images": 7,
                                   "mean_auroc": 0.61, "chance_auroc": 0.5, "accuracy": 30.0,
                                   "chance_accuracy": 20.0}))
    out = tmp_path / "export"
    main(["--checkpoint", str(run_dir), "--out", str(out), "--results", str(results)])
    card = (out / "README.md").read_text()
    assert "2 steps" in card and "chance" in card and "0.610" in card

    model, cfg, tokenizer, _, _ = run.load_trained(str(run_dir), "cpu")
    dataset = run.build_dataset(cfg, "test", 3)
    batch = run.collate_for(cfg, tokenizer)([dataset[i] for i in range(3)])
    torch.save({"images": batch["image"], "reports": [dataset[i].report for i in range(3)]}, tmp_path / "inputs.pt")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    subprocess.run([sys.executable, "-c", LOADER, str(out), str(tmp_path / "inputs.pt"), str(tmp_path / "out.pt")],
                   check=True, cwd=tmp_path, env=env)
    loaded = torch.load(tmp_path / "out.pt")
    model.eval()
    image, text = model.embed(batch["image"], batch["input_ids"], batch["attention_mask"])
    assert torch.equal(loaded["input_ids"], batch["input_ids"])
    torch.testing.assert_close(loaded["image"], image, rtol=0, atol=1e-5)
    torch.testing.assert_close(loaded["text"], text, rtol=0, atol=1e-5)
    torch.testing.assert_close(loaded["logit_scale"], model.logit_scale.detach())


def test_export_refuses_a_folder_in_use_and_bad_results(tiny_run, tmp_path, capsys):
    used = tmp_path / "used"
    used.mkdir()
    (used / "keep.txt").write_text("mine")
    for argv, message in ([["--out", str(used)], "not an empty folder"],
                          [["--out", str(tmp_path / "new"), "--results", str(tmp_path / "absent.json")], "--results"],
                          [["--out", str(tmp_path / "no" / "such")], "parent folder"]):
        with pytest.raises(SystemExit) as exit_info:
            main(["--checkpoint", str(tiny_run), *argv])
        assert exit_info.value.code == 2 and message in capsys.readouterr().err
    assert (used / "keep.txt").read_text() == "mine" and not (tmp_path / "new").exists()
