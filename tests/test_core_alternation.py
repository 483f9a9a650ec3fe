"""Core alternation (strategies/core_alternation.py): the masks alternate exactly between one fixed core
(the nested prefix of width core-fraction) and the full model; a core round is FedAvg
restricted to the core's entries (numpy reference) and leaves every other entry as it
was; the core splits off after a short run and works alone."""

import json
import math

import numpy as np
import pytest
import torch

from fl_subnet import analyze
from fl_subnet.core.core_sampler import CoreAlternationSampler
from fl_subnet.experiments.config import RunConfig
from fl_subnet.models import MLP
from fl_subnet.strategies import CoreAlternation, build_strategy
from fl_subnet.wire import arrays_to_state

import strategy_helpers as sh

SPEC = analyze(lambda: MLP(6, [10, 7], 3), torch.zeros(1, 6), verify=False)


def prefix(size, f):
    return np.arange(math.ceil(round(f * size, 9)))


@pytest.mark.parametrize("period", [2, 3, 5])
@pytest.mark.parametrize("fraction", [0.3, 0.5, 1.0])
def test_schedule_alternates_exactly(period, fraction):
    sampler = CoreAlternationSampler(fraction, period)
    for rnd in range(1, 4 * period + 1):
        masks = sampler.sample(SPEC.groups, rnd, 4)
        core = rnd % period != 0  # period - 1 core rounds, then one full round
        assert sampler.is_core_round(rnd) is core
        for mask in masks:
            for g in SPEC.groups:
                want = prefix(g.size, fraction) if core else np.arange(g.size)
                np.testing.assert_array_equal(mask.kept(g).numpy(), want)
                assert mask.scale_of(g) == 1.0
    kinds = ["core" if sampler.is_core_round(r) else "full" for r in range(1, 7)]
    assert kinds == {2: ["core", "full"] * 3, 3: ["core", "core", "full"] * 2,
                     5: ["core"] * 4 + ["full", "core"]}[period]


def test_scaled_core_and_bad_arguments():
    (mask,) = CoreAlternationSampler(0.5, 2, scale=True).sample(SPEC.groups, 1, 1)
    assert all(mask.scale_of(g) == 2.0 for g in SPEC.groups)
    with pytest.raises(ValueError, match="core-period"):
        CoreAlternationSampler(0.5, 1)
    with pytest.raises(ValueError, match="core-fraction"):
        CoreAlternation(sh.factory, core_fraction=0.0)
    with pytest.raises(ValueError, match="core-period"):
        RunConfig.from_mapping({"strategy": "core-alternation", "core-period": 1})
    with pytest.raises(ValueError, match="core-fraction"):
        RunConfig.from_mapping({"strategy": "core-alternation", "core-fraction": 1.5})


def test_registry_builds_it_from_the_run_config():
    cfg = RunConfig.from_mapping({"strategy": "core-alternation", "core-fraction": 0.25, "core-period": 3})
    strategy = build_strategy(cfg, sh.factory)
    assert isinstance(strategy, CoreAlternation)
    assert (strategy.core_fraction, strategy.period) == (0.25, 3)


def run_round(strategy, grid, rnd, arrays):
    messages = list(strategy.configure_train(rnd, arrays, sh.train_config(), grid))
    replies = list(grid.send_and_receive(messages))
    new, metrics = strategy.aggregate_train(rnd, replies)
    return messages, replies, new, metrics


def test_core_round_is_fedavg_on_the_core_and_leaves_the_rest():
    """Round 1 (core, f = 0.5 of the 16 hidden units: 8): every node gets the same 8-unit
    slice; the new model is Σ n_i W_i / Σ n_i on the core's entries (weighted by
    num-examples, numpy) and the old model elsewhere. Round 2 (full) is plain FedAvg."""
    strategy = CoreAlternation(sh.factory, core_fraction=0.5, period=2, fraction_evaluate=0.0,
                               min_available_nodes=3)
    grid = sh.grid(3)
    init = sh.initial_arrays()
    old = {k: v.numpy() for k, v in arrays_to_state(init).items()}
    messages, replies, new, metrics = run_round(strategy, grid, 1, init)
    assert metrics["num-replies"] == 3 and metrics["coverage"] == pytest.approx(0.5)
    for msg in messages:  # every node: the same core slice
        got = strategy.slice_state(msg.content["arrays"], msg.metadata.dst_node_id)
        np.testing.assert_array_equal(got["1.weight"].numpy(), old["1.weight"][:8])
        np.testing.assert_array_equal(got["3.weight"].numpy(), old["3.weight"][:, :8])
    states = [{k: v.numpy() for k, v in strategy.slice_state(r.content["arrays"], r.metadata.src_node_id).items()}
              for r in replies]
    n = np.array([r.content["metrics"]["num-examples"] for r in replies], dtype=np.float64)
    assert len(set(n)) > 1  # unequal weights, so weighting matters
    rows = {"1.weight": np.s_[:8], "1.bias": np.s_[:8], "3.weight": np.s_[:, :8], "3.bias": np.s_[:]}
    got = {k: v.numpy() for k, v in arrays_to_state(new).items()}
    for key, core in rows.items():
        want = old[key].astype(np.float64).copy()
        want[core] = sum(w * s[key] for w, s in zip(n, states)) / n.sum()
        np.testing.assert_allclose(got[key], want, rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(got["1.weight"][8:], old["1.weight"][8:])  # untouched exactly
    np.testing.assert_array_equal(got["3.weight"][:, 8:], old["3.weight"][:, 8:])
    assert not np.allclose(got["1.weight"][:8], old["1.weight"][:8])  # the core did move

    messages, replies, new2, _ = run_round(strategy, grid, 2, new)  # full round: FedAvg
    assert all(strategy.slice_state(m.content["arrays"], m.metadata.dst_node_id)["1.weight"].shape == (16, 8) for m in messages)
    states = [{k: v.numpy() for k, v in strategy.slice_state(r.content["arrays"], r.metadata.src_node_id).items()}
              for r in replies]
    n = np.array([r.content["metrics"]["num-examples"] for r in replies], dtype=np.float64)
    got2 = {k: v.numpy() for k, v in arrays_to_state(new2).items()}
    for key in got2:
        np.testing.assert_allclose(got2[key], sum(w * s[key] for w, s in zip(n, states)) / n.sum(),
                                   rtol=1e-6, atol=1e-7)


def test_core_splits_off_and_works_alone(tmp_path):
    """A 4-round run on digits (rounds 1 and 3 core, 2 and 4 full): the harness reports
    the core tier's accuracy, and the saved core, loaded from the model factory alone,
    reaches it by itself, well above chance (0.1), with under half the parameters."""
    from fl_subnet.checkpoint import MODEL_FILE, load_model
    from fl_subnet.clients.train import evaluate_model
    from fl_subnet.experiments.cli import run_one
    from fl_subnet.experiments.experiment import CentralEvaluation, factory_for
    from fl_subnet.tiers import load_submodel, tier_file

    values = {"strategy": "core-alternation", "core-fraction": 0.5, "core-period": 2, "num-nodes": 3,
              "num-server-rounds": 4, "dataset": "digits", "model": "mlp", "hidden": "64,32",
              "partitioning": "iid", "local-steps": 20, "lr": 0.2, "seed": 0}
    summary = run_one(values, tmp_path)
    rows = json.loads((tmp_path / "metrics.json").read_text())
    assert [r["coverage"] for r in rows[1:]] == pytest.approx([0.5, 1.0, 0.5, 1.0])
    cfg = RunConfig.from_mapping(values)
    core = load_submodel(tmp_path / tier_file(0.5), factory_for(cfg))
    test = CentralEvaluation(cfg, None).test
    acc = evaluate_model(core, test, "cross-entropy")["eval-acc"]
    assert acc == summary["tier-0.5-acc"] and acc > 0.3, acc  # chance: 0.1
    full = load_model(tmp_path / MODEL_FILE)
    assert sum(v.numel() for v in core.state_dict().values()) < 0.5 * sum(v.numel() for v in full.values())
    # the core's own weights: the leading 32 x 64 block of the first layer, nothing else
    assert torch.equal(core.state_dict()["1.weight"], full["1.weight"][:32])
