"""Gather → scatter round trips, partitions and Bernoulli keep rates."""

import math

import pytest
import torch

from fl_subnet.core.aggregate import MaskedAggregator
from fl_subnet.core.groups import UnitGroup
from fl_subnet.core.masks import full_mask
from fl_subnet.core.samplers import BernoulliSampler, FullSampler, PartitionSampler


def test_gather_shapes_follow_mask(model_and_factory):
    model, _, groups, slicer = model_and_factory
    mask = BernoulliSampler(0.5, seed=1).sample(groups, 1, 1)[0]
    compact = slicer.gather(model.state_dict(), mask)
    for key, full in model.state_dict().items():
        want = list(full.shape)
        for dim, g in [(c.dim, g.name) for g in slicer.groups for c in g.couplings if c.key == key]:
            want[dim] = int(mask.indices[g].numel())
        assert list(compact[key].shape) == want
        # values are the full tensor's entries at the kept positions
        expect = full
        for dim, g in [(c.dim, g.name) for g in slicer.groups for c in g.couplings if c.key == key]:
            expect = expect.index_select(dim, mask.indices[g])
        assert torch.equal(compact[key], expect)


@pytest.mark.parametrize("precision", ["float64", "float32"])
def test_gather_then_scatter_round_trip_is_exact(model_and_factory, precision):
    model, _, groups, slicer = model_and_factory
    state = model.state_dict()
    for mask in BernoulliSampler(0.4, seed=2).sample(groups, 3, 4):
        for weight in (1.0, 7.0):
            agg = MaskedAggregator(state, slicer, precision=precision)
            agg.add(slicer.gather(state, mask), mask, weight=weight)
            new = agg.finalize()
            for key in state:
                if precision == "float64" or weight == 1.0:
                    assert torch.equal(new[key], state[key]), key  # n·x/n is exact in float64
                else:  # float32 sums: within one ulp
                    assert torch.allclose(new[key], state[key], rtol=2**-23, atol=0), key


def test_gather_returns_new_memory(model_and_factory):
    model, _, groups, slicer = model_and_factory
    state = model.state_dict()
    compact = slicer.gather(state, full_mask(groups))
    for key in state:
        compact[key].add_(1.0)
    assert all(not torch.equal(compact[k], state[k]) for k in state)


@pytest.mark.parametrize("mode", ["equal", "iid"])
@pytest.mark.parametrize("p", [1, 2, 3, 8])
def test_partition_holds_every_unit_exactly_once(mode, p):
    groups = [UnitGroup("a", 50, (), ()), UnitGroup("b", 7, (), ())]
    masks = PartitionSampler(p, mode=mode, seed=5).sample(groups, 2, p)
    for g in groups:
        counts = torch.zeros(g.size, dtype=torch.int64)
        for m in masks:
            counts[m.indices[g.name]] += 1
        assert torch.equal(counts, torch.ones(g.size, dtype=torch.int64))
        if mode == "equal":
            sizes = [m.indices[g.name].numel() for m in masks]
            assert max(sizes) - min(sizes) <= 1


def test_partition_slots_beyond_p_repeat_parts():
    groups = [UnitGroup("a", 30, (), ())]
    masks = PartitionSampler(3, seed=1).sample(groups, 1, 6)
    for i in range(3):
        assert torch.equal(masks[i].indices["a"], masks[i + 3].indices["a"])


@pytest.mark.parametrize("xi", [0.1, 0.5, 0.9])
def test_bernoulli_keep_rate_matches_keep_prob(xi):
    n = 20_000
    groups = [UnitGroup("h", n, (), ())]
    masks = BernoulliSampler(xi, seed=11).sample(groups, 1, 5)
    kept = sum(int(m.indices["h"].numel()) for m in masks)
    total = 5 * n
    sigma = math.sqrt(total * xi * (1 - xi))  # binomial standard deviation
    assert abs(kept - total * xi) < 5 * sigma
    assert all(m.scale["h"] == pytest.approx(1 / xi) for m in masks)


def test_masks_depend_only_on_seed_round_slot():
    groups = [UnitGroup("h", 100, (), ())]
    torch.manual_seed(1)
    a = BernoulliSampler(0.5, seed=3).sample(groups, 4, 3)
    torch.manual_seed(999)  # global RNG state must not matter
    b = BernoulliSampler(0.5, seed=3).sample(groups, 4, 3)
    c = BernoulliSampler(0.5, seed=3).sample(groups, 5, 3)
    for x, y in zip(a, b):
        assert torch.equal(x.indices["h"], y.indices["h"])
    assert not torch.equal(a[0].indices["h"], a[1].indices["h"])  # slots differ
    assert not torch.equal(a[0].indices["h"], c[0].indices["h"])  # rounds differ


def test_full_sampler_keeps_everything(model_and_factory):
    _, _, groups, _ = model_and_factory
    for m in FullSampler().sample(groups, 1, 2):
        assert m.coverage(groups) == 1.0


def test_union_coverage_counts_units_held_by_any_mask():
    from fl_subnet.core.masks import Mask, coverage
    groups = [UnitGroup("a", 6, (), ()), UnitGroup("b", 4, (), ())]
    m1 = Mask({"a": torch.tensor([0, 1]), "b": torch.tensor([0])})
    m2 = Mask({"a": torch.tensor([1, 2]), "b": torch.tensor([], dtype=torch.int64)})
    assert coverage([m1, m2], groups) == (3 + 1) / 10  # a: {0,1,2}, b: {0}
    assert m1.coverage(groups) == 3 / 10
    assert coverage([], []) == 1.0
