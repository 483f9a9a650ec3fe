#!/usr/bin/env python
"""Draw docs/tiers-table.json (the three-tier CNN scenario over seeds, measured by
``python bench/tiers.py --write-docs``) as ``tiers-table.png`` in ``--out`` — the figure
``make figures`` copies to docs/ (scripts/make_figures.py, ``tiers-table``).

    python scripts/tiers_plot.py --out DIR [--json docs/tiers-table.json]

Drawing only: the measurement takes minutes and is the bench's (``--rounds`` is accepted
for ``make_figures``'s sake and refused unless absent, since nothing is run here).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.tiers import JSON_OUT, plot  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True, help="folder of tiers-table.png")
    p.add_argument("--json", type=Path, default=JSON_OUT, help=f"default {JSON_OUT.relative_to(ROOT)}")
    p.add_argument("--rounds", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.rounds is not None:
        p.error("--rounds: this figure draws a stored measurement (run python bench/tiers.py --rounds N instead)")
    args.out.mkdir(parents=True, exist_ok=True)
    plot(json.loads(args.json.read_text()), args.out / "tiers-table.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
