"""FlatMap: a mask's kept positions over the concatenated float tensors equal the
per-tensor index maps of the Slicer laid end to end, and gathering at them gives the
packed compact slice."""

import functools
import math

import pytest
import torch

from fl_subnet.core.flat import FlatMap
from fl_subnet.core.masks import Mask
from fl_subnet.core.slicing import flat_positions
from fl_subnet.core.spec import analyze
from fl_subnet.models.cnn import CNNBN, FlowerCNN
from fl_subnet.models.mlp import MLP
from fl_subnet.models.resnet import PreActResNet
from fl_subnet.models.transformer import HandAttentionTransformer, MHATransformer

CASES = {
    "mlp": (functools.partial(MLP, 6, [16, 12], 3), (5, 6), torch.float32),
    "flower-cnn": (functools.partial(FlowerCNN, 1, 10, 8), (3, 1, 8, 8), torch.float32),
    "cnn-bn": (functools.partial(CNNBN, 1, 10, 8), (3, 1, 8, 8), torch.float32),
    "resnet": (functools.partial(PreActResNet, 1, 10, (8, 12), 2), (3, 1, 8, 8), torch.float32),
    "mha-transformer": (functools.partial(MHATransformer, 16, 8, 16, 4, 24, 2, 2), (3, 8), torch.int64),
    "hand-transformer": (functools.partial(HandAttentionTransformer, 16, 8, 16, 4, 24, 2, 2), (3, 8), torch.int64),
}


def _spec(name):
    factory, shape, dtype = CASES[name]
    example = torch.zeros(shape, dtype=dtype)
    return factory, analyze(factory, example, verify=False)


def _masks(spec, seed):
    """Random subsets (sometimes empty of a group's units, sometimes all), over every
    group a mask may name, with and without a skipped block."""
    gen = torch.Generator().manual_seed(seed)
    for trial in range(6):
        indices = {}
        for g in spec.all_groups:
            k = [0, 1, g.size // 3, g.size // 2, g.size][(trial + len(indices)) % 5] if trial < 5 else g.size
            indices[g.name] = torch.randperm(g.size, generator=gen)[:max(k, 1)].sort().values
        skip = frozenset([spec.blocks[trial % len(spec.blocks)].name]) if spec.blocks and trial % 2 else frozenset()
        yield Mask(indices, skip=skip)


def _reference(spec, shapes, mask):
    """The Slicer's per-tensor flat positions, each offset by its key's start."""
    skipped = spec.slicer.skipped_keys(mask)
    parts, offset = [], 0
    for key in sorted(shapes):
        if key not in skipped:
            parts.append(flat_positions(spec.slicer.kept(mask, key, shapes[key]), shapes[key], torch.int64) + offset)
        offset += math.prod(shapes[key])
    return torch.cat(parts)


@pytest.mark.parametrize("name", sorted(CASES))
def test_kept_positions_equal_the_slicers_per_tensor_maps(name):
    factory, spec = _spec(name)
    state = factory().state_dict()
    shapes = {k: tuple(v.shape) for k, v in state.items() if v.is_floating_point()}
    flat = FlatMap(spec.slicer, shapes)
    assert flat.numel == sum(math.prod(s) for s in shapes.values())
    whole = torch.cat([state[k].reshape(-1) for k in flat.keys])
    for mask in _masks(spec, 0):
        got = flat.kept(mask)
        assert torch.equal(got, _reference(spec, shapes, mask))
        # gathering at the positions is the compact slice, tensors end to end in sorted-key order
        compact = spec.gather(state, mask)
        want = torch.cat([compact[k].reshape(-1) for k in sorted(compact) if k in shapes])
        assert torch.equal(whole[got], want)


def test_split_views_every_key_in_its_shape():
    factory, spec = _spec("cnn-bn")
    state = factory().state_dict()
    shapes = {k: tuple(v.shape) for k, v in state.items() if v.is_floating_point()}
    flat = FlatMap(spec.slicer, shapes)
    whole = torch.cat([state[k].reshape(-1) for k in flat.keys])
    for key, view in flat.split(whole).items():
        assert torch.equal(view, state[key]), key


def test_an_invalid_mask_is_refused():
    _, spec = _spec("mlp")
    flat = FlatMap(spec.slicer, {"1.weight": (16, 6)})
    g = spec.groups[0]
    with pytest.raises(ValueError):
        flat.kept(Mask({g.name: torch.tensor([g.size + 3])}))


def test_unlisted_and_shared_positions_follow_dim_keep():
    """A dim longer than its group (unlisted positions: always kept), a position shared
    by two units (kept while either is), and two groups on one tensor's two dims."""
    from fl_subnet.core.groups import Coupling, UnitGroup
    from fl_subnet.core.slicing import Slicer

    a = UnitGroup("a", 3, (Coupling("w", 0, torch.tensor([0, 1, 1, 2]), torch.tensor([0, 1, 2, 2])),))
    b = UnitGroup("b", 2, (Coupling("w", 1),))  # identity over the first 2 of 4 columns
    slicer = Slicer([a, b])
    shapes = {"w": (5, 4), "v": (3,)}
    flat = FlatMap(slicer, shapes)
    spec = type("S", (), {"slicer": slicer})()
    for ka in ([0], [1], [2], [0, 2], [0, 1, 2]):
        for kb in ([0], [1], [0, 1]):
            mask = Mask({"a": torch.tensor(ka), "b": torch.tensor(kb)})
            assert torch.equal(flat.kept(mask), _reference(spec, shapes, mask)), (ka, kb)


@pytest.mark.parametrize("name", sorted(CASES))
def test_compact_shapes_equal_the_slicers(name):
    """The flat pass's compact shapes (one cumulative sum over the dim-position rows) equal
    the Slicer's per-tensor ones, for every key of the state (float keys from the map,
    the others from the slicer), skipped blocks included."""
    factory, spec = _spec(name)
    state = factory().state_dict()
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    flat = FlatMap(spec.slicer, {k: s for k, s in shapes.items() if state[k].is_floating_point()})
    for mask in [*_masks(spec, 1), Mask({g.name: torch.arange(g.size) for g in spec.all_groups})]:
        fresh = Mask(dict(mask.indices), skip=mask.skip)  # no shapes cached by the other path
        want = spec.slicer.compact_shapes(fresh, shapes)
        got = flat.compact_shapes(mask, shapes)
        assert list(got) == list(shapes) and got == want
        assert got == {k: tuple(t.shape) for k, t in spec.gather(state, mask).items()} | {
            k: want[k] for k in spec.slicer.skipped_keys(mask)}
