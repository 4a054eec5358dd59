"""The data readers and the mcr.prepare CLI on careless or hostile input: each test replays a
trial a careless or hostile user ran, on the fake trees of mcr.data.fake, and checks that it
ends in a clear error or a skip counted with its reason, with nothing written before lost."""
import builtins
import csv
import gzip
import json
import os
import shutil
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

from mcr.data import shards
from mcr.data.fake import MIMIC_EXPECTED, make_mimic_tree, make_openi_tree
from mcr.data.mimic import UNSAFE_ID, MimicCXR
from mcr.data.openi import OpenI
from mcr.data.shards import ShardDataset, ShardError
from mcr.prepare import build_parser
from mcr.prepare import main as prepare_main

pytestmark = pytest.mark.hostile

TRAIN_KEPT = MIMIC_EXPECTED["train"]["kept"]


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    return make_mimic_tree(str(tmp_path_factory.mktemp("mimic")), image_size=48)


@pytest.fixture
def copy(tree, tmp_path):
    """A private copy of the fake MIMIC tree, to damage."""
    return shutil.copytree(tree, tmp_path / "root")


def read_rows(path):
    with (gzip.open if str(path).endswith(".gz") else open)(path, "rt", newline="") as f:
        reader = csv.DictReader(f)
        return list(reader), list(reader.fieldnames)


def write_rows(path, rows, fields, bom=False, sep=","):
    """A CSV as a careless tool writes it (values hold no commas): optional BOM, any separator."""
    lines = [sep.join(fields)] + [sep.join(row[k] for k in fields) for row in rows]
    with (gzip.open if str(path).endswith(".gz") else open)(path, "wt", newline="", encoding="utf-8") as f:
        f.write(("\ufeff" if bom else "") + "\n".join(lines) + "\n")


def table(root, name):
    return next(os.path.join(root, n) for n in os.listdir(root) if n.startswith(f"mimic-cxr-2.0.0-{name}.csv"))


# --- --overwrite --splits val -------------------------------------------------------------

def test_overwrite_of_one_split_deletes_only_its_files_and_keeps_the_others(tree, tmp_path, capsys):
    out = tmp_path / "shards"
    flags = ["--data", "mimic-cxr", "--data-root", tree, "--out", str(out), "--image-size", "32", "--workers", "1"]
    assert prepare_main(flags) == 0
    before = ShardDataset(str(out), "train")
    (out / "val.py").write_text("print('mine')\n")  # the user's files, named like a split
    (out / "val.notes.txt").write_text("mine")
    assert prepare_main(flags + ["--overwrite", "--splits", "val"]) == 0
    assert (out / "val.py").read_text() == "print('mine')\n" and (out / "val.notes.txt").read_text() == "mine"
    manifest = json.loads((out / "manifest.json").read_text())
    assert sorted(manifest["splits"]) == ["test", "train", "val"]
    after = ShardDataset(str(out), "train")  # train still loads, unchanged
    assert after.reports == before.reports
    np.testing.assert_array_equal(after.images, before.images)
    shards.verify(str(out))

    # another image size for one split would mix 48 px val with 32 px train/test: refused first
    listing = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(SystemExit) as stop:
        prepare_main(flags[:-4] + ["--image-size", "48", "--workers", "1", "--overwrite", "--splits", "val"])
    assert stop.value.code == 2
    assert "--out" in capsys.readouterr().err.strip().splitlines()[-1]
    assert {p.name: p.read_bytes() for p in out.iterdir()} == listing  # nothing touched


# --- ids that are paths -------------------------------------------------------------------

def test_mimic_ids_that_escape_the_root_are_skipped_counted_and_never_opened(copy, tmp_path, monkeypatch):
    outside = tmp_path / "outside"
    some_jpeg = next(p for p in copy.rglob("*.jpg") if p.stat().st_size > 100)
    # study 1 (AP): an absolute dicom_id; study 2: a subject_id whose '../' lands in `outside`
    secret_dicom = outside / "secret"
    subject = "1/../../../../outside"
    study2 = "50000002"
    for path in (secret_dicom.with_suffix(".jpg"), outside / f"s{study2}" / "00020-dicom.jpg"):
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(some_jpeg, path)
    (outside / f"s{study2}.txt").write_text("FINDINGS: SECRET text outside the root.\n")
    for name in ("split", "metadata"):
        rows, fields = read_rows(table(copy, name))
        for row in rows:
            if row["study_id"] == "50000001":
                row["dicom_id"] = str(secret_dicom)
            if row["study_id"] == study2:
                row["subject_id"] = subject
        write_rows(table(copy, name), rows, fields)

    opened = []
    real_open, real_image_open = builtins.open, Image.open
    monkeypatch.setattr(builtins, "open", lambda f, *a, **k: (opened.append(str(f)), real_open(f, *a, **k))[1])
    monkeypatch.setattr(Image, "open", lambda f, *a, **k: (opened.append(str(f)), real_image_open(f, *a, **k))[1])
    dataset = MimicCXR(str(copy), "train", 32)
    monkeypatch.undo()

    assert not [p for p in opened if "outside" in os.path.normpath(p)]
    assert len(dataset) == TRAIN_KEPT - 2
    assert dataset.summary.skipped[UNSAFE_ID] == 2
    assert "SECRET" not in " ".join(dataset.reports)
    assert all(os.path.commonpath([str(copy), p]) == str(copy) for p in dataset.paths)
    assert "outside" in str(dataset.summary)  # the example names the offending id


def test_openi_ids_that_are_paths_are_skipped_and_counted(tmp_path):
    root = make_openi_tree(str(tmp_path / "openi"), image_size=48)
    clean = {s: len(OpenI(root, s, 32)) for s in ("train", "val", "test")}
    xml = os.path.join(root, "ecgen-radiology", "1.xml")
    with open(xml) as f:
        text = f.read().replace('parentImage id="CXR1_1_IM-0001-1001"',
                                'parentImage id="/elsewhere/CXR1_1_IM-0001-1001"')
    with open(xml, "w") as f:
        f.write(text)
    proj = os.path.join(root, "indiana_projections.csv")
    rows, fields = read_rows(proj)
    rows[2]["filename"] = "../../elsewhere/" + rows[2]["filename"]  # report 2's frontal image
    write_rows(proj, rows, fields)
    parts = {s: OpenI(root, s, 32) for s in clean}
    reason = "image id that is a path, not a name (never opened)"
    assert sum(p.summary.skipped[reason] for p in parts.values()) == 1
    assert all(p.summary.skipped["indiana_projections.csv row whose filename is a path (ignored)"] == 1
               for p in parts.values())
    assert sum(map(len, parts.values())) == sum(clean.values()) - 2  # reports 1 and 2 lose their frontal image
    assert not any("CXR1_1_IM-0001-1001" in p for ds in parts.values() for p in ds.paths)


# --- encodings and CSV shapes ----------------------------------------------------------------

def test_one_report_with_an_invalid_utf8_byte_skips_that_study_naming_the_file(copy):
    report = copy / "files" / "p10" / "p10000000" / "s50000000.txt"
    report.write_bytes(report.read_bytes().replace(b"FINDINGS", b"FIND\xffINGS", 1))
    dataset = MimicCXR(str(copy), "train", 32)
    assert len(dataset) == TRAIN_KEPT - 1
    reason = "unreadable report (not UTF-8 or damaged)"
    assert dataset.summary.skipped[reason] == 1
    assert "s50000000.txt: not UTF-8" in dataset.summary.examples[reason]


def test_invalid_utf8_in_a_zipped_report_skips_that_study(tmp_path):
    root = make_mimic_tree(str(tmp_path / "zipped"), image_size=48, reports_zip=True)
    path = os.path.join(root, "mimic-cxr-reports.zip")
    with zipfile.ZipFile(path) as z:
        members = {n: z.read(n) for n in z.namelist()}
    name = next(n for n in members if n.endswith("s50000003.txt"))
    members[name] = b"\xc3\x28" + members[name]  # an invalid two-byte sequence
    with zipfile.ZipFile(path, "w") as z:
        for n, data in members.items():
            z.writestr(n, data)
    dataset = MimicCXR(root, "train", 32)
    assert len(dataset) == TRAIN_KEPT - 1
    assert "mimic-cxr-reports.zip:files/p10/p10000003/s50000003.txt: not UTF-8" in str(dataset.summary)


def test_csvs_with_a_bom_and_spaces_after_commas_read_the_same(tree, copy):
    for name in ("split", "metadata", "chexpert"):
        rows, fields = read_rows(table(copy, name))
        write_rows(table(copy, name), rows, fields, bom=True, sep=", ")
    assert read_rows(table(copy, "split"))[1][0] == "\ufeffdicom_id"  # the trial's file, as written
    a, b = MimicCXR(tree, "train", 32), MimicCXR(str(copy), "train", 32)
    assert a.reports == b.reports and [os.path.basename(p) for p in a.paths] == [os.path.basename(p) for p in b.paths]
    np.testing.assert_array_equal(a.labels, b.labels)
    assert a.labels.sum() > 0


@pytest.mark.parametrize("name, column", [("split", "subject_id"), ("split", "split"), ("metadata", "dicom_id"),
                                          ("chexpert", "study_id"), ("chexpert", "Edema")])
def test_a_missing_column_names_the_file_and_the_column(copy, name, column):
    rows, fields = read_rows(table(copy, name))
    write_rows(table(copy, name), rows, [f for f in fields if f != column])
    with pytest.raises(ValueError, match=rf"mimic-cxr-2.0.0-{name}.csv.*no column '{column}'"):
        MimicCXR(str(copy), "train", 32)


def test_a_missing_view_position_column_is_reported_as_such(copy):
    rows, fields = read_rows(table(copy, "metadata"))
    write_rows(table(copy, "metadata"), rows, [f for f in fields if f != "ViewPosition"])
    with pytest.raises(ValueError, match=r"metadata.csv: no column 'ViewPosition'.*views=all"):
        MimicCXR(str(copy), "train", 32)
    assert len(MimicCXR(str(copy), "train", 32, views=None)) == TRAIN_KEPT + 1  # + the lateral-only study


def test_a_nul_byte_or_a_non_number_label_is_clear(copy):
    rows, fields = read_rows(table(copy, "chexpert"))
    rows[0]["Cardiomegaly"] = "yes"
    write_rows(table(copy, "chexpert"), rows, fields)
    dataset = MimicCXR(str(copy), "train", 32)
    assert len(dataset) == TRAIN_KEPT - 1
    assert "'Cardiomegaly' holds 'yes'" in dataset.summary.examples["unparsable CheXpert label"]
    path = table(copy, "split")
    with gzip.open(path, "ab") as f:
        f.write(b"bad\x00id,50000099,10000099,train\n")
    dataset = MimicCXR(str(copy), "train", 32)  # a NUL byte never reaches a file name
    assert len(dataset) == TRAIN_KEPT - 1 and dataset.summary.skipped[UNSAFE_ID] == 1
    assert dataset.summary.examples[UNSAFE_ID] == "dicom_id='bad\\x00id'"


def test_openi_projections_csv_with_a_bom_spaces_or_a_missing_column(tmp_path):
    root = make_openi_tree(str(tmp_path / "openi"), image_size=48)
    before = OpenI(root, "train", 32).paths
    proj = os.path.join(root, "indiana_projections.csv")
    rows, fields = read_rows(proj)
    write_rows(proj, rows, fields, bom=True, sep=" , ")
    assert OpenI(root, "train", 32).paths == before
    write_rows(proj, rows, ["uid", "filename"])
    with pytest.raises(ValueError, match="indiana_projections.csv: no column 'projection'"):
        OpenI(root, "train", 32)


# --- shard integrity ------------------------------------------------------------------------

BLOCK = 4096  # 32 x 32 images: 4 per block, 10+ blocks per train file


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = make_mimic_tree(str(tmp_path_factory.mktemp("many")), image_size=32,
                           studies=[("train", [("PA", "")], "full", True)] * 41)
    out = str(tmp_path_factory.mktemp("shards"))
    shards.prepare(lambda s: MimicCXR(root, s, 32), out, ["train"], source={"fake": root}, image_size=32,
                   workers=1, progress=False, block_bytes=BLOCK)
    return out


def flipped_copy(prepared, tmp_path, name, position):
    out = shutil.copytree(prepared, tmp_path / "flipped")
    data = bytearray((out / name).read_bytes())
    data[position] ^= 0x01
    (out / name).write_bytes(bytes(data))
    return out


def test_a_flipped_byte_in_the_images_is_never_returned(prepared, tmp_path):
    clean = ShardDataset(prepared, "train")
    size = os.path.getsize(os.path.join(prepared, "train.images.npy"))
    assert size > 10 * BLOCK
    rng = np.random.default_rng()
    for trial in range(4):
        position = int(rng.integers(BLOCK, size))  # past the header block: the sampled open check may miss it
        out = flipped_copy(prepared, tmp_path / str(trial), "train.images.npy", position)
        dataset = ShardDataset(str(out), "train", sample_blocks=0)
        row = (position - dataset.images.offset) // (32 * 32)
        failed = []
        for i in range(len(dataset)):
            try:
                np.testing.assert_array_equal(dataset[i].image, clean[i].image)
            except ShardError as err:
                assert "train.images.npy" in str(err) and "CRC-32" in str(err) and "--verify" in str(err)
                failed.append(int(dataset.rows[i]))
        first_row = (position // BLOCK * BLOCK - dataset.images.offset) // (32 * 32)
        assert row in failed and all(abs(r - first_row) <= BLOCK // (32 * 32) for r in failed), (position, failed)


@pytest.mark.parametrize("name, position", [("train.images.npy", 20), ("train.labels.npy", -3),
                                            ("train.text.bin", 7), ("train.text_offsets.npy", -1),
                                            ("train.valid.npy", -1)])
def test_opening_catches_a_flipped_byte_in_headers_and_small_files(prepared, tmp_path, name, position):
    out = flipped_copy(prepared, tmp_path, name, position)
    with pytest.raises(ShardError, match=rf"{name}: bytes \d+-\d+ \(block \d+\) differ"):
        ShardDataset(str(out), "train")
    ShardDataset(str(out), "train", check="sizes")  # the old check did not see it
    with pytest.raises(ShardError, match=rf"{name} \(sha256 mismatch\)"):
        ShardDataset(str(out), "train", check="full")


def test_opening_with_every_block_sampled_catches_any_flip(prepared, tmp_path):
    size = os.path.getsize(os.path.join(prepared, "train.images.npy"))
    out = flipped_copy(prepared, tmp_path, "train.images.npy", int(np.random.default_rng().integers(size)))
    with pytest.raises(ShardError, match="CRC-32"):
        ShardDataset(str(out), "train", sample_blocks=size // BLOCK + 1)


def test_blocks_checked_in_workers_are_not_hashed_again(prepared):
    dataset = ShardDataset(prepared, "train", sample_blocks=0)
    assert dataset.checked.sum() == 1  # the header block
    loader = torch.utils.data.DataLoader(dataset, batch_size=8, num_workers=2, collate_fn=len)
    assert sum(loader) == len(dataset)
    assert dataset.checked.all()  # the map is shared memory: the workers' checks are seen here


def test_shards_without_block_checksums_open_with_a_warning(prepared, tmp_path, capsys):
    out = shutil.copytree(prepared, tmp_path / "v1")
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["version"] = 1
    for info in manifest["splits"]["train"]["files"].values():
        del info["crc32"], info["block_bytes"]
    (out / "manifest.json").write_text(json.dumps(manifest))
    assert len(ShardDataset(str(out), "train")) == 41
    assert "without block checksums" in capsys.readouterr().err
    with pytest.raises(ValueError, match="check must be one of"):
        ShardDataset(str(out), "train", check="crc")


# --- the mcr.prepare CLI -------------------------------------------------------------------------

def test_every_prepare_flag_has_help_and_closed_sets_have_choices():
    actions = [a for a in build_parser()._actions if a.option_strings and a.dest != "help"]
    assert all(a.help for a in actions), [a.dest for a in actions if not a.help]
    assert {a.dest: a.choices for a in actions}["data"] == ("mimic-cxr", "openi")
    assert "train,val,test" in build_parser().format_help()


@pytest.mark.parametrize("flags, named", [
    (["--data", "nope"], "--data"),
    (["--splits", "train,dev"], "--splits"),
    (["--image-size", "8"], "--image-size"),
    (["--workers", "-1"], "--workers"),
    (["--chunk", "0"], "--chunk"),
    (["--data-options", "images=two"], "--data-options"),
    (["--data-options", "colour=red"], "--data-options"),
])
def test_bad_prepare_values_exit_2_with_one_line_before_any_work(tree, tmp_path, capsys, flags, named):
    out = tmp_path / "out"
    base = {"--data": "mimic-cxr", "--data-root": tree, "--out": str(out)}
    base.update(dict(zip(flags[::2], flags[1::2])))
    with pytest.raises(SystemExit) as stop:
        prepare_main([x for kv in base.items() for x in kv])
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and named in err, err
    assert not out.exists()


def test_bad_prepare_paths_exit_2_and_a_failed_verify_exits_1(tmp_path, capsys):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    for flags, named in [(["--data-root", str(tmp_path / "none"), "--out", str(tmp_path / "o")], "--data-root"),
                         (["--data-root", str(tmp_path), "--out", str(a_file)], "--out")]:
        with pytest.raises(SystemExit) as stop:
            prepare_main(["--data", "mimic-cxr", *flags])
        assert stop.value.code == 2 and named in capsys.readouterr().err.splitlines()[-1]
    with pytest.raises(SystemExit) as stop:
        prepare_main(["--verify", str(tmp_path / "none")])
    assert stop.value.code == 2
    assert prepare_main(["--verify", str(tmp_path)]) == 1
    assert "not a prepared shard folder" in capsys.readouterr().err
