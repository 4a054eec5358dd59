"""Smoke test of the finding-footprints study (experiments/finding-footprints/footprints.py),
so that the study cannot rot while the generator it patches changes."""
import importlib.util
import os
from math import comb

import numpy as np
import pytest

STUDY = os.path.join(os.path.dirname(__file__), os.pardir, os.pardir, "experiments", "finding-footprints",
                     "footprints.py")


@pytest.fixture(scope="module")
def footprints():
    spec = importlib.util.spec_from_file_location("footprints", STUDY)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_p_all_dropped_matches_counting(footprints):
    # 4 patches, 2 dropped: the two given patches are both dropped in 1 of C(4, 2) = 6 masks
    assert footprints.p_all_dropped(2, 4, 0.5) == pytest.approx(1 / 6)
    assert footprints.p_all_dropped(0, 36, 0.5) == 1.0
    assert footprints.p_all_dropped(19, 36, 0.5) == 0.0
    assert footprints.p_all_dropped(3, 36, 0.5) == pytest.approx(comb(33, 15) / comb(36, 18))


def test_footprints_of_large_findings_cover_more_patches(footprints):
    counts = footprints.finding_footprints(60, image_size=64, patch_size=16)
    assert counts["edema"] and counts["nodule"]
    assert np.median(counts["edema"]) > np.median(counts["nodule"]) >= 1


def test_the_study_runs_from_its_command_line(footprints, capsys):
    counts = footprints.main(["--studies", "8", "--image-size", "32", "--patch-size", "16"])
    out = capsys.readouterr().out
    assert counts and "every finding" in out
    with pytest.raises(SystemExit) as err:
        footprints.main(["--image-size", "30"])
    assert err.value.code == 2
