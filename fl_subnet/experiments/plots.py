"""Plots of runs: accuracy and loss against server rounds and against cumulative MB."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

#: Tick positions per decade tried on a log axis, sparsest first (see :func:`label_log_axis`).
_LOG_SUBS = ((1.0,), (1.0, 2.0, 5.0), tuple(float(k) for k in range(1, 10)))


def _log_ticks(vmin: float, vmax: float) -> list[float]:
    """At least two tick positions inside ``[vmin, vmax]`` (``0 < vmin < vmax``) for a log axis.

    The sparsest of 10^k, {1, 2, 5}·10^k and {1, …, 9}·10^k that puts at least two ticks
    inside the interval (powers of ten thinned to at most ~8 ticks); a span too narrow for
    any of them (a flat curve) gets evenly spaced ticks in data space.
    """
    import numpy as np
    from matplotlib.ticker import MaxNLocator

    lo, hi = math.floor(math.log10(vmin)), math.ceil(math.log10(vmax))
    tol = 1e-9 * (vmax - vmin)
    for subs in _LOG_SUBS:
        step = max(1, math.ceil((hi - lo) / 8)) if subs == (1.0,) else 1
        ticks = [s * 10.0 ** k for k in range(lo, hi + 1, step) for s in subs]
        inside = [t for t in ticks if vmin - tol <= t <= vmax + tol]
        if len(inside) >= 2:
            return inside
    ticks = MaxNLocator(nbins=4, steps=[1, 2, 2.5, 5, 10]).tick_values(vmin, vmax)
    inside = [float(t) for t in ticks if vmin - tol <= t <= vmax + tol and t > 0]
    return inside if len(inside) >= 2 else [float(v) for v in np.linspace(vmin, vmax, 3)]


def label_log_axis(axis) -> None:
    """Make a log-scaled ``axis`` (e.g. ``ax.yaxis``) show at least two labelled ticks.

    Matplotlib's own log ticks can leave a curve that spans less than a decade (a loss
    floor from 0.042 to 0.046) with one labelled tick or none, depending on its version.
    Here the major ticks come from :func:`_log_ticks` (recomputed when the limits change),
    labelled in plain decimals with just enough digits to tell them apart; minor ticks
    stay unlabelled.
    """
    from matplotlib.ticker import Formatter, Locator, NullFormatter

    class LogTicks(Locator):
        def __call__(self):
            vmin, vmax = self.axis.get_view_interval()
            return self.tick_values(vmin, vmax)

        def tick_values(self, vmin, vmax):
            vmin, vmax = sorted((float(vmin), float(vmax)))
            if not (vmin > 0 and math.isfinite(vmax) and vmax > vmin):
                return []
            return _log_ticks(vmin, vmax)

    class DecimalLabels(Formatter):
        digits = 3

        def set_locs(self, locs):
            super().set_locs(locs)
            locs = [float(v) for v in locs if v > 0]
            # the fewest significant digits (at least 2) that tell the ticks apart
            self.digits = next((d for d in range(2, 12) if len({f"{v:.{d}g}" for v in locs}) == len(locs)), 12)

        def __call__(self, x, pos=None):
            return f"{x:.{self.digits}g}"

    axis.set_major_locator(LogTicks())
    axis.set_major_formatter(DecimalLabels())
    axis.set_minor_formatter(NullFormatter())


def runs_figure(runs: Mapping[str, Sequence[dict]], title: str = ""):
    """The figure :func:`plot_runs` writes, as a matplotlib ``Figure`` (Agg backend)."""
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
        label_log_axis(axes[1, col].yaxis)
        if not classification:
            axes[0, col].set_yscale("log")
            label_log_axis(axes[0, col].yaxis)
        for row in range(2):
            axes[row, col].set_xlabel(xlabel)
            axes[row, col].grid(alpha=0.3)
    axes[0, 0].legend()
    if title:
        fig.suptitle(title)
    return fig


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
        losses use a log scale with at least two labelled ticks (:func:`label_log_axis`).
    """
    import matplotlib.pyplot as plt

    fig = runs_figure(runs, title)
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def tier_columns(summaries: Sequence[Mapping[str, object]]) -> list[float]:
    """The capacities ``r`` of the ``tier-<r>-acc`` keys found in any summary, sorted."""
    caps = {float(k[len("tier-"):-len("-acc")]) for s in summaries for k in s
            if k.startswith("tier-") and k.endswith("-acc")}
    return sorted(caps)


def plot_tiers(summaries: Sequence[Mapping[str, object]], path: str | Path, title: str = "") -> Path | None:
    """Grouped bars: for each run (ordered by the MB it communicated, which labels it), the
    test accuracy of each capacity tier's sub-model and of the full model.

    Parameters
    ----------
    summaries : Sequence[Mapping[str, object]]
        Run summaries (``summary.json``): ``total-mb``, ``final-eval-acc``,
        ``tier-<r>-acc`` (:func:`fl_subnet.tiers.evaluate_tiers`), ``out-dir``.
    path : str or Path
        PNG file to write.

    Returns
    -------
    Path or None
        ``path``, or None (nothing written) when no summary has tier accuracies.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    caps = [r for r in tier_columns(summaries) if r < 1.0]  # tier 1 is the full model
    if not caps:
        return None
    runs = sorted(summaries, key=lambda s: float(s["total-mb"]))
    bars = [(f"sub-model of capacity {r:g}", f"tier-{r:g}-acc") for r in caps] + [("full model", "final-eval-acc")]
    width = 0.8 / len(bars)
    fig, ax = plt.subplots(figsize=(max(7.0, 1.5 * len(runs) + 2), 5), constrained_layout=True)
    for j, (label, key) in enumerate(bars):
        xs = [i + (j - (len(bars) - 1) / 2) * width for i in range(len(runs))]
        ys = [s.get(key) if s.get(key) is not None else 0.0 for s in runs]
        ax.bar(xs, ys, width, label=label, color=f"C{j}")
        for x, y in zip(xs, ys):
            ax.text(x, y + 0.01, f"{y:.2f}", ha="center", va="bottom", fontsize=7)
    ax.set_xticks(range(len(runs)))
    ax.set_xticklabels([f"{s.get('strategy') or Path(str(s['out-dir'])).name}\n{float(s['total-mb']):.1f} MB"
                        for s in runs])
    ax.set_ylabel("test accuracy")
    ax.set_ylim(0, 1.08)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", ncol=len(bars))
    return save_figure(fig, ax, path, title)


def save_figure(fig, ax, path: str | Path, title: str = "") -> Path:
    """Set ``ax``'s title (if any), write ``fig`` as a PNG at 110 dpi and close it."""
    import matplotlib.pyplot as plt

    if title:
        ax.set_title(title)
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
