"""Tests for the synthetic chest X-ray corpus (numpy only)."""

import re

import numpy as np
import pytest

from mcr.data.synthetic import (
    FINDINGS,
    REGIONS,
    SPLIT_OFFSETS,
    Study,
    SyntheticCXR,
    labels_from_names,
    make_study,
)

# Finding group -> (keyword regex, [(label, side, zone), ...]).
GROUPS = {
    "cardiomegaly": (r"cardiomegaly|enlarg", [("cardiomegaly", None, None)]),
    "effusion": (r"effusion", [("pleural_effusion_left", "left", None), ("pleural_effusion_right", "right", None)]),
    "consolidation": (
        r"consolidation|airspace opacity",
        [(f"consolidation_{s}_{z}", s, z) for s in ("left", "right") for z in ("upper", "lower")],
    ),
    "pneumothorax": (r"pneumothorax", [("pneumothorax_left", "left", None), ("pneumothorax_right", "right", None)]),
    "nodule": (r"nodul", [("nodule_left", "left", None), ("nodule_right", "right", None)]),
    "atelectasis": (r"atelectasis", [("atelectasis_left", "left", None), ("atelectasis_right", "right", None)]),
    "edema": (r"edema", [("pulmonary_edema", None, None)]),
    "devices": (r"tube|central line|catheter|pacemaker|devices", [("support_devices", None, None)]),
}
NEGATED = re.compile(r"\bno\b", re.I)
NORMAL_WORDS = re.compile(r"normal|clear|sharp|unremarkable", re.I)


def sentences(report: str) -> list[str]:
    assert re.fullmatch(r"FINDINGS: \S.* IMPRESSION: \S.*", report), report
    assert report.count("FINDINGS:") == 1 and report.count("IMPRESSION:") == 1
    findings, impression = report[len("FINDINGS: "):].split(" IMPRESSION: ")
    parts = re.split(r"(?<=\.)\s+", findings) + re.split(r"(?<=\.)\s+", impression)
    out = [s for s in parts if not re.fullmatch(r"\d+\.", s)]  # drop "1." list numbers
    assert all(s.endswith(".") for s in out), report
    return out


def present(study: Study) -> set[str]:
    return {FINDINGS[i] for i in np.flatnonzero(study.labels)}


def words(sentence: str) -> set[str]:
    return set(re.findall(r"[a-z]+", sentence.lower()))


@pytest.fixture(scope="module")
def text_studies():
    return [make_study(i, seed=7, image_size=32) for i in range(400)]


@pytest.fixture(scope="module")
def image_studies():
    return [make_study(i, seed=3, image_size=64) for i in range(600)]


# --- determinism and API ----------------------------------------------------


def test_deterministic():
    a, b = make_study(12, seed=5, image_size=64), make_study(12, seed=5, image_size=64)
    assert a.image.tobytes() == b.image.tobytes()
    assert a.report == b.report
    assert np.array_equal(a.labels, b.labels)


def test_different_seed_or_index_differs():
    base = make_study(12, seed=5, image_size=64)
    for other in (make_study(13, seed=5, image_size=64), make_study(12, seed=6, image_size=64)):
        assert other.image.tobytes() != base.image.tobytes()
    reports = {make_study(i, seed=5, image_size=32).report for i in range(50)}
    assert len(reports) > 45


def test_report_and_labels_do_not_depend_on_image_size():
    for i in range(20):
        small, big = make_study(i, seed=2, image_size=32), make_study(i, seed=2, image_size=96)
        assert small.report == big.report
        assert np.array_equal(small.labels, big.labels)


@pytest.mark.parametrize("size", [32, 64, 224])
def test_image_shape_dtype_and_contrast(size):
    for i in range(3):
        study = make_study(i, image_size=size)
        assert study.image.shape == (size, size)
        assert study.image.dtype == np.uint8
        assert study.image.std() > 20
        assert study.labels.shape == (len(FINDINGS),) and study.labels.dtype == np.float32


def test_labels_from_names():
    assert labels_from_names([]).tolist() == [1.0] + [0.0] * (len(FINDINGS) - 1)
    labels = labels_from_names(["cardiomegaly", "nodule_left"])
    assert labels.dtype == np.float32
    assert set(np.flatnonzero(labels)) == {FINDINGS.index("cardiomegaly"), FINDINGS.index("nodule_left")}
    with pytest.raises(ValueError):
        labels_from_names(["broken_leg"])


def test_dataset_indexing():
    ds = SyntheticCXR(5, split="val", image_size=32, seed=4)
    assert len(ds) == 5
    expected = make_study(SPLIT_OFFSETS["val"] + 3, seed=4, image_size=32)
    assert ds[3].report == expected.report and ds[3].image.tobytes() == expected.image.tobytes()
    assert ds[-1].image.tobytes() == ds[4].image.tobytes()
    assert ds[-5].report == ds[0].report
    for bad in (5, -6, 100):
        with pytest.raises(IndexError):
            ds[bad]


def test_splits_do_not_overlap():
    images = {
        split: {SyntheticCXR(40, split=split, image_size=32)[i].image.tobytes() for i in range(40)}
        for split in SPLIT_OFFSETS
    }
    assert all(len(v) == 40 for v in images.values())
    assert not images["train"] & images["val"]
    assert not images["train"] & images["test"]
    assert not images["val"] & images["test"]


@pytest.mark.parametrize(
    "kwargs, word",
    [
        ({"num_studies": 0}, "num_studies"),
        ({"num_studies": 3, "split": "dev"}, "train"),
        ({"num_studies": 3, "image_size": 16}, "image_size"),
    ],
)
def test_dataset_bad_arguments(kwargs, word):
    with pytest.raises(ValueError, match=word):
        SyntheticCXR(**kwargs)


def test_make_study_bad_image_size():
    with pytest.raises(ValueError, match="image_size"):
        make_study(0, image_size=31)


# --- labels and report text ---------------------------------------------------


def test_normal_is_exclusive(text_studies):
    for study in text_studies:
        assert set(np.unique(study.labels)) <= {0.0, 1.0}
        assert study.labels[0] == (0.0 if study.labels[1:].any() else 1.0)


def test_every_present_finding_is_reported_with_laterality(text_studies):
    for study in text_studies:
        positive = [s for s in sentences(study.report) if not NEGATED.search(s)]
        for keyword, labels in GROUPS.values():
            for label, side, zone in labels:
                if label not in present(study):
                    continue
                assert any(
                    re.search(keyword, s, re.I) and {side, zone} - {None} <= words(s) for s in positive
                ), (label, study.report)


def test_positive_sentences_only_describe_present_findings(text_studies):
    for study in text_studies:
        for sentence in sentences(study.report):
            if NEGATED.search(sentence):
                continue
            for keyword, labels in GROUPS.values():
                if not re.search(keyword, sentence, re.I):
                    continue
                candidates = [
                    label for label, side, zone in labels
                    if (side is None or side in words(sentence) or not {"left", "right"} & words(sentence))
                    and (zone is None or zone in words(sentence) or not {"upper", "lower"} & words(sentence))
                ]
                assert set(candidates) & present(study), (sentence, study.report)


def test_negations_only_for_absent_findings(text_studies):
    seen_negation = False
    for study in text_studies:
        for sentence in sentences(study.report):
            lowered = sentence.lower()
            if re.search(r"heart size|cardiac silhouette|cardiomediastinal", lowered) and "normal" in lowered:
                assert "cardiomegaly" not in present(study), study.report
            if "costophrenic angles are sharp" in lowered:
                assert not {"pleural_effusion_left", "pleural_effusion_right"} & present(study)
            if "clear" in words(sentence):
                assert present(study) == {"normal"}, study.report
            if not NEGATED.search(sentence):
                continue
            for keyword, labels in GROUPS.values():
                if re.search(keyword, sentence, re.I):
                    seen_negation = True
                    sides = {"left", "right"} & words(sentence)
                    negated = {label for label, side, _ in labels if not sides or side in sides}
                    assert not negated & present(study), (sentence, study.report)
    assert seen_negation


def test_normal_reports_have_no_positive_findings(text_studies):
    normals = [s for s in text_studies if present(s) == {"normal"}]
    assert normals
    for study in normals:
        for sentence in sentences(study.report):
            assert NEGATED.search(sentence) or NORMAL_WORDS.search(sentence), (sentence, study.report)


def test_label_frequencies():
    labels = np.stack([make_study(i, seed=11, image_size=32).labels for i in range(2000)])
    freq = dict(zip(FINDINGS, labels.mean(axis=0)))
    assert 0.15 <= freq["normal"] <= 0.35, freq
    for name in FINDINGS[1:]:
        assert freq[name] >= 0.02, (name, freq[name])
    assert labels[:, 1:].sum(axis=1).max() <= 3


# --- image/label consistency (statistical) -------------------------------------


def region_mean(image: np.ndarray, name: str) -> float:
    size = image.shape[0]
    x0, y0, x1, y1 = (round(v * size) for v in REGIONS[name])
    return float(image[y0:y1, x0:x1].mean())


def group_gap(studies, label, feature) -> float:
    """Mean feature over studies with the label minus mean over those without."""
    has = np.array([study.labels[FINDINGS.index(label)] == 1 for study in studies])
    values = np.array([feature(study.image) for study in studies])
    assert 10 <= has.sum() <= len(studies) - 10
    return float(values[has].mean() - values[~has].mean())


def test_effusion_brightens_its_own_lower_lung(image_studies):
    # Patient's left is on the image right: left effusion brightens "left_lower" (image right).
    left_minus_right = lambda img: region_mean(img, "left_lower") - region_mean(img, "right_lower")  # noqa: E731
    assert group_gap(image_studies, "pleural_effusion_left", left_minus_right) > 15
    assert group_gap(image_studies, "pleural_effusion_right", left_minus_right) < -15


def test_left_lower_box_is_on_image_right():
    assert REGIONS["left_lower"][0] > 0.5 > REGIONS["right_lower"][2]


def test_cardiomegaly_widens_heart(image_studies):
    border = lambda img: region_mean(img, "left_heart_border") - region_mean(img, "left_upper")  # noqa: E731
    assert group_gap(image_studies, "cardiomegaly", border) > 25


def test_pneumothorax_darkens_its_apex(image_studies):
    left_minus_right = lambda img: region_mean(img, "left_apex") - region_mean(img, "right_apex")  # noqa: E731
    assert group_gap(image_studies, "pneumothorax_left", left_minus_right) < -8
    assert group_gap(image_studies, "pneumothorax_right", left_minus_right) > 8


def test_global_brightness_varies_within_normals(image_studies):
    means = [s.image.mean() for s in image_studies if s.labels[0] == 1]
    assert np.std(means) > 5
