"""Folding output scales into consumer weights (IST evaluated as ResIST does)."""

import pytest
import torch

from fl_subnet.core.fold import fold_output_scales
from fl_subnet.core.masks import full_mask
from fl_subnet.core.spec import analyze
from fl_subnet.models import MLP, FlowerCNN
import functools

from fl_subnet.models.transformer import MHATransformer

CASES = [
    (lambda: MLP(6, [8, 5], 3), torch.randn(4, 6)),
    (lambda: FlowerCNN(1, 10, 8), torch.randn(3, 1, 8, 8)),
]


@pytest.mark.parametrize("factory, x", CASES)
def test_folded_model_equals_the_scaled_reference(factory, x):
    spec = analyze(factory, x[:1])
    torch.manual_seed(1)
    model = factory()
    state = model.state_dict()
    scales = {g.name: 1.0 / (i + 2) for i, g in enumerate(spec.groups)}  # a different 1/p per group
    mask = full_mask(spec.all_groups)
    ref = spec.reference(state, type(mask)(mask.indices, dict(scales))).eval()
    folded = factory()
    folded.load_state_dict(fold_output_scales(spec, state, scales))  # the user's own class loads it
    with torch.no_grad():
        torch.testing.assert_close(folded.eval()(x), ref(x), atol=1e-6, rtol=1e-5)
        assert not torch.allclose(model.eval()(x), ref(x))  # the scales matter


def test_hand_computed_mlp_fold():
    """MLP 2-3-1, hidden scale 1/2: the output layer's weight is halved, nothing else moves."""
    factory = lambda: MLP(2, [3], 1)  # noqa: E731
    spec = analyze(factory)
    state = factory().state_dict()
    (g,) = spec.groups
    out = fold_output_scales(spec, state, {g.name: 0.5})
    w_in, w_out = [k for k in state if k.endswith("weight")]
    assert torch.equal(out[w_out], state[w_out] * 0.5)
    assert all(out[k] is state[k] for k in state if k != w_out)


def test_unfoldable_consumer_and_unknown_group_are_named():
    factory = functools.partial(MHATransformer, 16, 20, num_classes=2)
    spec = analyze(factory, torch.zeros(1, 20, dtype=torch.long))
    heads = [g.name for g in spec.groups if g.kind == "heads"] or [spec.groups[0].name]
    with pytest.raises(ValueError, match="cannot fold an output scale into"):
        fold_output_scales(spec, factory().state_dict(), {heads[0]: 0.5})
    with pytest.raises(ValueError, match="unknown unit group"):
        fold_output_scales(spec, factory().state_dict(), {"nope": 0.5})
