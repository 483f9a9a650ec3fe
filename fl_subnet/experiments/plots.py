"""Plots of runs: accuracy and loss against server rounds and against cumulative MB."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path


def plot_runs(runs: Mapping[str, Sequence[dict]], path: str | Path, title: str = "") -> Path:
    """A 2×2 figure: (eval accuracy | full-model loss) × (server round | cumulative MB).

    Parameters
    ----------
    runs : Mapping[str, Sequence[dict]]
        Label → metrics rows (``server-round``, ``eval-acc``, ``full-train-loss``,
        ``eval-loss``, ``cumulative-bytes``).
    path : str or Path
        PNG file to write.

    Returns
    -------
    Path
        ``path``. Regression runs (no accuracy) plot the evaluation loss instead, and
        losses use a log scale.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    classification = any(r.get("eval-acc") is not None for rows in runs.values() for r in rows)
    top_key, top_label = ("eval-acc", "test accuracy") if classification else ("eval-loss", "test loss")
    fig, axes = plt.subplots(2, 2, figsize=(11, 8), constrained_layout=True)
    for label, rows in runs.items():
        rounds = [r["server-round"] for r in rows]
        mb = [r["cumulative-bytes"] / 1e6 for r in rows]
        for col, xs in enumerate((rounds, mb)):
            axes[0, col].plot(xs, [r.get(top_key) for r in rows], marker="o", ms=3, label=label)
            axes[1, col].plot(xs, [r.get("full-train-loss") for r in rows], marker="o", ms=3, label=label)
    for col, xlabel in enumerate(("server round", "cumulative MB sent (down + up)")):
        axes[0, col].set_ylabel(top_label)
        axes[1, col].set_ylabel("full-model training loss")
        axes[1, col].set_yscale("log")
        if not classification:
            axes[0, col].set_yscale("log")
        for row in range(2):
            axes[row, col].set_xlabel(xlabel)
            axes[row, col].grid(alpha=0.3)
    axes[0, 0].legend()
    if title:
        fig.suptitle(title)
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
