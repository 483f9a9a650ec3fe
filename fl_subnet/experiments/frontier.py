"""Accuracy against bytes over several seeds: mean curves, spread, and bytes to a target.

The headline comparison of protocols (``fl-subnet frontier``): every scenario is run with
each seed; per protocol, the test accuracy and the cumulative MB of each server round are
averaged over the seeds (all seeds of a scenario have the same rounds), and the table says
how many MB each protocol needs before its mean accuracy first reaches the reference's
final mean accuracy minus a margin.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass(frozen=True)
class Curve:
    """One protocol's curve, averaged over seeds.

    Attributes
    ----------
    label : str
        The scenario's name.
    seeds : int
        Runs averaged.
    rounds : list[int]
        Server rounds (0 = the initial model).
    mb : list[float]
        Mean cumulative MB (down + up) after each round.
    acc, acc_std : list[float]
        Mean and standard deviation (population, over seeds) of the test accuracy.
    """

    label: str
    seeds: int
    rounds: list[int]
    mb: list[float]
    acc: list[float]
    acc_std: list[float]

    @property
    def final_acc(self) -> float:
        return self.acc[-1]

    @property
    def final_std(self) -> float:
        return self.acc_std[-1]

    @property
    def total_mb(self) -> float:
        return self.mb[-1]


def mean_curve(label: str, runs: Sequence[Sequence[Mapping[str, object]]]) -> Curve:
    """Average the metrics rows of several seeds of one scenario, round by round.

    Raises
    ------
    ValueError
        If the runs do not have the same rounds (an interrupted run), naming the label.
    """
    rounds = [[int(r["server-round"]) for r in rows] for rows in runs]
    if not runs or any(r != rounds[0] for r in rounds):
        raise ValueError(f"{label}: the seeds' runs have different rounds {[len(r) for r in rounds]}")
    cols = list(zip(*runs))
    acc = [[float(r["eval-acc"]) for r in col] for col in cols]
    return Curve(label, len(runs), rounds[0], [statistics.fmean(r["cumulative-bytes"] / 1e6 for r in col) for col in cols],
                 [statistics.fmean(a) for a in acc], [statistics.pstdev(a) for a in acc])


def mb_to_reach(curve: Curve, target: float) -> float | None:
    """Mean cumulative MB at the first round whose mean accuracy is ≥ ``target`` (None: never)."""
    for mb, acc in zip(curve.mb, curve.acc):
        if acc >= target:
            return mb
    return None


def frontier_table(curves: Sequence[Curve], reference: str, margin: float) -> list[dict]:
    """One row per curve: final accuracy (mean ± std), total MB, and the MB to reach the
    reference's final mean accuracy − ``margin`` (absolute and as a fraction of the
    reference's total MB)."""
    ref = next(c for c in curves if c.label == reference)
    target = ref.final_acc - margin
    rows = []
    for c in curves:
        reach = mb_to_reach(c, target)
        rows.append({"scenario": c.label, "seeds": c.seeds, "final-acc": c.final_acc, "final-acc-std": c.final_std,
                     "gap-points": 100 * (ref.final_acc - c.final_acc), "total-mb": c.total_mb,
                     "mb-to-target": reach, "target": target,
                     "fraction-of-reference-mb": None if reach is None else reach / ref.total_mb})
    return rows


def table_markdown(rows: Sequence[Mapping[str, object]], reference: str, margin: float) -> str:
    """The table as Markdown (as the README shows it)."""
    head = (f"| scenario | final accuracy (mean ± std) | total MB | MB to reach {reference}'s final − "
            f"{100 * margin:g} point(s) | fraction of {reference}'s MB |\n|---|---|---|---|---|\n")
    lines = []
    for r in rows:
        reach = "not reached" if r["mb-to-target"] is None else f"{r['mb-to-target']:.1f}"
        frac = "—" if r["fraction-of-reference-mb"] is None else f"{r['fraction-of-reference-mb']:.2f}"
        lines.append(f"| {r['scenario']} | {r['final-acc']:.3f} ± {r['final-acc-std']:.3f} | {r['total-mb']:.1f} "
                     f"| {reach} | {frac} |")
    return head + "\n".join(lines) + "\n"


def plot_frontier(curves: Sequence[Curve], path: str | Path, title: str = "", target: float | None = None) -> Path:
    """Mean test accuracy against mean cumulative MB, one line per protocol with its
    ±1 std band over seeds; a dashed line at ``target``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .plots import save_figure

    fig, ax = plt.subplots(figsize=(8, 5.5), constrained_layout=True)
    for i, c in enumerate(curves):
        lo = [a - s for a, s in zip(c.acc, c.acc_std)]
        hi = [a + s for a, s in zip(c.acc, c.acc_std)]
        ax.plot(c.mb, c.acc, color=f"C{i}", marker="o", ms=2.5, label=f"{c.label} ({c.seeds} seeds)")
        ax.fill_between(c.mb, lo, hi, color=f"C{i}", alpha=0.2)
    if target is not None and math.isfinite(target):
        ax.axhline(target, color="grey", ls="--", lw=1, label=f"target {target:.3f}")
    ax.set_xscale("log")
    ax.set_xlabel("cumulative MB sent (down + up), log scale")
    ax.set_ylabel("test accuracy (mean, ±1 std band)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, loc="lower right")
    return save_figure(fig, ax, path, title)


def curves_json(curves: Sequence[Curve], rows: Sequence[Mapping[str, object]]) -> dict:
    return {"curves": [asdict(c) for c in curves], "table": list(rows)}
