"""MIMIC-CXR-JPG reader and report sections on a fake tree with every defect: skipped
studies counted by reason, gz and plain CSVs, zip and extracted reports, views, labels."""
import gzip
import os
import shutil

import numpy as np
import pytest

from mcr.data.common import CHEXPERT_LABELS, UnreadableImage, load_image
from mcr.data.fake import MIMIC_EXPECTED, make_mimic_tree
from mcr.data.mimic import MimicCXR
from mcr.data.registry import open_dataset, parse_options
from mcr.data.reports import compose_report, report_from_text, split_sections

MIMIC_REPORT = """                                 FINAL REPORT
 EXAMINATION:  CHEST (PA AND LAT)

 INDICATION:  ___F with new onset ascites  // eval for infection

 COMPARISON:  None.

 FINDINGS:

 There is no focal consolidation, pleural effusion or pneumothorax.  Bilateral
 nodular opacities most likely represent nipple shadows.

 IMPRESSION:

 No acute cardiopulmonary process.
"""


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    return make_mimic_tree(str(tmp_path_factory.mktemp("mimic")), image_size=48)


def test_sections_are_split_cleaned_and_composed():
    sections = split_sections(MIMIC_REPORT)
    assert list(sections) == ["examination", "indication", "comparison", "findings", "impression"]
    assert sections["indication"] == "F with new onset ascites // eval for infection"  # ___ dropped
    assert sections["findings"].startswith("There is no focal consolidation, pleural effusion or pneumothorax. Bil")
    assert compose_report(sections) == ("FINDINGS: " + sections["findings"] +
                                        " IMPRESSION: No acute cardiopulmonary process.")
    assert compose_report(sections, ("impression",)) == "IMPRESSION: No acute cardiopulmonary process."


@pytest.mark.parametrize("text, wanted, fallback, expected", [
    ("FINAL REPORT\n IMPRESSION: Clear lungs.", ("findings", "impression"), "last", "IMPRESSION: Clear lungs."),
    ("INDICATION: cough\n FINDINGS: Normal heart.", ("impression",), "last", "Normal heart."),
    ("INDICATION: cough\n FINDINGS: Normal heart.", ("impression",), "none", ""),
    ("FINAL REPORT\n  Lungs are clear. No effusion.", ("findings", "impression"), "last",
     "Lungs are clear. No effusion."),
    ("FINAL REPORT\n \n", ("findings", "impression"), "last", ""),
    ("FINDINGS AND IMPRESSION: Small left effusion.", ("findings",), "last", "FINDINGS: Small left effusion."),
])
def test_section_fallbacks(text, wanted, fallback, expected):
    assert report_from_text(text, wanted, fallback) == expected


def test_bad_fallback_is_refused():
    with pytest.raises(ValueError, match="fallback"):
        compose_report({}, fallback="first")


@pytest.mark.parametrize("split", ["train", "val", "test"])
def test_summary_counts_every_skip(tree, split):
    dataset = MimicCXR(tree, split, 32)
    assert dataset.summary.as_dict()["kept"] == MIMIC_EXPECTED[split]["kept"] == len(dataset)
    assert dict(dataset.summary.skipped) == MIMIC_EXPECTED[split]["skipped"]
    if split == "train":
        assert dataset.summary.notes == {"studies without CheXpert labels (all-zero labels)": 1}
        assert "empty report" in str(dataset.summary)


def test_samples_images_reports_and_labels(tree):
    dataset = MimicCXR(tree, "train", 32)
    for i in range(len(dataset)):
        sample = dataset[i]
        assert sample.image.shape == (32, 32) and sample.image.dtype == np.uint8
        assert sample.report and sample.labels.shape == (len(CHEXPERT_LABELS),)
    # study 4's PA file is missing, so its AP image is used
    assert any(p.endswith("00041-dicom.jpg") for p in dataset.paths)
    assert not any(p.endswith("00051-dicom.jpg") or "LATERAL" in p for p in dataset.paths)
    # impression-only and heading-less reports are kept
    assert any(r.startswith("IMPRESSION:") for r in dataset.reports)
    assert any(not r.startswith(("FINDINGS", "IMPRESSION")) for r in dataset.reports)
    # the study without a CheXpert row has all-zero labels; study 1 has an uncertain Edema
    assert (dataset.labels.sum(1) == 0).sum() == 1
    edema = CHEXPERT_LABELS.index("Edema")
    assert dataset.labels[1, edema] == 0
    assert MimicCXR(tree, "train", 32, uncertain=1.0).labels[1, edema] == 1


def test_views_and_images_per_study(tree):
    everything = MimicCXR(tree, "train", 32, views=None, images_per_study="all")
    # + study 0's lateral, + study 5 (lateral only); still without the corrupt/missing files
    assert len(everything) == MIMIC_EXPECTED["train"]["kept"] + 2
    pa_only = MimicCXR(tree, "train", 32, views=("PA",))
    assert len(pa_only) == MIMIC_EXPECTED["train"]["kept"] - 2  # studies 1 and 4 are AP
    assert pa_only.summary.skipped["no image with view in ('PA',)"] == 2  # studies 1 and 5
    assert pa_only.summary.skipped["study without a usable image"] == 2  # study 4's PA is missing, 6's corrupt
    with pytest.raises(ValueError, match="images_per_study"):
        MimicCXR(tree, "train", 32, images_per_study="two")


def test_plain_csvs_and_zipped_reports_read_the_same(tree, tmp_path):
    other = make_mimic_tree(str(tmp_path / "zipped"), image_size=48, reports_zip=True)
    for name in os.listdir(other):
        if name.endswith(".csv.gz"):
            with gzip.open(os.path.join(other, name), "rb") as f, open(os.path.join(other, name[:-3]), "wb") as g:
                g.write(f.read())
            os.remove(os.path.join(other, name))
    assert not any(n.endswith(".gz") for n in os.listdir(other))
    a, b = MimicCXR(tree, "train", 32), MimicCXR(other, "train", 32)
    assert a.reports == b.reports
    np.testing.assert_array_equal(a.labels, b.labels)
    np.testing.assert_array_equal(a[3].image, b[3].image)


def test_missing_inputs_are_clear_errors(tree, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        MimicCXR(str(tmp_path / "nowhere"), "train")
    with pytest.raises(FileNotFoundError, match="split.csv"):
        MimicCXR(str(tmp_path), "train")
    partial = tmp_path / "no_reports"
    partial.mkdir()
    shutil.copy(os.path.join(tree, "mimic-cxr-2.0.0-split.csv.gz"), partial)
    shutil.copy(os.path.join(tree, "mimic-cxr-2.0.0-metadata.csv"), partial)
    with pytest.raises(FileNotFoundError, match="no MIMIC-CXR reports"):
        MimicCXR(str(partial), "train")
    with pytest.raises(ValueError, match="split must be"):
        MimicCXR(tree, "holdout")
    with pytest.raises(ValueError, match="needs --data-root"):
        open_dataset("mimic-cxr", "", "train", 32)


def test_image_truncated_after_indexing_is_replaced_and_counted(tree, tmp_path):
    copy = shutil.copytree(tree, tmp_path / "copy")
    dataset = MimicCXR(str(copy), "train", 32)
    with open(dataset.paths[2], "r+b") as f:  # passes the header check, fails to decode
        f.truncate(400)
    with pytest.raises(UnreadableImage):
        load_image(dataset.paths[2], 32)
    sample = dataset[2]
    assert sample.report == dataset.reports[3]  # the next readable entry
    assert dataset.summary.skipped["unreadable image at load time"] == 1
    assert all(dataset[i] is not None for i in range(len(dataset)))  # the epoch goes on


def test_load_image_resizes_and_centre_crops(tree):
    dataset = MimicCXR(tree, "val", 40)
    image = load_image(dataset.paths[0], 40)  # the source is 48 x 60: 40 x 50, crop 5 rows top and bottom
    assert image.shape == (40, 40) and image.std() > 0


def test_data_options_parse_and_reject():
    assert parse_options("views=PA;images=all;sections=impression;uncertain=1", "mimic-cxr") == {
        "views": ("PA",), "images_per_study": "all", "sections": ("impression",), "uncertain": 1.0}
    assert parse_options("views=all")["views"] is None
    with pytest.raises(ValueError, match="KEY=VALUE"):
        parse_options("colour=red")
    with pytest.raises(ValueError, match="mimic-cxr only"):
        parse_options("uncertain=1", "openi")


def copy_without_column(tree, dest, table, column):
    """A copy of the MIMIC tree whose `table` CSV (plain or gzipped) lacks `column`."""
    import csv
    import io

    shutil.copytree(tree, dest)
    path = next(os.path.join(dest, n) for n in os.listdir(dest) if n.startswith(f"mimic-cxr-2.0.0-{table}.csv"))
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        rows = list(csv.reader(io.TextIOWrapper(f, encoding="utf-8")))
    keep = [k for k, name in enumerate(rows[0]) if name != column]
    with opener(path, "wt", newline="") as f:
        csv.writer(f).writerows([[row[k] for k in keep] for row in rows])
    return str(dest)


@pytest.mark.parametrize("table, column", [("metadata", "ViewPosition"), ("chexpert", "Edema"),
                                           ("split", "subject_id")])
def test_a_missing_column_stops_training_before_any_work(tree, tmp_path, capsys, table, column):
    from mcr.train import main

    root = copy_without_column(tree, tmp_path / "mimic", table, column)
    with pytest.raises(ValueError, match=f"{table}.csv.*no column '{column}'"):
        MimicCXR(root, "train")
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "metrics.jsonl").write_text("{}\n")  # --overwrite must not delete the old run for nothing
    with pytest.raises(SystemExit) as exit_info:
        main(["--data", "mimic-cxr", "--data-root", root, "--out-dir", str(run), "--overwrite"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1 and f"no column '{column}'" in err, err
    assert sorted(os.listdir(run)) == ["checkpoints", "metrics.jsonl"]
