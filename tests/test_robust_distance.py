"""The geometric median, Multi-Krum and direction screening over masked replies
(fl_subnet/core/robust_distance.py): against plain-numpy ports of the authors' lines
(epfml/byzantine-robust-noniid-optimizer, ``codes/aggregator/rfa.py``
``smoothed_weiszfeld`` and ``codes/aggregator/krum.py`` ``multi_krum``), hand computations
on partial masks, a rogue among honest replies, bad keys, and runs through the strategy
(Flower serde both ways)."""

import functools
import math

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord

from fl_subnet import Mask
from fl_subnet.core.masks import full_mask
from fl_subnet.core.robust_distance import (MaskedGeometricMedian, MaskedMultiKrum, geometric_median, krum_rogues,
                                            krum_scores, update_cosines)
from fl_subnet.core.rules import make_rule
from test_robust_direction import SPEC, _factory, _flat, _full_replies, _run, _state64

# ---- plain-numpy ports of the reference's lines --------------------------------------------


def ref_smoothed_weiszfeld(weights, alphas, z, nu, T):
    """``codes/aggregator/rfa.py`` ``smoothed_weiszfeld``, torch replaced by numpy."""
    m = len(weights)
    for t in range(T):
        betas = []
        for k in range(m):
            distance = np.linalg.norm(z - weights[k])
            betas.append(alphas[k] / max(distance, nu))
        z = 0
        for w, beta in zip(weights, betas):
            z += w * beta
        z /= sum(betas)
    return z


def ref_multi_krum(vectors, f, m):
    """``codes/aggregator/krum.py`` ``pairwise_euclidean_distances``, ``_compute_scores`` and
    ``multi_krum`` in numpy, with ONE change, to follow the paper (Blanchard et al. 2017,
    §4): ``_compute_scores`` sums the squared distances once (the reference squares the
    already squared distances again)."""
    n = len(vectors)
    distances = {i: {j: float(np.linalg.norm(vectors[i] - vectors[j]) ** 2) for j in range(i + 1, n)}
                 for i in range(n - 1)}

    def score(i):
        s = [distances[j][i] for j in range(i)] + [distances[i][j] for j in range(i + 1, n)]
        return sum(sorted(s)[: n - f - 2])

    scores = [(i, score(i)) for i in range(n)]
    return [i for i, _ in sorted(scores, key=lambda x: x[1])][:m]


# ---- helpers (the model, states and replies of tests/test_robust_direction.py) -----------------

def _point(entries):
    """A one-key point from ``{position: value}``."""
    idx = torch.tensor(sorted(entries), dtype=torch.int64)
    return {"w": (idx, torch.tensor([float(entries[i]) for i in sorted(entries)], dtype=torch.float64))}


# ---- (a) full masks: the reference's lines ------------------------------------------------

@pytest.mark.parametrize("iterations,smoothing", [(1, 0.1), (8, 0.1), (8, 1e-6), (20, 10.0)])
def test_full_masks_equal_the_reference_smoothed_weiszfeld(iterations, smoothing):
    state = _state64(1)
    replies = _full_replies(state, 7, seed=3)
    replies[2] = {k: t + 5.0 for k, t in replies[2].items()}  # one far point
    g = _flat(state)
    inputs = [_flat(r) - g for r in replies]
    want = ref_smoothed_weiszfeld(inputs, [1 / 7] * 7, np.zeros_like(inputs[0]), smoothing, iterations)
    _, out = _run("geometric-median", state, replies, weiszfeld_iterations=iterations,
                  weiszfeld_smoothing=smoothing)
    np.testing.assert_allclose(_flat(out) - g, want, rtol=0, atol=1e-12)


@pytest.mark.parametrize("num,rogues", [(7, 2), (8, 1), (10, 3), (5, 0), (4, -1)])
def test_full_masks_equal_the_reference_multi_krum(num, rogues):
    state = _state64(2)
    replies = _full_replies(state, num, seed=num)
    replies[0] = {k: t - 3.0 for k, t in replies[0].items()}  # a far point: never selected when f >= 1
    g = _flat(state)
    inputs = [_flat(r) - g for r in replies]
    f = krum_rogues(num, rogues)
    chosen = ref_multi_krum(inputs, f, num - f)
    agg, out = _run("multi-krum", state, replies, krum_rogues=rogues)
    assert agg.selected == chosen
    np.testing.assert_allclose(_flat(out) - g, np.mean([inputs[i] for i in chosen], axis=0), rtol=0, atol=1e-12)
    if f >= 1:
        assert 0 not in agg.selected


def test_krum_rogues_defaults_to_what_krum_tolerates_and_lowers_a_larger_value(caplog):
    assert [krum_rogues(n) for n in (1, 2, 3, 4, 5, 6, 10, 11)] == [0, 0, 0, 0, 1, 1, 3, 4]
    assert krum_rogues(10, 2) == 2
    assert krum_rogues(5, 4) == 1 and "lowered to 1" in caplog.text


# ---- (b) partial masks by hand --------------------------------------------------------------

def test_geometric_median_by_hand_on_partial_masks():
    """Entries 0, 1 of one key; points a = (0, –), b = (3, 4), c = (–, 8) (– : not held).
    One iteration from z = 0: distances over held entries |a| = 0 → ν, |b| = 5, |c| = 8;
    β = (1/3)/(ν, 5, 8); z[0] = (β_a·0 + β_b·3)/(β_a + β_b), z[1] = (β_b·4 + β_c·8)/(β_b + β_c)."""
    nu = 0.5
    points = [_point({0: 0.0}), _point({0: 3.0, 1: 4.0}), _point({1: 8.0})]
    z, dist = geometric_median(points, {"w": 3}, iterations=1, smoothing=nu)
    ba, bb, bc = 1 / 3 / nu, 1 / 3 / 5, 1 / 3 / 8
    assert dist == [0.0, 5.0, 8.0]
    assert z["w"].tolist() == pytest.approx([bb * 3 / (ba + bb), (bb * 4 + bc * 8) / (bb + bc), 0.0], abs=1e-15)


def test_krum_scores_by_hand_with_unheld_entries_as_zero():
    """Points on 3 entries, an unheld entry counting as 0: a = (1, 0, –), b = (1, 1, –),
    c = (–, –, 2), d = (1, 0, 0). Squared distances: ab 1, ac 1+4=5, ad 0, bc 1+1+4=6,
    bd 1, cd 1+4=5. n = 4, f = 0: each score is the sum of the 2 smallest."""
    points = [_point({0: 1.0, 1: 0.0}), _point({0: 1.0, 1: 1.0}), _point({2: 2.0}),
              _point({0: 1.0, 1: 0.0, 2: 0.0})]
    scores = krum_scores(points, {"w": 3}, rogues=0)
    assert scores == pytest.approx([0 + 1, 1 + 1, 5 + 5, 0 + 1], abs=1e-15)


def test_multi_krum_on_partial_masks_leaves_out_the_far_reply_and_its_entries():
    """Five replies, f = 1: the far one is left out; an entry only it held keeps W_k and is
    not in held()."""
    state = _state64(4)
    groups = {g.name: g.size for g in SPEC.groups}
    masks = [Mask({name: torch.arange(size - 1) for name, size in groups.items()}) for _ in range(4)]
    masks.append(full_mask(SPEC.groups))
    replies = _full_replies(state, 5, seed=5, scale=0.01)
    replies[4] = {k: t + 4.0 for k, t in replies[4].items()}
    agg, out = _run("multi-krum", state, replies, masks, krum_rogues=1)
    assert agg.selected is not None and 4 not in agg.selected and len(agg.selected) == 4
    first = SPEC.groups[0]
    key = next(k for k in state if k.endswith("weight"))
    last_unit = first.size - 1
    assert torch.equal(out[key][last_unit], state[key][last_unit])  # only the far reply held this row
    assert not bool(agg.held()[key].expand_as(state[key])[last_unit].any())
    assert bool(agg.held()[key].expand_as(state[key])[0].all())


def test_update_cosines_by_hand():
    center = {"w": torch.tensor([1.0, 0.0, 2.0], dtype=torch.float64)}
    points = [_point({0: 2.0}), _point({0: -1.0, 2: -1.0}), _point({1: 5.0}), _point({0: 1.0, 2: 0.0})]
    cos = update_cosines(points, center)
    assert cos == pytest.approx([1.0, -3 / (math.sqrt(2) * math.sqrt(5)), 1.0, 1 / math.sqrt(5)], abs=1e-15)


# ---- (c) a rogue among honest replies ----------------------------------------------------------

def test_a_far_sign_flipped_reply_moves_the_geometric_median_little_and_is_left_out_by_krum():
    """Six honest replies around μ and one sending −4μ: the mean is pulled past 0 along μ,
    the geometric median stays close to the honest mean, Multi-Krum leaves the rogue out,
    and the rogue's cosine to the geometric median is negative."""
    state = _state64(6)
    g = torch.Generator().manual_seed(6)
    mu = {k: 0.5 * torch.randn(t.shape, generator=g, dtype=torch.float64) for k, t in state.items()}
    honest = [{k: state[k] + mu[k] + 0.2 * torch.randn(t.shape, generator=g, dtype=torch.float64)
               for k, t in state.items()} for _ in range(6)]
    rogue = {k: state[k] - 4.0 * mu[k] for k in state}
    replies = honest + [rogue]
    base = _flat(state)
    mu_flat = _flat(mu)
    honest_mean = np.mean([_flat(r) - base for r in honest], axis=0)

    def along(out):
        return float((_flat(out) - base) @ mu_flat / (mu_flat @ mu_flat))

    _, mean = _run("mean", state, replies)
    gm_agg, gm = _run("geometric-median", state, replies)
    krum, kr = _run("multi-krum", state, replies)
    assert along(mean) < 0.3  # the attack is real: (6·1 − 4)/7 ≈ 0.29 of μ
    assert along(gm) > 0.85
    assert np.linalg.norm(_flat(gm) - base - honest_mean) < 0.25 * np.linalg.norm(honest_mean)
    assert 6 not in krum.selected and along(kr) > 0.9
    points = gm_agg._points()
    z, _ = geometric_median(points, gm_agg._numels())
    cos = update_cosines(points, z)
    assert cos[6] < -0.5 and min(cos[:6]) > 0.5


# ---- (d) bad keys ----------------------------------------------------------------------------

@pytest.mark.parametrize("rule,key,value", [
    ("geometric-median", "weiszfeld-iterations", 0), ("geometric-median", "weiszfeld-iterations", 2.5),
    ("geometric-median", "weiszfeld-smoothing", 0.0), ("geometric-median", "weiszfeld-smoothing", float("inf")),
    ("multi-krum", "krum-rogues", -2), ("multi-krum", "krum-rogues", 1.5)])
def test_bad_keys_are_refused_naming_the_key(rule, key, value):
    from fl_subnet.experiments.config import RunConfig
    from fl_subnet.strategies import SubnetFedAvg

    with pytest.raises(ValueError, match=key):
        RunConfig.from_mapping({"aggregation": rule, key: value})
    option = key.replace("-", "_")
    with pytest.raises(ValueError, match=key):
        make_rule(rule, {}, SPEC.slicer, **{option: value})
    with pytest.raises(ValueError, match=key):
        SubnetFedAvg(_factory, aggregation=rule, **{option: value})


@pytest.mark.parametrize("value", [1.5, -1.01, True, "0"])
def test_bad_min_cosine_is_refused_naming_the_key(value):
    from fl_subnet.experiments.config import RunConfig
    from fl_subnet.strategies.defences import Defences

    with pytest.raises(ValueError, match="min-cosine"):
        Defences(min_cosine=value)
    if not isinstance(value, (bool, str)):
        with pytest.raises(ValueError, match="min-cosine"):
            RunConfig.from_mapping({"min-cosine": value})


def test_building_blocks_refuse_bad_input():
    with pytest.raises(ValueError, match="weiszfeld-iterations"):
        MaskedGeometricMedian({}, SPEC.slicer, iterations=True)
    with pytest.raises(ValueError, match="krum-rogues"):
        MaskedMultiKrum({}, SPEC.slicer, rogues=-3)


# ---- (e) through strategy.start ---------------------------------------------------------------

@pytest.mark.parametrize("aggregation", ["geometric-median", "multi-krum"])
@pytest.mark.parametrize("protocol", ["federated-dropout", "ist"])
def test_rules_accept_honest_replies_through_strategy_start(aggregation, protocol):
    """The rule behind the strategy (Flower serde both ways on the in-process grid): every
    honest reply is accepted and the model learns."""
    from strategy_helpers import central_loss, grid, initial_arrays, robust_strategy, train_config

    n = 4
    strategy = robust_strategy(protocol, aggregation, n)
    result = strategy.start(grid=grid(n), initial_arrays=initial_arrays(), num_rounds=3,
                            train_config=train_config())
    for rnd in (1, 2, 3):
        m = result.train_metrics_clientapp[rnd]
        assert m["num-replies"] == n and m["num-rejected"] == 0, (rnd, dict(m))
    assert central_loss(result.arrays) < central_loss(initial_arrays()) - 0.05


def _flipping_train(rogue_pid, model, train_set, cfg, seed):
    """Honest local training; node ``rogue_pid`` then sends −3 × its update."""
    from fl_subnet.clients.train import train_local

    start = {k: v.detach().clone() for k, v in model.state_dict().items()}
    n, loss = train_local(model, train_set, cfg, seed)
    if getattr(train_set, "partition_id", None) == rogue_pid:
        with torch.no_grad():
            for k, p in model.state_dict().items():
                if p.is_floating_point():
                    p.copy_(start[k] - 3.0 * (p - start[k]))
    return n, loss


def test_direction_screening_rejects_the_flipped_reply_through_strategy_start(caplog):
    """FedAvg with ``min-cosine = 0`` over 5 nodes, node 2 sending its update flipped and
    tripled: that reply, and only it, is rejected every round with the reason named; the
    same run without the rogue rejects nothing (honest replies all point with the centre)."""
    from torch.utils.data import TensorDataset

    from fl_subnet.clients import make_client_app
    from fl_subnet.experiments.inprocess_grid import InProcessGrid
    from fl_subnet.strategies import SubnetFedAvg
    from fl_subnet.strategies.defences import Defences
    from strategy_helpers import central_loss, factory, initial_arrays, load_data, train_config

    class Tagged(TensorDataset):
        partition_id = -1

    def tagged_data(context):
        train, test = load_data(context)
        data = Tagged(*train.tensors)
        data.partition_id = int(context.node_config["partition-id"])
        return data, test

    n = 5
    for rogue in (2, None):
        strategy = SubnetFedAvg(factory, num_train_nodes=n, fraction_evaluate=0.0, aggregation="centered-clip",
                                defences=Defences(min_cosine=0.0))
        app = make_client_app(factory, tagged_data, functools.partial(_flipping_train, rogue))
        caplog.clear()
        # 20 local steps: the honest updates share a direction (with 3 they are nearly orthogonal)
        result = strategy.start(grid=InProcessGrid(app, n), initial_arrays=initial_arrays(), num_rounds=3,
                                train_config=train_config(**{"local-steps": 20, "batch-size": 16}))
        for rnd in (1, 2, 3):
            m = result.train_metrics_clientapp[rnd]
            assert m["num-rejected"] == (1 if rogue is not None else 0), (rogue, rnd, dict(m))
            assert m["num-replies"] == n - m["num-rejected"]
        if rogue is not None:
            assert caplog.text.count("points away from the round's robust centre") == 3
        assert central_loss(result.arrays) < central_loss(initial_arrays()) - 0.05


def test_direction_screening_is_off_below_three_replies(caplog):
    from fl_subnet.strategies import SubnetFedAvg
    from fl_subnet.strategies.defences import Defences
    from strategy_helpers import factory, grid, initial_arrays, train_config

    strategy = SubnetFedAvg(factory, num_train_nodes=2, fraction_evaluate=0.0, defences=Defences(min_cosine=0.5))
    result = strategy.start(grid=grid(2), initial_arrays=initial_arrays(), num_rounds=1, train_config=train_config())
    assert result.train_metrics_clientapp[1]["num-replies"] == 2
    assert "min-cosine needs 3" in caplog.text


def test_run_config_keys_reach_the_rule_and_the_defences():
    from fl_subnet.experiments.config import RunConfig
    from fl_subnet.strategies.registry import build_strategy

    cfg = RunConfig.from_mapping({"strategy": "federated-dropout", "aggregation": "geometric-median",
                                  "weiszfeld-iterations": 4, "weiszfeld-smoothing": 0.25, "min-cosine": 0.1})
    strategy = build_strategy(cfg, _factory, example_input=torch.zeros(1, 6))
    agg = strategy._aggregator(3)
    assert isinstance(agg, MaskedGeometricMedian) and (agg.iterations, agg.smoothing) == (4, 0.25)
    assert strategy.defences.min_cosine == 0.1
    cfg = RunConfig.from_mapping({"strategy": "fedavg", "aggregation": "multi-krum", "krum-rogues": 2})
    agg = build_strategy(cfg, _factory, example_input=torch.zeros(1, 6))._aggregator(1)
    assert isinstance(agg, MaskedMultiKrum) and agg.rogues == 2
    assert build_strategy(RunConfig.from_mapping({"strategy": "fedavg"}), _factory,
                          example_input=torch.zeros(1, 6)).defences.min_cosine is None  # off by default


def test_train_config_untouched_by_direction_screening():
    """min-cosine is the server's: nothing is added to the nodes' train config."""
    from fl_subnet.strategies import SubnetFedAvg
    from fl_subnet.strategies.defences import Defences

    a = SubnetFedAvg(_factory, example_input=torch.zeros(1, 6))
    b = SubnetFedAvg(_factory, example_input=torch.zeros(1, 6), defences=Defences(min_cosine=0.0))
    assert a._example_config == b._example_config
    assert isinstance(ConfigRecord(dict(b._example_config)), ConfigRecord)
