"""p = 1, τ = 1, one Bernoulli mask ≡ one SGD step of the full model under that dropout mask."""

import pytest
import torch
import torch.nn.functional as F

from fl_subnet.core.aggregate import MaskedAggregator
from fl_subnet.core.spec import analyze
from fl_subnet.core.samplers import BernoulliSampler


def _sgd_step(model, x, y, lr, regression):
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
    out = model(x)
    loss = 0.5 * (out - y).pow(2).mean() if regression else F.cross_entropy(out, y)
    opt.zero_grad()
    loss.backward()
    opt.step()


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-6), (torch.float64, 1e-12)])
@pytest.mark.parametrize("xi", [0.3, 0.8])
def test_one_masked_step_equals_dropout_sgd_step(model_and_factory, xi, dtype, tol):
    """In float64 to 1e-12: the output scale 1/ξ is applied in the model's dtype (1/0.3
    rounded to float32's 3.3333332538604736 moved the step by about 1e-8)."""
    model, factory32, groups, slicer = model_and_factory
    factory = lambda: factory32().to(dtype)  # noqa: E731
    regression = model.__class__.__name__ == "ShallowReLU"
    d_in = 5 if regression else 6
    x = F.normalize(torch.randn(16, d_in, dtype=dtype), dim=1)
    y = torch.randn(16, 1, dtype=dtype) if regression else torch.randint(0, 3, (16,))
    state = {k: v.clone().to(dtype) if v.is_floating_point() else v.clone() for k, v in model.state_dict().items()}
    mask = BernoulliSampler(xi, seed=21).sample(groups, 1, 1)[0]

    # (a) the protocol: compact slice, one local step, folded back
    compact = analyze(factory, x[:2], verify=False).build(slicer.gather(state, mask), mask)
    _sgd_step(compact, x, y, lr=0.2, regression=regression)
    agg = MaskedAggregator(state, slicer)
    agg.add({k: v.detach() for k, v in compact.state_dict().items()}, mask, weight=16)
    folded = agg.finalize()

    # (b) the full model with the same dropout mask applied (units zeroed, kept scaled 1/ξ)
    full = factory()
    full.load_state_dict(state)
    for g in groups:
        dense = torch.zeros(g.size, dtype=dtype)
        dense[mask.indices[g.name]] = 1.0 / xi
        for c in g.consumers:
            full.get_submodule(c).register_forward_pre_hook(lambda _m, a, d=dense: (a[0] * d,))
    _sgd_step(full, x, y, lr=0.2, regression=regression)

    for key, value in full.state_dict().items():
        assert folded[key].dtype == value.dtype, key
        assert (folded[key] - value).abs().max() <= tol, (key, (folded[key] - value).abs().max())
    # and the step really moved the kept units
    assert any(not torch.equal(folded[k], state[k]) for k in state)

