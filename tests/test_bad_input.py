"""Bad input raises ValueError naming the offending key or value."""

import pytest
import torch

from fl_subnet.core.aggregate import MaskedAggregator
from fl_subnet.core.masks import Mask
from fl_subnet.wire import mask_from_config, mask_to_config
from fl_subnet.core.samplers import BernoulliSampler, PartitionSampler


def test_mask_index_out_of_range(model_and_factory):
    model, _, groups, slicer = model_and_factory
    g = groups[0]
    bad = Mask({g.name: torch.tensor([0, g.size])})
    with pytest.raises(ValueError, match=rf"mask\['{g.name}'\].*out of range"):
        slicer.gather(model.state_dict(), bad)


def test_mask_unsorted_or_unknown_group(model_and_factory):
    model, _, groups, slicer = model_and_factory
    with pytest.raises(ValueError, match="sorted"):
        slicer.gather(model.state_dict(), Mask({groups[0].name: torch.tensor([3, 1])}))
    with pytest.raises(ValueError, match="unknown unit group 'nope'"):
        slicer.gather(model.state_dict(), Mask({"nope": torch.tensor([0])}))


def test_compact_tensor_of_wrong_shape(model_and_factory):
    model, _, groups, slicer = model_and_factory
    state = model.state_dict()
    mask = BernoulliSampler(0.5, seed=0).sample(groups, 1, 1)[0]
    compact = slicer.gather(state, mask)
    key = groups[0].couplings[0].key
    compact[key] = torch.zeros(compact[key].shape[0] + 1, *compact[key].shape[1:])
    agg = MaskedAggregator(state, slicer)
    with pytest.raises(ValueError, match=rf"'{key}' has shape"):
        agg.add(compact, mask, 1)
    assert agg.num_replies == 0  # nothing accumulated


@pytest.mark.parametrize("corrupt,match", [
    (lambda c, k: c.pop(k), "missing"),
    (lambda c, k: c.__setitem__("extra", torch.zeros(1)), "extra"),
    (lambda c, k: c.__setitem__(k, c[k].double()), "dtype"),
    (lambda c, k: c[k].view(-1).__setitem__(0, float("nan")), "NaN"),
])
def test_malformed_replies_are_rejected(model_and_factory, corrupt, match):
    model, _, groups, slicer = model_and_factory
    state = model.state_dict()
    mask = BernoulliSampler(0.5, seed=0).sample(groups, 1, 1)[0]
    compact = slicer.gather(state, mask)
    corrupt(compact, groups[0].couplings[0].key)
    with pytest.raises(ValueError, match=match):
        MaskedAggregator(state, slicer).add(compact, mask, 1)


@pytest.mark.parametrize("xi", [0.0, -0.1, 1.5, float("nan"), "half"])
def test_keep_prob_outside_unit_interval(xi):
    with pytest.raises(ValueError, match="keep-prob"):
        BernoulliSampler(xi)


@pytest.mark.parametrize("p", [0, -2, 1.5, True])
def test_num_subnets_below_one(p):
    with pytest.raises(ValueError, match="num-subnets"):
        PartitionSampler(p)


def test_bad_weight():
    from fl_subnet.core.analysis import find_unit_groups
    from fl_subnet.models import MLP
    from fl_subnet.core.slicing import Slicer
    model = MLP(2, [3], 1)
    groups = find_unit_groups(model)
    slicer = Slicer(groups)
    mask = Mask({})
    with pytest.raises(ValueError, match="num-examples"):
        MaskedAggregator(model.state_dict(), slicer).add(slicer.gather(model.state_dict(), mask), mask, 0)


class _CumSum(torch.nn.Module):
    def forward(self, x):
        return torch.cumsum(x, dim=-1)  # mixes hidden units: no fl_subnet rule


def test_unsupported_layer_names_module():
    from torch import nn
    from fl_subnet.core.analysis import find_unit_groups
    model = nn.Sequential(nn.Linear(3, 4), _CumSum(), nn.Linear(4, 2))
    with pytest.raises(NotImplementedError, match="group '0'.*cumsum.*module '1' \\(_CumSum\\)"):
        find_unit_groups(model)


def test_mask_wire_round_trip_and_errors(model_and_factory):
    _, _, groups, _ = model_and_factory
    mask = BernoulliSampler(0.3, seed=4).sample(groups, 2, 1)[0]
    cfg = mask_to_config(mask, groups)
    back = mask_from_config(cfg, groups)
    for g in groups:
        assert torch.equal(back.indices[g.name], mask.indices[g.name])
        assert back.scale[g.name] == pytest.approx(1 / 0.3)
    key = "mask." + groups[0].name
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        mask_from_config({**cfg, key: cfg[key] + b"\x00"}, groups)
    # a group the server does not mask sends no key: the node keeps it whole
    partial = mask_from_config({k: v for k, v in cfg.items() if k != key}, groups)
    assert torch.equal(partial.kept(groups[0]), torch.arange(groups[0].size))


def test_mask_encoding_stays_small_for_a_million_units():
    from flwr.app import ConfigRecord
    from fl_subnet.core.groups import UnitGroup
    groups = [UnitGroup("big", 1_000_000, (), ())]
    mask = BernoulliSampler(0.5, seed=1).sample(groups, 1, 1)[0]
    cfg = mask_to_config(mask, groups)
    ConfigRecord(cfg)  # plain Python types only
    assert len(cfg["mask.big"]) == 125_000  # one bit per unit
    assert torch.equal(mask_from_config(cfg, groups).indices["big"], mask.indices["big"])
