"""Masked aggregation against a hand-computed example and a plain-numpy reference."""

import numpy as np
import pytest
import torch
from torch import nn

from fl_subnet.core.aggregate import MaskedAggregator as _MaskedAggregator
from fl_subnet.core.flat import FlatMap
from fl_subnet.core.analysis import find_unit_groups
from fl_subnet.core.masks import Mask
from fl_subnet.models import MLP
from fl_subnet.core.samplers import BernoulliSampler, PartitionSampler
from fl_subnet.core.slicing import Slicer

from models_extra import WithBuffers


@pytest.fixture(params=["per-tensor", "flat"])
def MaskedAggregator(request):
    """The aggregator summing tensor by tensor, and the one summing every float tensor
    at once over a FlatMap: the same tests hold for both."""
    def make(old, slicer, **kw):
        flat = None
        if request.param == "flat":
            flat = FlatMap(slicer, {k: tuple(v.shape) for k, v in old.items() if v.is_floating_point()})
        agg = _MaskedAggregator(old, slicer, flat=flat, **kw)
        assert (agg.flat is not None) == (request.param == "flat")
        return agg
    return make


def test_two_clients_hand_computed(MaskedAggregator):
    # MLP 2 -> 3 -> 1; hidden units {0,1,2}. Client A holds {0,1} (weight 1),
    # client B holds {1,2} (weight 3). Every compact entry of A is 1.0, of B is 5.0.
    model = MLP(2, [3], 1)
    groups = find_unit_groups(model)
    slicer = Slicer(groups)
    old = {k: torch.full_like(v, -9.0) for k, v in model.state_dict().items()}
    a = Mask({"1": torch.tensor([0, 1])})
    b = Mask({"1": torch.tensor([1, 2])})
    agg = MaskedAggregator(old, slicer)
    agg.add({k: torch.full_like(v, 1.0) for k, v in slicer.gather(old, a).items()}, a, 1)
    agg.add({k: torch.full_like(v, 5.0) for k, v in slicer.gather(old, b).items()}, b, 3)
    new = agg.finalize()
    both = (1 * 1.0 + 3 * 5.0) / 4  # = 4.0
    assert new["1.weight"].tolist() == [[1.0, 1.0], [both, both], [5.0, 5.0]]
    assert new["1.bias"].tolist() == [1.0, both, 5.0]
    assert new["3.weight"].tolist() == [[1.0, both, 5.0]]
    assert new["3.bias"].tolist() == [both]  # shared: held by both


def test_unheld_units_keep_or_zero(MaskedAggregator):
    model = MLP(2, [4], 1)
    groups = find_unit_groups(model)
    slicer = Slicer(groups)
    old = {k: torch.full_like(v, 2.0) for k, v in model.state_dict().items()}
    m = Mask({"1": torch.tensor([1])})
    for mode, fill in (("keep", 2.0), ("zero", 0.0)):
        agg = MaskedAggregator(old, slicer, untouched=mode)
        agg.add({k: torch.full_like(v, 7.0) for k, v in slicer.gather(old, m).items()}, m, 2)
        new = agg.finalize()
        assert new["1.bias"].tolist() == [fill, 7.0, fill, fill]
        assert new["3.weight"].tolist() == [[fill, 7.0, fill, fill]]
        assert new["3.bias"].tolist() == [7.0]


def _numpy_reference(old, slicer, replies):
    """Per entry: sum of n_c * W_c[e] over holders / sum of n_c over holders."""
    out = {}
    for key, full in old.items():
        num = np.zeros(full.shape)
        den = np.zeros(full.shape)
        for compact, mask, w in replies:
            idx = [np.arange(s) for s in full.shape]
            for dim, g in [(c.dim, g.name) for g in slicer.groups for c in g.couplings if c.key == key]:
                idx[dim] = mask.indices[g].numpy()
            sel = np.ix_(*idx)
            num[sel] += w * compact[key].numpy().astype(np.float64)
            den[sel] += w
        out[key] = np.where(den > 0, num / np.where(den > 0, den, 1), full.numpy())
    return out


@pytest.mark.parametrize("sampler", [BernoulliSampler(0.4, seed=1), PartitionSampler(3, mode="iid", seed=2)])
def test_matches_numpy_reference_on_random_masks(sampler, MaskedAggregator):
    torch.manual_seed(0)
    model = MLP(5, [12, 9, 6], 4)  # three hidden groups: weights coupled on both dims
    groups = find_unit_groups(model)
    slicer = Slicer(groups)
    old = model.state_dict()
    replies = []
    for i, mask in enumerate(sampler.sample(groups, 1, 5)):
        compact = {k: torch.randn_like(v) for k, v in slicer.gather(old, mask).items()}
        replies.append((compact, mask, float(10 + 7 * i)))
    agg = MaskedAggregator(old, slicer)
    for r in replies:
        agg.add(*r)
    new = agg.finalize()
    ref = _numpy_reference(old, slicer, replies)
    for key in old:
        np.testing.assert_allclose(new[key].numpy(), ref[key], rtol=1e-6, atol=1e-6, err_msg=key)


def test_integer_buffers_and_scalars(MaskedAggregator):
    model = WithBuffers()
    groups = find_unit_groups(model)
    slicer = Slicer(groups)
    old = model.state_dict()
    a, b = Mask({"rows": torch.tensor([0, 2])}), Mask({"rows": torch.tensor([2, 3])})
    ca = {"w": torch.ones(2, 2), "t": torch.tensor(3.0), "steps": torch.tensor(5)}
    cb = {"w": torch.zeros(2, 2), "t": torch.tensor(6.0), "steps": torch.tensor(9)}
    agg = MaskedAggregator(old, slicer)
    agg.add(ca, a, 2)
    agg.add(cb, b, 1)
    new = agg.finalize()
    assert new["steps"].dtype == torch.int64 and int(new["steps"]) == 9  # max, not a float mean
    assert new["t"].shape == () and float(new["t"]) == pytest.approx((2 * 3 + 6) / 3)
    want = torch.tensor([[1, 1], [2, 3], [2 / 3, 2 / 3], [0, 0]])  # row 1: nobody held it
    assert torch.allclose(new["w"], want, atol=1e-7)


def test_no_reply_keeps_model(MaskedAggregator):
    model = MLP(3, [4], 2)
    slicer = Slicer(find_unit_groups(model))
    old = model.state_dict()
    new = MaskedAggregator(old, slicer).finalize()
    assert all(torch.equal(new[k], old[k]) for k in old)


def test_loss_average_denominator_counts_every_client(MaskedAggregator):
    model = MLP(2, [3], 1)
    groups = find_unit_groups(model)
    slicer = Slicer(groups)
    old = {k: torch.full_like(v, 2.0) for k, v in model.state_dict().items()}
    a, b = Mask({"1": torch.tensor([0, 1])}), Mask({"1": torch.tensor([1, 2])})
    agg = MaskedAggregator(old, slicer, denominator="all")
    agg.add({k: torch.full_like(v, 4.0) for k, v in slicer.gather(old, a).items()}, a, 1)
    agg.add({k: torch.full_like(v, 8.0) for k, v in slicer.gather(old, b).items()}, b, 1)
    new = agg.finalize()
    # unit 0: (4 + 2)/2, unit 1: (4 + 8)/2, unit 2: (2 + 8)/2 — W_k stands in for non-holders
    assert new["1.bias"].tolist() == [3.0, 6.0, 5.0]
    assert new["3.bias"].tolist() == [6.0]


def test_held_and_denominators_agree_between_the_paths(MaskedAggregator):
    """held() (before and after finalize) marks exactly the entries a reply held, with
    partial masks, a full mask and unequal weights; the mean uses Σ n_c over holders."""
    model = MLP(3, [5, 4], 2)
    slicer = Slicer(find_unit_groups(model))
    old = {k: torch.full_like(v, 7.0) for k, v in model.state_dict().items()}
    masks = [Mask({"1": torch.tensor([0, 2]), "3": torch.tensor([1])}),
             Mask({"1": torch.tensor([2, 4]), "3": torch.tensor([1, 3])})]
    agg = MaskedAggregator(old, slicer)
    for i, (m, w) in enumerate(zip(masks, (1.0, 3.0))):
        agg.add({k: torch.full_like(v, float(i)) for k, v in slicer.gather(old, m).items()}, m, w)
    before = agg.held()
    h1, h3 = torch.zeros(5, dtype=torch.bool), torch.zeros(4, dtype=torch.bool)
    h1[[0, 2, 4]], h3[[1, 3]] = True, True
    pairs = torch.zeros(4, 5, dtype=torch.bool)  # 3.weight: row and column held by the same reply
    pairs[1, [0, 2]], pairs[[[1], [3]], [[2, 4]]] = True, True
    want = {"1.weight": h1[:, None].expand(5, 3), "1.bias": h1, "3.weight": pairs,
            "3.bias": h3, "5.weight": h3[None, :].expand(2, 4), "5.bias": torch.ones(2, dtype=torch.bool)}
    new = agg.finalize()
    for held in (before, agg.held()):
        assert all(torch.equal(held[k].expand_as(old[k]), want[k].expand_as(old[k])) for k in want)
    assert new["1.bias"].tolist() == [0.0, 7.0, (0 * 1 + 1 * 3) / 4, 7.0, 1.0]  # unit 2 held by both
    assert new["3.weight"][1].tolist() == [0.0, 7.0, 0.75, 7.0, 1.0]
    assert new["5.bias"].tolist() == [0.75, 0.75]  # uncoupled: both replies, weights 1 and 3
