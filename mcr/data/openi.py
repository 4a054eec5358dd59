"""IU X-ray (OpenI, NLMCXR) reader.

Expected under `root` (any folder depth): the report XMLs of NLMCXR_reports.tgz
(ecgen-radiology/<n>.xml) and the PNGs of NLMCXR_png.tgz (<parentImage id>.png). An optional
indiana_projections.csv (columns filename, projection: Frontal / Lateral) enables the view
filter; without it each report keeps its first image (usually the frontal one) or all.
Images are found by walking `root`; an image id (XML) or CSV filename is only a key into
that listing, and one that is a path (absolute, '../', '/') is skipped and counted.

There is no official split: report files (by number) are shuffled with `split_seed` and cut
80 / 10 / 10 into train / val / test. Labels: the MeSH major terms mapped by keyword onto
the 14 CheXpert observations (mcr.data.common.CHEXPERT_LABELS).
"""
import os
import xml.etree.ElementTree as ET

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
from mcr.data.reports import clean_text, compose_report

SPLIT_FRACTIONS = {"train": (0.0, 0.8), "val": (0.8, 0.9), "test": (0.9, 1.0)}
# MeSH major term (first part, lowercased) keyword -> CheXpert observation; first match wins
MESH_KEYWORDS = (
    ("normal", "No Finding"), ("atelectasis", "Atelectasis"), ("cardiomegaly", "Cardiomegaly"),
    ("consolidation", "Consolidation"), ("edema", "Edema"), ("mediastin", "Enlarged Cardiomediastinum"),
    ("fracture", "Fracture"), ("nodule", "Lung Lesion"), ("mass", "Lung Lesion"), ("lesion", "Lung Lesion"),
    ("opacity", "Lung Opacity"), ("infiltrat", "Lung Opacity"), ("effusion", "Pleural Effusion"),
    ("pleura", "Pleural Other"), ("pneumonia", "Pneumonia"), ("pneumothorax", "Pneumothorax"),
    ("catheter", "Support Devices"), ("tube", "Support Devices"), ("device", "Support Devices"),
    ("pacemaker", "Support Devices"), ("stent", "Support Devices"),
)


def image_key(name):
    """'CXR1_1_IM-0001-3001', 'CXR1_1_IM-0001-3001.png' and '1_IM-0001-3001.dcm.png' -> '1_IM-0001-3001'."""
    stem = os.path.basename(name)
    for suffix in (".png", ".dcm"):
        stem = stem.removesuffix(suffix)
    return stem.removeprefix("CXR")


def mesh_labels(terms):
    """float32 [14] from MeSH major terms such as 'Cardiomegaly/mild'."""
    out = np.zeros(len(CHEXPERT_LABELS), dtype=np.float32)
    for term in terms:
        head = term.split("/")[0].strip().lower()
        for keyword, name in MESH_KEYWORDS:
            if keyword in head:
                out[CHEXPERT_LABELS.index(name)] = 1.0
                break
    if out.any() and out[CHEXPERT_LABELS.index("No Finding")] and out.sum() > 1:
        out[CHEXPERT_LABELS.index("No Finding")] = 0.0
    return out


def parse_report(path):
    """(uid, {section: text}, [image ids], [MeSH major terms]) of one NLMCXR XML."""
    tree = ET.parse(path).getroot()
    uid_node = tree.find(".//uId")
    uid = uid_node.get("id") if uid_node is not None else os.path.splitext(os.path.basename(path))[0]
    sections = {}
    for node in tree.iter("AbstractText"):
        text = clean_text("".join(node.itertext()))
        if text:
            sections[node.get("Label", "").strip().lower()] = text
    images = [node.get("id") for node in tree.iter("parentImage") if node.get("id")]
    terms = [node.text for node in tree.iter("major") if node.text]
    return uid, sections, images, terms


def _uid_order(uid):
    digits = "".join(c for c in uid if c.isdigit())
    return (int(digits) if digits else 0, uid)


class OpenI(ImageReportDataset):
    """One seeded split of IU X-ray as Samples (see the module docstring).

    views: projections kept ("Frontal", "Lateral"); used only with indiana_projections.csv.
    """

    label_names = CHEXPERT_LABELS

    def __init__(self, root, split="train", image_size=224, *, views=("Frontal",), images_per_study="one",
                 sections=("findings", "impression"), fallback="last", split_seed=0):
        check_reader_args("OpenI", root, split, SPLIT_FRACTIONS, images_per_study)
        summary = Summary(f"openi {split}")
        xmls, pngs, projections = [], {}, None
        for folder, _, files in os.walk(root):
            for name in files:
                path = os.path.join(folder, name)
                if name.endswith(".xml"):
                    xmls.append(path)
                elif name.endswith(".png"):
                    pngs[image_key(name)] = path
                elif name == "indiana_projections.csv":
                    projections = {}
                    for r in read_csv(path, ("filename", "projection")):
                        if is_plain_name(r["filename"]):
                            projections[image_key(r["filename"])] = r["projection"]
                        else:
                            summary.skip(f"{name} row whose filename is a path (ignored)", repr(r["filename"]))
        if not xmls:
            raise FileNotFoundError(f"OpenI root {root!r} holds no report XMLs (NLMCXR_reports)")
        if projections is None and views:
            summary.note("reports without projections file: view filter off")
        # the split is drawn over report files (sorted by number), so a broken XML is
        # counted in the one split it belongs to
        xmls.sort(key=lambda p: _uid_order(os.path.basename(p)))
        order = np.random.default_rng(split_seed).permutation(len(xmls))
        lo, hi = (round(f * len(xmls)) for f in SPLIT_FRACTIONS[split])
        entries = []
        for path in (xmls[i] for i in sorted(order[lo:hi].tolist())):
            try:
                uid, sections_found, images, terms = parse_report(path)
            except ET.ParseError:
                summary.skip("unparsable report XML", path)
                continue
            # the fallback may use FINDINGS / IMPRESSION only, never INDICATION or COMPARISON
            usable = {k: v for k, v in sections_found.items() if k in ("findings", "impression", *sections)}
            text = compose_report(usable, sections, fallback)
            if not text:
                summary.skip("empty report", uid)
                continue
            for i in images:
                if not is_plain_name(i):
                    summary.skip("image id that is a path, not a name (never opened)", f"{uid}: {i!r}")
            images = [i for i in images if is_plain_name(i)]
            if projections is not None and views:
                images = [i for i in images if projections.get(image_key(i)) in views]
            if not images:
                summary.skip("report without an image of the wanted views", uid)
                continue
            y = mesh_labels(terms)
            candidates = ((pngs.get(image_key(i)), f"{i}.png") for i in images)
            kept = add_study_images(entries, summary, candidates, text, y, images_per_study)
            if not kept:
                summary.skip("report without a usable image", uid)
        summary.kept = len(entries)
        super().__init__(entries, image_size, CHEXPERT_LABELS, summary, f"openi {split}")
