"""bench/real_data.py: FedAvg, federated dropout and IST on mnist-5k and mnist1d over seeds
(docs/datasets.md).

The quick run (1 seed, 2 rounds) must give the JSON structure with finite accuracies in
[0, 1] and positive MB, and docs/datasets.md's table must be the one the bench renders from
docs/datasets.json, whose centralized MNIST-1D runs (MLP, linear model, CNN) reach the
published accuracies within a few points. ``--merge`` keeps the runs it does not measure.
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
        assert list(variants) == list(bench.variants_of(dataset)), dataset
        for variant, runs in variants.items():
            assert list(runs) == [str(s) for s in bench.QUICK_SEEDS]
            for run in runs.values():
                assert run["rounds"] == bench.QUICK_ROUNDS
                assert isinstance(run["acc"], float) and 0.0 <= run["acc"] <= 1.0, (dataset, variant, run)
                assert math.isfinite(run["total-mb"]) and run["total-mb"] > 0
        # the sub-network protocols send less than FedAvg on the same data
        mb = {v: runs["0"]["total-mb"] for v, runs in variants.items()}
        assert mb["ist"] < mb["fedsubdrop"] < mb["fedavg"], (dataset, mb)
        if "cnn-fedavg" in mb:
            assert mb["cnn-ist"] < mb["cnn-fedsubdrop"] < mb["cnn-fedavg"], (dataset, mb)
    # stdout: one measurement per data set and variant as a JSON line (bench/common.py), the same runs
    assert [(m["setting"]["dataset"], m["setting"]["variant"]) for m in printed] == [
        (d, v) for d in bench.DATASETS for v in bench.variants_of(d)]
    for m in printed:
        assert m["bench"] == "datasets" and m["metric"] == "accuracy" and m["reps"] == len(bench.QUICK_SEEDS)
        assert m["runs"] == data["datasets"][m["setting"]["dataset"]][m["setting"]["variant"]]
    table = bench.render_table(data)
    assert all(f"| {d} | {v} |" in table for d in bench.DATASETS for v in bench.variants_of(d))


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
    assert list(data["datasets"]) == list(bench.DATASETS)
    for dataset, variants in data["datasets"].items():
        assert list(variants) == list(bench.variants_of(dataset))
        for variant, runs in variants.items():
            want = bench.scenario(dataset, variant, 0, None)["num-server-rounds"]
            assert list(runs) == [str(s) for s in bench.SEEDS] and {r["rounds"] for r in runs.values()} == {want}
    for model, variant in bench.PUBLISHED_VARIANT.items():
        central = statistics.fmean(r["acc"] for r in data["datasets"]["mnist1d"][variant].values())
        assert abs(100 * central - bench.PUBLISHED["mnist1d"][model]) <= 5, (model, central)


def test_variants_and_their_scenarios():
    """Every data set runs the protocols and the centralized MLP; mnist1d also the linear
    model and the CNN (its own scenario files, its own fedavg for the bytes ratio)."""
    assert bench.variants_of("mnist-5k") == bench.VARIANTS
    assert bench.variants_of("mnist1d") == (*bench.VARIANTS, "centralized-logistic", "cnn-fedavg", "cnn-fedsubdrop",
                                           "cnn-ist", "centralized-cnn")
    assert bench.scenario_file("mnist1d", "centralized-logistic") == "scenarios/mnist1d-fedavg.toml"
    assert bench.scenario_file("mnist1d", "centralized-cnn") == "scenarios/mnist1d-cnn-fedavg.toml"
    assert bench.scenario_file("mnist1d", "cnn-ist") == "scenarios/mnist1d-cnn-ist.toml"
    assert bench.fedavg_of("cnn-ist") == "cnn-fedavg" and bench.fedavg_of("ist") == "fedavg"
    logistic = bench.scenario("mnist1d", "centralized-logistic", 1, None)
    cnn = bench.scenario("mnist1d", "centralized-cnn", 1, None)
    mlp = bench.scenario("mnist1d", "centralized", 1, None)
    assert (logistic["model"], logistic["hidden"]) == ("mlp", "") and cnn["model"] == "cnn1d"
    for key, value in bench.CENTRAL.items():  # the same centralized setting for the three models
        assert logistic[key] == cnn[key] == mlp[key] == value, key
    with pytest.raises(ValueError, match="variant 'cnn-ist' is not run on 'mnist-5k'"):
        bench.scenario("mnist-5k", "cnn-ist", 0, None)


def test_merge_keeps_the_runs_not_measured_now():
    run = {"acc": 0.5, "total-mb": 1.0, "seconds": 1.0, "rounds": 2}
    old = {"mnist-5k": {"fedavg": {"0": run}}, "mnist1d": {"fedavg": {"0": run}, "centralized": {"0": run}}}
    new = {"mnist1d": {"centralized-cnn": {"0": {**run, "acc": 0.9}}, "centralized": {"0": {**run, "acc": 0.7}}}}
    merged = bench.merge(old, new)
    assert list(merged) == ["mnist-5k", "mnist1d"] and merged["mnist-5k"] == old["mnist-5k"]
    assert list(merged["mnist1d"]) == ["fedavg", "centralized", "centralized-cnn"]  # table order
    assert merged["mnist1d"]["centralized"]["0"]["acc"] == 0.7
    assert merged["mnist1d"]["fedavg"] == old["mnist1d"]["fedavg"]
