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
    assert set(cfg) == {"mask", "scale"} and cfg["scale"] == pytest.approx(1 / 0.3)  # one scale for all
    with pytest.raises(ValueError, match="'mask' has .* bytes, expected"):
        mask_from_config({**cfg, "mask": cfg["mask"] + b"\x00"}, groups)
    with pytest.raises(ValueError, match="'mask' was written for other unit groups"):
        # another model: a group renamed (or resized, or the groups in another order)
        mask_from_config(cfg, [dataclasses.replace(groups[0], name=groups[0].name + "x"), *groups[1:]])
    with pytest.raises(ValueError, match="'scale' must list"):
        mask_from_config({**cfg, "scale": [2.0] * (len(groups) + 1)}, groups)
    with pytest.raises(ValueError, match="'scale' must be a number in"):
        mask_from_config({**cfg, "scale": float("nan")}, groups)
    with pytest.raises(ValueError, match="'mask' must hold the mask's bytes"):
        mask_from_config({**cfg, "mask": "0101"}, groups)
    # no mask entry: every group is kept whole
    whole = mask_from_config({}, groups)
    assert torch.equal(whole.kept(groups[0]), torch.arange(groups[0].size))


def test_mask_wire_layout_by_hand():
    """The ``mask`` bytes written out by hand: fingerprint, a bit per group marking the
    written groups, then each written group's bits (little bit order, byte-aligned)."""
    import zlib

    from fl_subnet.core.groups import UnitGroup
    from fl_subnet.core.masks import Mask
    groups = [UnitGroup("a", 10, (), ()), UnitGroup("b", 3, (), ()), UnitGroup("c", 5, (), ())]
    mask = Mask({"a": torch.tensor([0, 2, 9]), "c": torch.tensor([4])}, {"a": 2.0, "c": 0.5})
    cfg = mask_to_config(mask, groups)
    fingerprint = zlib.crc32(b"a:10\nb:3\nc:5").to_bytes(4, "little")
    assert cfg["mask"] == fingerprint + bytes([0b101, 0b101, 0b10, 0b10000])
    assert cfg["scale"] == [2.0, 0.5]
    back = mask_from_config(cfg, groups)
    assert set(back.indices) == {"a", "c"} and back.kept(groups[1]).tolist() == [0, 1, 2]
    assert back.indices["a"].tolist() == [0, 2, 9] and back.scale == {"a": 2.0, "c": 0.5}
    # a group the server masks is written even when whole (FjORD gates exactly those)
    forced = mask_from_config(mask_to_config(mask, groups, masked=groups[1:2]), groups)
    assert set(forced.indices) == {"a", "b", "c"} and forced.scale["b"] == 1.0
    bad = bytearray(cfg["mask"])
    bad[6] |= 0b100  # a bit beyond group a's 10 units (its second byte)
    with pytest.raises(ValueError, match="beyond the size 10 of group 'a'"):
        mask_from_config({**cfg, "mask": bytes(bad)}, groups)
    with pytest.raises(ValueError, match="unit group\\(s\\) \\['z'\\]"):
        mask_to_config(Mask({"z": torch.tensor([0])}), groups)


def test_mask_encoding_stays_small_for_a_million_units():
    from flwr.app import ConfigRecord
    from fl_subnet.core.groups import UnitGroup
    groups = [UnitGroup("big", 1_000_000, (), ())]
    mask = BernoulliSampler(0.5, seed=1).sample(groups, 1, 1)[0]
    cfg = mask_to_config(mask, groups)
    ConfigRecord(cfg)  # plain Python types only
    assert len(cfg["mask"]) == 4 + 1 + 125_000  # fingerprint, group bit, one bit per unit
    assert torch.equal(mask_from_config(cfg, groups).indices["big"], mask.indices["big"])


# --- The run config: one pydantic definition per key, plain ValueErrors naming the key ---------

import dataclasses  # noqa: E402
import math  # noqa: E402
import typing  # noqa: E402

from hypothesis import given, settings, strategies as st  # noqa: E402

from fl_subnet.experiments import config as run_config  # noqa: E402
from fl_subnet.experiments.config import STRATEGIES, RunConfig  # noqa: E402


@pytest.mark.parametrize("mapping,message", [
    ({"lr": float("inf")}, "lr must be a finite number > 0, got inf"),
    ({"lr": 2**53 + 1}, "lr must be a finite number > 0, got 9007199254740993"),  # no silent rounding
    ({"lr": 10**400}, "lr must be a finite number > 0, got 1000000"),  # no OverflowError
    ({"keep-prob": 0}, "keep-prob must be a finite number in (0, 1], got 0"),
    ({"num-nodes": "3"}, "num-nodes must be an integer in [1, 10000], got '3'"),
    ({"num-nodes": True}, "num-nodes must be an integer in [1, 10000], got true"),
    ({"seed": 2**32}, "seed must be an integer in [0, 4294967295], got 4294967296"),
    ({"strategy": "fedavgg"}, f"strategy must be one of {STRATEGIES}, got 'fedavgg' (did you mean 'fedavg'?)"),
    ({"strategy": "ist", "num-nodes": 2}, "num-subnets (4) must not exceed num-nodes (2): IST trains one "
                                          "sub-network per node"),
    ({"dataset": "synthetic-sequence", "model": "transformer", "partitioning": "pathological",
      "classes-per-partition": 3}, "classes-per-partition (3) must not exceed the 2 classes of dataset "
                                   "'synthetic-sequence'"),
    ({"num-nodes": 1438}, "num-nodes (1438) must not exceed the 1437 training examples of dataset 'digits'"),
    ({"num_nodes": 3}, "unknown run-config key 'num_nodes' (did you mean 'num-nodes'?); accepted keys: strategy,"),
])
def test_run_config_messages(mapping, message):
    with pytest.raises(ValueError) as info:
        RunConfig.from_mapping(mapping)
    assert type(info.value) is ValueError  # not pydantic's ValidationError
    assert message in str(info.value) and "\n" not in str(info.value)


def test_run_config_keyword_construction_validates_too():
    with pytest.raises(ValueError, match="^lr must be a finite number > 0, got nan$") as info:
        RunConfig(lr=float("nan"))
    assert type(info.value) is ValueError
    with pytest.raises(ValueError, match="unknown run-config key 'bogus'"):
        RunConfig(bogus=1)
    with pytest.raises(ValueError, match="lr must be"):
        dataclasses.replace(RunConfig(), lr=-1.0)
    with pytest.raises(ValueError, match="lr must be .* got 'x'; seed must be .* got -1"):  # all at once
        RunConfig(lr="x", seed=-1)


def test_run_config_api():
    cfg = RunConfig(num_nodes=5.0, lr=1, strategy="ist", num_subnets=2)
    assert cfg.num_nodes == 5 and type(cfg.num_nodes) is int and cfg.lr == 1.0 and type(cfg.lr) is float
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.lr = 0.5
    assert RunConfig.keys() == [f.name.replace("_", "-") for f in dataclasses.fields(RunConfig)]
    assert RunConfig.from_mapping({"num-nodes": 5, "lr": 1, "strategy": "ist", "num-subnets": 2}) == cfg
    assert RunConfig.from_mapping({"bogus": 1, "lr": 0.2}, ignore_unknown=True).lr == 0.2
    assert RunConfig(hidden=" 32, 16").hidden_widths() == [32, 16]
    assert RunConfig(dataset="synthetic-regression", partitioning="iid").loss_name == "mse"
    assert cfg.train_config()["lr"] == 1.0
    cfg.validate()
    # the tuples are the Literal types' arguments: one definition each
    assert run_config.STRATEGIES == typing.get_args(RunConfig.__pydantic_fields__["strategy"].annotation)
    assert run_config.MODELS == typing.get_args(RunConfig.__pydantic_fields__["model"].annotation)
    assert set(run_config.CONV_MODELS) < set(run_config.MODELS)
    assert set(run_config.IMAGE_DATASETS) < set(run_config.DATASETS) == set(run_config.DATASET_INFO)
    assert run_config.CHOICES["partitioning"] == run_config.PARTITIONINGS
    from fl_subnet.experiments.data import DATASET_NAMES
    assert set(DATASET_NAMES) == set(run_config.DATASETS)
    for key in RunConfig.keys():  # every key is documented, with what it allows
        assert f"    {key} : {run_config.allowed(key)}, default" in RunConfig.__doc__


_VALUES = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-2**70, max_value=2**70), st.floats(), st.text(max_size=12),
    st.sampled_from(["fedavg", "ist", "digits", "cnn", "iid", "128,64", "0", "auto", "mse", "1e3"]),
    st.lists(st.integers(), max_size=3), st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
    st.dates(), st.datetimes(), st.times(), st.binary(max_size=4),
)


@settings(max_examples=400, deadline=None)
@given(key=st.sampled_from(RunConfig.keys()), value=_VALUES)
def test_any_value_of_any_key_is_accepted_or_a_value_error_naming_it(key, value):
    try:
        cfg = RunConfig.from_mapping({key: value})
    except ValueError as err:
        assert type(err) is ValueError
        assert key in str(err) and "\n" not in str(err)
        return
    got = getattr(cfg, key.replace("-", "_"))
    default = dataclasses.fields(RunConfig)[RunConfig.keys().index(key)].default
    assert type(got) is type(default) and got == value  # the value itself, of the key's type: no coercion
    assert isinstance(value, bool) == isinstance(default, bool)  # true is not 1, 1 is not true
    assert not isinstance(got, float) or math.isfinite(got)


def test_defence_choices_equal_the_librarys():
    from fl_subnet.core.robust import SCREEN_MODES
    from fl_subnet.experiments.config import CHOICES
    from fl_subnet.strategies.base import AGGREGATIONS

    assert CHOICES["aggregation"] == AGGREGATIONS and CHOICES["screen"] == SCREEN_MODES
