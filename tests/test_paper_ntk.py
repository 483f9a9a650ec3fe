"""Liao & Kyrillidis (TMLR 2022) in the regime of their theory, on a small instance:
over-parameterised shallow ReLU net (m = 1024 ≫ n = 32), every sub-network on all the
data, τ = 5 full-batch GD steps, step size η = c/(s·λ_max) of the NTK Gram matrix
(s = the sub-network's output scale). Checked: plain GD (ξ = 1) goes to ≈ 0; IST's
floor (categorical masks) rises with p; multi-sample dropout's floor at fixed p falls
as ξ → 1. Floors are read only where the curve has flattened."""

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from fl_subnet.app.client_app import app
from fl_subnet.experiments.cli import load_scenario
from fl_subnet.experiments.config import RunConfig
from fl_subnet.experiments.experiment import CentralEvaluation, factory_for, run_server
from fl_subnet.experiments.inprocess_grid import InProcessGrid
from fl_subnet.experiments.ntk import ntk_gram, ntk_lambda_max_of
from fl_subnet.experiments.sweep import flattened, loss_floor

SCENARIOS = Path(__file__).resolve().parent.parent / "scenarios"
SMALL = {"dataset": "synthetic-regression", "num-samples": 32, "input-dim": 32, "model": "shallow-relu",
         "hidden": "1024", "batch-size": 0, "data-scope": "all", "partitioning": "iid", "local-steps": 5,
         "num-server-rounds": 16, "seed": 0}


def _rows(**over):
    rc = {**SMALL, **over}
    rows = []
    run_server(InProcessGrid(app, rc["num-nodes"], run_config=rc), RunConfig.from_mapping(rc), rows.append)
    return rows


@pytest.fixture(scope="module")
def inv_lambda():
    """1/λ_max of the Gram matrix of the small instance at initialisation."""
    return 1.0 / ntk_lambda_max_of(RunConfig.from_mapping({**SMALL, "strategy": "fedavg", "num-nodes": 1}))


@pytest.fixture(scope="module")
def ist(inv_lambda):
    return {p: _rows(strategy="ist", **{"num-subnets": p, "num-nodes": max(2, p), "ist-scaling": "p-lr",
                                        "partition-mode": "iid", "lr": inv_lambda})
            for p in (1, 2, 8)}


def test_gram_matrix_is_the_shallow_relu_kernel():
    """torch.func Jacobians against the closed form (2/n)(1/m) Σ_r 1[w_r·x_i>0] 1[w_r·x_j>0] x_i·x_j."""
    cfg = RunConfig.from_mapping({**SMALL, "strategy": "fedavg", "num-nodes": 1, "hidden": "64"})
    model = factory_for(cfg)()
    x = CentralEvaluation.train_set(cfg).tensors[0]
    w = model.hidden.weight.detach().numpy().astype(np.float64)
    xn = x.numpy().astype(np.float64)
    act = (xn @ w.T > 0).astype(np.float64)  # (n, m)
    ref = (2.0 / len(xn)) * (act @ act.T) / w.shape[0] * (xn @ xn.T)
    np.testing.assert_allclose(ntk_gram(model, x).numpy(), ref, rtol=1e-5, atol=1e-9)


def test_scenarios_use_the_theorys_step_size():
    """The NTK scenarios' lr is 1/λ_max (IST: ×1/p by p-lr) and ξ/λ_max (dropout, ξ = 0.5)."""
    for name, xi in (("paper-ist-ntk.toml", 1.0), ("paper-msd-ntk.toml", 0.5)):
        cfg = RunConfig.from_mapping(load_scenario(SCENARIOS / name, {}))
        assert cfg.lr * ntk_lambda_max_of(cfg) == pytest.approx(xi, rel=1e-3), name


def test_plain_gd_at_the_theorys_step_goes_to_zero(ist):
    loss = [r["full-train-loss"] for r in ist[1]]
    assert loss[-1] < 1e-8 * loss[0]


def test_ist_floor_rises_with_p(ist):
    assert flattened(ist[2]) and flattened(ist[8])
    f1, f2, f8 = (loss_floor(ist[p]) for p in (1, 2, 8))
    assert f1 < 1e-3 * f2  # GD has none
    assert f8 > 2 * f2


def test_dropout_floor_falls_as_keep_prob_goes_to_one(inv_lambda):
    floors = {}
    for xi in (0.25, 1.0):
        rows = _rows(strategy="multisample-dropout", **{"keep-prob": xi, "num-subnets": 4, "num-nodes": 4,
                                                         "lr": xi * inv_lambda, "num-server-rounds": 32})
        floors[xi] = loss_floor(rows)
        assert flattened(rows) or floors[xi] < 1e-8  # GD at 1e-8 and still falling: below any floor
    assert floors[1.0] < 1e-3 * floors[0.25]


def test_flattened_separates_a_transient_from_a_floor():
    geometric = [{"server-round": k, "full-train-loss": 0.7 ** k} for k in range(41)]
    rng = np.random.default_rng(0)
    noisy_floor = [{"server-round": k, "full-train-loss": 0.01 + 0.5 ** k + 0.002 * rng.random()} for k in range(41)]
    assert not flattened(geometric)
    assert flattened(noisy_floor)
    assert math.isclose(loss_floor(noisy_floor), np.mean([r["full-train-loss"] for r in noisy_floor[-10:]]))
