"""A node's lr follows its sub-model's output scale s: ×1/s² by default (lr-scaling)."""

import logging

import pytest
from flwr.app import ConfigRecord

from fl_subnet.strategies import IST, Dropout, FederatedDropout, FedRolex, HeteroFL, MultiSampleDropout, SubnetFedAvg
from fl_subnet.wire import mask_from_config

from strategy_helpers import factory, grid, initial_arrays, train_config


def _lrs(strategy, n, **cfg):
    msgs = list(strategy.configure_train(1, initial_arrays(), train_config(**cfg), grid(n)))
    return msgs, [m.content["config"].get("lr") for m in msgs]


def _scales(strategy, msgs):
    return [max(float(mask_from_config(m.content["config"], strategy.spec.all_groups).scale.get(g.name, 1.0))
                for g in strategy.groups) for m in msgs]


@pytest.mark.parametrize("lr_scaling, power", [("auto", 2), ("square", 2), ("linear", 1), ("none", 0)])
def test_federated_dropout_lr_over_s_to_the_power(lr_scaling, power):
    s = FederatedDropout(factory, 0.4, num_train_nodes=3, lr_scaling=lr_scaling, fraction_evaluate=0.0)
    msgs, lrs = _lrs(s, 3, lr=0.2)
    assert _scales(s, msgs) == [2.5] * 3  # 1/ξ
    assert lrs == [pytest.approx(0.2 * 0.4 ** power, rel=1e-12)] * 3


def test_heterofl_lr_per_node_capacity():
    s = HeteroFL(factory, (1.0, 0.5, 0.25), fraction_evaluate=0.0, min_available_nodes=3, min_train_nodes=3)
    msgs, lrs = _lrs(s, 3, lr=0.1)
    scales = _scales(s, msgs)
    assert sorted(scales) == [1.0, 2.0, 4.0]
    assert lrs == [pytest.approx(0.1 / sc ** 2, rel=1e-12) for sc in scales]


@pytest.mark.parametrize("make", [
    lambda: SubnetFedAvg(factory, min_available_nodes=2, min_train_nodes=2, fraction_evaluate=0.0),
    lambda: FedRolex(factory, (1.0, 0.5), min_available_nodes=2, min_train_nodes=2, fraction_evaluate=0.0),
    lambda: FederatedDropout(factory, 0.5, scale=False, num_train_nodes=2, fraction_evaluate=0.0),
    lambda: IST(factory, 2, scaling="none", num_train_nodes=2, fraction_evaluate=0.0),
    lambda: Dropout(factory, 0.5, fraction_evaluate=0.0, min_available_nodes=2),
    lambda: MultiSampleDropout(factory, 0.5, 2, fraction_evaluate=0.0),
], ids=["fedavg", "fedrolex", "dropout-unscaled", "ist-none", "dropout", "multisample-dropout"])
def test_unscaled_masks_and_one_step_dropout_keep_the_users_lr(make):
    s = make()
    _, lrs = _lrs(s, 2, lr=0.3)
    assert lrs and all(lr == 0.3 for lr in lrs)


def test_no_lr_in_the_train_config_warns_once_and_sends_none(caplog):
    s = FederatedDropout(factory, 0.5, num_train_nodes=2, fraction_evaluate=0.0)
    cfg = ConfigRecord({"local-steps": 1})
    with caplog.at_level(logging.WARNING, logger="fl_subnet.strategies.base"):
        for rnd in (1, 2):
            msgs = list(s.configure_train(rnd, initial_arrays(), cfg, grid(2)))
            assert all("lr" not in m.content["config"] for m in msgs)
    warned = [r for r in caplog.records if "has no 'lr'" in r.getMessage()]
    assert len(warned) == 1 and "x4" in warned[0].getMessage()


def test_unknown_lr_scaling_names_the_key():
    with pytest.raises(ValueError, match="lr-scaling must be one of"):
        FederatedDropout(factory, 0.5, lr_scaling="cubic")


def test_lr_scaling_choices_equal_the_run_configs():
    from fl_subnet.experiments.config import CHOICES
    from fl_subnet.strategies.lr_scaling import LR_SCALINGS

    assert CHOICES["lr-scaling"] == LR_SCALINGS


def test_lr_factor_by_hand():
    import torch

    from fl_subnet.core.masks import Mask
    from fl_subnet.strategies.lr_scaling import lr_factor

    idx = torch.arange(2)
    mask = Mask({"a": idx, "b": idx}, {"a": 2.0, "b": torch.tensor([1.0, 4.0])})  # per-unit scales: max 4
    assert lr_factor(mask, "square") == 1 / 16 and lr_factor(mask, "linear") == 1 / 4
    assert lr_factor(mask, "none") == 1.0
    assert lr_factor(Mask({"a": idx}, {"a": 0.5}), "square") == 1.0  # no scale above 1: the lr given
    with pytest.raises(ValueError, match="lr-scaling"):
        lr_factor(mask, "auto")
