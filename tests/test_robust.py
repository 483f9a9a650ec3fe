"""Robust masked aggregation (coordinate-wise median / trimmed mean over each entry's
holders), update screening and weight capping, against a hand-computed example and an
independent plain-numpy reference."""

import math

import numpy as np
import pytest
import torch
from torch import nn

import fl_subnet
from fl_subnet import Mask
from fl_subnet.core.aggregate import MaskedAggregator
from fl_subnet.core.masks import full_mask
from fl_subnet.core.robust import MaskedMedian, MaskedTrimmedMean, cap_weight, screen_update
from fl_subnet.core.slicing import Slicer
from fl_subnet.models import MLP

from models_extra import WithBuffers, ResidualMLP


def _mlp():
    return MLP(6, [10, 7], 3)


SPEC = fl_subnet.analyze(_mlp, torch.zeros(1, 6))
# Hand-written for MLP(6, [10, 7], 3): key -> unit group indexing each dim (None: not
# masked). Linear weight (out, in): rows by the layer's output group, columns by its
# input group. Independent of the slicer's coupling table.
LAYOUT = {
    "1.weight": ("1", None), "1.bias": ("1",),
    "3.weight": ("3", "1"), "3.bias": ("3",),
    "5.weight": (None, "3"), "5.bias": (None,),
}
SIZES = {"1": 10, "3": 7}


def _random_mask(rng, p):
    """Bernoulli(p) kept units per group; a group is sometimes left out (kept whole)."""
    idx = {}
    for name, size in SIZES.items():
        if rng.random() < 0.15:
            continue
        idx[name] = torch.from_numpy(np.flatnonzero(rng.random(size) < p)).to(torch.int64)
    return Mask(idx)


def _numpy_holder_values(old, replies):
    """key -> (C, *shape) float64 array: client c's value where its mask held the entry,
    NaN where it did not (scattered by hand from the masks' kept indices)."""
    out = {}
    for key, full in old.items():
        shape = tuple(full.shape)
        stack = np.full((len(replies),) + shape, np.nan)
        for c, (compact, mask, _w) in enumerate(replies):
            idx = []
            for d, group in enumerate(LAYOUT[key]):
                if group is None or group not in mask.indices:
                    idx.append(np.arange(shape[d]))
                else:
                    idx.append(mask.indices[group].numpy())
            stack[c][np.ix_(*idx)] = compact[key].numpy().astype(np.float64)
        out[key] = stack
    return out


def _np_trimmed(values, beta):
    v = np.sort(np.asarray(values, dtype=np.float64))
    t = math.floor(beta * len(v) + 1e-9)
    return v[t:len(v) - t].mean()


def _numpy_reference(old, replies, rule):
    """Per entry, over the clients that held it: np.median or a sorted trimmed mean;
    entries nobody held keep the old value."""
    out = {}
    for key, stack in _numpy_holder_values(old, replies).items():
        res = old[key].numpy().astype(np.float64).copy()
        for e in np.ndindex(res.shape):
            vals = stack[(slice(None),) + e]
            vals = vals[~np.isnan(vals)]
            if len(vals):
                res[e] = np.median(vals) if rule == "median" else _np_trimmed(vals, rule)
        out[key] = res
    return out


def _make(rule, old, slicer):
    return MaskedMedian(old, slicer) if rule == "median" else MaskedTrimmedMean(old, slicer, rule)


RULES = ["median", 0.0, 0.1, 0.25, 0.4]


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_random_masks_match_numpy_reference(rule, seed):
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    old = _mlp().state_dict()
    num_clients = [4, 5, 6, 7][seed]
    replies = []
    for c in range(num_clients):
        mask = _random_mask(rng, p=0.5)
        compact = {k: torch.randn_like(v) for k, v in SPEC.slicer.gather(old, mask).items()}
        replies.append((compact, mask, float(rng.integers(1, 50))))  # weights: ignored
    agg = _make(rule, old, SPEC.slicer)
    for r in replies:
        agg.add(*r)
    assert agg.num_replies == num_clients
    new = agg.finalize()
    ref = _numpy_reference(old, replies, rule)
    holders = {k: (~np.isnan(s)).sum(0) for k, s in _numpy_holder_values(old, replies).items()}
    counts = np.concatenate([h.ravel() for h in holders.values()])
    assert (counts % 2 == 0).any() and (counts >= 2).any()  # even holder counts do occur
    for key in old:
        assert new[key].dtype == old[key].dtype and new[key].shape == old[key].shape
        np.testing.assert_allclose(new[key].numpy(), ref[key], rtol=1e-6, atol=1e-6, err_msg=key)


def test_random_masks_leave_unheld_entries_unchanged():
    rng = np.random.default_rng(7)
    old = _mlp().state_dict()
    replies = []
    for _ in range(3):
        mask = Mask({n: torch.from_numpy(np.flatnonzero(rng.random(s) < 0.3)).to(torch.int64)
                     for n, s in SIZES.items()})
        replies.append(({k: torch.randn_like(v) for k, v in SPEC.slicer.gather(old, mask).items()}, mask, 1.0))
    holders = {k: (~np.isnan(s)).sum(0) for k, s in _numpy_holder_values(old, replies).items()}
    assert any((h == 0).any() for h in holders.values())
    for rule in ("median", 0.2):
        agg = _make(rule, old, SPEC.slicer)
        for r in replies:
            agg.add(*r)
        new = agg.finalize()
        for key, h in holders.items():
            assert torch.equal(new[key][torch.from_numpy(h == 0)], old[key][torch.from_numpy(h == 0)]), key


def test_hand_computed_three_clients():
    # MLP 2 -> 4 -> 1, hidden units {0,1,2,3}. Every compact entry of A is 1, of B 5,
    # of C 100. A holds {0,1}, B holds {1,2}, C holds {0}; unit 3: nobody.
    model = MLP(2, [4], 1)
    slicer = Slicer(fl_subnet.analyze(lambda: MLP(2, [4], 1), torch.zeros(1, 2)).groups)
    old = {k: torch.full_like(v, -9.0) for k, v in model.state_dict().items()}
    masks = {"A": Mask({"1": torch.tensor([0, 1])}), "B": Mask({"1": torch.tensor([1, 2])}),
             "C": Mask({"1": torch.tensor([0])})}
    value = {"A": 1.0, "B": 5.0, "C": 100.0}
    weight = {"A": 1.0, "B": 1000.0, "C": 1.0}  # ignored by the robust rules

    def run(agg):
        for c in "ABC":
            agg.add({k: torch.full_like(v, value[c]) for k, v in slicer.gather(old, masks[c]).items()},
                    masks[c], weight[c])
        return agg.finalize()

    med = run(MaskedMedian(old, slicer))
    # unit 0: A, C -> (1+100)/2 (even count: mean of the two middle values, not 1);
    # unit 1: A, B -> 3; unit 2: B -> 5; unit 3: nobody -> -9; shared 3.bias: 1, 5, 100 -> 5
    assert med["1.bias"].tolist() == [50.5, 3.0, 5.0, -9.0]
    assert med["1.weight"].tolist() == [[50.5] * 2, [3.0] * 2, [5.0] * 2, [-9.0] * 2]
    assert med["3.weight"].tolist() == [[50.5, 3.0, 5.0, -9.0]]
    assert med["3.bias"].tolist() == [5.0]
    third = run(MaskedTrimmedMean(old, slicer, 1 / 3))  # h=3: drop 1 each side; h=2: floor(2/3)=0
    assert third["1.bias"].tolist() == [50.5, 3.0, 5.0, -9.0]
    assert third["3.bias"].tolist() == [5.0]
    plain = run(MaskedTrimmedMean(old, slicer, 0.0))  # count mean, weights ignored
    assert plain["3.bias"].tolist() == [pytest.approx(106 / 3)]


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("num_clients", [5, 6])
def test_full_masks_equal_numpy_coordinatewise_rules(seed, num_clients):
    torch.manual_seed(seed)
    old = _mlp().state_dict()
    mask = full_mask(SPEC.groups)
    replies = [{k: torch.randn_like(v) for k, v in old.items()} for _ in range(num_clients)]
    for rule in RULES:
        agg = _make(rule, old, SPEC.slicer)
        for r in replies:
            agg.add(r, mask, 3.0)
        new = agg.finalize()
        for key in old:
            stack = np.stack([r[key].numpy().astype(np.float64) for r in replies])
            if rule == "median":
                want = np.median(stack, axis=0)
            else:
                t = math.floor(rule * num_clients + 1e-9)
                want = np.sort(stack, axis=0)[t:num_clients - t].mean(axis=0)
            np.testing.assert_allclose(new[key].numpy(), want, rtol=1e-6, atol=1e-6, err_msg=f"{rule} {key}")


@pytest.mark.parametrize("bad", [-0.1, 0.5, 0.7, 1, float("nan"), float("inf"), True, "0.1", None])
def test_trim_fraction_validation(bad):
    with pytest.raises(ValueError, match="trim_fraction"):
        MaskedTrimmedMean(_mlp().state_dict(), SPEC.slicer, bad)


def test_invalid_replies_are_rejected_without_trace():
    old = _mlp().state_dict()
    mask = full_mask(SPEC.groups)
    good = {k: torch.ones_like(v) for k, v in old.items()}
    for agg in (MaskedMedian(old, SPEC.slicer), MaskedTrimmedMean(old, SPEC.slicer, 0.2)):
        nan = dict(good, **{"3.weight": torch.full_like(old["3.weight"], float("nan"))})
        with pytest.raises(ValueError, match="NaN or Inf"):
            agg.add(nan, mask)
        with pytest.raises(ValueError, match="shape"):
            agg.add(dict(good, **{"1.bias": torch.ones(3)}), mask)
        with pytest.raises(ValueError, match="missing"):
            agg.add({k: v for k, v in good.items() if k != "5.bias"}, mask)
        with pytest.raises(ValueError, match="weight"):
            agg.add(good, mask, 0.0)
        with pytest.raises(ValueError, match="shape"):
            agg.check(dict(good, **{"1.bias": torch.ones(3)}), mask)
        assert agg.num_replies == 0
        new = agg.finalize()
        assert all(torch.equal(new[k], old[k]) and new[k] is not old[k] for k in old)  # no reply: W_k
        agg.add(good, mask)
        assert agg.num_replies == 1
        assert all(torch.equal(v, torch.ones_like(v)) for v in agg.finalize().values())


def test_integer_tensors_take_max_and_scalars_are_reduced():
    slicer = Slicer(WithBuffers().unit_groups())
    old = WithBuffers().state_dict()
    a, b, c = (Mask({"rows": torch.tensor(i)}) for i in ([0, 2], [2, 3], [0, 2, 3]))
    replies = [({"w": torch.full((2, 2), 1.0), "t": torch.tensor(3.0), "steps": torch.tensor(5)}, a),
               ({"w": torch.full((2, 2), 2.0), "t": torch.tensor(6.0), "steps": torch.tensor(9)}, b),
               ({"w": torch.full((3, 2), 7.0), "t": torch.tensor(4.0), "steps": torch.tensor(2)}, c)]
    for agg in (MaskedMedian(old, slicer), MaskedTrimmedMean(old, slicer, 0.34)):
        for r in replies:
            agg.add(*r)
        new = agg.finalize()
        assert new["steps"].dtype == torch.int64 and int(new["steps"]) == 9
        assert new["t"].shape == () and float(new["t"]) == 4.0  # median of 3, 4, 6; trim 1 each side
        # rows 0: {1, 7}; 1: nobody; 2: {1, 2, 7}; 3: {2, 7}
        assert new["w"].tolist() == [[4.0, 4.0], [2.0, 3.0], [2.0, 2.0], [4.5, 4.5]]


def test_skipped_depth_block_is_not_held():
    spec = fl_subnet.analyze(ResidualMLP, torch.randn(3, 16), verify=False)
    state = ResidualMLP().state_dict()
    every = full_mask(spec.all_groups)
    skipping = Mask(dict(every.indices), skip=frozenset({"fc1"}))
    replies = [(skipping, 100.0), (every, 1.0), (every, 3.0)]
    for agg in (MaskedMedian(state, spec.slicer), MaskedTrimmedMean(state, spec.slicer, 0.0)):
        for mask, v in replies:
            agg.add({k: torch.full_like(t, v) for k, t in spec.gather(state, mask).items()}, mask)
        out = agg.finalize()
        for k in state:
            want = 2.0 if k.startswith(("fc1.", "fc2.")) else (3.0 if isinstance(agg, MaskedMedian) else 104 / 3)
            assert torch.allclose(out[k], torch.full_like(state[k], want)), k
    nobody = MaskedMedian(state, spec.slicer)
    nobody.add({k: torch.full_like(t, 1.0) for k, t in spec.gather(state, skipping).items()}, skipping)
    kept = nobody.finalize()
    assert all(torch.equal(kept[k], state[k]) for k in ("fc1.weight", "fc2.bias"))


@pytest.mark.parametrize("rule", ["median", 0.2])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_one_rogue_of_five_stays_within_honest_range(rule, seed):
    torch.manual_seed(seed)
    old = _mlp().state_dict()
    mask = full_mask(SPEC.groups)
    honest = [{k: v + 0.01 * torch.randn_like(v) for k, v in old.items()} for _ in range(4)]
    rogue = {k: torch.full_like(v, 1e30) for k, v in old.items()}
    agg = _make(rule, old, SPEC.slicer)
    for r in honest[:2] + [rogue] + honest[2:]:
        agg.add(r, mask, 1e6 if r is rogue else 1.0)
    new = agg.finalize()
    mean = MaskedAggregator(old, SPEC.slicer)
    for r in honest + [rogue]:
        mean.add(r, mask, 1.0)
    assert float(mean.finalize()["1.weight"].abs().min()) > 1e28  # the plain mean is ruined
    for key in old:
        stack = torch.stack([h[key] for h in honest])
        assert bool((new[key] >= stack.min(0).values).all() and (new[key] <= stack.max(0).values).all()), key


# ---- screening ------------------------------------------------------------------------

def _slice_and_reply(scale, seed=0):
    torch.manual_seed(seed)
    old = _mlp().state_dict()
    mask = Mask({"1": torch.tensor([0, 3, 4, 8]), "3": torch.tensor([1, 2, 6])})
    g = SPEC.slicer.gather(old, mask)
    return g, {k: v + scale * torch.randn_like(v) for k, v in g.items()}


def _ratio64(reply, g):
    upd = math.sqrt(sum(float((reply[k].double() - g[k].double()).square().sum()) for k in g))
    return upd / math.sqrt(sum(float(g[k].double().square().sum()) for k in g))


@pytest.mark.parametrize("mode", ["reject", "clip"])
def test_honest_reply_comes_back_as_the_same_objects(mode):
    g, reply = _slice_and_reply(1e-3)
    before = {k: v.clone() for k, v in reply.items()}
    out, ratio, clipped = screen_update(reply, g, max_ratio=0.5, mode=mode)
    assert out is reply and not clipped
    assert all(out[k] is reply[k] and torch.equal(reply[k], before[k]) for k in reply)
    assert ratio == pytest.approx(_ratio64(reply, g), rel=1e-9) and 0 < ratio < 0.5


def test_huge_reply_is_rejected_with_ratio_and_bound():
    g, _ = _slice_and_reply(0.0)
    rogue = {k: torch.full_like(v, 1e30) for k, v in g.items()}
    with pytest.raises(ValueError, match=r"ratio .*e\+.* exceeds the bound max_ratio=0\.5"):
        screen_update(rogue, g, max_ratio=0.5, mode="reject")


@pytest.mark.parametrize("max_ratio", [0.5, 2.0])
@pytest.mark.parametrize("seed", [0, 1])
def test_huge_reply_is_clipped_to_the_bound(max_ratio, seed):
    g, _ = _slice_and_reply(0.0, seed)
    rogue = {k: torch.full_like(v, 1e30) for k, v in g.items()}
    out, ratio, clipped = screen_update(rogue, g, max_ratio=max_ratio, mode="clip")
    assert clipped and ratio > 1e28 and out is not rogue
    assert all(out[k].dtype == g[k].dtype and out[k].shape == g[k].shape for k in g)
    assert _ratio64(out, g) == pytest.approx(max_ratio, rel=1e-5)
    assert all(torch.equal(rogue[k], torch.full_like(g[k], 1e30)) for k in g)  # input untouched
    # the clipped update points the same way as the rogue one
    for k in g:
        assert bool(((out[k].double() - g[k].double()) * (1e30 - g[k].double()) >= 0).all())
    assert screen_update(out, g, max_ratio * (1 + 1e-4), mode="reject")[0] is out


def test_screen_leaves_integer_tensors_alone_and_handles_zero_model():
    g = {"w": torch.zeros(3), "steps": torch.tensor(4)}
    same = {"w": torch.zeros(3), "steps": torch.tensor(9)}
    out, ratio, clipped = screen_update(same, g, 1.0)  # zero model, zero update: ratio 0, not NaN
    assert out is same and ratio == 0.0 and not clipped
    moved = {"w": torch.ones(3), "steps": torch.tensor(9)}
    with pytest.raises(ValueError, match="exceeds"):
        screen_update(moved, g, 1.0)
    out, ratio, clipped = screen_update(moved, g, 1.0, mode="clip")
    assert clipped and out["steps"] is moved["steps"] and float(out["w"].norm()) <= 1e-11


@pytest.mark.parametrize("mode", ["reject", "clip"])
def test_screen_rejects_nonfinite_and_malformed_replies(mode):
    g, reply = _slice_and_reply(1e-3)
    with pytest.raises(ValueError, match="NaN or Inf"):
        screen_update(dict(reply, **{"1.bias": torch.full_like(reply["1.bias"], float("nan"))}), g, 1.0, mode)
    with pytest.raises(ValueError, match="missing"):
        screen_update({k: v for k, v in reply.items() if k != "5.bias"}, g, 1.0, mode)
    with pytest.raises(ValueError, match="shape"):
        screen_update(dict(reply, **{"5.bias": torch.zeros(2)}), g, 1.0, mode)
    with pytest.raises(ValueError, match="dtype"):
        screen_update(dict(reply, **{"5.bias": reply["5.bias"].double()}), g, 1.0, mode)


@pytest.mark.parametrize("kwargs", [{"max_ratio": 0.0}, {"max_ratio": -1.0}, {"max_ratio": float("inf")},
                                    {"max_ratio": float("nan")}, {"max_ratio": 1.0, "mode": "scale"}])
def test_screen_argument_validation(kwargs):
    g, reply = _slice_and_reply(1e-3)
    with pytest.raises(ValueError, match="max_ratio|mode"):
        screen_update(reply, g, **kwargs)


# ---- weight cap -----------------------------------------------------------------------

def test_cap_weight():
    assert cap_weight(50, 10) == 10.0 and cap_weight(5, 10) == 5.0 and cap_weight(7.5, None) == 7.5
    assert isinstance(cap_weight(5, 10), float)
    for weight, cap in [(5, 0), (5, -1), (5, float("inf")), (5, float("nan")), (5, True), (5, "3"),
                        (0, 10), (-1, None), (float("nan"), 10), (float("inf"), None)]:
        with pytest.raises(ValueError, match="weight|cap"):
            cap_weight(weight, cap)


# ---- through strategy.start ------------------------------------------------------------

@pytest.mark.parametrize("aggregation", ["median", "trimmed-mean"])
@pytest.mark.parametrize("protocol", ["federated-dropout", "ist"])
def test_robust_rules_accept_honest_replies_through_strategy_start(aggregation, protocol):
    """A robust rule behind the strategy (Flower serde both ways on the in-process grid):
    every honest reply is accepted and the model learns."""
    from strategy_helpers import central_loss, grid, initial_arrays, robust_strategy, train_config

    n = 4
    strategy = robust_strategy(protocol, aggregation, n)
    result = strategy.start(grid=grid(n), initial_arrays=initial_arrays(), num_rounds=3,
                            train_config=train_config())
    for rnd in (1, 2, 3):
        m = result.train_metrics_clientapp[rnd]
        assert m["num-replies"] == n and m["num-rejected"] == 0, (rnd, dict(m))
    assert central_loss(result.arrays) < central_loss(initial_arrays()) - 0.05
