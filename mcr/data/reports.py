"""Radiology report cleaning and section extraction (MIMIC-CXR free text, OpenI XML fields).

    sections = split_sections(raw_text)              # {"findings": "...", "impression": "...", ...}
    text = compose_report(sections, ("findings", "impression"), fallback="last")

The composed text reads "FINDINGS: ... IMPRESSION: ..." (the synthetic corpus' format).
When none of the wanted sections is present, fallback="last" uses the report's last
section (MIMIC-CXR's own convention: the final paragraph carries the conclusion), or the
whole cleaned text when the report has no headings; fallback="none" gives "" (skipped).
"""
import re

# heading spellings -> canonical section names
ALIASES = {
    "finding": "findings",
    "findings": "findings",
    "findings and impression": "findings",
    "impressions": "impression",
    "impression": "impression",
    "conclusion": "impression",
    "conclusions": "impression",
    "summary": "impression",
    "history": "indication",
    "clinical history": "indication",
    "reason for exam": "indication",
    "reason for examination": "indication",
    "indication": "indication",
    "comparison": "comparison",
    "comparisons": "comparison",
    "technique": "technique",
    "examination": "examination",
    "exam": "examination",
}
FALLBACKS = ("last", "none")

# A heading: capitals (and spaces, /, &, -) followed by a colon, at the start of a line.
_HEADING = re.compile(r"^[ \t]*([A-Z][A-Z /&()-]{1,40}?)[ \t]*:", re.MULTILINE)
_PLACEHOLDER = re.compile(r"_{2,}|\bX{2,}\b")  # de-identification marks (MIMIC ___, OpenI XXXX)


def clean_text(text):
    """Drop de-identification placeholders and collapse whitespace."""
    text = _PLACEHOLDER.sub(" ", text)
    return " ".join(text.split())


def split_sections(text):
    """Raw report -> {canonical section name: cleaned text}, in report order.

    Text before the first heading is kept under "preamble" (minus a FINAL REPORT title).
    Unknown headings keep their lowercased name; repeated sections are concatenated.
    """
    text = text.replace("\r\n", "\n")
    matches = list(_HEADING.finditer(text))
    sections = {}

    def add(name, body):
        body = clean_text(body)
        if body:
            sections[name] = f"{sections[name]} {body}" if name in sections else body

    head = re.sub(r"^\s*FINAL REPORT", "", text[: matches[0].start() if matches else len(text)])
    add("preamble", head)
    for m, nxt in zip(matches, matches[1:] + [None]):
        name = " ".join(m.group(1).lower().split())
        add(ALIASES.get(name, name), text[m.end(): nxt.start() if nxt else len(text)])
    return sections


def compose_report(sections, wanted=("findings", "impression"), fallback="last"):
    """The report text used for training: the wanted sections with their headings, or the
    fallback (see the module docstring); "" when nothing usable remains."""
    if fallback not in FALLBACKS:
        raise ValueError(f"fallback must be one of {FALLBACKS}, got {fallback!r}")
    parts = [f"{name.upper()}: {sections[name]}" for name in wanted if sections.get(name)]
    if parts:
        return " ".join(parts)
    if fallback == "none" or not sections:
        return ""
    return list(sections.values())[-1]


def report_from_text(text, wanted=("findings", "impression"), fallback="last"):
    """split_sections + compose_report of one raw report."""
    return compose_report(split_sections(text), wanted, fallback)
