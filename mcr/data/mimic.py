"""MIMIC-CXR-JPG v2 reader.

Expected under `root` (the PhysioNet layout; CSVs plain or gzipped):

    files/pXX/pYYYYYYYY/sZZZZZZZZ/<dicom_id>.jpg
    mimic-cxr-2.0.0-split.csv[.gz]        dicom_id, study_id, subject_id, split
    mimic-cxr-2.0.0-metadata.csv[.gz]     dicom_id, ..., ViewPosition (needed for the view filter)
    mimic-cxr-2.0.0-chexpert.csv[.gz]     optional: subject_id, study_id, 14 CheXpert columns
    mimic-cxr-reports.zip                 or the extracted files/pXX/pYYYYYYYY/sZZZZZZZZ.txt
                                          (beside the images, or under mimic-cxr-reports/)

Splits are the official ones (val = "validate"). By default one frontal image per study
(PA preferred to AP, then the smallest dicom_id); images_per_study="all" keeps every image
of the wanted views, each paired with its study's report. Studies without a usable image,
report, or text after section extraction are skipped and counted in `summary`.
CheXpert labels: 1 = positive; uncertain (-1) maps to `uncertain` (default 0); blank = 0.
"""
import csv
import gzip
import io
import os
import zipfile
from collections import defaultdict

import numpy as np

from mcr.data.common import CHEXPERT_LABELS, ImageReportDataset, Summary, add_study_images, check_reader_args
from mcr.data.reports import report_from_text

PREFIX = "mimic-cxr-2.0.0-"
SPLITS = {"train": "train", "val": "validate", "validate": "validate", "test": "test"}
FRONTAL = ("PA", "AP")


def find_table(root, name, required=True):
    """Path of <root>/mimic-cxr-2.0.0-<name>.csv[.gz], or None when optional and absent."""
    for ext in (".csv.gz", ".csv"):
        path = os.path.join(root, PREFIX + name + ext)
        if os.path.isfile(path):
            return path
    if required:
        raise FileNotFoundError(f"MIMIC-CXR root {root!r} has no {PREFIX}{name}.csv(.gz)")
    return None


def read_table(path):
    """Rows of a plain or gzipped CSV as dicts."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt", newline="") as f:
        return list(csv.DictReader(f))


class ReportStore:
    """Report texts by relative path 'files/pXX/pYYYYYYYY/sZZZZZZZZ.txt', from
    mimic-cxr-reports.zip or an extracted folder."""

    def __init__(self, root, reports=None):
        candidates = [reports] if reports else [
            os.path.join(root, "mimic-cxr-reports.zip"), os.path.join(root, "mimic-cxr-reports"), root]
        self.zip = self.dir = None
        for path in candidates:
            if path.endswith(".zip") and os.path.isfile(path):
                self.zip = zipfile.ZipFile(path)
                # member names may carry a leading folder; key them from "files/" on
                self.names = {n[n.find("files/"):]: n for n in self.zip.namelist()
                              if n.endswith(".txt") and "files/" in n}
                return
            if os.path.isdir(os.path.join(path, "files")):
                self.dir = path
                return
        raise FileNotFoundError(f"no MIMIC-CXR reports found (looked for {', '.join(candidates)})")

    def read(self, rel):
        """Raw text, or None when the report is absent."""
        if self.zip is not None:
            name = self.names.get(rel)
            return None if name is None else io.TextIOWrapper(self.zip.open(name), encoding="utf-8").read()
        path = os.path.join(self.dir, rel)
        if not os.path.isfile(path):
            return None
        with open(path, encoding="utf-8") as f:
            return f.read()


def chexpert_vector(row, uncertain=0.0):
    """float32 [14] from one chexpert.csv row."""
    out = np.zeros(len(CHEXPERT_LABELS), dtype=np.float32)
    for k, name in enumerate(CHEXPERT_LABELS):
        value = (row.get(name) or "").strip()
        if value:
            v = float(value)
            out[k] = 1.0 if v == 1.0 else uncertain if v == -1.0 else 0.0
    return out


class MimicCXR(ImageReportDataset):
    """One official split of MIMIC-CXR-JPG as Samples (see the module docstring).

    views: ViewPosition values kept, in preference order; None keeps every image.
    sections / fallback: see mcr.data.reports.compose_report.
    """

    label_names = CHEXPERT_LABELS

    def __init__(self, root, split="train", image_size=224, *, views=FRONTAL, images_per_study="one",
                 sections=("findings", "impression"), fallback="last", reports=None, uncertain=0.0):
        check_reader_args("MIMIC-CXR", root, split, SPLITS, images_per_study)
        summary = Summary(f"mimic-cxr {split}")
        rows = [r for r in read_table(find_table(root, "split")) if r["split"] == SPLITS[split]]
        view_of = {}
        if views:
            view_of = {r["dicom_id"]: r.get("ViewPosition", "") for r in read_table(find_table(root, "metadata"))}
        labels_path = find_table(root, "chexpert", required=False)
        labels = {r["study_id"]: chexpert_vector(r, uncertain) for r in read_table(labels_path)} if labels_path else {}
        store = ReportStore(root, reports)

        studies = defaultdict(list)
        for r in rows:
            studies[(r["subject_id"], r["study_id"])].append(r["dicom_id"])
        entries = []
        for (subject, study), dicoms in sorted(studies.items(), key=lambda kv: (kv[0][0], kv[0][1])):
            folder = f"files/p{subject[:2]}/p{subject}"
            if views:
                dicoms = sorted((d for d in dicoms if view_of.get(d) in views),
                                key=lambda d: (views.index(view_of[d]), d))
                if not dicoms:
                    summary.skip(f"no image with view in {tuple(views)}", f"s{study}")
                    continue
            else:
                dicoms = sorted(dicoms)
            raw = store.read(f"{folder}/s{study}.txt")
            if raw is None:
                summary.skip("missing report", f"{folder}/s{study}.txt")
                continue
            text = report_from_text(raw, sections, fallback)
            if not text:
                summary.skip("empty report", f"{folder}/s{study}.txt")
                continue
            if study not in labels:
                summary.note("studies without CheXpert labels (all-zero labels)")
            y = labels.get(study, np.zeros(len(CHEXPERT_LABELS), dtype=np.float32))
            paths = (os.path.join(root, folder, f"s{study}", f"{dicom}.jpg") for dicom in dicoms)
            candidates = ((path if os.path.isfile(path) else None, path) for path in paths)
            kept = add_study_images(entries, summary, candidates, text, y, images_per_study)
            if not kept:
                summary.skip("study without a usable image", f"s{study}")
        summary.kept = len(entries)
        super().__init__(entries, image_size, CHEXPERT_LABELS, summary, f"mimic-cxr {split}")
