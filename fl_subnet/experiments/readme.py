"""The README's generated blocks, rendered from the code and from the results files that
``make figures`` writes into ``docs/``.

    python -m fl_subnet.experiments.readme [--check] [--readme README.md]

A generated block is the text between ``<!-- generated: NAME -->`` and
``<!-- end: NAME -->``. Blocks: ``protocols`` (one row per registered protocol,
:func:`fl_subnet.strategies.protocol_table`), ``demo`` (``docs/demo-results.json``) and
``quickstart`` (``docs/quickstart-protocols.json``). Without ``--check`` the file is
rewritten in place; with it, the exit status is 1 and the stale blocks are named if the
file differs from its rendering (a test runs this check). ``make figures`` runs it last.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[2]
BLOCK = re.compile(r"(<!-- generated: (?P<name>[\w-]+) -->\n)(?P<body>.*?)(\n<!-- end: (?P=name) -->)", re.S)


def _protocols(docs: Path) -> str:
    from fl_subnet.strategies import protocol_table

    return protocol_table()


def _demo(docs: Path) -> str:
    from .results import markdown_table

    return markdown_table(json.loads((docs / "demo-results.json").read_text()))


def _quickstart(docs: Path) -> str:
    from .quickstart import table

    return table(json.loads((docs / "quickstart-protocols.json").read_text()))


#: Block name -> renderer (its argument: the docs folder).
RENDERERS: dict[str, Callable[[Path], str]] = {"protocols": _protocols, "demo": _demo, "quickstart": _quickstart}


def render(text: str, docs: Path = ROOT / "docs") -> tuple[str, list[str]]:
    """``text`` with every generated block rendered anew, and the names of those that changed.

    Raises
    ------
    ValueError
        If a block names no renderer.
    """
    changed: list[str] = []

    def one(m: re.Match) -> str:
        name = m.group("name")
        if name not in RENDERERS:
            raise ValueError(f"generated block {name!r} has no renderer; known: {sorted(RENDERERS)}")
        body = RENDERERS[name](docs).rstrip("\n")
        if body != m.group("body"):
            changed.append(name)
        return m.group(1) + body + m.group(4)

    return BLOCK.sub(one, text), changed


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    parser = argparse.ArgumentParser(prog="python -m fl_subnet.experiments.readme", description=__doc__.split("\n")[0])
    parser.add_argument("--readme", type=Path, default=ROOT / "README.md")
    parser.add_argument("--docs", type=Path, default=ROOT / "docs")
    parser.add_argument("--check", action="store_true", help="exit 1 if a generated block is stale")
    args = parser.parse_args(argv)
    text = args.readme.read_text()
    new, changed = render(text, args.docs)
    if args.check:
        if changed:
            log.error("%s: stale generated blocks %s (run python -m fl_subnet.experiments.readme)",
                      args.readme, changed)
            return 1
        return 0
    if changed:
        args.readme.write_text(new)
    log.info("%s: %s", args.readme, f"rewrote {changed}" if changed else "up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
