"""HeteroFL's ``dynamic`` model split (strategies/heterofl_dynamic.py): each node's capacity
is drawn anew every server round, in the proportions of the tiers, as in HeteroFL's
reference code (``src/fed.py``, ``make_model_rate``); a node's mask is then HeteroFL's
nested prefix of that capacity."""

from __future__ import annotations

import numpy as np
import torch

import strategy_helpers as sh
from fl_subnet.core.samplers import prefix_size
from fl_subnet.experiments.inprocess_grid import InProcessGrid
from fl_subnet.clients import make_client_app
from fl_subnet.strategies import PROTOCOLS, HeteroFL, HeteroFLDynamic
from fl_subnet.wire import arrays_to_state

TIERS = (1.0, 0.5, 0.5, 0.5)  # the reference's proportion (0.25, 0.75) of the levels (1, 0.5)


def record_capacities(strategy):
    """Spy on the round's capacities: ``{node id: capacity}`` per round, and check that each
    mask is HeteroFL's nested prefix of its node's capacity."""
    seen, pending, sample, capacity_of = [], {}, strategy.sampler.sample, strategy.capacity_of

    def spy_capacity(node):
        pending[node] = capacity_of(node)
        return pending[node]

    def spy_sample(groups, server_round, num_masks, capacities=None):
        seen.append(dict(pending))
        pending.clear()
        masks = sample(groups, server_round, num_masks, capacities=capacities)
        for mask, r in zip(masks, capacities):
            for g in groups:
                assert torch.equal(mask.indices[g.name], torch.arange(prefix_size(g.size, r))), (g.name, r)
        return masks

    strategy.sampler.sample = spy_sample
    strategy.capacity_of = spy_capacity
    return seen


def run(cls, rounds=6, tiers=TIERS, grid=None, **kw):
    strategy = cls(sh.factory, tiers, seed=3, **kw)
    seen = record_capacities(strategy)
    result = strategy.start(grid=grid or sh.grid(), initial_arrays=sh.initial_arrays(), num_rounds=rounds,
                            train_config=sh.train_config())
    return strategy, seen, result


def test_registered_as_a_protocol():
    assert PROTOCOLS["heterofl-dynamic"].cls is HeteroFLDynamic


def test_capacities_are_redrawn_every_round_from_the_tiers():
    _, seen, result = run(HeteroFLDynamic, rounds=8)
    assert len(seen) == 8 and all(len(caps) == 4 and set(caps.values()) <= set(TIERS) for caps in seen)
    per_node = [[caps[n] for caps in seen] for n in seen[0]]
    assert any(len(set(caps)) > 1 for caps in per_node), seen  # a node's capacity changes across rounds
    for rnd in range(1, 9):
        m = result.train_metrics_clientapp[rnd]
        assert m["num-replies"] == 4 and m["num-rejected"] == 0
    _, fixed, _ = run(HeteroFL, rounds=3)  # the fix split: the same capacities every round
    assert fixed[0] == fixed[1] == fixed[2] and sorted(fixed[0].values()) == sorted(TIERS)


def test_draws_follow_the_reference_proportions():
    """The share of each level over many draws matches the reference's
    ``torch.multinomial(proportion, num_users, replacement=True)`` (both within 3 standard
    errors of the proportion)."""
    strategy = HeteroFLDynamic(sh.factory, TIERS)
    n, draws = 100, []
    for rnd in range(1, 41):
        draws += strategy.round_capacities(rnd, n)
    proportion = torch.tensor([0.25, 0.75])  # levels (1.0, 0.5)
    torch.manual_seed(0)
    reference = np.array([1.0, 0.5])[torch.multinomial(proportion, len(draws), replacement=True).numpy()]
    se = np.sqrt(0.25 * 0.75 / len(draws))
    for sample in (np.array(draws), reference):
        assert abs(np.mean(sample == 1.0) - 0.25) < 3 * se


def test_same_seed_same_draws_and_one_level_is_heterofl():
    a, seen_a, res_a = run(HeteroFLDynamic, rounds=3)
    b, seen_b, res_b = run(HeteroFLDynamic, rounds=3)
    assert seen_a == seen_b
    one = (0.5,)  # a single level: every draw is that level, the fix split's model bit for bit
    _, _, dyn = run(HeteroFLDynamic, rounds=3, tiers=one)
    _, _, fix = run(HeteroFL, rounds=3, tiers=one)
    sd, sf = arrays_to_state(dyn.arrays), arrays_to_state(fix.arrays)
    assert all(torch.equal(sd[k], sf[k]) for k in sf)


def test_a_declared_capacity_is_kept():
    configs = [{"partition-id": i, "num-partitions": 4} for i in range(4)]
    configs[2]["capacity"] = 0.25
    grid = InProcessGrid(make_client_app(sh.factory, sh.load_data), 4, node_configs=configs)
    strategy, seen, _ = run(HeteroFLDynamic, rounds=4, grid=grid, order_by_partition=True)
    declared = [n for n, c in strategy.declared_capacities.items() if c == 0.25]
    assert len(declared) == 1 and [caps[declared[0]] for caps in seen] == [0.25] * 4
    assert all({c for n, c in caps.items() if n != declared[0]} <= set(TIERS) for caps in seen)
