"""MaskedAggregator.finalize builds each tensor row chunk by row chunk: the result must not
depend on the chunk size (bit for bit), whatever the precision, denominator or fallback."""

import pytest
import torch

import fl_subnet.core.aggregate as aggregate
from fl_subnet.core.analysis import find_unit_groups
from fl_subnet.core.samplers import BernoulliSampler, PartitionSampler
from fl_subnet.core.slicing import Slicer
from fl_subnet.models import MLP


def _round(slicer, state, masks, **kw):
    gen = torch.Generator().manual_seed(3)
    agg = aggregate.MaskedAggregator(state, slicer, **kw)
    for i, m in enumerate(masks):
        compact = {k: v + 0.3 * torch.randn(v.shape, generator=gen) for k, v in slicer.gather(state, m).items()}
        rows = {"5.weight": torch.tensor([0, 2])} if i == 0 else None
        agg.add(compact, m, 0.7 + 13.1 * i, rows=rows)
    return agg.finalize(), agg.held()


@pytest.mark.parametrize("sampler", [BernoulliSampler(0.5, seed=1), PartitionSampler(3, seed=1)])
@pytest.mark.parametrize("kw", [{}, {"precision": "float64"}, {"untouched": "zero"}, {"denominator": "all"}])
def test_chunk_size_does_not_change_the_result(monkeypatch, sampler, kw):
    torch.manual_seed(0)
    model = MLP(11, [40, 30], 4)
    groups = find_unit_groups(model)
    slicer = Slicer(groups)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    masks = sampler.sample(groups, 1, 4)
    whole, whole_held = _round(slicer, state, masks, **kw)
    for entries in (1, 7, 100):
        monkeypatch.setattr(aggregate, "CHUNK_ENTRIES", entries)
        monkeypatch.setattr(aggregate, "WHOLE_ENTRIES", 0)
        out, held = _round(slicer, state, masks, **kw)
        for key, t in whole.items():
            assert t.dtype == out[key].dtype and torch.equal(t, out[key]), (entries, key)
        for key, h in whole_held.items():
            assert torch.equal(h.expand_as(state[key]), held[key].expand_as(state[key])), (entries, key)


def test_row_chunks_cover_every_row_once():
    assert aggregate.row_chunks(()) == [(0, 0)]
    assert aggregate.row_chunks((5,), 2) == [(0, 5)]
    assert aggregate.row_chunks((5, 3), 7) == [(0, 2), (2, 4), (4, 5)]
    assert aggregate.row_chunks((4, 10), 3) == [(0, 1), (1, 2), (2, 3), (3, 4)]
