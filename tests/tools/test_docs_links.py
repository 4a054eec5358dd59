"""Every relative link and every repository path named in the README and docs/ exists.

Checked: markdown links `[text](target)` (resolved against the file's folder; `#anchor` of a
markdown target must be one of its headings) and back-quoted paths that look like repository
paths (a `/` and a file extension, or a trailing `/`; a `*` matches by glob), found either
beside the file or from the repository root. Ignored: URLs, anchor-only links, fenced code
blocks, placeholders (`<...>`, `{...}`, `...`, upper-case names such as `RUN/` or `DIR`) and
the outputs a user's run creates (`runs/`, a run folder's `checkpoints/`, `tokenizer/`, ...).
And the README links every page of docs/.
"""
import glob
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOC_FILES = sorted([ROOT / "README.md", ROOT / "CHANGELOG.md", *(ROOT / "docs").glob("*.md")])

# the first component of paths that a run or a command writes, not files of the repository
OUTPUT_PREFIXES = ("runs/", "checkpoints/", "tokenizer/", "retrieval/", "tensorboard/", "build/", "/")

LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
CODE_SPAN = re.compile(r"`([^`\n]+)`")
FENCE = re.compile(r"^\s*(```|~~~)")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
LOOKS_LIKE_PATH = re.compile(r"^[\w.\-*/]+(/|\.[A-Za-z0-9*]+)$")
PLACEHOLDER = re.compile(r"[<>{}]|\.\.\.|(^|/)[A-Z][A-Z0-9_]*(/|$)")


def prose_lines(text):
    """The lines of a markdown text outside fenced code blocks, as (line number, line)."""
    inside = False
    for number, line in enumerate(text.splitlines(), 1):
        if FENCE.match(line):
            inside = not inside
            continue
        if not inside:
            yield number, line


def slug(heading):
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"`|\*\*|__", "", heading).strip().lower()
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", text)
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path):
    """Every heading anchor of a markdown file, repeated headings numbered as GitHub does."""
    seen, found = {}, set()
    for _, line in prose_lines(path.read_text(encoding="utf-8")):
        match = HEADING.match(line)
        if match:
            base = slug(match.group(2))
            count = seen.get(base, 0)
            seen[base] = count + 1
            found.add(base if count == 0 else f"{base}-{count}")
    return found


def exists(path):
    return bool(glob.glob(str(path))) if "*" in str(path) else path.exists()


def broken_references(doc, root=ROOT):
    """'line N: why' for each link or repository path of `doc` that does not resolve."""
    problems = []
    text = doc.read_text(encoding="utf-8")
    for number, line in prose_lines(text):
        without_code = CODE_SPAN.sub("", line)
        for target in LINK.findall(without_code):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
                continue  # a URL or an anchor of this page
            file_part, _, anchor = target.partition("#")
            resolved = (doc.parent / file_part).resolve()
            if not resolved.exists():
                problems.append(f"line {number}: link target {target} does not exist")
            elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
                problems.append(f"line {number}: {target}: no heading with anchor #{anchor}")
        for span in CODE_SPAN.findall(line):
            candidate = span.strip()
            if ("/" not in candidate or not LOOKS_LIKE_PATH.match(candidate)
                    or candidate.startswith(OUTPUT_PREFIXES) or PLACEHOLDER.search(candidate)):
                continue
            if not (exists(doc.parent / candidate) or exists(root / candidate)):
                problems.append(f"line {number}: path `{candidate}` exists neither beside {doc.name} nor in the "
                                "repository root")
    return problems


@pytest.mark.parametrize("doc", DOC_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_links_and_paths_resolve(doc):
    assert doc.exists(), f"{doc} is missing"
    problems = broken_references(doc)
    assert not problems, f"{doc.relative_to(ROOT)}:\n" + "\n".join(problems)


def test_checker_reports_what_is_broken_and_skips_what_is_not_a_file(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "mod.py").write_text("")
    (tmp_path / "docs" / "other.md").write_text("# Other page\n\n## A section, with `code` (1×)\n")
    doc = tmp_path / "docs" / "page.md"
    doc.write_text("\n".join([
        "# Page",
        "[ok](other.md) [ok anchor](other.md#a-section-with-code-1) [ok dir](../pkg/) [own](#page)",
        "[url](https://example.org/x.md) `pkg/mod.py` `pkg/*.py` `runs/default/final.json` `RUN/retrieval/`",
        "`<out-dir>/tokenizer/` `mcr.train` `--out-dir` `a / b`",
        "```bash",
        "python missing/script.py",
        "```",
        "[bad](missing.md) [bad anchor](other.md#nowhere) `pkg/gone.py` `pkg/*.txt`",
    ]) + "\n")
    problems = broken_references(doc, root=tmp_path)
    assert [p.split(":")[0] for p in problems] == ["line 8"] * 4, problems
    assert "missing.md" in problems[0] and "#nowhere" in problems[1]
    assert "pkg/gone.py" in problems[2] and "pkg/*.txt" in problems[3]


def test_readme_links_every_docs_page():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    linked = {(ROOT / target.partition("#")[0]).resolve() for target in LINK.findall(readme)}
    unlinked = [p.name for p in sorted((ROOT / "docs").glob("*.md")) if p.resolve() not in linked]
    assert not unlinked, f"README.md links no page for: {', '.join(unlinked)}"
