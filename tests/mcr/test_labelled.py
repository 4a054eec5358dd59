"""The labelled-images reader on fake trees with CheXpert's and RSNA's real column names."""
import math
import os

import numpy as np
import pytest

from mcr.data.labelled import LabelledImages, inside_root, open_labelled, parse_labelled_options


@pytest.fixture
def chexpert_tree(tmp_path, chexpert):
    """CheXpert-v1.0-small/valid/... with three good images, one missing, one unreadable,
    one path that leaves the root."""
    root = tmp_path / "chexpert"
    rel = "CheXpert-v1.0-small/valid/patient{:05d}/study1/view1_frontal.jpg"
    for i in range(3):
        chexpert.write_image(str(root / rel.format(i)), value=60 * i)
    bad = root / rel.format(4)
    bad.parent.mkdir(parents=True)
    bad.write_bytes(b"not a jpeg")
    chexpert.write_image(str(tmp_path / "outside.jpg"))
    rows = [chexpert.row(rel.format(0), Cardiomegaly="1.0", Edema="0.0", Atelectasis="-1.0"),
            chexpert.row(rel.format(1), Cardiomegaly="-1.0", Pleural_Effusion="1.0", No_Finding=""),
            chexpert.row(rel.format(2), No_Finding="1.0", Cardiomegaly="0.0"),
            chexpert.row(rel.format(3), Edema="1.0"),   # missing file
            chexpert.row(rel.format(4), Edema="1.0"),   # unreadable
            chexpert.row("../outside.jpg", Edema="1.0")]
    (root / "valid.csv").write_text("\n".join([chexpert.header, *rows]) + "\n")
    return root


def column(dataset, name):
    return dataset.labels[:, list(dataset.label_names).index(name)]


def test_chexpert_columns_policies_and_skips(chexpert_tree):
    data = LabelledImages(str(chexpert_tree), "valid.csv", 32)
    # Sex, Age, Frontal/Lateral, AP/PA are not labels; nor are columns blank in every row
    assert list(data.label_names) == ["No Finding", "Cardiomegaly", "Edema", "Atelectasis", "Pleural Effusion"]
    assert len(data) == 3
    assert data.summary.skipped == {"missing image file": 1, "unreadable image": 1, "image path outside the root": 1}
    assert column(data, "Cardiomegaly").tolist() == [1.0, 0.0, 0.0]  # U-Zeros by default
    assert column(data, "Edema").tolist() == [0.0, 0.0, 0.0]          # blank -> 0 by default
    sample = data[0]
    assert sample.image.shape == (32, 32) and sample.image.dtype == np.uint8 and sample.report == ""


@pytest.mark.parametrize("uncertain, expected", [("zeros", 0.0), ("ones", 1.0), ("ignore", math.nan)])
def test_uncertainty_policy(chexpert_tree, uncertain, expected, chexpert):
    data = LabelledImages(str(chexpert_tree), "valid.csv", 32, label_names=chexpert.labels, uncertain=uncertain,
                          missing="ignore")
    cardio = column(data, "Cardiomegaly")
    assert cardio[0] == 1.0 and cardio[2] == 0.0
    assert (math.isnan(cardio[1]) if math.isnan(expected) else cardio[1] == expected)
    assert np.isnan(column(data, "Fracture")).all()  # blank everywhere -> unknown under missing=ignore


def test_paths_confined_to_the_root(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    (root / "a.png").write_bytes(b"")
    os.symlink(tmp_path, root / "link")
    assert inside_root(str(root), "a.png") == os.path.realpath(root / "a.png")
    for escaping in ("../x.png", "/etc/passwd", "link/x.png", ""):
        assert inside_root(str(root), escaping) is None


def test_rsna_layout_merges_rows_of_one_image(tmp_path, chexpert):
    root = tmp_path / "rsna"
    for pid in ("p0", "p1"):
        chexpert.write_image(str(root / "stage_2_train_images" / f"{pid}.png"))
    (root / "stage_2_train_labels.csv").write_text(
        "patientId,x,y,width,height,Target\np0,,,,,0\np1,264.0,152.0,213.0,379.0,1\n"
        "p1,562.0,152.0,256.0,453.0,1\n")
    data = open_labelled(str(root), "train", 32, "train=stage_2_train_labels.csv;path_column=patientId;"
                         "path_template=stage_2_train_images/{}.png;labels=Target")
    assert data.label_names == ("Target",) and data.labels[:, 0].tolist() == [0.0, 1.0]


def test_bad_cells_and_options_are_named(chexpert_tree, chexpert):
    with open(chexpert_tree / "valid.csv", "a") as f:
        f.write(chexpert.row("CheXpert-v1.0-small/valid/patient00000/study1/view1_frontal.jpg", Edema="yes") + "\n")
    data = LabelledImages(str(chexpert_tree), "valid.csv", 32, label_names=["Edema"])
    assert "label cell not 1, 0, -1 or blank (column 'Edema')" in data.summary.skipped
    with pytest.raises(ValueError, match="uncertain=maybe"):
        parse_labelled_options("uncertain=maybe")
    with pytest.raises(ValueError, match="bad item 'colour=red'"):
        parse_labelled_options("colour=red")
    with pytest.raises(ValueError, match="no column 'Nodule'"):
        LabelledImages(str(chexpert_tree), "valid.csv", 32, label_names=["Nodule"])
    with pytest.raises(FileNotFoundError, match="train.csv"):
        open_labelled(str(chexpert_tree), "train", 32)
