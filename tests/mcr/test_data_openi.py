"""OpenI (IU X-ray, NLMCXR XML + PNG) reader on a fake tree with every defect, and the
training CLI on it."""
import json
import os

import numpy as np
import pytest

from mcr.data.common import CHEXPERT_LABELS
from mcr.data.fake import OPENI_DEFECTS, make_openi_tree
from mcr.data.openi import OpenI, image_key, mesh_labels, parse_report
from mcr.train import main

RUN_FLAGS = ["--vocab-size", "200", "--batch-size", "4", "--max-steps", "2", "--eval-every", "0",
            "--warmup-steps", "1", "--log-every", "1"]
SPLITS = ("train", "val", "test")


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    return make_openi_tree(str(tmp_path_factory.mktemp("openi")), image_size=48)


def test_splits_are_disjoint_seeded_and_cover_every_report(tree):
    parts = {s: OpenI(tree, s, 32) for s in SPLITS}
    reports = [set(parts[s].reports) for s in SPLITS]
    assert not (reports[0] & reports[1] or reports[0] & reports[2] or reports[1] & reports[2])
    assert parts["train"].reports == OpenI(tree, "train", 32).reports  # deterministic
    assert parts["train"].reports != OpenI(tree, "train", 32, split_seed=1).reports
    total = {"kept": 0}
    for dataset in parts.values():
        total["kept"] += len(dataset)
        for reason, n in dataset.summary.skipped.items():
            total[reason] = total.get(reason, 0) + n
    # 20 reports: 7 defective ones (3 and 4 lose one section but are kept)
    assert total == {"kept": 20 - 5, "empty report": 1, "unreadable image": 1, "report without a usable image": 2,
                     "report without an image of the wanted views": 1, "missing image file": 1,
                     "unparsable report XML": 1}


def test_sections_views_and_labels(tree):
    everything = {r: ds for s in SPLITS for ds in [OpenI(tree, s, 32)] for r in ds.reports}
    assert any(r.startswith("IMPRESSION:") for r in everything)  # report 3 (no findings)
    assert all("INDICATION" not in r and "XXXX" not in r for r in everything)
    uid, sections, images, terms = parse_report(os.path.join(tree, "ecgen-radiology", "1.xml"))
    assert uid == "CXR1" and images == ["CXR1_1_IM-0001-1001", "CXR1_1_IM-0001-2001"]
    assert set(sections) == {"comparison", "indication", "findings", "impression"}
    train = OpenI(tree, "train", 32)
    assert all(p.endswith("-1001.png") for p in train.paths)  # frontal only
    both = OpenI(tree, "train", 32, views=("Frontal", "Lateral"), images_per_study="all")
    assert len(both) > len(train) and any(p.endswith("-2001.png") for p in both.paths)
    assert train[0].image.shape == (32, 32) and train[0].labels.shape == (len(CHEXPERT_LABELS),)


def test_without_projections_the_first_readable_image_is_used(tmp_path):
    bare = make_openi_tree(str(tmp_path / "bare"), image_size=48, projections=False)
    parts = [OpenI(bare, s, 32) for s in SPLITS]
    assert parts[0].summary.notes["reports without projections file: view filter off"] == 1
    paths = [os.path.basename(p) for ds in parts for p in ds.paths]
    # reports 6 (corrupt frontal PNG) and 8 (frontal PNG missing) fall back to their lateral image
    assert sorted(p for p in paths if p.endswith("-2001.png")) == ["CXR6_1_IM-0006-2001.png",
                                                                    "CXR8_1_IM-0008-2001.png"]
    assert len(paths) == 20 - 3  # reports 5 (empty), 7 (no images), 9 (broken XML)


def test_mesh_terms_map_to_chexpert():
    y = mesh_labels(["Cardiomegaly/mild", "Pulmonary Atelectasis/base/left", "Catheters, Indwelling"])
    assert [CHEXPERT_LABELS[i] for i in np.flatnonzero(y)] == ["Atelectasis", "Cardiomegaly", "Support Devices"]
    assert CHEXPERT_LABELS[int(np.flatnonzero(mesh_labels(["normal"]))[0])] == "No Finding"
    assert mesh_labels(["normal", "Cardiomegaly"])[CHEXPERT_LABELS.index("No Finding")] == 0
    assert image_key("CXR12_1_IM-0012-1001") == image_key("12_1_IM-0012-1001.dcm.png") == "12_1_IM-0012-1001"


def test_missing_root_and_empty_root(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        OpenI(str(tmp_path / "nowhere"), "train")
    with pytest.raises(FileNotFoundError, match="no report XMLs"):
        OpenI(str(tmp_path), "train")
    assert OPENI_DEFECTS[5] == "empty"


def test_train_cli_on_openi(tree, tmp_path, capsys, tiny_flags):
    results = main(tiny_flags + RUN_FLAGS + ["--data", "openi", "--data-root", tree, "--out-dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert "openi train:" in out and "skipped: empty report" in out
    assert 0 <= results["i2t"]["R@1"] <= 100
    assert json.load(open(tmp_path / "final.json"))["step"] == 2


def test_16_bit_png_is_scaled_not_clipped(tmp_path):
    from PIL import Image

    from mcr.data.common import load_image

    ramp = (np.arange(64 * 64, dtype=np.uint16).reshape(64, 64) % 64) * 64  # 12-bit values 0..4032
    Image.fromarray(ramp).save(tmp_path / "deep.png")
    image = load_image(str(tmp_path / "deep.png"), 64)
    assert image.dtype == np.uint8 and image.max() == 255 and image.min() == 0
    assert np.unique(image).size > 32  # a ramp, not a white square
