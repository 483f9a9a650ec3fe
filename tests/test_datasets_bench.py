"""bench/real_data.py: FedAvg, federated dropout and IST on mnist-5k and mnist1d over seeds
(docs/datasets.md).

The quick run (1 seed, 2 rounds) must give the JSON structure with finite accuracies in
[0, 1] and positive MB, and docs/datasets.md's table must be the one the bench renders from
docs/datasets.json, whose centralized MNIST-1D runs reach the published MLP accuracy
within a few points.
"""

import json
import math
import statistics
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import real_data as bench  # noqa: E402
from bench_runs import run_quick  # noqa: E402


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    return run_quick("real_data", tmp_path_factory.mktemp("real_data"))


@pytest.mark.slow  # a fresh process that generates both data sets: about 35 s on 2 cores
def test_quick_run_structure(quick):
    data, printed = quick
    assert data["bench"] == "datasets" and data["wall_seconds"] > 0
    assert data["setting"]["rounds"] == bench.QUICK_ROUNDS and data["setting"]["seeds"] == list(bench.QUICK_SEEDS)
    assert {"cpu", "cores", "torch_threads", "torch", "flwr"} <= set(data["machine"])
    assert list(data["datasets"]) == list(bench.DATASETS)
    for dataset, variants in data["datasets"].items():
        assert list(variants) == list(bench.VARIANTS), dataset
        for variant, runs in variants.items():
            assert list(runs) == [str(s) for s in bench.QUICK_SEEDS]
            for run in runs.values():
                assert run["rounds"] == bench.QUICK_ROUNDS
                assert isinstance(run["acc"], float) and 0.0 <= run["acc"] <= 1.0, (dataset, variant, run)
                assert math.isfinite(run["total-mb"]) and run["total-mb"] > 0
        # the sub-network protocols send less than FedAvg on the same data
        mb = {v: runs["0"]["total-mb"] for v, runs in variants.items()}
        assert mb["ist"] < mb["fedsubdrop"] < mb["fedavg"], (dataset, mb)
    # stdout: one measurement per data set and variant as a JSON line (bench/common.py), the same runs
    assert [(m["setting"]["dataset"], m["setting"]["variant"]) for m in printed] == [
        (d, v) for d in bench.DATASETS for v in bench.VARIANTS]
    for m in printed:
        assert m["bench"] == "datasets" and m["metric"] == "accuracy" and m["reps"] == len(bench.QUICK_SEEDS)
        assert m["runs"] == data["datasets"][m["setting"]["dataset"]][m["setting"]["variant"]]
    table = bench.render_table(data)
    assert all(f"| {d} | {v} |" in table for d in bench.DATASETS for v in bench.VARIANTS)


def test_docs_table_is_rendered_from_the_json():
    data = json.loads((ROOT / "docs" / "datasets.json").read_text())
    assert bench.docs_table() == bench.render_table(data)


def test_docs_json_is_the_full_setting():
    """docs/datasets.json holds every data set, variant and seed of the full bench, at the
    scenarios' rounds, and its centralized MNIST-1D accuracy is within a few points of the
    published MLP's (the figure docs/datasets.md quotes)."""
    data = json.loads((ROOT / "docs" / "datasets.json").read_text())
    assert data["setting"]["seeds"] == list(bench.SEEDS) and data["setting"]["rounds"] is None
    assert data["published"] == {"mnist1d": bench.PUBLISHED["mnist1d"]}
    for dataset, variants in data["datasets"].items():
        assert list(variants) == list(bench.VARIANTS)
        for variant, runs in variants.items():
            want = bench.scenario(dataset, variant, 0, None)["num-server-rounds"]
            assert list(runs) == [str(s) for s in bench.SEEDS] and {r["rounds"] for r in runs.values()} == {want}
    central = statistics.fmean(r["acc"] for r in data["datasets"]["mnist1d"]["centralized"].values())
    assert abs(100 * central - bench.PUBLISHED["mnist1d"]["MLP"]) <= 5, central
