"""What ``min-holders`` costs in bytes (docs/reliability.md, "Redundancy: min-holders").

Setting: the digits MLP of the scenarios (``MLP(64, [256, 128], 10)``), 10 connected
nodes, rounds 1 to :data:`ROUNDS` of seed 0, ``min-holders`` k = 1, 2, 3, for

* ``ist-3``: IST with p = 3 over all 10 nodes (``num_train_nodes=10``);
* ``ist-3-f0.3``: IST with p = 3 and ``fraction-train`` 0.3 (3 nodes a round, classic IST;
  with k the strategy takes k·p);
* ``dropout-0.5``: federated dropout, ξ = 0.5, all 10 nodes.

Only ``configure_train`` runs (no training): per round, the bytes the strategy counts as
``bytes-down`` (:func:`~fl_subnet.strategies.replies.payload_bytes`: the slices' ``.npy``
payloads and the masks), summed over the nodes, and the fewest holders any hidden unit
has. The replies carry the same slices back, so ``bytes-up`` grows by the same factor.
Deterministic: the numbers depend only on the seed and the code.

Usage::

    python bench/holders.py                 # print the table
    python bench/holders.py --write-docs    # write it into docs/reliability.md
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import replace_between  # noqa: E402

log = logging.getLogger("bench.holders")

DOCS = ROOT / "docs" / "reliability.md"
MARK_START, MARK_END = "<!-- holders:start -->", "<!-- holders:end -->"
NUM_NODES = 10
ROUNDS = 5
KS = (1, 2, 3)
SETTINGS = {
    "ist-3": "IST, p = 3, all 10 nodes",
    "ist-3-f0.3": "IST, p = 3, `fraction-train` 0.3",
    "dropout-0.5": "federated dropout, ξ = 0.5, all 10 nodes",
}


def make_strategy(setting: str, k: int):
    """The strategy of ``setting`` with ``min_holders=k`` (seed 0)."""
    import functools

    from fl_subnet.models import MLP
    from fl_subnet.strategies import IST, FederatedDropout

    factory = functools.partial(MLP, 64, [256, 128], 10)
    common = dict(seed=0, min_holders=k)
    if setting == "ist-3":
        return IST(factory, 3, num_train_nodes=NUM_NODES, **common)
    if setting == "ist-3-f0.3":
        return IST(factory, 3, fraction_train=0.3, **common)
    if setting == "dropout-0.5":
        return FederatedDropout(factory, 0.5, num_train_nodes=NUM_NODES, **common)
    raise ValueError(f"unknown setting {setting!r}")


def measure() -> dict[str, dict[int, dict[str, float]]]:
    """setting → k → ``nodes`` (a round), ``fewest`` (fewest holders of a unit over the
    rounds) and ``bytes`` (bytes-down per round, mean over the rounds)."""
    import torch
    from flwr.app import ArrayRecord, ConfigRecord
    from flwr.clientapp import ClientApp

    from fl_subnet.core.holders import holder_counts
    from fl_subnet.experiments.inprocess_grid import InProcessGrid
    from fl_subnet.strategies.replies import payload_bytes

    out: dict[str, dict[int, dict[str, float]]] = {}
    grid = InProcessGrid(ClientApp(), NUM_NODES)  # configure_train only: the ClientApp is never called
    for setting in SETTINGS:
        out[setting] = {}
        for k in KS:
            strategy = make_strategy(setting, k)
            torch.manual_seed(0)
            arrays = ArrayRecord(strategy.model_factory().state_dict())
            total, fewest, nodes = 0, None, set()
            for rnd in range(1, ROUNDS + 1):
                messages = strategy.configure_train(rnd, arrays, ConfigRecord({"lr": 0.1}), grid)
                total += sum(payload_bytes(m.content[strategy.arrayrecord_key], m.content[strategy.configrecord_key])
                             for m in messages)
                counts = holder_counts(list(strategy._sent.values()), strategy.groups)
                low = min(int(c.min()) for c in counts.values())
                fewest = low if fewest is None else min(fewest, low)
                nodes.add(len(messages))
            (n,) = nodes
            out[setting][k] = {"nodes": n, "fewest": fewest, "bytes": total / ROUNDS}
    return out


def render_table(data: dict[str, dict[int, dict[str, float]]]) -> str:
    """The markdown table of :func:`measure`'s numbers."""
    lines = [f"Digits MLP 64-256-128-10, {NUM_NODES} nodes connected, seed 0, rounds 1 to {ROUNDS} "
             "(`python bench/holders.py --write-docs`). Bytes down a round (the strategy's `bytes-down`); "
             "bytes up grow by the same factor.",
             "",
             "| setting | k | nodes a round | fewest holders of a unit | MB down a round | × k = 1 |",
             "|---|---|---|---|---|---|"]
    for setting, rows in data.items():
        base = rows[KS[0]]["bytes"]
        for k, r in rows.items():
            lines.append(f"| {SETTINGS[setting]} | {k} | {r['nodes']} | {r['fewest']} | {r['bytes'] / 1e6:.3f} "
                         f"| {r['bytes'] / base:.3f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write-docs", action="store_true", help=f"write the table into {DOCS.relative_to(ROOT)}")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    table = render_table(measure())
    if args.write_docs:
        replace_between(DOCS, MARK_START, MARK_END, table)
        log.warning("wrote %s", DOCS)
    sys.stdout.write(table)
    return table


if __name__ == "__main__":
    main()
