"""Sweeps: one scenario run per value of a key, the loss floor against that value.

The *floor* of a run is the mean full-model training loss over its last quarter of
server rounds: the level at which, by Liao & Kyrillidis (TMLR 2022, Thm. 1), the
geometric decrease of masked training stops (it shrinks as p grows for Bernoulli
masks, and is ~0 for ξ = 1, plain GD).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np


def loss_floor(rows: Sequence[dict], key: str = "full-train-loss") -> float:
    """Mean of ``key`` over the last quarter of the rounds (at least one round)."""
    values = [r[key] for r in rows if r["server-round"] > 0]
    tail = values[-max(1, len(values) // 4):]
    return float(np.mean(tail)) if tail else float("nan")


def floor_figure(values: Sequence, floors: Sequence[float], key: str, title: str = ""):
    """The figure :func:`plot_floor` writes, as a matplotlib ``Figure`` (Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .plots import label_log_axis

    fig, ax = plt.subplots(figsize=(6, 4.5), constrained_layout=True)
    ax.plot([str(v) for v in values], floors, marker="o")
    ax.set_yscale("log")
    label_log_axis(ax.yaxis)  # floors within a decade of each other still get labelled ticks
    ax.set_xlabel(key)
    # on three lines: on one, the label is taller than the axes and gets cut off
    ax.set_ylabel("loss floor\n(mean full-model training loss,\nlast quarter of rounds)")
    ax.grid(alpha=0.3)
    if title:
        ax.set_title(title)
    return fig


def plot_floor(values: Sequence, floors: Sequence[float], key: str, path: str | Path, title: str = "") -> Path:
    """Loss floor (log scale, at least two labelled ticks) against the swept value."""
    import matplotlib.pyplot as plt

    fig = floor_figure(values, floors, key, title)
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_sweep(out: Path, key: str, values: Sequence, runs: dict[str, list[dict]], title: str) -> dict:
    """``sweep.json``, ``sweep-loss.png`` (curves) and ``sweep-floor.png``; returns the floors."""
    from .plots import plot_runs

    floors = {label: loss_floor(rows) for label, rows in runs.items()}
    plot_runs(runs, out / "sweep-loss.png", title=title)
    plot_floor(values, list(floors.values()), key, out / "sweep-floor.png", title=title)
    result = {"key": key, "values": list(values), "floors": floors}
    (out / "sweep.json").write_text(json.dumps(result, indent=2))
    return result
