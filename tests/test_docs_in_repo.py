"""The project's notes live in the repository: no file points at notes kept outside it,
and every `docs/<page>.md, <Heading>` citation names a page and a heading that exist."""

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Notes kept outside the repository, spelled in parts so that this file does not name them.
OUTSIDE = tuple(f"{stem}.md" for stem in ("DESIGN", "RECIPE", "STYLE"))
# A citation: the page, a comma, then the heading as written, ending at punctuation or the line's end.
CITATION = re.compile(r"docs/(\w+)\.md, ([A-Z][\w -]*\w)")
CITING_SUFFIXES = (".py", ".yaml", ".yml", ".md")


def repo_files() -> list[Path]:
    """Tracked files, and new ones git does not ignore, that exist in the work tree; outside
    a git work tree (an unpacked archive), every file but the environment and run outputs."""
    try:
        out = subprocess.run(
            ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            cwd=ROOT,
            capture_output=True,
            check=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        skipped = {".git", ".venv", "runs", "__pycache__"}
        return [p for p in ROOT.rglob("*") if p.is_file() and not skipped & set(p.relative_to(ROOT).parts)]
    names = dict.fromkeys(n for n in out.decode().split("\0") if n)
    return [ROOT / n for n in names if (ROOT / n).is_file()]


def text_lines(path: Path) -> list[str]:
    """The file's lines, or [] for a binary file (a NUL byte, or not UTF-8)."""
    data = path.read_bytes()
    if b"\0" in data[:8192]:
        return []
    try:
        return data.decode("utf-8").splitlines()
    except UnicodeDecodeError:
        return []


def headings(page: Path) -> set[str]:
    """The markdown headings of `page` (any level), outside fenced code blocks."""
    out, fenced = set(), False
    for line in page.read_text().splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and (m := re.match(r"#+\s+(.+?)\s*$", line)):
            out.add(m.group(1))
    return out


def test_no_file_mentions_notes_outside_the_repository():
    offending = [
        f"{path.relative_to(ROOT)}:{n}: {line.strip()}"
        for path in repo_files()
        for n, line in enumerate(text_lines(path), 1)
        if any(name in line for name in OUTSIDE)
    ]
    message = f"{len(offending)} line(s) cite notes that are not in the repository:\n" + "\n".join(offending)
    assert not offending, message


def test_docs_citations_name_existing_pages_and_headings():
    pages: dict[str, set[str] | None] = {}
    found, bad = 0, []
    for path in repo_files():
        if path.suffix not in CITING_SUFFIXES:
            continue
        for n, line in enumerate(text_lines(path), 1):
            for page, heading in CITATION.findall(line):
                found += 1
                if page not in pages:
                    doc = ROOT / "docs" / f"{page}.md"
                    pages[page] = headings(doc) if doc.is_file() else None
                where = f"{path.relative_to(ROOT)}:{n}"
                if pages[page] is None:
                    bad.append(f"{where}: docs/{page}.md does not exist")
                elif heading not in pages[page]:
                    known = ", ".join(sorted(pages[page]))
                    bad.append(f"{where}: docs/{page}.md has no heading {heading!r} (headings: {known})")
    assert found, "no docs citation found: is the pattern still the one the code uses?"
    assert not bad, "\n".join(bad)
