"""The three-tier CNN scenario over several seeds (docs/heterogeneous.md, "Three capacity
tiers on digits").

Setting: scenarios/tiers-cnn-heterofl.toml's data, nodes, capacities and rounds (digits,
the CNN with static BatchNorm, 12 nodes, Dirichlet 0.5, capacities 0.25 / 0.5 / 1.0 by node
order, 20 rounds of 10 local steps). Variants (:data:`VARIANTS`), one scenario file each:

* ``heterofl``: HeteroFL's fixed split (``tiers-cnn-heterofl.toml``);
* ``heterofl-label-split``: the same with ``label-split = true``;
* ``heterofl-dynamic``: ``strategy = "heterofl-dynamic"`` (a capacity drawn every round);
* ``fedrolex``: rolling windows (``tiers-cnn-fedrolex.toml``);
* ``fjord``: ordered dropout (``tiers-cnn-fjord.toml``);
* ``fjord-distill``: the same with ``fjord-distill = true``;
* ``fjord-averaged-bn``: FjORD with averaged BatchNorm statistics shared by all widths;
* ``fjord-per-width-bn``: the same with ``fjord-bn = "per-width"`` (one set per width).

Each variant runs for every seed (the scenario's ``seed`` key, which sets the initial
model, the Dirichlet split, the masks and the batch orders), one run after the other in
this process, through :func:`fl_subnet.experiments.cli.run_one` (the in-process grid: the
real ServerApp and ClientApp code), into a temporary folder. Per run: the full model's
final test accuracy, each tier's sub-model alone (``tier-<r>-acc``), total MB (down + up)
and seconds.

Output: one JSON line per variant on stdout (:mod:`bench.common`'s shape: ``metric``
"accuracy", ``median`` of the full model's accuracy over the seeds, plus ``runs``);
``--out`` writes ``{"variants": {variant: {seed: {...}}}, "machine": ..., ...}`` (default
docs/tiers-table.json); ``--write-docs`` renders its table into docs/heterogeneous.md
between ``<!-- tiers-table:start -->`` and ``<!-- tiers-table:end -->``
(:func:`render_table`) and draws it as docs/tiers-table.png (:func:`plot`).

Usage::

    python bench/tiers.py --quick --out /tmp/tiers.json   # 1 seed, 2 rounds, 2 variants
    python bench/tiers.py --write-docs                    # 3 seeds, 8 variants
    python bench/tiers.py --render-only --write-docs      # the table from docs/tiers-table.json
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import statistics
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import (add_docs_options, bench_logging, between, emit, machine, output_file, quiet_runs,  # noqa: E402
                          record, replace_between, run_line)

log = logging.getLogger("bench.tiers")

#: variant → (scenario file, the base variant it is compared with, or None).
VARIANTS: dict[str, tuple[str, str | None]] = {
    "heterofl": ("scenarios/tiers-cnn-heterofl.toml", None),
    "heterofl-label-split": ("scenarios/tiers-option-heterofl-label-split.toml", "heterofl"),
    "heterofl-dynamic": ("scenarios/tiers-option-heterofl-dynamic.toml", "heterofl"),
    "fedrolex": ("scenarios/tiers-cnn-fedrolex.toml", None),
    "fjord": ("scenarios/tiers-cnn-fjord.toml", None),
    "fjord-distill": ("scenarios/tiers-option-fjord-distill.toml", "fjord"),
    "fjord-averaged-bn": ("scenarios/tiers-option-fjord-averaged-bn.toml", "fjord"),
    "fjord-per-width-bn": ("scenarios/tiers-option-fjord-per-width-bn.toml", "fjord-averaged-bn"),
}
QUICK_VARIANTS = ("heterofl", "fjord-distill")
SEEDS, QUICK_SEEDS = (0, 1, 2), (0,)
QUICK_ROUNDS = 2
TIERS = (0.25, 0.5, 1.0)
#: The metrics kept per run, from the run's summary.json.
FIELDS = ("full-acc", *(f"tier-{r:g}-acc" for r in TIERS), "total-mb", "seconds")
MARK_START, MARK_END = "<!-- tiers-table:start -->", "<!-- tiers-table:end -->"
DOCS = ROOT / "docs" / "heterogeneous.md"
JSON_OUT = ROOT / "docs" / "tiers-table.json"
PLOT = ROOT / "docs" / "tiers-table.png"


def scenario(variant: str, seed: int, rounds: int | None) -> dict:
    """The validated run config of ``variant`` for ``seed`` (and ``rounds``, if given)."""
    from fl_subnet.experiments.cli import load_scenario

    overrides: dict[str, object] = {"seed": seed}
    if rounds is not None:
        overrides["num-server-rounds"] = rounds
    return load_scenario(ROOT / VARIANTS[variant][0], overrides)


def run_variant_seed(variant: str, seed: int, rounds: int | None, tmp: Path) -> dict[str, float]:
    """One run of ``variant`` with ``seed``: the :data:`FIELDS` of its summary."""
    from fl_subnet.experiments.cli import run_one

    values = scenario(variant, seed, rounds)
    summary = run_one(values, tmp / f"{variant}-seed{seed}")
    out = {"full-acc": summary["final-eval-acc"], "total-mb": summary["total-mb"], "seconds": summary["seconds"],
           "rounds": summary["rounds"]}
    for r in TIERS:
        out[f"tier-{r:g}-acc"] = summary.get(f"tier-{r:g}-acc")
    return out


def measure(variants: Sequence[str], seeds: Sequence[int], rounds: int | None) -> dict[str, dict[str, dict]]:
    """Every variant × seed, one run after the other; one JSON line per variant (emitted)."""
    results: dict[str, dict[str, dict]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-tiers-") as tmp:
        for variant in variants:
            runs = {}
            for seed in seeds:
                t0 = time.perf_counter()
                runs[str(seed)] = run_variant_seed(variant, seed, rounds, Path(tmp))
                log.info("%s seed %d: full %.4f, tiers %s, %.1f MB, %.0f s", variant, seed, runs[str(seed)]["full-acc"],
                         " / ".join(f"{runs[str(seed)][f'tier-{r:g}-acc']:.4f}" for r in TIERS),
                         runs[str(seed)]["total-mb"], time.perf_counter() - t0)
            results[variant] = runs
            setting = {"variant": variant, "scenario": VARIANTS[variant][0], "seeds": list(seeds),
                       "rounds": next(iter(runs.values()))["rounds"]}
            emit(record("tiers", setting, [r["full-acc"] for r in runs.values()], metric="accuracy", runs=runs))
    return results


# --------------------------------------------------------------------------- the table
def mean_sd(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n − 1; 0 for one value)."""
    values = list(values)
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _stat(runs: Mapping[str, Mapping[str, float]], field: str) -> tuple[float, float]:
    return mean_sd([r[field] for r in runs.values()])


def _pct(runs: Mapping[str, Mapping[str, float]], field: str) -> str:
    m, sd = _stat(runs, field)
    return f"{100 * m:.1f} ± {100 * sd:.1f}"


def paired(variants: Mapping[str, Mapping[str, Mapping[str, float]]], variant: str, base: str,
           field: str) -> list[float]:
    """``variant`` − ``base`` in ``field``, seed by seed (the seeds both ran); a seed gives both
    the same initial model and Dirichlet split, so the pairs differ only by the protocol."""
    a, b = variants[variant], variants[base]
    return [a[s][field] - b[s][field] for s in a if s in b]


def _delta(diffs: Sequence[float]) -> str:
    """Mean ± sd of paired differences in points; † when every seed's difference has the same
    sign (and none is 0)."""
    m, sd = mean_sd(diffs)
    same = len(diffs) > 1 and (all(d > 0 for d in diffs) or all(d < 0 for d in diffs))
    return f"{100 * m:+.1f} ± {100 * sd:.1f}" + (" †" if same else "")


def render_table(data: Mapping[str, object]) -> str:
    """The Markdown tables of docs/heterogeneous.md from the JSON that ``--out`` writes.

    One row per variant: the full model's final test accuracy and tiers 0.25 / 0.5 alone
    (%, mean ± sample sd over the seeds) and total MB (down + up, mean over the seeds).
    Then one row per variant that has a base (:data:`VARIANTS`): the differences to the
    base, seed by seed (:func:`paired`), in points, mean ± sd, † where every seed agrees in
    sign.
    """
    variants: Mapping[str, Mapping[str, Mapping[str, float]]] = data["variants"]
    setting = data["setting"]
    lines = [f"Final test accuracy (%), mean ± sd over seeds {setting['seeds']}, {setting['rounds']} rounds:", "",
             "| variant | full model | tier 0.25 alone | tier 0.5 alone | total MB |",
             "|---|---|---|---|---|"]
    for variant, runs in variants.items():
        mb = statistics.fmean(r["total-mb"] for r in runs.values())
        lines.append(f"| {variant} | {_pct(runs, 'full-acc')} | {_pct(runs, 'tier-0.25-acc')} "
                     f"| {_pct(runs, 'tier-0.5-acc')} | {mb:.1f} |")
    pairs = [(v, VARIANTS[v][1]) for v in variants if v in VARIANTS and VARIANTS[v][1] in variants]
    if pairs:
        lines += ["", "Against the base variant, seed by seed (the same seed: the same initial model and split), "
                      "in points, mean ± sd of the differences; † every seed moved the same way:", "",
                  "| variant | base | full model | tier 0.25 alone | tier 0.5 alone |", "|---|---|---|---|---|"]
        for variant, base in pairs:
            cells = " | ".join(_delta(paired(variants, variant, base, f)) for f in
                               ("full-acc", "tier-0.25-acc", "tier-0.5-acc"))
            lines.append(f"| {variant} | {base} | {cells} |")
    lines += run_line(data, "python bench/tiers.py")
    return "\n".join(lines) + "\n"


def plot(data: Mapping[str, object], path: Path = PLOT):
    """A bar chart of the table: per variant, the full model and each tier alone (mean
    over the seeds, the seeds' sd as error bars), written to ``path`` (PNG). Returns the
    matplotlib ``Figure``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fields = (("full-acc", "full model"), *((f"tier-{r:g}-acc", f"tier {r:g} alone") for r in TIERS if r < 1))
    variants = list(data["variants"])
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(variants)), 3.6), layout="constrained")
    width = 0.8 / len(fields)
    for i, (field, label) in enumerate(fields):
        stats = [_stat(data["variants"][v], field) for v in variants]
        ax.bar([j + (i - (len(fields) - 1) / 2) * width for j in range(len(variants))],
               [100 * m for m, _ in stats], width, yerr=[100 * sd for _, sd in stats], capsize=2, label=label)
    ax.set_xticks(range(len(variants)), variants, rotation=30, ha="right")
    ax.set_ylabel("final test accuracy (%)")
    seeds = next(iter(data["variants"].values()))
    ax.set_title(f"Three capacity tiers on digits, {len(seeds)} seeds (bench/tiers.py)")
    ax.set_ylim(0, 100)
    ax.legend(loc="lower left", fontsize="small")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return fig


def write_docs(data: Mapping[str, object], path: Path = DOCS) -> None:
    """Replace the table between the markers of ``path`` with :func:`render_table`, and
    draw it as :data:`PLOT` (:func:`plot`)."""
    replace_between(path, MARK_START, MARK_END, render_table(data))
    plot(data)


def docs_table(path: Path = DOCS) -> str:
    """The table currently between the markers of ``path``."""
    return between(path, MARK_START, MARK_END)


def check(data: Mapping[str, object]) -> None:
    """Every run has finite accuracies in [0, 1]."""
    for variant, runs in data["variants"].items():
        for seed, run in runs.items():
            for field in ("full-acc", *(f"tier-{r:g}-acc" for r in TIERS)):
                v = run[field]
                if v is None or not math.isfinite(v) or not 0.0 <= v <= 1.0:
                    raise ValueError(f"{variant} seed {seed}: {field} = {v!r}")


def main(argv: Sequence[str] | None = None) -> dict[str, object]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true",
                   help=f"{len(QUICK_SEEDS)} seed, {QUICK_ROUNDS} rounds, variants {', '.join(QUICK_VARIANTS)}")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help=f"default {list(SEEDS)}")
    p.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=None, help="default: all")
    add_docs_options(p, JSON_OUT, ROOT, "docs/heterogeneous.md")
    args = p.parse_args(list(argv) if argv is not None else None)
    bench_logging(log)
    out = output_file(args, JSON_OUT)
    if args.render_only:
        data = json.loads((out or JSON_OUT).read_text())
        write_docs(data)
        return data
    quiet_runs()
    seeds = args.seeds or (QUICK_SEEDS if args.quick else SEEDS)
    variants = args.variants or (QUICK_VARIANTS if args.quick else tuple(VARIANTS))
    rounds = QUICK_ROUNDS if args.quick else None
    t0 = time.perf_counter()
    results = measure(variants, seeds, rounds)
    base = scenario(variants[0], seeds[0], rounds)
    data = {"bench": "tiers", "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
            "command": " ".join(["python bench/tiers.py", *(argv if argv is not None else sys.argv[1:])]),
            "setting": {k: base[k] for k in ("model", "batchnorm", "dataset", "partitioning", "dirichlet-alpha",
                                             "num-nodes", "capacity-tiers", "local-steps", "lr", "batch-size")}
            | {"rounds": base["num-server-rounds"], "seeds": list(seeds),
               "scenarios": {v: VARIANTS[v][0] for v in variants}},
            "wall_seconds": time.perf_counter() - t0, "machine": machine(), "variants": results}
    check(data)
    log.info("%d runs in %.0f s", len(variants) * len(seeds), data["wall_seconds"])
    if out is not None:
        out.write_text(json.dumps(data, indent=1) + "\n")
    if args.write_docs:
        write_docs(data)
    return data


if __name__ == "__main__":
    main()
