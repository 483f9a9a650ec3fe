"""Centered clipping and bucketing over masked replies (fl_subnet/core/robust_direction.py):
against a plain-numpy port of the authors' lines (epfml/byzantine-robust-noniid-optimizer,
``codes/aggregator/clipping.py`` ``Clipping`` and ``utils.py`` ``bucketing_wrapper``), a hand
computation on partial masks, a scaled negated-mean attacker, bad keys, and runs through
the strategy (Flower serde both ways)."""

import math

import numpy as np
import pytest
import torch

import fl_subnet
from fl_subnet import Mask
from fl_subnet.core.masks import full_mask
from fl_subnet.core.robust_direction import (MaskedBucketing, MaskedCenteredClip, bucket_means, bucket_order,
                                             centered_clip)
from fl_subnet.core.rules import make_rule
from fl_subnet.models import MLP

# ---- a plain-numpy port of the reference's lines ------------------------------------------


class RefClipping:
    """``codes/aggregator/clipping.py`` ``Clipping``, torch replaced by numpy."""

    def __init__(self, tau, n_iter=1):
        self.tau = tau
        self.n_iter = n_iter
        self.momentum = None

    def clip(self, v):
        v_norm = np.linalg.norm(v)
        with np.errstate(divide="ignore"):  # torch: tau / 0 = inf, silently
            scale = min(1, self.tau / v_norm)
        return v * scale

    def __call__(self, inputs):
        if self.momentum is None:
            self.momentum = np.zeros_like(inputs[0])
        for _ in range(self.n_iter):
            self.momentum = (
                sum(self.clip(v - self.momentum) for v in inputs) / len(inputs)
                + self.momentum
            )
        return self.momentum.copy()


def ref_bucketing(aggregator, s, inputs, indices):
    """``utils.py`` ``bucketing_wrapper``'s ``aggr``, with the shuffled ``indices`` given
    (the reference draws them with ``np.random.shuffle``)."""
    T = int(np.ceil(len(inputs) / s))
    reshuffled_inputs = []
    for t in range(T):
        indices_slice = indices[t * s: (t + 1) * s]
        g_bar = sum(inputs[i] for i in indices_slice) / len(indices_slice)
        reshuffled_inputs.append(g_bar)
    return aggregator(reshuffled_inputs)


# ---- helpers -------------------------------------------------------------------------------

def _factory():
    return MLP(6, [10, 7], 3)


SPEC = fl_subnet.analyze(_factory, torch.zeros(1, 6))


def _state64(seed):
    torch.manual_seed(seed)
    return {k: v.double() for k, v in _factory().state_dict().items()}


def _flat(state):
    return np.concatenate([state[k].numpy().reshape(-1) for k in state])


def _unflat(vec, like):
    out, at = {}, 0
    for k, t in like.items():
        out[k] = vec[at: at + t.numel()].reshape(t.shape)
        at += t.numel()
    return out


def _full_replies(state, num, seed, scale=0.1):
    g = torch.Generator().manual_seed(seed)
    return [{k: t + scale * torch.randn(t.shape, generator=g, dtype=torch.float64) for k, t in state.items()}
            for _ in range(num)]


def _run(rule, state, replies, masks=None, **options):
    agg = make_rule(rule, state, SPEC.slicer, **options)
    for i, r in enumerate(replies):
        mask = full_mask(SPEC.groups) if masks is None else masks[i]
        agg.add(SPEC.slicer.gather(r, mask), mask, 1.0 + i)  # weights are ignored
    return agg, agg.finalize()


# ---- (a) full masks: the reference's lines ------------------------------------------------

@pytest.mark.parametrize("radius", [0.0, 0.5, 1e9])
@pytest.mark.parametrize("iterations", [1, 3])
def test_full_masks_equal_the_reference_centered_clipping_over_two_rounds(radius, iterations):
    """Two rounds: the reference's Clipping object keeps ``momentum`` between calls; the
    rule gets it as ``center`` (the previous rule's ``next_center``)."""
    ref = None
    center = None
    for rnd in (1, 2):
        state = _state64(rnd)
        replies = _full_replies(state, 7, seed=10 + rnd)
        g = _flat(state)
        inputs = [_flat(r) - g for r in replies]
        if ref is None:  # the data-driven radius: median distance to the start (0 in round 1)
            tau = radius or float(np.median([np.linalg.norm(x) for x in inputs]))
            ref = RefClipping(tau, n_iter=iterations)
        else:
            tau = radius or float(np.median([np.linalg.norm(x - ref.momentum) for x in inputs]))
            ref.tau = tau
        want = ref(inputs)
        agg, out = _run("centered-clip", state, replies, clip_radius=radius, clip_iterations=iterations,
                        center=center)
        assert agg.radius == pytest.approx(tau, rel=1e-14)
        got = _flat(out) - g
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)
        np.testing.assert_allclose(_flat(agg.next_center), want, rtol=0, atol=1e-12)
        center = agg.next_center
    if radius == 1e9:  # nothing clipped: the plain (unweighted) mean of the updates
        np.testing.assert_allclose(want, np.mean(inputs, axis=0), rtol=0, atol=1e-12)


@pytest.mark.parametrize("num,bucket_size", [(7, 2), (8, 3), (5, 1), (3, 5)])
@pytest.mark.parametrize("radius", [0.0, 0.3])
def test_full_masks_equal_the_reference_bucketing(num, bucket_size, radius):
    state = _state64(3)
    replies = _full_replies(state, num, seed=4)
    g = _flat(state)
    inputs = [_flat(r) - g for r in replies]
    seed, rnd = 5, 9
    order = bucket_order(num, seed, rnd)
    assert sorted(order) == list(range(num))
    buckets = [sum(inputs[i] for i in order[t:t + bucket_size]) / len(order[t:t + bucket_size])
               for t in range(0, num, bucket_size)]
    tau = radius or float(np.median([np.linalg.norm(b) for b in buckets]))
    want = ref_bucketing(RefClipping(tau, n_iter=3), bucket_size, inputs, order)
    agg, out = _run("bucketing", state, replies, clip_radius=radius, bucket_size=bucket_size, seed=seed,
                    server_round=rnd)
    np.testing.assert_allclose(_flat(out) - g, want, rtol=0, atol=1e-12)


def test_bucket_order_depends_on_seed_and_round_only():
    before = torch.random.get_rng_state()
    np_before = np.random.get_state()[1].copy()
    a = bucket_order(12, 0, 3)
    assert a == bucket_order(12, 0, 3)
    assert a != bucket_order(12, 0, 4) and a != bucket_order(12, 1, 3)
    assert torch.equal(torch.random.get_rng_state(), before)  # the global state is not drawn from
    assert np.array_equal(np.random.get_state()[1], np_before)


# ---- (b) partial masks: by hand ---------------------------------------------------------------

# MLP(2, [3], 1): unit u of the hidden group holds 1.weight[u, :] (2), 1.bias[u], 3.weight[0, u]
# (4 entries); 3.bias (1 entry) is held by every reply. A mask keeping k units holds 4k + 1.
HAND = fl_subnet.analyze(lambda: MLP(2, [3], 1), torch.zeros(1, 2))


def _hand_case(rule, **options):
    (grp,) = HAND.groups
    state = {k: torch.ones_like(v, dtype=torch.float64) for k, v in MLP(2, [3], 1).state_dict().items()}
    agg = make_rule(rule, state, HAND.slicer, **options)
    for kept, c in (([0], 3.0), ([1], 0.5), ([0, 1], -1.0)):  # A, B, C: update c on every held entry
        mask = Mask({grp.name: torch.tensor(kept)})
        agg.add({k: t + c for k, t in HAND.slicer.gather(state, mask).items()}, mask, 1.0)
    out = agg.finalize()
    unit = [out["1.bias"][u].item() - 1 for u in range(3)]
    for u in range(3):  # every entry of a unit moved alike
        assert torch.allclose(out["1.weight"][u] - 1, torch.tensor(unit[u], dtype=torch.float64), atol=1e-15)
        assert out["3.weight"][0, u].item() - 1 == pytest.approx(unit[u], abs=1e-15)
    return unit, out["3.bias"].item() - 1


def test_centered_clipping_on_partial_masks_by_hand():
    """A = unit 0 at +3 (5 entries, ‖Δ‖ = 3√5), B = unit 1 at +0.5 (‖Δ‖ = √5/2),
    C = units 0, 1 at −1 (9 entries, ‖Δ‖ = 3); τ = 2, v₀ = 0.

    Iteration 1: A scaled by 2/(3√5) (each entry 2/√5), B kept, C scaled by 2/3 (−2/3).
    unit 0 (A, C): (2/√5 − 2/3)/2; unit 1 (B, C): (1/2 − 2/3)/2 = −1/12; 3.bias (all):
    (2/√5 + 1/2 − 2/3)/3; unit 2: nobody, stays.
    Iteration 2 from v₁ = (a, b, β) on (unit 0, unit 1, bias): distances over held entries
    dA² = 4(3 − a)² + (3 − β)², dB² = 4(½ − b)² + (½ − β)², dC² = 4(1 + a)² + 4(1 + b)² + (1 + β)².
    """
    unit, bias = _hand_case("centered-clip", clip_radius=2.0, clip_iterations=1)
    r5 = math.sqrt(5)
    a, b, beta = (2 / r5 - 2 / 3) / 2, -1 / 12, (2 / r5 + 1 / 2 - 2 / 3) / 3
    assert unit == pytest.approx([a, b, 0.0], abs=1e-15) and bias == pytest.approx(beta, abs=1e-15)

    unit2, bias2 = _hand_case("centered-clip", clip_radius=2.0, clip_iterations=2)
    dA = math.sqrt(4 * (3 - a) ** 2 + (3 - beta) ** 2)
    dB = math.sqrt(4 * (0.5 - b) ** 2 + (0.5 - beta) ** 2)
    dC = math.sqrt(4 * (1 + a) ** 2 + 4 * (1 + b) ** 2 + (1 + beta) ** 2)
    sA, sB, sC = (min(1.0, 2 / d) for d in (dA, dB, dC))
    want_a = a + ((3 - a) * sA + (-1 - a) * sC) / 2
    want_b = b + ((0.5 - b) * sB + (-1 - b) * sC) / 2
    want_beta = beta + ((3 - beta) * sA + (0.5 - beta) * sB + (-1 - beta) * sC) / 3
    assert unit2 == pytest.approx([want_a, want_b, 0.0], abs=1e-14)
    assert bias2 == pytest.approx(want_beta, abs=1e-14)


def test_bucketing_on_partial_masks_by_hand():
    """The replies of the test above, seed 0 round 2: order [A, C, B] (pinned below), s = 2.
    Bucket {A, C}: unit 0 (3 − 1)/2 = 1, unit 1 (C alone) −1, bias 1: ‖·‖ = 3, scaled by 2/3.
    Bucket {B}: unit 1 and bias ½, ‖·‖ = √5/2, kept. Per entry over the buckets holding it:
    unit 0: 2/3; unit 1: (−2/3 + ½)/2 = −1/12; bias (2/3 + ½)/2 = 7/12."""
    assert bucket_order(3, 0, 2) == [0, 2, 1]
    unit, bias = _hand_case("bucketing", clip_radius=2.0, clip_iterations=1, bucket_size=2, seed=0,
                            server_round=2)
    assert unit == pytest.approx([2 / 3, -1 / 12, 0.0], abs=1e-15) and bias == pytest.approx(7 / 12, abs=1e-15)


def test_data_driven_radius_is_the_median_distance_and_unheld_entries_keep_their_value():
    """clip-radius 0: τ = median of the distances to the start (3√5, √5/2, 3 → 3)."""
    (grp,) = HAND.groups
    state = {k: torch.ones_like(v, dtype=torch.float64) for k, v in MLP(2, [3], 1).state_dict().items()}
    agg = MaskedCenteredClip(state, HAND.slicer)
    for kept, c in (([0], 3.0), ([1], 0.5), ([0, 1], -1.0)):
        mask = Mask({grp.name: torch.tensor(kept)})
        agg.add({k: t + c for k, t in HAND.slicer.gather(state, mask).items()}, mask, 1.0)
    out = agg.finalize()
    assert agg.radius == pytest.approx(3.0, abs=1e-15)
    assert torch.equal(out["1.weight"][2], state["1.weight"][2]) and out["3.weight"][0, 2] == 1.0
    assert torch.all(agg.next_center["1.weight"][2] == 0)  # the aggregate update of an unheld entry


# ---- (c) a scaled negated-mean attacker ----------------------------------------------------------

def _cos(a, b):
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def _attack_case(masks_of, seed=0, honest=6, drift=0.2):
    """Honest updates μ + noise (unit noise, μ of ``drift`` per entry); the attacker sends
    −c × the honest mean over its slice, its norm 2.9 × the honest median (just under a
    ``max-ratio-to-median = 3`` screen). Returns {rule: cosine of the aggregate update with
    the honest replies' mean over holders}, over the entries the attacker holds."""
    state = _state64(seed)
    g = torch.Generator().manual_seed(seed)
    keys = [k for k in state]
    mu = {k: torch.randn(state[k].shape, generator=g, dtype=torch.float64) * drift for k in keys}
    honest_full = [{k: state[k] + mu[k] + torch.randn(state[k].shape, generator=g, dtype=torch.float64)
                    for k in keys} for _ in range(honest)]
    masks = masks_of(honest + 1)
    clean = make_rule("mean", state, SPEC.slicer)
    norms = []
    for r, m in zip(honest_full, masks):
        c = SPEC.slicer.gather(r, m)
        base = SPEC.slicer.gather(state, m)
        norms.append(math.sqrt(sum(float((c[k] - base[k]).square().sum()) for k in c)))
        clean.add(c, m, 1.0)
    honest_mean = clean.finalize()
    m_att = masks[-1]
    probe = make_rule("mean", state, SPEC.slicer)
    probe.add(SPEC.slicer.gather(state, m_att), m_att, 1.0)
    held = np.concatenate([h.expand_as(state[k]).numpy().reshape(-1) for k, h in probe.held().items()])
    want = (_flat(honest_mean) - _flat(state))[held]
    base = SPEC.slicer.gather(state, m_att)
    direction = {k: SPEC.slicer.gather(honest_mean, m_att)[k] - base[k] for k in base}
    dnorm = math.sqrt(sum(float(d.square().sum()) for d in direction.values()))
    scale = 2.9 * float(np.median(norms)) / dnorm
    attacker = {k: base[k] - scale * direction[k] for k in base}
    cos = {}
    for rule in ("mean", "median", "centered-clip", "bucketing"):
        agg = make_rule(rule, state, SPEC.slicer, seed=0, server_round=1)
        for r, m in zip(honest_full, masks):
            agg.add(SPEC.slicer.gather(r, m), m, 1.0)
        agg.add(attacker, m_att, 1.0)
        cos[rule] = _cos((_flat(agg.finalize()) - _flat(state))[held], want)
    return cos


def test_negated_mean_attacker_full_masks():
    cos = _attack_case(lambda n: [full_mask(SPEC.groups)] * n)
    assert cos["mean"] < 0, cos  # the attack is real
    assert cos["centered-clip"] > 0.5 and cos["bucketing"] > 0.5, cos


def test_negated_mean_attacker_when_sub_models_overlap_little():
    """Reply i keeps the window of 5 of 10 and 4 of 7 units starting at 3i: the attacker's
    entries have two to four honest holders. Its negated mean passes the per-entry median
    where it is one of few; clipping the whole update to one honest update's norm keeps the
    direction. Bucketing halves the holders of each entry (a bucket holds an entry where
    any member does), so it only beats the plain mean here."""
    groups = {g.name: g.size for g in SPEC.groups}

    def masks_of(n):
        return [Mask({name: torch.tensor(sorted((3 * i + j) % size for j in range(5 if size == 10 else 4)))
                      for name, size in groups.items()}) for i in range(n)]

    cos = _attack_case(masks_of)
    assert cos["mean"] < 0 and cos["median"] < 0, cos
    assert cos["centered-clip"] > 0.3, cos
    assert cos["bucketing"] > cos["mean"] + 0.3, cos


# ---- (d) bad keys ------------------------------------------------------------------------------------

@pytest.mark.parametrize("key,value", [("clip-radius", -1.0), ("clip-radius", float("nan")),
                                       ("clip-iterations", 0), ("bucket-size", 0), ("bucket-size", 1.5)])
def test_bad_keys_are_refused_naming_the_key(key, value):
    from fl_subnet.experiments.config import RunConfig

    with pytest.raises(ValueError, match=key):
        RunConfig.from_mapping({"aggregation": "bucketing", key: value})
    option = key.replace("-", "_")
    with pytest.raises(ValueError, match=key):
        make_rule("bucketing", {}, SPEC.slicer, **{option: value})
    from fl_subnet.strategies import SubnetFedAvg
    with pytest.raises(ValueError, match=key):
        SubnetFedAvg(_factory, aggregation="bucketing", **{option: value})


def test_building_blocks_refuse_bad_input():
    with pytest.raises(ValueError, match="permutation"):
        bucket_means([{}, {}], {}, [0, 0], 2)
    with pytest.raises(ValueError, match="center '1.bias'"):
        centered_clip([], {"1.bias": 10}, {"1.bias": torch.zeros(3)}, 1.0)
    with pytest.raises(ValueError, match="clip-iterations"):
        MaskedCenteredClip({}, SPEC.slicer, clip_iterations=True)
    with pytest.raises(ValueError, match="bucket-size"):
        MaskedBucketing({}, SPEC.slicer, bucket_size=-2)


# ---- (e) through strategy.start -------------------------------------------------------------------

@pytest.mark.parametrize("aggregation", ["centered-clip", "bucketing"])
@pytest.mark.parametrize("protocol", ["federated-dropout", "ist"])
def test_rules_accept_honest_replies_through_strategy_start(aggregation, protocol):
    """The rule behind the strategy (Flower serde both ways on the in-process grid): every
    honest reply is accepted, the model learns, and the next round starts from the last
    aggregate update (the strategy's ``clip_center``)."""
    from strategy_helpers import central_loss, grid, initial_arrays, robust_strategy, train_config

    n = 4
    strategy = robust_strategy(protocol, aggregation, n)
    assert strategy.clip_center is None
    result = strategy.start(grid=grid(n), initial_arrays=initial_arrays(), num_rounds=3,
                            train_config=train_config())
    for rnd in (1, 2, 3):
        m = result.train_metrics_clientapp[rnd]
        assert m["num-replies"] == n and m["num-rejected"] == 0, (rnd, dict(m))
    assert central_loss(result.arrays) < central_loss(initial_arrays()) - 0.05
    assert strategy.clip_center is not None and any(float(t.abs().sum()) > 0 for t in strategy.clip_center.values())


def test_run_config_keys_reach_the_rule():
    from fl_subnet.experiments.config import RunConfig
    from fl_subnet.strategies.registry import build_strategy

    cfg = RunConfig.from_mapping({"strategy": "federated-dropout", "aggregation": "bucketing",
                                  "clip-radius": 0.5, "clip-iterations": 2, "bucket-size": 3})
    strategy = build_strategy(cfg, _factory, example_input=torch.zeros(1, 6))
    agg = strategy._aggregator(7)
    assert isinstance(agg, MaskedBucketing)
    assert (agg.clip_radius, agg.clip_iterations, agg.bucket_size, agg.seed, agg.server_round) == (
        0.5, 2, 3, cfg.seed, 7)


def _masked_centered_clip_numpy(points, numels, radius, iterations):
    """The masked rule of ``centered_clip``'s docstring, entry by entry in numpy (v₀ = 0)."""
    keys = list(numels)
    v = {k: np.zeros(n) for k, n in numels.items()}
    held = [{k: (idx.numpy(), d.numpy()) for k, (idx, d) in p.items()} for p in points]
    count = {k: np.zeros(n) for k, n in numels.items()}
    for p in held:
        for k, (idx, _) in p.items():
            count[k][idx] += 1

    def dist(p):
        return math.sqrt(sum(float(np.sum((d - v[k][idx]) ** 2)) for k, (idx, d) in p.items()))

    if radius == 0.0:
        radius = float(np.median([dist(p) for p in held]))
    for _ in range(iterations):
        scales = [min(1.0, radius / dist(p)) if dist(p) > radius else 1.0 for p in held]
        acc = {k: np.zeros(n) for k, n in numels.items()}
        for p, s in zip(held, scales):
            for k, (idx, d) in p.items():
                acc[k][idx] += (d - v[k][idx]) * s
        v = {k: v[k] + acc[k] / np.maximum(count[k], 1) for k in keys}
    return v, radius


@pytest.mark.parametrize("radius", [0.0, 1.5])
def test_centered_clip_is_the_masked_rule_entry_by_entry(radius):
    """Partial points (one holds no bias) against the rule of the docstring in numpy."""
    gen = torch.Generator().manual_seed(7)
    numels = {"w": 40, "b": 6}
    points = []
    for i in range(9):
        p = {}
        for k, n in numels.items():
            idx = torch.nonzero(torch.rand(n, generator=gen) < 0.6).squeeze(1)
            if idx.numel() and not (k == "b" and i == 4):  # point 4 holds no bias
                p[k] = (idx, torch.randn(idx.numel(), generator=gen, dtype=torch.float64) * (8.0 if i == 2 else 1.0))
        points.append(p)
    v, used, clipped = centered_clip(points, numels, None, radius, 3)
    want, want_radius = _masked_centered_clip_numpy(points, numels, radius, 3)
    assert used == pytest.approx(want_radius, abs=1e-13) and clipped >= 1
    for k in numels:
        np.testing.assert_allclose(v[k].numpy(), want[k], rtol=0, atol=1e-12)
