"""The README is a front page: at most 300 lines, linking to the docs pages, and every
relative link in README.md and docs/*.md reaches an existing file (and, with a ``#``, a
heading of that file).

Headings are turned into anchors as GitHub does: lower case, punctuation other than ``-``
and ``_`` dropped, spaces to ``-``, a repeated heading suffixed ``-1``, ``-2``, ...
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
MAX_README_LINES = 300

LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")  # [text](target) and ![alt](target)
FENCED = re.compile(r"```.*?```", re.S)
CODE = re.compile(r"```.*?```|`[^`\n]*`", re.S)  # fenced blocks and inline code hold no links


def user_pages() -> list[Path]:
    return [README, *sorted((ROOT / "docs").glob("*.md"))]


def anchors(path: Path) -> set[str]:
    """The anchors GitHub gives the headings of a Markdown file."""
    seen: dict[str, int] = {}
    found = set()
    for line in FENCED.sub("", path.read_text()).splitlines():
        m = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not m:
            continue
        slug = re.sub(r"[^\w\- ]", "", m.group(1).lower()).replace(" ", "-")  # drops backticks too
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        found.add(slug if n == 0 else f"{slug}-{n}")
    return found


def relative_links(path: Path) -> list[str]:
    return [t for t in LINK.findall(CODE.sub("", path.read_text()))
            if not re.match(r"[a-z][a-z0-9+.-]*:", t)]  # leave out http:, https:, mailto:


def test_readme_is_a_front_page():
    lines = README.read_text().splitlines()
    assert len(lines) <= MAX_README_LINES, f"README.md has {len(lines)} lines; move a section to docs/"


@pytest.mark.parametrize("path", user_pages(), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_relative_link_reaches_a_file_and_heading(path):
    broken = []
    for target in relative_links(path):
        file, _, anchor = target.partition("#")
        dest = (path.parent / file).resolve() if file else path
        if not dest.exists():
            broken.append(f"{target}: no file {dest.relative_to(ROOT) if dest.is_relative_to(ROOT) else dest}")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{target}: no heading with anchor #{anchor} in {dest.relative_to(ROOT)}")
    assert not broken, f"{path.relative_to(ROOT)}:\n" + "\n".join(broken)


def test_readme_links_every_docs_page():
    """Every docs page is reachable from the README (frontier-digits-mlp.md is a generated
    table that docs/ist-and-dropout.md includes, not a page)."""
    linked = {(README.parent / t.partition("#")[0]).resolve() for t in relative_links(README)}
    pages = {p.resolve() for p in (ROOT / "docs").glob("*.md")} - {(ROOT / "docs" / "frontier-digits-mlp.md").resolve()}
    assert not pages - linked, sorted(p.name for p in pages - linked)


def test_every_docs_page_says_what_it_covers():
    """A docs page opens with its title and then one plain statement of what it covers."""
    for path in sorted((ROOT / "docs").glob("*.md")):
        if path.name == "frontier-digits-mlp.md":
            continue
        lines = path.read_text().splitlines()
        assert lines[0].startswith("# "), path.name
        first = next(line for line in lines[1:] if line.strip())
        assert not first.startswith(("#", "```", "|", "-", "!")), (path.name, first)


def test_code_messages_name_readme_sections_that_exist():
    """Error messages that send the user to a README section ("README: 'Switch your own
    Flower app to fl-subnet'") name a heading the README has."""
    headings = {m.group(1).strip() for m in re.finditer(r"^#{1,6}\s+(.+)$", README.read_text(), re.M)}
    named = set()
    for folder in ("fl_subnet", "strategies", "clients"):
        for source in (ROOT / folder).rglob("*.py"):
            named |= set(re.findall(r"README: '([^']+)'", source.read_text()))
    assert "Switch your own Flower app to fl-subnet" in named
    assert named <= headings, sorted(named - headings)


def test_readme_versions_are_the_pinned_ones():
    """The versions the README names are the ones constraints.txt pins."""
    pins = dict(line.split("==") for line in (ROOT / "constraints.txt").read_text().splitlines()
                if "==" in line and not line.startswith("#"))
    text = " ".join(README.read_text().split())
    named = re.search(r"pinned in `constraints.txt` \(Python 3\.11, (.*?)\)", text).group(1)
    for item in named.split(", "):
        name, version = item.rsplit(" ", 1) if item.count(" ") == 1 else item.split(" ")[:2]
        name = name.split("[")[0]
        assert pins.get(name) == version, (item, pins.get(name))
