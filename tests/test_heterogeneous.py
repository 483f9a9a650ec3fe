"""Width-heterogeneous nodes: HeteroFL's nested prefixes and FedRolex's rolling windows,
against plain-numpy references, a hand-computed count mean, FedRolex's even coverage
(over C rounds every unit trained exactly k times), and a round in which each node
receives exactly its capacity tier's shapes."""

import math

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord

from fl_subnet import analyze
from fl_subnet.clients import make_client_app
from fl_subnet.core.aggregate import MaskedAggregator
from fl_subnet.core.samplers import NestedPrefixSampler, RollingWindowSampler, prefix_size
from fl_subnet.experiments.inprocess_grid import InProcessGrid
from fl_subnet.models import MLP
from fl_subnet.strategies import FedRolex, HeteroFL
from fl_subnet.wire import arrays_to_state

from strategy_helpers import factory as small_factory
from strategy_helpers import load_data


def factory():
    return MLP(6, [10, 7], 3)


SPEC = analyze(factory, torch.zeros(1, 6), verify=False)


def numpy_window(size: int, capacity: float, server_round: int, rolling: bool) -> np.ndarray:
    k = max(1, int(np.ceil(capacity * size - 1e-9)))
    if not rolling:
        return np.arange(k)
    return np.sort(np.roll(np.arange(size), -(server_round % size))[:k])


@pytest.mark.parametrize("rolling", [False, True])
@pytest.mark.parametrize("seed", range(3))
def test_masks_equal_numpy_references(rolling, seed):
    rng = np.random.default_rng(seed)
    caps = [float(c) for c in rng.choice([0.1, 0.25, 0.3, 0.5, 2 / 3, 1.0], size=5)]
    rnd = int(rng.integers(0, 50))
    sampler = (RollingWindowSampler if rolling else NestedPrefixSampler)(scale=True)
    masks = sampler.sample(SPEC.groups, rnd, len(caps), capacities=caps)
    for mask, r in zip(masks, caps):
        for g in SPEC.groups:
            np.testing.assert_array_equal(mask.kept(g).numpy(), numpy_window(g.size, r, rnd, rolling))
            assert mask.scale_of(g) == pytest.approx(1 / r)
    assert prefix_size(10, 0.25) == 3 and prefix_size(10, 0.3) == 3 and prefix_size(7, 0.01) == 1


def test_nested_prefixes_are_nested():
    caps = [0.25, 0.5, 1.0]
    masks = NestedPrefixSampler().sample(SPEC.groups, 3, 3, capacities=caps)
    for g in SPEC.groups:
        small, mid, big = (set(m.kept(g).tolist()) for m in masks)
        assert small <= mid <= big == set(range(g.size))


@pytest.mark.parametrize("capacity", [0.2, 0.5, 0.7])
def test_fedrolex_trains_every_unit_exactly_k_times_over_c_rounds(capacity):
    sampler = RollingWindowSampler()
    for g in SPEC.groups:
        counts = np.zeros(g.size, dtype=int)
        for rnd in range(17, 17 + g.size):  # any C consecutive rounds
            (mask,) = sampler.sample([g], rnd, 1, capacities=[capacity])
            counts[mask.kept(g).numpy()] += 1
        assert (counts == prefix_size(g.size, capacity)).all(), (g.name, counts)


def test_count_mean_over_holders_by_hand():
    """Group '1' (10 units): node A holds units 0-2 (value 1), node B units 0-4 (value 4),
    node C everything (value 10), weights ignored: unit 0 → (1+4+10)/3, unit 4 → (4+10)/2,
    unit 9 → 10."""
    state = {k: torch.zeros_like(v) for k, v in factory().state_dict().items()}
    caps = [0.3, 0.5, 1.0]
    masks = NestedPrefixSampler().sample(SPEC.groups, 1, 3, capacities=caps)
    agg = MaskedAggregator(state, SPEC.slicer)
    for mask, value in zip(masks, (1.0, 4.0, 10.0)):
        compact = {k: torch.full_like(v, value) for k, v in SPEC.gather(state, mask).items()}
        agg.add(compact, mask, 1.0)  # HeteroFL: unweighted
    out = agg.finalize()["1.bias"]  # the first hidden layer's bias: one entry per unit of group "1"
    assert out[0] == pytest.approx(5.0) and out[4] == pytest.approx(7.0) and out[9] == pytest.approx(10.0)


@pytest.mark.parametrize("cls", [HeteroFL, FedRolex])
def test_each_node_receives_its_tiers_shapes(cls):
    tiers = (0.25, 0.5, 1.0)
    torch.manual_seed(0)
    init = small_factory().state_dict()  # MLP 8-16-3: one group "1" of 16 units
    strategy = cls(small_factory, capacity_tiers=tiers, fraction_evaluate=0.0, min_available_nodes=3,
                   order_by_partition=True)
    grid = InProcessGrid(make_client_app(small_factory, load_data), 3)
    cfg = ConfigRecord({"local-steps": 2, "lr": 0.1, "batch-size": 8, "loss": "cross-entropy", "seed": 0})
    messages = list(strategy.configure_train(1, ArrayRecord(init), cfg, grid))
    ranks = {n: strategy._rank[n] for n in strategy._rank}  # fl-subnet's ClientApp reports partition-ids
    assert sorted(ranks.values()) == [0, 1, 2]
    for msg in messages:
        node = msg.metadata.dst_node_id
        r = tiers[strategy._order.index(node) % 3]
        got = strategy.slice_state(msg.content["arrays"], msg.metadata.dst_node_id)
        k = math.ceil(r * 16 - 1e-9)
        assert got["1.weight"].shape == (k, 8) and got["3.weight"].shape == (3, k), (r, got["1.weight"].shape)
    replies = list(grid.send_and_receive(messages))
    arrays, metrics = strategy.aggregate_train(1, replies)
    assert metrics["num-replies"] == 3 and metrics["coverage"] == 1.0
    assert arrays_to_state(arrays)["1.weight"].shape == (16, 8)


def test_declared_capacity_overrides_the_tiers():
    from flwr.app import Context, Message, RecordDict

    from fl_subnet.clients import partition_reply

    context = Context(run_id=1, node_id=5, node_config={"partition-id": 2, "capacity": 0.25}, state=RecordDict(),
                      run_config={})
    InProcessGrid(make_client_app(factory, load_data), 1)  # Flower's run identity, for Message
    reply = partition_reply(Message(RecordDict(), dst_node_id=5, message_type="query"), context)
    assert dict(reply.content["metrics"]) == {"partition-id": 2, "capacity": 0.25}
    strategy = HeteroFL(factory, capacity_tiers=(1.0,))
    strategy._capacity[5] = 0.25
    strategy._order = [5, 6]
    assert strategy.capacity_of(5) == 0.25 and strategy.capacity_of(6) == 1.0
    with pytest.raises(ValueError, match="capacity"):
        HeteroFL(factory, capacity_tiers=(0.0, 1.0))
