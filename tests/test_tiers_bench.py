"""bench/tiers.py: the three-tier CNN scenario over seeds (docs/heterogeneous.md).

The quick run (1 seed, 2 rounds, 2 variants) must give the JSON structure with finite
accuracies in [0, 1], and docs/heterogeneous.md's table must be the one the bench renders
from docs/tiers-table.json.
"""

import json
import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import tiers  # noqa: E402
from bench_runs import run_quick  # noqa: E402


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    return run_quick("tiers", tmp_path_factory.mktemp("tiers"))


def test_quick_run_structure(quick):
    data, printed = quick
    assert data["bench"] == "tiers" and data["wall_seconds"] > 0
    assert data["setting"]["rounds"] == tiers.QUICK_ROUNDS and data["setting"]["seeds"] == list(tiers.QUICK_SEEDS)
    assert {"cpu", "cores", "torch_threads", "torch", "flwr"} <= set(data["machine"])
    assert list(data["variants"]) == list(tiers.QUICK_VARIANTS)
    for variant, runs in data["variants"].items():
        assert list(runs) == [str(s) for s in tiers.QUICK_SEEDS], variant
        for run in runs.values():
            assert run["rounds"] == tiers.QUICK_ROUNDS
            for field in ("full-acc", "tier-0.25-acc", "tier-0.5-acc", "tier-1-acc"):
                v = run[field]
                assert isinstance(v, float) and math.isfinite(v) and 0.0 <= v <= 1.0, (variant, field, v)
            assert math.isfinite(run["total-mb"]) and run["total-mb"] > 0
    # stdout: one measurement per variant as a JSON line (bench/common.py), the same runs
    assert [m["setting"]["variant"] for m in printed] == list(tiers.QUICK_VARIANTS)
    for m in printed:
        assert m["bench"] == "tiers" and m["metric"] == "accuracy" and m["reps"] == len(tiers.QUICK_SEEDS)
        assert m["runs"] == data["variants"][m["setting"]["variant"]]
    table = tiers.render_table(data)
    assert all(f"| {v} |" in table for v in tiers.QUICK_VARIANTS)


def test_docs_table_is_rendered_from_the_json():
    data = json.loads((ROOT / "docs" / "tiers-table.json").read_text())
    assert tiers.docs_table() == tiers.render_table(data)


def test_plot_draws_the_json(tmp_path):
    """The bar chart has one bar per variant and field (full model, tier 0.25, tier 0.5),
    each the mean over the seeds in percent."""
    data = json.loads((ROOT / "docs" / "tiers-table.json").read_text())
    fig = tiers.plot(data, tmp_path / "t.png")
    assert (tmp_path / "t.png").stat().st_size > 0
    bars = [p for p in fig.axes[0].patches]
    variants = list(data["variants"])
    assert len(bars) == 3 * len(variants)
    full = [b.get_height() for b in bars[:len(variants)]]
    want = [100 * sum(r["full-acc"] for r in data["variants"][v].values()) / len(data["variants"][v]) for v in variants]
    assert full == pytest.approx(want)
