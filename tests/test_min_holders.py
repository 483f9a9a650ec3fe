"""``min-holders``: at least k holders for every unit of a round, for IST and federated dropout.

(1) With k requested, every unit of every group is held by at least k masks in every
round (``min(k, n)`` with n nodes), for IST and federated dropout (Bernoulli and even
coverage), over several seeds, by hand on a small case, and through the strategies'
``configure_train``; (2) k = 1 gives exactly the masks of the code without the option
(reference copies of the samplers' draws below) and the same messages; (3) every error
names ``min-holders``; (4) through ``strategy.start`` and Flower's serde both ways with the
coordinate-wise median and k = 2: every reply accepted, the loss falls. Also: the bytes
table in docs/reliability.md is the one ``bench/holders.py`` prints.
"""

import logging
import sys
from pathlib import Path

import pytest
import torch

from fl_subnet.core.coverage import EvenCoverageSampler
from fl_subnet.core.groups import UnitGroup
from fl_subnet.core.holders import TOP_UP_SLOT, check_min_holders, holder_counts, top_up_holders
from fl_subnet.core.masks import Mask
from fl_subnet.core.samplers import BernoulliSampler, PartitionSampler, generator_for, prefix_size
from fl_subnet.experiments.config import RunConfig
from fl_subnet.strategies import IST, FederatedDropout, build_strategy

from strategy_helpers import central_loss, factory, grid, initial_arrays, train_config

ROOT = Path(__file__).resolve().parents[1]
GROUPS = [UnitGroup("a", 10, ()), UnitGroup("b", 7, ()), UnitGroup("c", 3, ())]
SEEDS = (0, 1, 2, 3, 4)
ROUNDS = (1, 2, 7)


def fewest(masks, groups=GROUPS) -> int:
    return min(int(c.min()) for c in holder_counts(masks, groups).values())


# ----------------------------------------------------------------- reference: the draws without the option
def reference_bernoulli(keep_prob, seed, groups, server_round, n):
    masks = []
    for slot in range(n):
        gen = generator_for(seed, server_round, slot)
        idx = {g.name: torch.nonzero(torch.rand(g.size, generator=gen) < keep_prob).flatten() for g in groups}
        masks.append(Mask(idx, {g.name: 1.0 / keep_prob for g in groups}))
    return masks


def reference_even(keep_prob, seed, groups, server_round, n):
    gen = generator_for(seed, server_round, -3)
    perms = {g.name: torch.randperm(g.size, generator=gen) for g in groups}
    masks = []
    for slot in range(n):
        idx = {}
        for g in groups:
            k = prefix_size(g.size, keep_prob)
            idx[g.name] = torch.sort(perms[g.name][(slot * k + torch.arange(k)) % g.size]).values
        masks.append(Mask(idx, {g.name: 1.0 / keep_prob for g in groups}))
    return masks


def reference_partition(p, seed, groups, server_round, n):
    gen = generator_for(seed, server_round, -1)
    parts = {}
    for g in groups:
        part = torch.empty(g.size, dtype=torch.int64)
        part[torch.randperm(g.size, generator=gen)] = torch.arange(g.size) * p // g.size
        parts[g.name] = part
    return [Mask({g.name: torch.nonzero(parts[g.name] == slot % p).flatten() for g in groups},
                 {g.name: 1.0 for g in groups}) for slot in range(n)]


def same_masks(a, b) -> bool:
    return len(a) == len(b) and all(
        x.indices.keys() == y.indices.keys() and all(torch.equal(x.indices[k], y.indices[k]) for k in x.indices)
        and x.scale == y.scale for x, y in zip(a, b))


# ----------------------------------------------------------------- (1) k holders for every unit
def test_top_up_by_hand():
    """Units 0..3 of one group, 3 masks {0, 1}, {1}, {}: with k = 2 unit 0 needs one more
    holder, units 2 and 3 two each (masks 2 and 3 hold none of them), unit 1 none. Each
    mask keeps what it had; unit 1 stays as it was; the scale stays 2.0."""
    g = [UnitGroup("h", 4, ())]
    masks = [Mask({"h": torch.tensor([0, 1])}, {"h": 2.0}), Mask({"h": torch.tensor([1])}, {"h": 2.0}),
             Mask({"h": torch.tensor([], dtype=torch.int64)}, {"h": 2.0})]
    out = top_up_holders(masks, g, 2, torch.Generator().manual_seed(0))
    counts = holder_counts(out, g)["h"].tolist()
    assert counts == [2, 2, 2, 2]  # exactly the target: nothing added beyond the deficit
    for before, after in zip(masks, out):
        assert set(before.indices["h"].tolist()) <= set(after.indices["h"].tolist())
        assert after.scale == {"h": 2.0}
        after.validate(g)  # sorted, unique, int64
    assert [1 in m.indices["h"].tolist() for m in out] == [True, True, False]  # unit 1 had 2 holders: untouched
    assert out[0].indices["h"].tolist()[:2] == [0, 1]
    # k = 3 on 3 masks: every mask holds every unit
    full = top_up_holders(masks, g, 3, torch.Generator().manual_seed(0))
    assert all(m.indices["h"].tolist() == [0, 1, 2, 3] for m in full)
    # k above the masks: min(k, n) = n
    assert all(m.indices["h"].tolist() == [0, 1, 2, 3] for m in top_up_holders(masks, g, 5, torch.Generator()))


@pytest.mark.parametrize("k", [2, 3])
@pytest.mark.parametrize("sampler_cls, keep_prob", [(BernoulliSampler, 0.2), (BernoulliSampler, 0.5),
                                                    (EvenCoverageSampler, 0.2)])
def test_federated_dropout_masks_have_k_holders(sampler_cls, keep_prob, k):
    for seed in SEEDS:
        for rnd in ROUNDS:
            for n in (2, 4, 10):
                masks = sampler_cls(keep_prob, seed=seed, min_holders=k).sample(GROUPS, rnd, n)
                assert fewest(masks) >= min(k, n), (seed, rnd, n)
                plain = sampler_cls(keep_prob, seed=seed).sample(GROUPS, rnd, n)
                for m, q in zip(masks, plain):  # only additions, at the same scale
                    m.validate(GROUPS)
                    assert m.scale == q.scale == {g.name: 1.0 / keep_prob for g in GROUPS}
                    assert all(set(q.kept(g).tolist()) <= set(m.kept(g).tolist()) for g in GROUPS)
                # no unit gets more than it needed: an added holder only where it was short
                for g in GROUPS:
                    before, after = holder_counts(plain, [g])[g.name], holder_counts(masks, [g])[g.name]
                    assert torch.equal(after, torch.maximum(before, torch.full_like(before, min(k, n))))
                again = sampler_cls(keep_prob, seed=seed, min_holders=k).sample(GROUPS, rnd, n)
                assert same_masks(masks, again)  # deterministic from the seed and the round
                assert same_masks(masks, top_up_holders(plain, GROUPS, k, generator_for(seed, rnd, TOP_UP_SLOT)))


@pytest.mark.parametrize("mode", ["equal", "iid"])
@pytest.mark.parametrize("k", [2, 3])
def test_ist_masks_have_k_holders(mode, k):
    """With n ≥ k·p nodes, slot i → part i mod p gives every part, so every unit, k holders."""
    p = 3
    for seed in SEEDS:
        for rnd in ROUNDS:
            for n in (k * p, k * p + 1, 10):
                masks = PartitionSampler(p, mode=mode, seed=seed, min_holders=k).sample(GROUPS, rnd, n)
                assert fewest(masks) >= k, (seed, rnd, n)
                assert same_masks(masks, PartitionSampler(p, mode=mode, seed=seed).sample(GROUPS, rnd, n))


def _sent_masks(strategy, num_nodes, rounds=(1, 2, 3)):
    """The masks ``configure_train`` sends in each of ``rounds`` (no training)."""
    from flwr.app import ConfigRecord

    g = grid(num_nodes)
    arrays = initial_arrays()
    out = []
    for rnd in rounds:
        messages = strategy.configure_train(rnd, arrays, ConfigRecord({"lr": 0.1}), g)
        out.append((messages, list(strategy._sent.values())))
    return out


@pytest.mark.parametrize("k", [2, 3])
def test_strategies_send_masks_with_k_holders(k):
    """IST p = 2 with Flower's fraction rule (fraction 0.25 of 8 nodes: 2 a round) takes
    k·p nodes; federated dropout ξ = 0.25 on 4 nodes tops up. Every unit of the model's
    group has k holders in every round."""
    ist = IST(factory, 2, fraction_train=0.25, min_holders=k, seed=3)
    for messages, masks in _sent_masks(ist, 8):
        assert len(messages) == 2 * k and fewest(masks, ist.groups) >= k
    fd = FederatedDropout(factory, 0.25, num_train_nodes=4, min_holders=k, seed=3)
    for _, masks in _sent_masks(fd, 4):
        assert fewest(masks, fd.groups) >= k


def test_ist_with_too_few_masks_warns_and_deals_what_it_has(caplog):
    """The sampler called with fewer than k·p slots (the strategy never does: it asks for
    k·p nodes): a warning naming min-holders, and the usual deal (⌊n/p⌋ or ⌈n/p⌉ holders)."""
    sampler = PartitionSampler(3, seed=1, min_holders=2)
    with caplog.at_level(logging.WARNING, logger="fl_subnet.core.samplers"):
        masks = sampler.sample(GROUPS, 1, 4)
    assert "min-holders 2" in caplog.text and "needs 6 nodes" in caplog.text
    assert same_masks(masks, reference_partition(3, 1, GROUPS, 1, 4)) and fewest(masks) == 1


def test_dropout_with_fewer_nodes_than_k_gives_every_node_every_short_unit(caplog):
    with caplog.at_level(logging.WARNING, logger="fl_subnet.core.samplers"):
        masks = BernoulliSampler(0.3, seed=2, min_holders=3).sample(GROUPS, 1, 2)
    assert fewest(masks) == 2 and "min-holders 3" in caplog.text


# ----------------------------------------------------------------- (2) k = 1 is the code without the option
@pytest.mark.parametrize("n", [1, 3, 10])
def test_k1_gives_exactly_the_masks_without_the_option(n):
    for seed in SEEDS:
        for rnd in ROUNDS:
            assert same_masks(BernoulliSampler(0.3, seed=seed, min_holders=1).sample(GROUPS, rnd, n),
                              reference_bernoulli(0.3, seed, GROUPS, rnd, n))
            assert same_masks(EvenCoverageSampler(0.3, seed=seed, min_holders=1).sample(GROUPS, rnd, n),
                              reference_even(0.3, seed, GROUPS, rnd, n))
            assert same_masks(PartitionSampler(3, seed=seed, min_holders=1).sample(GROUPS, rnd, n),
                              reference_partition(3, seed, GROUPS, rnd, n))
    # Bernoulli ξ = 0.3 on few nodes leaves units without a holder, and k = 1 keeps it so
    assert fewest(BernoulliSampler(0.3, seed=0).sample(GROUPS, 1, 1)) == 0


def test_k1_strategies_send_the_same_messages():
    from flwr.common.serde import message_to_proto

    def wire(strategy, nodes):
        return [[message_to_proto(m).content.SerializeToString(deterministic=True) for m in messages]
                for messages, _ in _sent_masks(strategy, nodes)]

    assert wire(IST(factory, 2, fraction_train=0.5, seed=1), 4) == \
        wire(IST(factory, 2, fraction_train=0.5, seed=1, min_holders=1), 4)
    assert wire(FederatedDropout(factory, 0.25, num_train_nodes=4, seed=1), 4) == \
        wire(FederatedDropout(factory, 0.25, num_train_nodes=4, seed=1, min_holders=1), 4)


def test_the_run_config_passes_min_holders_to_the_strategy():
    cfg = RunConfig(strategy="federated-dropout", min_holders=2, num_nodes=4)
    assert build_strategy(cfg, factory).sampler.min_holders == 2
    cfg = RunConfig(strategy="ist", num_subnets=2, num_nodes=4, min_holders=2)
    strategy = build_strategy(cfg, factory)
    assert strategy.sampler.min_holders == 2 and strategy.min_train_nodes == 4
    assert RunConfig().min_holders == 1
    from fl_subnet.experiments.config import RESUMABLE_KEYS

    assert "min-holders" not in RESUMABLE_KEYS  # it changes the masks


# ----------------------------------------------------------------- (3) errors name min-holders
@pytest.mark.parametrize("bad", [0, -1, 2.5, 2.0, "2", True, None])
def test_bad_values_name_the_key(bad):
    with pytest.raises(ValueError, match="min-holders must be an integer >= 1"):
        check_min_holders(bad)
    with pytest.raises(ValueError, match="min-holders"):
        FederatedDropout(factory, 0.5, min_holders=bad)
    with pytest.raises(ValueError, match="min-holders"):
        IST(factory, 2, min_holders=bad)
    with pytest.raises(ValueError, match="min-holders"):
        BernoulliSampler(0.5, min_holders=bad)


def test_ist_with_too_few_nodes_names_the_key():
    with pytest.raises(ValueError, match=r"min-holders \(2\) × num-subnets \(3\) = 6 nodes"):
        IST(factory, 3, num_train_nodes=5, min_holders=2)
    IST(factory, 3, num_train_nodes=6, min_holders=2)
    IST(factory, 3, num_train_nodes=2)  # k = 1: as without the option
    with pytest.raises(ValueError, match=r"min-holders \(3\) × num-subnets \(4\) must not exceed num-nodes \(10\)"):
        RunConfig(strategy="ist", num_subnets=4, num_nodes=10, min_holders=3)


@pytest.mark.parametrize("values, match", [
    ({"min-holders": 0}, "min-holders must be an integer in"),
    ({"min-holders": "2"}, "min-holders must be an integer in"),
    ({"min-holders": 1.5}, "min-holders must be an integer in"),
    ({"min-holders": 2}, "min-holders \\(2\\) needs strategy 'federated-dropout' or 'ist', got 'fedavg'"),
    ({"min-holders": 2, "strategy": "heterofl"}, "min-holders \\(2\\) needs strategy"),
])
def test_run_config_errors_name_the_key(values, match):
    with pytest.raises(ValueError, match=match):
        RunConfig.from_mapping(values)


# ----------------------------------------------------------------- (4) end to end with the median
@pytest.mark.parametrize("protocol", ["ist", "federated-dropout"])
def test_median_with_two_holders_through_strategy_start(protocol):
    """IST p = 2 with fraction 0.5 of 4 nodes (2 a round without the option, 4 with it) and
    federated dropout ξ = 0.5 on 4 nodes, aggregation "median", min-holders 2, through
    ``strategy.start`` on the in-process grid (Flower serde both ways): every round's masks
    give every unit 2 holders, every reply is accepted and the central loss falls."""
    n = 4
    if protocol == "ist":
        strategy = IST(factory, 2, local_steps=3, fraction_train=0.5, aggregation="median", min_holders=2,
                       fraction_evaluate=0.0)
    else:
        strategy = FederatedDropout(factory, 0.5, num_train_nodes=n, aggregation="median", min_holders=2,
                                    fraction_evaluate=0.0)
    drawn = []
    sample = strategy.sampler.sample

    def recording(*args, **kwargs):
        drawn.append(sample(*args, **kwargs))
        return drawn[-1]

    strategy.sampler.sample = recording
    result = strategy.start(grid=grid(n), initial_arrays=initial_arrays(), num_rounds=3, train_config=train_config())
    assert len(drawn) == 3 and all(len(masks) == n and fewest(masks, strategy.groups) >= 2 for masks in drawn)
    for rnd in (1, 2, 3):
        m = result.train_metrics_clientapp[rnd]
        assert m["num-replies"] == n and m["num-rejected"] == 0, (rnd, dict(m))
    assert central_loss(result.arrays) < central_loss(initial_arrays()) - 0.05


# ----------------------------------------------------------------- the bytes table of the docs
def test_docs_bytes_table_is_the_bench_output():
    sys.path.insert(0, str(ROOT))
    from bench import holders
    from bench.common import between

    data = holders.measure()
    assert between(holders.DOCS, holders.MARK_START, holders.MARK_END) == holders.render_table(data)
    ist = data["ist-3-f0.3"]
    assert [ist[k]["nodes"] for k in holders.KS] == [3, 6, 9] and [ist[k]["fewest"] for k in holders.KS] == [1, 2, 3]
    assert all(data["ist-3"][k]["bytes"] == data["ist-3"][1]["bytes"] for k in holders.KS)  # 10 ≥ 3·p nodes
    fd = data["dropout-0.5"]
    assert fd[1]["fewest"] == 0 and fd[2]["fewest"] >= 2 and fd[3]["fewest"] >= 3  # k = 1 leaves some unit unheld
    assert fd[1]["bytes"] < fd[2]["bytes"] < fd[3]["bytes"] < 1.1 * fd[1]["bytes"]
