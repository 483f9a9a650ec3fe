"""Sweeps: one scenario run per value of a key, the loss floor against that value.

The *floor* of a run is the mean full-model training loss over its last quarter of
server rounds: the level at which, by Liao & Kyrillidis (TMLR 2022, Thm. 1), the
geometric decrease of masked training stops (it shrinks as p grows for Bernoulli
masks, and is ~0 for ξ = 1, plain GD).

A floor is only a floor where the curve has *flattened* (:func:`flattened`): a
least-squares line through the log-loss of the last quarter of the rounds falls by less
than half across that quarter. A run still falling faster has a transient, not a
floor: its value is an upper bound, marked so in ``sweep.json`` and drawn hollow.
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


def flattened(rows: Sequence[dict], key: str = "full-train-loss", tol: float = 0.5) -> bool:
    """Whether the curve of ``key`` has flattened over the last quarter of the rounds.

    A least-squares line through ``log(key)`` against the round, over the last quarter
    (at least 4 rounds), must fall by less than ``tol`` across it:
    ``exp(slope · (rounds in it − 1)) >= 1 − tol``. Noise around a floor gives a slope
    near 0 (or rising, which counts as flat); a geometric transient falls by far more.
    """
    values = [r[key] for r in rows if r["server-round"] > 0]
    tail = np.asarray(values[-max(4, len(values) // 4):], dtype=np.float64)
    if len(tail) < 4 or len(values) < 4 or not np.all(tail > 0):
        return False
    slope = np.polyfit(np.arange(len(tail)), np.log(tail), 1)[0]
    return bool(np.exp(slope * (len(tail) - 1)) >= 1.0 - tol)


def floor_figure(values: Sequence, floors: Sequence[float], key: str, title: str = "",
                 flat: Sequence[bool] | None = None):
    """The figure :func:`plot_floor` writes, as a matplotlib ``Figure`` (Agg backend);
    points whose run had not flattened (``flat`` False) are drawn hollow."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .plots import label_log_axis

    fig, ax = plt.subplots(figsize=(6, 4.5), constrained_layout=True)
    xs = [str(v) for v in values]
    ax.plot(xs, floors, color="C0")
    flat = list(flat) if flat is not None else [True] * len(xs)
    done = [(x, f) for x, f, ok in zip(xs, floors, flat) if ok]
    falling = [(x, f) for x, f, ok in zip(xs, floors, flat) if not ok]
    if done:
        ax.plot(*zip(*done), "o", color="C0", label="floor (flattened)")
    if falling:
        ax.plot(*zip(*falling), "o", mfc="none", color="C0", label="still falling: an upper bound")
        ax.legend(fontsize=8)
    ax.set_yscale("log")
    label_log_axis(ax.yaxis)  # floors within a decade of each other still get labelled ticks
    ax.set_xlabel(key)
    # on three lines: on one, the label is taller than the axes and gets cut off
    ax.set_ylabel("loss floor\n(mean full-model training loss,\nlast quarter of rounds)")
    ax.grid(alpha=0.3)
    if title:
        ax.set_title(title)
    return fig


def plot_floor(values: Sequence, floors: Sequence[float], key: str, path: str | Path, title: str = "",
               flat: Sequence[bool] | None = None) -> Path:
    """Loss floor (log scale, at least two labelled ticks) against the swept value."""
    import matplotlib.pyplot as plt

    fig = floor_figure(values, floors, key, title, flat)
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def steps_figure(runs: dict[str, list[dict]], local_steps: Sequence[int]):
    """Full-model training loss (log) against total local steps (server round × τ): runs
    with different τ compared at matched computation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .plots import label_log_axis

    fig, ax = plt.subplots(figsize=(6, 4.5), constrained_layout=True)
    for (label, rows), tau in zip(runs.items(), local_steps):
        ax.plot([r["server-round"] * tau for r in rows], [r["full-train-loss"] for r in rows], label=label)
    ax.set_yscale("log")
    label_log_axis(ax.yaxis)
    ax.set_xlabel("total local steps per node (server round × τ)")
    ax.set_ylabel("full-model training loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def write_sweep(out: Path, key: str, values: Sequence, runs: dict[str, list[dict]], title: str,
                local_steps: Sequence[int] | None = None) -> dict:
    """``sweep.json``, ``sweep-loss.png`` (curves) and ``sweep-floor.png``; returns the floors.

    ``key`` names the swept key(s) (``"a+b"`` for keys varied together); with
    ``local_steps`` (τ of each run, when τ is swept) also ``sweep-steps.png``, the loss
    against total local steps. ``sweep.json`` holds each run's floor, whether it had
    flattened (:func:`flattened`) and its final loss.
    """
    from .plots import plot_runs, save_figure

    floors = {label: loss_floor(rows) for label, rows in runs.items()}
    flat = {label: flattened(rows) for label, rows in runs.items()}
    plot_runs(runs, out / "sweep-loss.png", title=title)
    plot_floor(values, list(floors.values()), key, out / "sweep-floor.png", title=title, flat=list(flat.values()))
    if local_steps is not None:
        fig = steps_figure(runs, local_steps)
        save_figure(fig, fig.axes[0], out / "sweep-steps.png", title)
    result = {"key": key, "values": list(values), "floors": floors, "flattened": flat,
              "final": {label: rows[-1]["full-train-loss"] for label, rows in runs.items() if rows}}
    (out / "sweep.json").write_text(json.dumps(result, indent=2))
    return result
