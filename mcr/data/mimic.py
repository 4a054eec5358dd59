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
report, or text after section extraction are skipped and counted in `summary`, as are
studies whose report is not UTF-8 text (the file is named), whose CheXpert row holds a
non-number, and ids that are empty or a path rather than a name (an absolute dicom_id or a
'../' in subject_id is never joined to the root). CSVs may carry a UTF-8 BOM and spaces after
commas; a missing column is a ValueError naming the file and the column.
CheXpert labels: 1 = positive; uncertain (-1) maps to `uncertain` (default 0); blank = 0.
"""
import io
import os
import zipfile
import zlib
from collections import defaultdict

import numpy as np

from mcr.data.common import (
    CHEXPERT_LABELS,
    ImageReportDataset,
    Summary,
    add_study_images,
    check_reader_args,
    is_plain_name,
    read_csv,
)
from mcr.data.reports import report_from_text

PREFIX = "mimic-cxr-2.0.0-"
SPLIT_COLUMNS = ("dicom_id", "study_id", "subject_id", "split")
UNSAFE_ID = "CSV id that is empty or a path, not a name (never opened)"
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


class UnreadableReport(Exception):
    """A report file that exists but cannot be read as UTF-8 text."""


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
        """Raw text, or None when the report is absent; raises UnreadableReport (naming the
        file) when its bytes are not UTF-8 or it cannot be read."""
        where = rel
        try:
            if self.zip is not None:
                name = self.names.get(rel)
                if name is None:
                    return None
                where = f"{self.zip.filename}:{name}"
                return io.TextIOWrapper(self.zip.open(name), encoding="utf-8").read()
            where = os.path.join(self.dir, rel)
            if not os.path.isfile(where):
                return None
            with open(where, encoding="utf-8") as f:
                return f.read()
        except UnicodeDecodeError as err:
            raise UnreadableReport(f"{where}: not UTF-8 text ({err.reason} at byte {err.start})") from None
        except (OSError, EOFError, zipfile.BadZipFile, zlib.error) as err:
            raise UnreadableReport(f"{where}: {err}") from None


def chexpert_vector(row, uncertain=0.0):
    """float32 [14] from one chexpert.csv row."""
    out = np.zeros(len(CHEXPERT_LABELS), dtype=np.float32)
    for k, name in enumerate(CHEXPERT_LABELS):
        value = (row.get(name) or "").strip()
        if value:
            try:
                v = float(value)
            except ValueError:
                raise ValueError(f"column {name!r} holds {value!r}, not a number") from None
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
        rows = [r for r in read_csv(find_table(root, "split"), SPLIT_COLUMNS) if r["split"] == SPLITS[split]]
        view_of = {}
        if views:
            path = find_table(root, "metadata")
            table = read_csv(path, ("dicom_id",))
            if table and "ViewPosition" not in table[0]:
                raise ValueError(f"{path}: no column 'ViewPosition', which the view filter views={tuple(views)} "
                                 f"needs; --data-options views=all keeps every image without it")
            view_of = {r["dicom_id"]: r["ViewPosition"] for r in table}
        labels, bad_labels = {}, {}
        labels_path = find_table(root, "chexpert", required=False)
        for r in read_csv(labels_path, ("study_id", *CHEXPERT_LABELS)) if labels_path else ():
            try:
                labels[r["study_id"]] = chexpert_vector(r, uncertain)
            except ValueError as err:
                bad_labels[r["study_id"]] = f"{os.path.basename(labels_path)} study {r['study_id']}: {err}"
        store = ReportStore(root, reports)

        studies = defaultdict(list)
        for r in rows:
            studies[(r["subject_id"], r["study_id"])].append(r["dicom_id"])
        entries = []
        for (subject, study), dicoms in sorted(studies.items(), key=lambda kv: (kv[0][0], kv[0][1])):
            # every id becomes one path component: an id that is a path could leave the root
            if not (is_plain_name(subject) and is_plain_name(study)):
                summary.skip(UNSAFE_ID, f"subject_id={subject!r}, study_id={study!r}")
                continue
            for dicom in dicoms:
                if not is_plain_name(dicom):
                    summary.skip(UNSAFE_ID, f"dicom_id={dicom!r}")
            dicoms = [d for d in dicoms if is_plain_name(d)]
            if not dicoms:
                continue
            if study in bad_labels:
                summary.skip("unparsable CheXpert label", bad_labels[study])
                continue
            folder = f"files/p{subject[:2]}/p{subject}"
            if views:
                dicoms = sorted((d for d in dicoms if view_of.get(d) in views),
                                key=lambda d: (views.index(view_of[d]), d))
                if not dicoms:
                    summary.skip(f"no image with view in {tuple(views)}", f"s{study}")
                    continue
            else:
                dicoms = sorted(dicoms)
            try:
                raw = store.read(f"{folder}/s{study}.txt")
            except UnreadableReport as err:
                summary.skip("unreadable report (not UTF-8 or damaged)", str(err))
                continue
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
