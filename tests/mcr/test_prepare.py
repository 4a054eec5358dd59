"""mcr.prepare: shards hold exactly what the raw reader yields (same batches, same trained
weights), resume after an interruption, checksums catch corruption, bad inputs are clear."""
import json
import os
import pickle
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from mcr import checkpoint
from mcr.data import shards
from mcr.data.batching import Collate
from mcr.data.fake import MIMIC_EXPECTED, make_mimic_tree
from mcr.data.mimic import MimicCXR
from mcr.data.shards import ShardDataset
from mcr.data.tokenizer import train_wordpiece
from mcr.engine import batches_for_epoch
from mcr.prepare import main as prepare_main
from mcr.train import main as train_main

RUN_FLAGS = ["--vocab-size", "200", "--batch-size", "4", "--max-steps", "2", "--eval-every", "0",
            "--warmup-steps", "1", "--log-every", "1"]


def read_json(folder, name):
    with open(os.path.join(folder, name)) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    return make_mimic_tree(str(tmp_path_factory.mktemp("mimic")), image_size=48)


@pytest.fixture(scope="module")
def prepared(tree, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("shards"))
    prepare_main(["--data", "mimic-cxr", "--data-root", tree, "--out", out, "--image-size", "32", "--workers", "2"])
    return out


def test_manifest_records_counts_summaries_and_checksums(prepared):
    manifest = read_json(prepared, "manifest.json")
    assert manifest["image_size"] == 32 and manifest["label_names"][1] == "Cardiomegaly"
    for split, expected in MIMIC_EXPECTED.items():
        entry = manifest["splits"][split]
        assert entry["valid"] == entry["count"] == expected["kept"]
        assert entry["summary"]["skipped"] == expected["skipped"]
        assert set(entry["files"]) == set(shards.PARTS)
        assert all(len(f["sha256"]) == 64 for f in entry["files"].values())
    assert not any(name.endswith("progress.json") for name in os.listdir(prepared))


@pytest.mark.parametrize("split", ["train", "val"])
def test_shards_give_the_same_batches_as_the_raw_reader(tree, prepared, split):
    raw, shard = MimicCXR(tree, split, 32), ShardDataset(prepared, split, 32)
    shard = pickle.loads(pickle.dumps(shard))  # as a spawned DataLoader worker gets it: no array copied
    assert shard._images is None
    assert len(raw) == len(shard) and raw.reports == shard.reports
    tokenizer = train_wordpiece(raw.reports, 120)
    collate = Collate(tokenizer, 48)
    for batch in batches_for_epoch(len(raw), 2, seed=3, epoch=1):
        a, b = collate([raw[i] for i in batch]), collate([shard[i] for i in batch])
        assert a.keys() == b.keys()
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)


def test_training_from_raw_and_from_shards_gives_the_same_weights(tree, prepared, tmp_path, capsys, tiny_flags):
    train_main(tiny_flags + RUN_FLAGS + ["--data", "mimic-cxr", "--data-root", tree,
                                         "--out-dir", str(tmp_path / "raw")])
    out = capsys.readouterr().out
    assert "mimic-cxr train: 7 kept" in out and "1 skipped: unreadable image" in out
    # the same vocabulary: WordPiece training breaks frequency ties differently from run to run
    train_main(tiny_flags + RUN_FLAGS + ["--data", "shards", "--data-root", prepared,
                                         "--out-dir", str(tmp_path / "shards"),
                                         "--tokenizer", str(tmp_path / "raw" / "tokenizer")])
    a = load_file(os.path.join(checkpoint.latest_checkpoint(tmp_path / "raw"), "model.safetensors"))
    b = load_file(os.path.join(checkpoint.latest_checkpoint(tmp_path / "shards"), "model.safetensors"))
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)


class Interrupted(Exception):
    pass


class FailingAt:
    """A dataset whose image() raises at row `at` (a killed prepare), else delegates."""

    def __init__(self, dataset, at):
        self.dataset, self.at = dataset, at

    def __getattr__(self, name):
        return getattr(self.dataset, name)

    def __len__(self):
        return len(self.dataset)

    def image(self, i):
        if i == self.at:
            raise Interrupted
        return self.dataset.image(i)


def test_interrupted_prepare_resumes_to_identical_files(tree, prepared, tmp_path):
    source = {"data": "mimic-cxr", "data_root": os.path.abspath(tree), "data_options": ""}
    dataset = MimicCXR(tree, "train", 32)
    out = str(tmp_path)
    with pytest.raises(Interrupted):
        shards.prepare(lambda s: FailingAt(dataset, 5), out, ["train"], source=source, image_size=32,
                       chunk=2, workers=1, progress=False)
    state = read_json(out, "train.progress.json")
    assert state["done"] == 4  # two whole chunks were committed before row 5
    with pytest.raises(ValueError, match="other settings"):
        shards.write_split(MimicCXR(tree, "train", 32, views=None), out, "train",
                           source={**source, "data_options": "views=all"}, workers=1, progress=False)
    shards.prepare(lambda s: dataset, out, ["train"], source=source, image_size=32, chunk=2, workers=1,
                   progress=False)
    ours, reference = read_json(out, "manifest.json"), read_json(prepared, "manifest.json")
    for part, info in ours["splits"]["train"]["files"].items():
        assert info["sha256"] == reference["splits"]["train"]["files"][part]["sha256"], part


def test_undecodable_image_at_prepare_time_is_marked_invalid(tree, tmp_path):
    dataset = MimicCXR(tree, "val", 32)
    from mcr.data.common import UnreadableImage

    class OneBad(FailingAt):
        def image(self, i):
            if i == 0:
                raise UnreadableImage("truncated.jpg: image file is truncated")
            return self.dataset.image(i)

    source = {"data": "test"}
    manifest = shards.prepare(lambda s: OneBad(dataset, 0), str(tmp_path), ["val"], source=source, image_size=32,
                              workers=1, progress=False)
    assert manifest["splits"]["val"]["valid"] == 1
    assert manifest["splits"]["val"]["summary"]["skipped"] == {"unreadable image at prepare time": 1}
    shard = ShardDataset(str(tmp_path), "val")
    assert len(shard) == 1 and shard[0].report == dataset.reports[1]
    np.testing.assert_array_equal(shard[0].image, dataset.image(1))


def test_checksums_catch_corruption_and_bad_inputs_are_clear(prepared, tmp_path, capsys):
    copy = tmp_path / "copy"
    copy.mkdir()
    for name in os.listdir(prepared):
        shutil.copy(os.path.join(prepared, name), copy / name)
    assert prepare_main(["--verify", str(copy)]) == 0
    assert "all files match" in capsys.readouterr().out
    data = bytearray((copy / "val.images.npy").read_bytes())
    data[-1] ^= 0xFF
    (copy / "val.images.npy").write_bytes(bytes(data))
    assert prepare_main(["--verify", str(copy)]) == 1
    assert "val.images.npy (sha256 mismatch)" in capsys.readouterr().err
    with pytest.raises(shards.ShardError, match="CRC-32 mismatch"):
        ShardDataset(str(copy), "val")  # a one-block file: opening checks all of it
    with pytest.raises(ValueError, match="sha256 mismatch"):
        ShardDataset(str(copy), "val", check="full")
    (copy / "test.labels.npy").write_bytes(b"")
    with pytest.raises(ValueError, match=r"test.labels.npy \(size 0"):
        ShardDataset(str(copy), "test")
    with pytest.raises(ValueError, match="model wants 64"):
        ShardDataset(prepared, "train", 64)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ShardDataset(str(tmp_path / "nowhere"), "train")
    with pytest.raises(FileNotFoundError, match="not a prepared shard folder"):
        ShardDataset(str(tmp_path), "train")
    with pytest.raises(SystemExit) as stop:
        prepare_main(["--data", "mimic-cxr", "--data-root", str(tmp_path), "--out", prepared, "--image-size", "48"])
    assert stop.value.code == 2 and "another --out" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        prepare_main(["--data", "mimic-cxr"])
    assert "--data and --out are required" in capsys.readouterr().err


def test_a_missing_column_exits_2_before_any_file_is_touched(tree, prepared, tmp_path, capsys):
    import csv

    root = tmp_path / "mimic"
    shutil.copytree(tree, root)
    with open(root / "mimic-cxr-2.0.0-metadata.csv", newline="") as f:
        rows = list(csv.reader(f))
    with open(root / "mimic-cxr-2.0.0-metadata.csv", "w", newline="") as f:
        csv.writer(f).writerows([row[:-1] for row in rows])  # no ViewPosition
    out = tmp_path / "shards"
    argv = ["--data", "mimic-cxr", "--data-root", str(root), "--image-size", "32", "--out", str(out)]
    for extra in ([], ["--overwrite"]):
        with pytest.raises(SystemExit) as stop:
            prepare_main(argv + extra)
        err = capsys.readouterr().err
        assert stop.value.code == 2 and err.count("\n") == 1 and "no column 'ViewPosition'" in err, err
        if not extra:
            assert not out.exists()
            shutil.copytree(prepared, out)
            before = {n: (out / n).read_bytes() for n in os.listdir(out)}
    assert {n: (out / n).read_bytes() for n in os.listdir(out)} == before  # --overwrite deleted nothing


def test_a_rerun_removes_the_temporary_files_of_a_killed_one(tree, tmp_path, capsys):
    out = tmp_path / "shards"
    argv = ["--data", "mimic-cxr", "--data-root", tree, "--out", str(out), "--image-size", "32", "--workers", "1",
            "--splits", "val"]
    dead = subprocess_pid_that_exited()
    out.mkdir()
    (out / f"val.progress.json.tmp{dead}").write_text('{"done": 0')  # killed between write and rename
    (out / f"manifest.json.tmp{dead}").write_text("{")
    (out / f"val.progress.json.tmp{os.getppid()}").write_text("{}")  # a live process's: not ours to delete
    assert prepare_main(argv) == 0
    assert f"removed {out / f'val.progress.json.tmp{dead}'}" in capsys.readouterr().err
    assert sorted(n for n in os.listdir(out) if ".tmp" in n) == [f"val.progress.json.tmp{os.getppid()}"]
    assert prepare_main(["--verify", str(out)]) == 0


def subprocess_pid_that_exited():
    """The id of a process that has exited (and been reaped)."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(done.stdout)
