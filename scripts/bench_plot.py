#!/usr/bin/env python
"""Draw a benchmark's stored JSON as its figure in ``--out``: ``tiers`` (docs/tiers-table.json,
the three-tier CNN scenario over seeds, ``python bench/tiers.py --write-docs``) as
``tiers-table.png``, ``lora`` (docs/lora.json, heterogeneous LoRA ranks,
``python bench/lora.py --write-docs``) as ``lora-accuracy-vs-mb.png``: the figures
``make figures`` copies to docs/ (scripts/make_figures.py, ``tiers-table`` and ``lora``).

    python scripts/bench_plot.py tiers --out DIR [--json docs/tiers-table.json]

Drawing only: the measurements take minutes and are the benches' (``--rounds`` is
accepted for ``make_figures``'s sake and refused unless absent, since nothing is run here).
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

#: bench name -> (module, the figure's file name)
BENCHES = {"tiers": ("bench.tiers", "tiers-table.png"), "lora": ("bench.lora", "lora-accuracy-vs-mb.png")}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("bench", choices=sorted(BENCHES))
    p.add_argument("--out", type=Path, required=True, help="folder of the figure")
    p.add_argument("--json", type=Path, default=None, help="default: the bench's JSON_OUT")
    p.add_argument("--rounds", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    module, name = BENCHES[args.bench]
    bench = importlib.import_module(module)
    if args.rounds is not None:
        p.error(f"--rounds: this figure draws a stored measurement (run python bench/{args.bench}.py instead)")
    args.out.mkdir(parents=True, exist_ok=True)
    bench.plot(json.loads((args.json or bench.JSON_OUT).read_text()), args.out / name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
