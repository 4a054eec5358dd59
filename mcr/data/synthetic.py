"""Synthetic chest radiographs paired with radiology reports (the default corpus).

Every study is a pure function of ``(index, seed, image_size)``: a frontal chest
radiograph (grayscale ``uint8``, ``image_size x image_size``) drawn with
vectorized numpy, plus a report ``"FINDINGS: ... IMPRESSION: ..."`` and a
multi-hot label vector over :data:`FINDINGS`. Nothing is downloaded or cached on
disk. The report and labels depend only on ``(index, seed)``; the image size only
changes the drawing resolution.

Conventions
-----------
* Radiological convention: the image is viewed as if facing the patient, so the
  PATIENT'S LEFT IS ON THE IMAGE RIGHT (the heart bulges to the image right) and
  the patient's right lung is the image-left lung field.
* Geometry is expressed in fractions of the image size (x grows to the image
  right, y grows downwards), so the drawing is resolution independent. The
  nominal layout constants below (``RIGHT_LUNG``, ``LEFT_LUNG``, ``HEART``,
  ``REGIONS``) are before the per-study jitter of patient size (about +-7%) and
  position (+-3%).
* Per-study exposure/contrast and noise vary randomly, so global brightness is
  not a shortcut: retrieving the right report needs location and laterality.
  (The gaussian noise is a random crop of a fixed per-size noise field, which is
  much cheaper than drawing fresh normals.)
* Generation cost is about 1 ms per 64x64 study and 2 ms per 224x224 study on
  one CPU core, so studies are made on the fly.
* A negated sentence ("No pleural effusion.") never refers to a present finding,
  and "normal" is set exactly when no other finding is present.

Findings are drawn where they belong and scaled by severity (mild, moderate,
severe; nodules by size in mm): cardiomegaly widens the heart, effusions fill
the costophrenic angle with a meniscus, consolidations are patchy blobs in the
upper/lower zone, pneumothoraces are dark marking-free rims at the apex and
lateral wall with a pleural line, nodules are round spots, atelectasis is a
band at the lung base, edema is bilateral perihilar haze, and support devices
are tube lines and a pacemaker box.
"""

from __future__ import annotations

import operator
from bisect import bisect_left
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

FINDINGS: tuple[str, ...] = (
    "normal",
    "cardiomegaly",
    "pleural_effusion_left",
    "pleural_effusion_right",
    "consolidation_left_upper",
    "consolidation_left_lower",
    "consolidation_right_upper",
    "consolidation_right_lower",
    "pneumothorax_left",
    "pneumothorax_right",
    "nodule_left",
    "nodule_right",
    "atelectasis_left",
    "atelectasis_right",
    "pulmonary_edema",
    "support_devices",
)
_INDEX = {name: i for i, name in enumerate(FINDINGS)}

SPLIT_OFFSETS = {"train": 0, "val": 10_000_000, "test": 20_000_000}

# (group, side, zone) of every abnormal finding; side/zone are None if not applicable.
_PARTS = {
    "cardiomegaly": ("cardiomegaly", None, None),
    "pleural_effusion_left": ("effusion", "left", None),
    "pleural_effusion_right": ("effusion", "right", None),
    "consolidation_left_upper": ("consolidation", "left", "upper"),
    "consolidation_left_lower": ("consolidation", "left", "lower"),
    "consolidation_right_upper": ("consolidation", "right", "upper"),
    "consolidation_right_lower": ("consolidation", "right", "lower"),
    "pneumothorax_left": ("pneumothorax", "left", None),
    "pneumothorax_right": ("pneumothorax", "right", None),
    "nodule_left": ("nodule", "left", None),
    "nodule_right": ("nodule", "right", None),
    "atelectasis_left": ("atelectasis", "left", None),
    "atelectasis_right": ("atelectasis", "right", None),
    "pulmonary_edema": ("edema", None, None),
    "support_devices": ("devices", None, None),
}
# Pairs never drawn together (a hydropneumothorax would need an air-fluid level).
_CONFLICTS = {
    frozenset(("pneumothorax_left", "pleural_effusion_left")),
    frozenset(("pneumothorax_right", "pleural_effusion_right")),
}

# ---------------------------------------------------------------------------
# Nominal layout, in fractions of the image size (see module docstring).
# Lungs are (cx, cy, rx, ry): an apex half-ellipse over straight sides, cut
# below by a diaphragm dome that is lowest at the lateral costophrenic angle.
RIGHT_LUNG = (0.305, 0.47, 0.150, 0.29)  # patient's right = image left
LEFT_LUNG = (0.695, 0.49, 0.145, 0.29)  # patient's left = image right
HEART = (0.55, 0.645, 0.12, 0.105)  # (cx, cy, rx, ry), offset to the image right
CARINA_Y = 0.39
FOV_MM = 350.0  # physical width of the field of view, for nodule sizes
# Boxes (x0, y0, x1, y1) that stay inside the named structure despite jitter.
REGIONS = {
    "right_apex": (0.22, 0.20, 0.36, 0.28),
    "left_apex": (0.64, 0.22, 0.78, 0.30),
    "right_upper": (0.20, 0.27, 0.38, 0.42),
    "left_upper": (0.62, 0.29, 0.80, 0.44),
    "right_lower": (0.18, 0.60, 0.34, 0.70),
    "left_lower": (0.70, 0.62, 0.84, 0.72),
    "left_heart_border": (0.66, 0.58, 0.74, 0.68),
}



@dataclass(frozen=True)
class Study:
    """One synthetic study: image, report and multi-hot labels."""

    image: np.ndarray  # uint8 [image_size, image_size]
    report: str  # "FINDINGS: ... IMPRESSION: ..."
    labels: np.ndarray  # float32 [len(FINDINGS)], 1.0 = present


def labels_from_names(names) -> np.ndarray:
    """Multi-hot float32 vector over FINDINGS; no abnormal names -> "normal"."""
    labels = np.zeros(len(FINDINGS), dtype=np.float32)
    for name in names:
        if name not in _INDEX:
            raise ValueError(f"unknown finding name {name!r}; valid: {FINDINGS}")
        labels[_INDEX[name]] = 1.0
    labels[0] = 0.0 if labels[1:].any() else 1.0
    return labels


def make_study(index: int, *, seed: int = 0, image_size: int = 224) -> Study:
    """Deterministically generate study ``index`` of the corpus ``seed``."""
    index, seed, image_size = (operator.index(v) for v in (index, seed, image_size))
    if index < 0:
        raise ValueError(f"index must be >= 0, got {index}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    if image_size < 32:
        raise ValueError(f"image_size must be >= 32, got {image_size}")
    rng = np.random.default_rng([seed, index])
    # Scalars first, arrays last: report and labels do not depend on image_size.
    spec = _sample_spec(rng)
    report = _write_report(spec, rng)
    image = _render(spec, rng, image_size)
    return Study(image=image, report=report, labels=labels_from_names(spec["findings"]))


ATTRIBUTES = ("laterality", "zone", "severity")


def _finding_name(group: str, side: str | None, zone: str | None) -> str:
    return next(n for n, parts in _PARTS.items() if parts == (group, side, zone))


def _counterfactual_specs(spec: dict) -> list[tuple[str, dict]]:
    """(attribute, spec) for every spec that differs from ``spec`` in exactly one attribute
    of one finding: its side, its lung zone, or its severity. Findings keep their order (so
    the report's sentences and template choices stay the same); a change that would
    duplicate a present finding or draw a conflicting pair is left out. Nodule sizes and
    devices have no severity word, so they only change side."""
    present = spec["findings"]
    out = []

    def changed(name: str, new_name: str, severity: int) -> dict:
        findings = {(new_name if n == name else n): (severity if n == name else s) for n, s in present.items()}
        new = {**spec, "findings": findings}
        group, side, _ = _PARTS[name]
        if group == "nodule" and new_name != name:
            new_side = _PARTS[new_name][1]
            new["nodules"] = {new_side if k == side else k: v for k, v in spec["nodules"].items()}
        return new

    for name, severity in present.items():
        group, side, zone = _PARTS[name]
        others = [n for n in present if n != name]
        if side is not None:
            flipped = _finding_name(group, "right" if side == "left" else "left", zone)
            if flipped not in present and not any(frozenset((flipped, o)) in _CONFLICTS for o in others):
                out.append(("laterality", changed(name, flipped, severity)))
        if zone is not None:
            moved = _finding_name(group, side, "lower" if zone == "upper" else "upper")
            if moved not in present:
                out.append(("zone", changed(name, moved, severity)))
        if group not in ("nodule", "devices"):
            out += [("severity", changed(name, name, s)) for s in range(3) if s != severity]
    return out


def make_counterfactuals(index: int, *, seed: int = 0, image_size: int = 224) -> tuple[Study, list[tuple[str, Study]]]:
    """Study ``index`` and its counterfactuals: the same study (patient, exposure, noise,
    report phrasing) with exactly one attribute of one finding changed, as (attribute,
    Study) pairs, attribute in ATTRIBUTES. A normal study has none.

    The report is rewritten from the random state after the spec was drawn, and the image
    is redrawn from the state after the original report, so only the changed attribute's
    words and pixels differ (later image draws may shift when the change moves a finding).
    A change invisible at this image size (the same pixels) is left out: no model could see
    it. ``make_counterfactuals(i)[0]`` equals ``make_study(i)``."""
    rng = np.random.default_rng([seed, index])
    spec = _sample_spec(rng)
    after_spec = rng.bit_generator.state
    report = _write_report(spec, rng)
    after_report = rng.bit_generator.state
    study = Study(image=_render(spec, rng, image_size), report=report, labels=labels_from_names(spec["findings"]))
    counterfactuals = []
    for attribute, cf_spec in _counterfactual_specs(spec):
        rng.bit_generator.state = after_spec
        cf_report = _write_report(cf_spec, rng)
        rng.bit_generator.state = after_report
        cf_image = _render(cf_spec, rng, image_size)
        if np.array_equal(cf_image, study.image):
            continue
        counterfactuals.append((attribute, Study(image=cf_image, report=cf_report,
                                                 labels=labels_from_names(cf_spec["findings"]))))
    return study, counterfactuals


class SyntheticCXR:
    """Fixed-length sequence of synthetic studies for one split (no torch needed)."""

    label_names = FINDINGS

    def __init__(self, num_studies: int, *, split: str = "train", image_size: int = 224, seed: int = 0):
        if num_studies < 1:
            raise ValueError(f"num_studies must be >= 1, got {num_studies}")
        if split not in SPLIT_OFFSETS:
            raise ValueError(f"split must be one of {sorted(SPLIT_OFFSETS)}, got {split!r}")
        if image_size < 32:
            raise ValueError(f"image_size must be >= 32, got {image_size}")
        if num_studies > SPLIT_OFFSETS["val"]:
            raise ValueError(f"num_studies must be <= {SPLIT_OFFSETS['val']} so splits stay disjoint")
        self.num_studies = int(num_studies)
        self.split = split
        self.image_size = int(image_size)
        self.seed = int(seed)

    def __len__(self) -> int:
        return self.num_studies

    def __getitem__(self, i: int) -> Study:
        i = operator.index(i)
        if i < 0:
            i += self.num_studies
        if not 0 <= i < self.num_studies:
            raise IndexError(f"study index out of range for {self.num_studies} studies")
        return make_study(SPLIT_OFFSETS[self.split] + i, seed=self.seed, image_size=self.image_size)

    def __repr__(self) -> str:
        return (f"SyntheticCXR(num_studies={self.num_studies}, split={self.split!r}, "
                f"image_size={self.image_size}, seed={self.seed})")


# ---------------------------------------------------------------------------
# Study specification


def _sample_spec(rng: np.random.Generator) -> dict:
    """Findings with severities, plus the few details the report mentions."""
    findings: dict[str, int] = {}
    if rng.random() >= 0.25:
        count = 1 + int(np.searchsorted([0.45, 0.80], rng.random()))
        for j in rng.permutation(len(FINDINGS) - 1) + 1:
            name = FINDINGS[j]
            if any(frozenset((name, other)) in _CONFLICTS for other in findings):
                continue
            findings[name] = int(rng.integers(3))
            if len(findings) == count:
                break
    spec = {"findings": {n: findings[n] for n in FINDINGS if n in findings}, "nodules": {}}
    for side in ("left", "right"):
        if f"nodule_{side}" in findings:
            lo, hi = ((6, 10), (10, 20), (20, 31))[findings[f"nodule_{side}"]]
            spec["nodules"][side] = (int(rng.integers(lo, hi)), rng.uniform(-0.45, 0.45), rng.uniform(-0.7, 0.3))
    if "support_devices" in findings:
        devices = [d for d in ("ett", "cvc", "pacer") if rng.random() < 0.5]
        spec["devices"] = devices or [("ett", "cvc", "pacer")[rng.integers(3)]]
        spec["ett_cm"] = int(rng.integers(3, 7))
    return spec


# ---------------------------------------------------------------------------
# Report text

_SEV_WORDS = {
    "cardiomegaly": ("mild", "moderate", "severe"),
    "effusion": ("small", "moderate", "large"),
    "consolidation": ("patchy", "confluent", "dense"),
    "pneumothorax": ("small", "moderate", "large"),
    "atelectasis": ("minimal", "moderate", "extensive"),
    "edema": ("mild", "moderate", "severe"),
    "nodule": ("small", "moderate", "large"),
    "devices": ("", "", ""),
}
_ADVERBS = ("mildly", "moderately", "markedly")

_FINDING_TEMPLATES = {
    "cardiomegaly": (
        "{Sev} cardiomegaly.",
        "The heart is {adv} enlarged.",
        "The cardiac silhouette is {adv} enlarged.",
        "{Sev} enlargement of the cardiac silhouette.",
    ),
    "effusion": (
        "{Sev} {side} pleural effusion.",
        "There is a {sev} pleural effusion on the {side}.",
        "{Sev} {side} effusion with blunting of the costophrenic angle.",
        "{Sev} {side}-sided pleural effusion with a meniscus.",
    ),
    "consolidation": (
        "{Sev} consolidation in the {side} {zone} lobe.",
        "{Sev} airspace opacity in the {side} {zone} lung zone.",
        "There is a {sev} consolidation of the {side} {zone} lobe, concerning for pneumonia.",
        "{Side} {zone} lobe airspace consolidation, {sev} in appearance.",
    ),
    "pneumothorax": (
        "{Sev} {side} pneumothorax.",
        "There is a {sev} {side} apical pneumothorax.",
        "{Sev} {side} pneumothorax with a visible pleural line.",
        "A {sev} pneumothorax is present on the {side}.",
    ),
    "nodule": (
        "A {size} mm nodule is seen in the {side} {zone} lung.",
        "{size} mm nodular opacity in the {side} lung.",
        "{Side} lung nodule measuring {size} mm.",
        "There is a {size} mm {side} pulmonary nodule.",
    ),
    "atelectasis": (
        "{Sev} {side} basilar atelectasis.",
        "{Sev} plate-like atelectasis at the {side} lung base.",
        "{Sev} atelectasis in the {side} lower lung.",
        "Linear opacity at the {side} base, likely {sev} atelectasis.",
    ),
    "edema": (
        "{Sev} pulmonary edema.",
        "{Sev} perihilar haziness consistent with pulmonary edema.",
        "Findings of {sev} pulmonary edema with bilateral perihilar opacities.",
        "{Sev} interstitial pulmonary edema.",
    ),
}
_DEVICE_TEMPLATES = {
    "ett": (
        "Endotracheal tube terminates approximately {cm} cm above the carina.",
        "The endotracheal tube tip is {cm} cm above the carina.",
    ),
    "cvc": (
        "Right internal jugular central line terminates in the superior vena cava.",
        "Right IJ central venous catheter with tip in the lower SVC.",
    ),
    "pacer": (
        "Left chest wall pacemaker with leads in the right atrium and right ventricle.",
        "Left-sided pacemaker with leads projecting over the heart.",
    ),
}
_IMPRESSION_TEMPLATES = {
    "cardiomegaly": ("{Sev} cardiomegaly.",),
    "effusion": ("{Sev} {side} pleural effusion.",),
    "consolidation": ("{Side} {zone} lobe consolidation, concerning for pneumonia.",
                      "{Sev} {side} {zone} lobe consolidation."),
    "pneumothorax": ("{Sev} {side} pneumothorax.",),
    "nodule": ("{size} mm {side} pulmonary nodule, recommend CT follow-up.", "{Side} pulmonary nodule."),
    "atelectasis": ("{Side} basilar atelectasis.",),
    "edema": ("{Sev} pulmonary edema.",),
    "devices": ("Support devices as described.", "Lines and tubes as above."),
}
# Statements that a whole finding group is absent.
_NEGATIONS = {
    "cardiomegaly": (
        "The heart size is normal.",
        "Heart size is within normal limits.",
        "The cardiomediastinal silhouette is within normal limits.",
        "Normal cardiac silhouette.",
    ),
    "effusion": ("No pleural effusion.", "There is no pleural effusion.", "No pleural effusions.",
                 "Costophrenic angles are sharp."),
    "pneumothorax": ("No pneumothorax.", "There is no pneumothorax.", "No evidence of pneumothorax."),
    "consolidation": ("No focal consolidation.", "There is no focal airspace consolidation."),
    "edema": ("No pulmonary edema.", "No evidence of pulmonary edema."),
    "nodule": ("No suspicious pulmonary nodules.",),
}
_SIDED_NEGATIONS = {
    "effusion": ("No {side} pleural effusion.",),
    "pneumothorax": ("No {side} pneumothorax.",),
}
_CLEAR_LUNGS = ("Lungs are clear.", "The lungs are clear bilaterally.", "Both lungs are clear.")
_NEUTRAL = ("No acute osseous abnormality.", "The osseous structures are unremarkable.")
_NORMAL_IMPRESSIONS = (
    "No acute cardiopulmonary process.",
    "No acute cardiopulmonary abnormality.",
    "Normal chest radiograph.",
    "No acute intrathoracic process.",
)
# Impression order: most urgent first.
_URGENCY = ("pneumothorax", "consolidation", "effusion", "edema", "cardiomegaly", "nodule", "atelectasis", "devices")


def _pick(rng: np.random.Generator, options):
    """Uniformly random element of a sequence."""
    return options[int(rng.random() * len(options))]


def _fill(template: str, name: str, severity: int, spec: dict) -> str:
    """Format a template with the side, zone, severity words and nodule size of a finding."""
    group, side, zone = _PARTS[name]
    sev = _SEV_WORDS[group][severity]
    words = {"sev": sev, "Sev": sev.capitalize(), "adv": _ADVERBS[severity], "side": side, "zone": zone}
    if side is not None:
        words["Side"] = side.capitalize()
    if group == "nodule":
        size, _, v = spec["nodules"][side]
        words["size"] = size
        words["zone"] = "upper" if v < -0.33 else "mid" if v < 0.1 else "lower"
    return template.format(**words)


def _write_report(spec: dict, rng: np.random.Generator) -> str:
    """FINDINGS (shuffled positive and negated sentences) and a summarising IMPRESSION."""
    findings = spec["findings"]
    groups = {_PARTS[n][0] for n in findings}
    sentences = []
    for name, severity in findings.items():
        if name == "support_devices":
            sentences += [_pick(rng, _DEVICE_TEMPLATES[d]).format(cm=spec["ett_cm"]) for d in spec["devices"]]
        else:
            sentences.append(_fill(_pick(rng, _FINDING_TEMPLATES[_PARTS[name][0]]), name, severity, spec))
    p_negate = 0.4 if findings else 0.7
    for group, options in _NEGATIONS.items():
        if group not in groups and rng.random() < p_negate:
            sentences.append(_pick(rng, options))
    for group, options in _SIDED_NEGATIONS.items():
        present = [_PARTS[n][1] for n in findings if _PARTS[n][0] == group]
        if len(present) == 1 and rng.random() < 0.3:
            other = "right" if present[0] == "left" else "left"
            sentences.append(_pick(rng, options).format(side=other))
    if not findings:
        sentences.append(_pick(rng, _CLEAR_LUNGS))
    if rng.random() < 0.3:
        sentences.append(_pick(rng, _NEUTRAL))
    sentences = [sentences[j] for j in rng.permutation(len(sentences))]

    if findings:
        ordered = sorted(findings, key=lambda n: _URGENCY.index(_PARTS[n][0]))
        items = [_fill(_pick(rng, _IMPRESSION_TEMPLATES[_PARTS[n][0]]), n, findings[n], spec) for n in ordered]
        impression = items[0] if len(items) == 1 else " ".join(f"{k}. {s}" for k, s in enumerate(items, 1))
    else:
        impression = _pick(rng, _NORMAL_IMPRESSIONS)
    return f"FINDINGS: {' '.join(sentences)} IMPRESSION: {impression}"


# ---------------------------------------------------------------------------
# Image drawing (float32 in [0, 1], bright = radiodense)


@lru_cache(maxsize=16)
def _pixel_centers(size: int) -> np.ndarray:
    """Pixel centre coordinates in [0, 1], float32."""
    return (np.arange(size, dtype=np.float32) + 0.5) / size


@lru_cache(maxsize=32)
def _upsample_weights(size: int, grid: int) -> tuple[np.ndarray, np.ndarray]:
    """Left grid index and interpolation fraction of every pixel for a grid -> size upsample."""
    pos = _pixel_centers(size) * (grid - 1)
    lo = np.minimum(pos.astype(np.int64), grid - 2)
    return lo, (pos - lo).astype(np.float32)


@lru_cache(maxsize=8)
def _noise_bank(size: int) -> np.ndarray:
    """Fixed (2*size, 2*size) standard gaussian field; studies use random crops (fast)."""
    return np.random.default_rng(20240229).standard_normal((2 * size, 2 * size), dtype=np.float32)


def _smooth_noise(rng: np.random.Generator, size: int, grid: int) -> np.ndarray:
    """Bilinearly upsampled uniform noise in [0, 1] (indexing, not BLAS: tiny matmuls thrash threads)."""
    lo, frac = _upsample_weights(size, grid)
    g = rng.random((grid, grid), dtype=np.float32)
    g = g[lo] + (g[lo + 1] - g[lo]) * frac[:, None]  # rows: (size, grid)
    return g[:, lo] + (g[:, lo + 1] - g[:, lo]) * frac  # columns: (size, size)


def _uniform(rng: np.random.Generator, lo: float, hi: float) -> float:
    """Scalar uniform draw (a few times faster than Generator.uniform)."""
    return lo + (hi - lo) * rng.random()


def _soft(d, width: float):
    """Soft inside-mask (1 inside, 0 outside) of a signed distance field."""
    return np.clip(0.5 - d / width, 0.0, 1.0)


def _lung_field(x, y, cx, cy, rx, ry):
    """Normalised coordinates (u row, v column) and signed distance of a lung shape."""
    u = (x - cx) / rx
    v = (y - cy) / ry
    apex_and_sides = np.sqrt(u * u + np.minimum(v, 0.0) ** 2) - 1.0
    dome = v - 0.65 - 0.35 * u * u  # diaphragm: highest mid-lung, lowest laterally
    return u, v, np.maximum(apex_and_sides, dome)


def _box(x, y, x0: float, x1: float, y0: float, y1: float) -> tuple[slice, slice]:
    """Pixel (rows, cols) slices covering the nominal box [x0, x1] x [y0, y1]."""
    xs, ys = x[0].tolist(), y[:, 0].tolist()
    return slice(bisect_left(ys, y0), bisect_left(ys, y1)), slice(bisect_left(xs, x0), bisect_left(xs, x1))


def _segment(x, y, p, q, width: float):
    """Soft line profile (1 on the segment p-q, 0 beyond width) over coordinates x, y."""
    (px, py), (qx, qy) = p, q
    xs, ys = x - px, y - py
    ex, ey = qx - px, qy - py
    t = np.clip((xs * ex + ys * ey) * (1.0 / (ex * ex + ey * ey)), 0.0, 1.0)
    return _bump(((xs - t * ex) ** 2 + (ys - t * ey) ** 2) * (1.0 / (width * width)))


def _draw_segment(img, x, y, p, q, width: float, amp: float) -> None:
    """Add a bright line from p to q (nominal coordinates) to img, in place, on its bounding box."""
    (px, py), (qx, qy) = p, q
    rows, cols = _box(x, y, min(px, qx) - width, max(px, qx) + width, min(py, qy) - width, max(py, qy) + width)
    if rows.start < rows.stop and cols.start < cols.stop:
        img[rows, cols] += amp * _segment(x[:, cols], y[rows], p, q, width)


def _bump(r2):
    """Cheap smooth profile of a squared normalised distance: 1 at 0, 0 beyond 1."""
    return np.square(np.maximum(1.0 - r2, 0.0))


def _gauss(x, y, cx, cy, sx, sy):
    """Separable gaussian bump (outer product of a column and a row)."""
    return np.exp(-(((y - cy) / sy) ** 2)) * np.exp(-(((x - cx) / sx) ** 2))


def _render(spec: dict, rng: np.random.Generator, size: int) -> np.ndarray:
    """Draw the radiograph of a study spec as a uint8 [size, size] image."""
    findings = spec["findings"]

    def sev(name: str) -> int:
        """Severity index 0-2 of a finding, -1 if absent."""
        return findings.get(name, -1)

    # Per-study patient size / position: map pixel centres to nominal coordinates.
    # x is a row vector and y a column vector; 2D fields come from broadcasting,
    # and local structures are computed only on their bounding box (see _box).
    scale = _uniform(rng, 0.93, 1.07)
    dx, dy = _uniform(rng, -0.03, 0.03), _uniform(rng, -0.03, 0.03)
    base = _pixel_centers(size)
    x = ((base - 0.5 - dx) / scale + 0.5)[None, :]
    y = ((base - 0.5 - dy) / scale + 0.5)[:, None]

    # Body: soft tissue, brighter below the diaphragm, with neck and shoulders.
    t = np.clip((y - 0.02) / 0.2, 0.0, 1.0)
    half_width = 0.13 + (_uniform(rng, 0.40, 0.47) - 0.13) * np.sqrt(t * (2.0 - t))
    tissue = _uniform(rng, 0.45, 0.55) + 0.1 * np.clip((y - 0.62) / 0.15, 0.0, 1.0)
    img = 0.04 + tissue * _soft(np.abs(x - 0.5) - half_width, 0.04)

    # Lung fields: dark, with vessel-like markings fading away from the hila.
    markings = 1.0 - 2.0 * np.abs(_smooth_noise(rng, size, 18) - 0.5)
    patchy = _smooth_noise(rng, size, 7)
    inspiration = _uniform(rng, 0.93, 1.07)
    lungs = {}
    for side, (cx, cy, rx, ry), lateral in (("right", RIGHT_LUNG, -1.0), ("left", LEFT_LUNG, 1.0)):
        ry *= inspiration
        rows, cols = _box(x, y, cx - rx - 0.02, cx + rx + 0.02, cy - ry - 0.02, cy + ry + 0.02)
        xs, ys = x[:, cols], y[rows]
        u, v, d = _lung_field(xs, ys, cx, cy, rx, ry)
        mask = _soft(d, 0.08)
        hilum = _gauss(xs, ys, 0.5 + 0.09 * lateral, 0.45, 0.10, 0.13)
        value = 0.15 + 0.10 * hilum + (0.03 + 0.07 * hilum) * markings[rows, cols]
        view = img[rows, cols]
        view += (value - view) * mask
        lungs[side] = (view, xs, ys, u, v, d, mask, patchy[rows, cols], (cx, cy, rx, ry), lateral)

    # Parenchymal findings, confined to the lung of their side.
    for side, (view, xs, ys, u, v, d, mask, patch, (cx, cy, rx, ry), lateral) in lungs.items():
        dens = np.zeros_like(view)
        for zone, vc in (("upper", _uniform(rng, -0.6, -0.35)), ("lower", _uniform(rng, 0.15, 0.4))):
            s = sev(f"consolidation_{side}_{zone}")
            if s >= 0:
                uc = lateral * _uniform(rng, -0.1, 0.35) if zone == "lower" else _uniform(rng, -0.3, 0.3)
                r = rx * (0.35, 0.5, 0.65)[s]
                blob = _gauss(xs, ys, cx + uc * rx, cy + vc * ry, r, r * 1.2)
                dens += (0.22, 0.32, 0.42)[s] * blob * (0.4 + 1.2 * patch)
        if side in spec["nodules"]:
            size_mm, un, vn = spec["nodules"][side]
            r = 1.2 * size_mm / 2 / FOV_MM
            dens += 0.35 * np.minimum(2.0 * _gauss(xs, ys, cx + un * rx, cy + vn * ry, r, r), 1.0)
        s = sev(f"atelectasis_{side}")
        if s >= 0:
            y0 = cy + ry * _uniform(rng, 0.35, 0.5)
            x0, x1 = cx - lateral * rx * 0.45, cx + lateral * rx * 0.55
            tilt = ry * _uniform(rng, -0.08, 0.12)
            _draw_segment(dens, xs, ys, (x0, y0 - tilt), (x1, y0 + tilt), (0.006, 0.011, 0.018)[s],
                          (0.2, 0.28, 0.36)[s])
        s = sev("pulmonary_edema")
        if s >= 0:
            batwing = _gauss(xs, ys, 0.5 + lateral * 0.11, 0.47, rx * 0.8, ry * 0.5)
            dens += (0.12, 0.2, 0.28)[s] * batwing * (0.6 + 0.8 * patch)
        view += dens * mask

        # Pleural findings: pneumothorax rim with a pleural line, effusion with a meniscus.
        s = sev(f"pneumothorax_{side}")
        if s >= 0:
            # Collapsed lung: pinned at the medial edge and base, retracted from apex and wall.
            t = (0.18, 0.3, 0.45)[s]
            _, _, dc = _lung_field(xs, ys, cx - lateral * rx * t, cy + 0.6 * t * ry, rx * (1 - t), ry * (1 - 0.6 * t))
            view += (0.03 - view) * (mask * _soft(-dc, 0.06))
            view += 0.25 * _bump(np.square(dc / 0.07)) * _soft(d + 0.12, 0.05)
        s = sev(f"pleural_effusion_{side}")
        if s >= 0:
            h = (0.15, 0.27, 0.42)[s]  # fluid height as a fraction of lung height
            level = 1.0 - 2.0 * h - 0.8 * h * ((lateral * u + 1.0) / 2.0) ** 2
            view += (0.6 - view) * (mask * _soft(level - v, 0.06))

        # Posterior rib arcs, seen through the lungs.
        phase = (ys - 0.9 * (np.abs(xs - 0.5) - 0.1) ** 2) * (1.0 / 0.068)
        phase -= np.floor(phase)
        view += (0.07 * mask) * np.clip(5.0 * np.abs(phase - 0.5) - 1.5, 0.0, 1.0)

    # Mediastinum, trachea and spine (a vertical band).
    rows, cols = _box(x, y, 0.38, 0.62, -1.0, 2.0)
    xs, ys, view = x[:, cols], y, img[:, cols]
    view += (0.66 - view) * _soft(np.abs(xs - 0.505) - 0.06, 0.03)
    view -= 0.22 * _soft(np.abs(xs - 0.5) - 0.014, 0.01) * (_soft(ys - CARINA_Y, 0.02) * _soft(0.05 - ys, 0.05))
    view += 0.07 * _soft(np.abs(xs - 0.5) - 0.035, 0.02) * (0.75 + 0.25 * np.cos(ys * (2 * np.pi / 0.045)))

    # Heart, widened and shifted to the patient's left by cardiomegaly.
    hx, hy, hrx, hry = HEART
    widen = _uniform(rng, 0.93, 1.05) * (1.0, 1.28, 1.42, 1.58)[sev("cardiomegaly") + 1]
    hx += 0.6 * hrx * (widen - 1.0)
    hrx, hry = hrx * widen, hry * (1.0 + 0.35 * (widen - 1.0))
    rows, cols = _box(x, y, hx - hrx - 0.02, hx + hrx + 0.02, hy - hry - 0.02, hy + hry + 0.02)
    xs, ys, view = x[:, cols], y[rows], img[rows, cols]
    view += (0.68 - view) * _soft(np.sqrt(((xs - hx) / hrx) ** 2 + ((ys - hy) / hry) ** 2) - 1.0, 0.07)

    # Clavicles: one segment, mirrored about the midline.
    rows, _ = _box(x, y, 0.0, 1.0, 0.11, 0.24)
    img[rows] += 0.2 * _segment(np.abs(x - 0.5), y[rows], (0.04, 0.21), (0.3, 0.14), 0.02)

    # Support devices.
    for device in spec.get("devices", ()):
        if device == "ett":
            tip = CARINA_Y - spec["ett_cm"] * 10.0 / FOV_MM
            _draw_segment(img, x, y, (0.5, -0.05), (0.5, tip), 0.005, 0.45)
        elif device == "cvc":
            _draw_segment(img, x, y, (0.37, -0.05), (0.43, 0.2), 0.004, 0.45)
            _draw_segment(img, x, y, (0.43, 0.2), (0.47, 0.36), 0.004, 0.45)
        elif device == "pacer":
            rows, cols = _box(x, y, 0.74, 0.86, 0.15, 0.25)
            img[rows, cols] += (0.5 * _soft(np.abs(x[:, cols] - 0.8) - 0.04, 0.01)
                                * _soft(np.abs(y[rows] - 0.2) - 0.028, 0.01))
            _draw_segment(img, x, y, (0.78, 0.2), (0.6, 0.36), 0.003, 0.4)
            _draw_segment(img, x, y, (0.6, 0.36), (0.52, 0.64), 0.003, 0.4)

    # Exposure, contrast and quantum noise.
    gain, offset = _uniform(rng, 0.8, 1.2), _uniform(rng, -0.1, 0.1)
    img = (img - 0.5) * gain + (0.5 + offset)
    row, col = int(rng.random() * size), int(rng.random() * size)
    img += _uniform(rng, 0.01, 0.035) * _noise_bank(size)[row : row + size, col : col + size]
    return (np.clip(img, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
