"""Tiny fake MIMIC-CXR-JPG and OpenI trees with every defect the readers must survive,
for the tests, the docs' dry runs and the loader benchmark (images and report texts come
from the synthetic corpus).

    make_mimic_tree(root)   15 studies; see MIMIC_STUDIES for what each one exercises
    make_openi_tree(root)   20 reports; see OPENI_DEFECTS
"""
import csv
import gzip
import io
import os
import zipfile

from PIL import Image

from mcr.data.common import CHEXPERT_LABELS
from mcr.data.synthetic import FINDINGS, make_study

# synthetic finding -> CheXpert column
TO_CHEXPERT = {
    "normal": "No Finding", "cardiomegaly": "Cardiomegaly", "pulmonary_edema": "Edema",
    "support_devices": "Support Devices",
    **{f: "Pleural Effusion" for f in FINDINGS if f.startswith("pleural_effusion")},
    **{f: "Consolidation" for f in FINDINGS if f.startswith("consolidation")},
    **{f: "Pneumothorax" for f in FINDINGS if f.startswith("pneumothorax")},
    **{f: "Lung Lesion" for f in FINDINGS if f.startswith("nodule")},
    **{f: "Atelectasis" for f in FINDINGS if f.startswith("atelectasis")},
}

# (split, [(view, defect)], report kind, has CheXpert row)
#   defects: "" ok, "missing" (listed, no file), "corrupt" (not a JPEG)
#   report kinds: full, impression_only, findings_only, no_headings, empty, absent
MIMIC_STUDIES = [
    ("train", [("PA", ""), ("LATERAL", "")], "full", True),
    ("train", [("AP", "")], "full", True),
    ("train", [("PA", "")], "impression_only", True),
    ("train", [("PA", "")], "findings_only", True),
    ("train", [("PA", "missing"), ("AP", "")], "full", True),     # falls back to the AP image
    ("train", [("LATERAL", "")], "full", True),                   # skipped: no frontal view
    ("train", [("PA", "corrupt")], "full", True),                 # skipped: no usable image
    ("train", [("PA", "")], "empty", True),                       # skipped: empty report
    ("train", [("PA", "")], "no_headings", True),
    ("train", [("PA", "")], "absent", True),                      # skipped: missing report
    ("train", [("PA", "")], "full", False),                       # kept, all-zero labels
    ("validate", [("PA", "")], "full", True),
    ("validate", [("AP", "")], "full", True),
    ("test", [("PA", "")], "full", True),
    ("test", [("PA", "")], "full", True),
]
MIMIC_EXPECTED = {  # frontal, one image per study
    "train": {"kept": 7, "skipped": {"no image with view in ('PA', 'AP')": 1, "missing image file": 1,
                                      "unreadable image": 1, "study without a usable image": 1,
                                      "empty report": 1, "missing report": 1}},
    "val": {"kept": 2, "skipped": {}},
    "test": {"kept": 2, "skipped": {}},
}


def _save_image(path, index, size, fmt):
    """A synthetic radiograph, non-square (size wide, 5/4 size high), as JPEG or PNG."""
    image = Image.fromarray(make_study(index, seed=7, image_size=size).image).resize((size, size * 5 // 4))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    image.save(path, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))


def _chexpert_row(labels):
    row = dict.fromkeys(CHEXPERT_LABELS, "")
    for name, value in zip(FINDINGS, labels):
        if value:
            row[TO_CHEXPERT[name]] = "1.0"
    return row


def _report_text(report, kind):
    findings, impression = report.split(" IMPRESSION: ")
    findings = findings.removeprefix("FINDINGS: ")
    head = "                                 FINAL REPORT\n EXAMINATION:  CHEST (PA AND LAT)\n \n " \
           "INDICATION:  ___F with cough  // eval for pneumonia\n \n COMPARISON:  None.\n \n"
    body = {
        "full": f" FINDINGS: \n \n {findings}\n \n IMPRESSION: \n \n {impression}\n",
        "impression_only": f" IMPRESSION: \n \n {impression}\n",
        "findings_only": f" FINDINGS: \n \n {findings}\n",
    }
    if kind == "no_headings":
        return f"                                 FINAL REPORT\n {findings} {impression}\n"
    if kind == "empty":
        return "                                 FINAL REPORT\n \n"
    return head + body[kind]


def _write_csv(path, rows, fields):
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=fields)
    writer.writeheader()
    writer.writerows(rows)
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "wt", newline="") as f:
        f.write(text.getvalue())


def make_mimic_tree(root, image_size=64, reports_zip=False, studies=MIMIC_STUDIES):
    """Write a MIMIC-CXR-JPG-shaped tree (split and CheXpert CSVs gzipped, metadata plain);
    reports as extracted .txt files, or as mimic-cxr-reports.zip. Returns root."""
    split_rows, meta_rows, label_rows, reports = [], [], [], {}
    for k, (split, images, kind, has_labels) in enumerate(studies):
        subject, study = f"1{k:07d}", f"5{k:07d}"
        folder = f"files/p{subject[:2]}/p{subject}"
        synthetic = make_study(k, seed=7, image_size=32)
        for j, (view, defect) in enumerate(images):
            dicom = f"{k:04d}{j}-dicom"
            split_rows.append({"dicom_id": dicom, "study_id": study, "subject_id": subject, "split": split})
            meta_rows.append({"dicom_id": dicom, "subject_id": subject, "study_id": study, "ViewPosition": view})
            path = os.path.join(root, folder, f"s{study}", f"{dicom}.jpg")
            if defect == "corrupt":
                os.makedirs(os.path.dirname(path), exist_ok=True)
                with open(path, "wb") as f:
                    f.write(b"this is not a JPEG")
            elif defect != "missing":
                _save_image(path, 100 * k + j, image_size, "JPEG")
        if kind != "absent":
            reports[f"{folder}/s{study}.txt"] = _report_text(synthetic.report, kind)
        if has_labels:
            label_rows.append({"subject_id": subject, "study_id": study, **_chexpert_row(synthetic.labels)})
    label_rows[1]["Edema"] = "-1.0"  # an uncertain mention
    _write_csv(os.path.join(root, "mimic-cxr-2.0.0-split.csv.gz"), split_rows, list(split_rows[0]))
    _write_csv(os.path.join(root, "mimic-cxr-2.0.0-metadata.csv"), meta_rows, list(meta_rows[0]))
    _write_csv(os.path.join(root, "mimic-cxr-2.0.0-chexpert.csv.gz"), label_rows,
               ["subject_id", "study_id", *CHEXPERT_LABELS])
    if reports_zip:
        with zipfile.ZipFile(os.path.join(root, "mimic-cxr-reports.zip"), "w") as z:
            for rel, text in reports.items():
                z.writestr(rel, text)
    else:
        for rel, text in reports.items():
            with open(os.path.join(root, rel), "w") as f:
                f.write(text)
    return root


# report number -> defect
OPENI_DEFECTS = {3: "impression_only", 4: "findings_only", 5: "empty", 6: "corrupt_frontal", 7: "no_images",
                 8: "missing_png", 9: "bad_xml"}
OPENI_MESH = {"cardiomegaly": "Cardiomegaly/mild", "pleural_effusion": "Pleural Effusion/left",
              "consolidation": "Consolidation/lung/base", "atelectasis": "Pulmonary Atelectasis/base",
              "pulmonary_edema": "Edema", "pneumothorax": "Pneumothorax", "nodule": "Nodule/lung/upper lobe",
              "support_devices": "Catheters, Indwelling", "normal": "normal"}


def _mesh_terms(labels):
    terms = []
    for name, value in zip(FINDINGS, labels):
        key = next(k for k in OPENI_MESH if name.startswith(k))
        if value and OPENI_MESH[key] not in terms:
            terms.append(OPENI_MESH[key])
    return terms


def make_openi_tree(root, image_size=64, count=20, projections=True):
    """Write an NLMCXR-shaped tree: ecgen-radiology/<n>.xml, NLMCXR_png/CXR<n>_1_IM-....png
    (frontal -1001, lateral -2001) and optionally indiana_projections.csv. Returns root."""
    os.makedirs(os.path.join(root, "ecgen-radiology"), exist_ok=True)
    os.makedirs(os.path.join(root, "NLMCXR_png"), exist_ok=True)
    proj_rows = []
    for n in range(1, count + 1):
        defect = OPENI_DEFECTS.get(n, "")
        study = make_study(1000 + n, seed=7, image_size=32)
        findings, impression = study.report.removeprefix("FINDINGS: ").split(" IMPRESSION: ")
        if defect in ("impression_only", "empty"):
            findings = ""
        if defect in ("findings_only", "empty"):
            impression = ""
        ids = [f"CXR{n}_1_IM-{n:04d}-1001", f"CXR{n}_1_IM-{n:04d}-2001"]
        for image_id, projection in zip(ids, ("Frontal", "Lateral")):
            proj_rows.append({"uid": n, "filename": image_id.removeprefix("CXR") + ".dcm.png",
                              "projection": projection})
            path = os.path.join(root, "NLMCXR_png", image_id + ".png")
            if defect == "corrupt_frontal" and projection == "Frontal":
                with open(path, "wb") as f:
                    f.write(b"\x89PNG not really")
            elif not (defect == "missing_png" and projection == "Frontal"):
                _save_image(path, 5000 + 10 * n + len(proj_rows), image_size, "PNG")
        images = "" if defect == "no_images" else "".join(
            f'<parentImage id="{i}"><figureId>F{j + 1}</figureId><caption>Xray Chest PA and Lateral</caption>'
            f"</parentImage>" for j, i in enumerate(ids))
        mesh = "".join(f"<major>{t}</major>" for t in _mesh_terms(study.labels))
        xml = (f'<?xml version="1.0" encoding="utf-8"?>\n<eCitation><meta type="rr"/><uId id="CXR{n}"/>'
               f"<MedlineCitation><Article><Abstract>"
               f'<AbstractText Label="COMPARISON">None.</AbstractText>'
               f'<AbstractText Label="INDICATION">XXXX-year-old with cough.</AbstractText>'
               f'<AbstractText Label="FINDINGS">{findings}</AbstractText>'
               f'<AbstractText Label="IMPRESSION">{impression}</AbstractText>'
               f"</Abstract></Article></MedlineCitation><MeSH>{mesh}</MeSH>{images}</eCitation>\n")
        if defect == "bad_xml":
            xml = xml[: len(xml) // 2]
        with open(os.path.join(root, "ecgen-radiology", f"{n}.xml"), "w") as f:
            f.write(xml)
    if projections:
        _write_csv(os.path.join(root, "indiana_projections.csv"), proj_rows, ["uid", "filename", "projection"])
    return root
