"""``denominator="zero-pad"``: every reply zero-padded to the full shape and averaged over
all replies, ``Σ_{c holds e} n_c W_c[e] / Σ_c n_c`` (the naive baseline of heterogeneous
LoRA ranks), against a plain-numpy reference, a hand-computed case, and the construction
it replaces (the masked mean with ``denominator="all"`` over a state of zeros)."""

import numpy as np
import pytest
import torch

from fl_subnet.core.aggregate import MaskedAggregator
from fl_subnet.core.analysis import find_unit_groups
from fl_subnet.core.samplers import BernoulliSampler, NestedPrefixSampler
from fl_subnet.core.slicing import Slicer
from fl_subnet.models import MLP


def _model():
    torch.manual_seed(0)
    model = MLP(6, [8], 3)
    groups = find_unit_groups(model)
    return groups, Slicer(groups), {k: v.detach().clone() for k, v in model.state_dict().items()}


def _aggregate(state, slicer, masks, weights, denominator, **kw):
    agg = MaskedAggregator(state, slicer, denominator=denominator, **kw)
    gen = torch.Generator().manual_seed(1)
    replies = []
    for mask, w in zip(masks, weights):
        compact = {k: v + torch.randn(v.shape, generator=gen) for k, v in slicer.gather(state, mask).items()}
        replies.append(compact)
        agg.add(compact, mask, w)
    return agg.finalize(), replies


def test_hand_computed_nested_prefixes():
    # hidden layer of 8 units; nodes keep the first 2, 4 and 8 with weights 1, 2, 3: unit 0 is
    # held by all (sum / 6), unit 3 by the last two (their sum / 6), unit 7 by the last alone (/ 6)
    groups, slicer, state = _model()
    masks = NestedPrefixSampler().sample(groups, 1, 3, [0.25, 0.5, 1.0])
    out, replies = _aggregate(state, slicer, masks, [1.0, 2.0, 3.0], "zero-pad", precision="float64")
    w, b = "1.weight", replies  # (8, 6): row u is hidden unit u
    for unit, holders in ((0, (0, 1, 2)), (3, (1, 2)), (7, (2,))):
        expect = sum((1.0, 2.0, 3.0)[c] * b[c][w][unit].double() for c in holders) / 6.0
        assert torch.allclose(out[w][unit].double(), expect, atol=1e-6, rtol=0), (unit, holders)  # float32 out


@pytest.mark.parametrize("precision", ["float32", "float64"])
@pytest.mark.parametrize("untouched", ["keep", "zero"])
def test_equals_numpy_zero_padding(precision, untouched):
    groups, slicer, state = _model()
    masks = BernoulliSampler(0.4, scale=False, seed=3).sample(groups, 1, 4)  # some units held by nobody
    weights = [3.0, 1.0, 7.0, 2.0]
    out, replies = _aggregate(state, slicer, masks, weights, "zero-pad", precision=precision, untouched=untouched)
    for key, full in state.items():
        padded = np.zeros((len(masks), *full.shape))
        held = np.zeros((len(masks), *full.shape), dtype=bool)
        for c, (mask, compact) in enumerate(zip(masks, replies)):
            kept = dict(slicer.kept(mask, key, full.shape))
            index = np.ix_(*[kept[d].numpy() if d in kept else np.arange(n) for d, n in enumerate(full.shape)])
            padded[c][index] = compact[key].double().numpy()
            held[c][index] = True
        expect = np.tensordot(np.asarray(weights), padded, axes=1) / sum(weights)
        fallback = 0.0 if untouched == "zero" and key in slicer.coupled else full.double().numpy()
        expect = np.where(held.any(0), expect, fallback)
        assert np.allclose(out[key].double().numpy(), expect, atol=1e-6, rtol=1e-6), key


def test_equals_the_all_nodes_mean_over_zeros_where_every_entry_is_held():
    groups, slicer, state = _model()
    masks = NestedPrefixSampler().sample(groups, 1, 3, [0.25, 0.5, 1.0])
    weights = [5.0, 2.0, 9.0]
    out, _ = _aggregate(state, slicer, masks, weights, "zero-pad")
    zeros = {k: torch.zeros_like(v) for k, v in state.items()}
    agg = MaskedAggregator(zeros, slicer, denominator="all")
    gen = torch.Generator().manual_seed(1)
    for mask, w in zip(masks, weights):  # the same replies: slices of state plus the same noise
        agg.add({k: v + torch.randn(v.shape, generator=gen) for k, v in slicer.gather(state, mask).items()}, mask, w)
    reference = agg.finalize()
    assert all(torch.equal(out[k], reference[k]) for k in state)
