"""The user-facing docs read as statements for a user, not as a work log.

Phrases that only make sense to whoever measured or changed something ("this session",
"the issue's target", "in an earlier run", "was ... before") are rejected in README.md,
the example READMEs and docs/*.md, naming the file, the line and the phrase.
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORK_LOG = re.compile(
    r"\b(?:last|this|previous|next) session\b|\bsessions? ago\b|\bthis morning\b|\bthe issue(?:'s)?\b"
    r"|\bthe earlier\b|\bin (?:an )?earlier runs?\b|\bwas\b.{0,60}?\bbefore\b",
    re.IGNORECASE)


def user_docs() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "examples").glob("*/README.md")), *sorted((ROOT / "docs").glob("*.md"))]


def test_no_work_log_phrases_in_user_docs():
    found = [f"{path.relative_to(ROOT)}:{n}: {m.group(0)!r}"
             for path in user_docs()
             for n, line in enumerate(path.read_text().splitlines(), 1)
             for m in WORK_LOG.finditer(line)]
    assert not found, "rephrase as a plain statement for a user:\n" + "\n".join(found)


def test_the_pattern_catches_work_log_phrases():
    for phrase in ["three runs of this session read", "it was 1.34 last session", "went from 0.9 two sessions ago",
                   "the issue's 0.4", "(0.84 in an earlier run)", "the earlier setting", "was 6.3 ms before"]:
        assert WORK_LOG.search(phrase), phrase
    for plain in ["whose public key was registered beforehand", "0.84 in another run", "earlier rounds"]:
        assert not WORK_LOG.search(plain), plain
