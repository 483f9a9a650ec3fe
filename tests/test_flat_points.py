"""The whole-update rules on one flat vector per reply (``use_flat``) equal the same rules
on one entry per tensor: same new global model, same held entries, same next center, over
random partial masks (skipped depth blocks included) and several rounds."""

import pytest
import torch

from fl_subnet.core.flat import FlatMap
from fl_subnet.core.robust_direction import make_center
from fl_subnet.core.rules import make_rule

from test_flat import CASES, _masks, _spec

RULES = {
    "centered-clip": {"clip_iterations": 3},
    "bucketing": {"bucket_size": 2, "seed": 3},
    "geometric-median": {},
    "multi-krum": {"krum_rogues": 1},
}


def _double(state):
    return {k: v.double() if v.is_floating_point() else v.clone() for k, v in state.items()}


@pytest.mark.parametrize("rule", sorted(RULES))
@pytest.mark.parametrize("name", ["mlp", "cnn-bn", "resnet", "mha-transformer"])
def test_flat_points_equal_per_tensor_points(name, rule):
    factory, spec = _spec(name)
    torch.manual_seed(0)
    state = _double(factory().state_dict())
    shapes = {k: tuple(v.shape) for k, v in state.items() if v.is_floating_point()}
    flat = FlatMap(spec.slicer, shapes)
    gen = torch.Generator().manual_seed(1)
    centers = {True: None, False: None}
    for server_round, seed in enumerate((5, 6)):
        masks = list(_masks(spec, seed))
        replies = []
        for i, mask in enumerate(masks):
            compact = spec.slicer.gather(state, mask)
            scale = 10.0 if i == 2 else 0.1  # one far reply: clipped, down-weighted, left out
            replies.append(({k: t + scale * torch.randn(t.shape, generator=gen, dtype=t.dtype)
                             if t.is_floating_point() else t for k, t in compact.items()}, mask))
        out = {}
        for use in (True, False):
            agg = make_rule(rule, state, spec.slicer, flat=flat if use else None, center=centers[use],
                            server_round=server_round, **RULES[rule])
            assert (agg.flat is flat) == use
            for compact, mask in replies:
                agg.add(compact, mask)
            out[use] = (agg.finalize(), agg.held(), getattr(agg, "next_center", None))
            centers[use] = make_center(agg, centers[use])
        (new_f, held_f, center_f), (new_k, held_k, center_k) = out[True], out[False]
        assert new_f.keys() == new_k.keys() and held_f.keys() == held_k.keys()
        for k in new_k:
            assert new_f[k].shape == new_k[k].shape and new_f[k].dtype == new_k[k].dtype
            torch.testing.assert_close(new_f[k], new_k[k], rtol=0, atol=1e-12)
        for k in held_k:  # broadcastable to the key's shape (MaskedAggregator.held)
            shape = state[k].shape
            assert torch.equal(held_f[k].expand(shape), held_k[k].expand(shape)), k
        if center_k is not None:
            for k in center_k:
                torch.testing.assert_close(center_f[k], center_k[k], rtol=0, atol=1e-12)
        moved = sum(int((new_k[k] != state[k]).sum()) for k in shapes)
        assert moved > 0  # the round changed the model
        state = new_k


def test_a_map_of_other_tensors_is_ignored():
    factory, spec = _spec("mlp")
    state = factory().state_dict()
    other = FlatMap(spec.slicer, {k: tuple(v.shape) for k, v in state.items() if k != "1.bias"})
    assert make_rule("centered-clip", state, spec.slicer, flat=other).flat is None
    assert "mlp" in CASES


def test_use_flat_comes_before_the_first_reply():
    factory, spec = _spec("mlp")
    state = factory().state_dict()
    flat = FlatMap(spec.slicer, {k: tuple(v.shape) for k, v in state.items()})
    agg = make_rule("multi-krum", state, spec.slicer)
    mask = next(iter(_masks(spec, 0)))
    agg.add(spec.slicer.gather(state, mask), mask)
    with pytest.raises(RuntimeError, match="before the first add"):
        agg.use_flat(flat)
