"""The compact-graph template cache: a sub-model built from a cached template (same
structure, another mask) equals one built from scratch, computes the reference forward,
and shares no state with its siblings."""

import functools

import pytest
import torch

import fl_subnet.core.compact as compact
from fl_subnet.core.masks import Mask
from fl_subnet.core.spec import analyze
from fl_subnet.core.unit_scale import UnitScale, set_unit_scales, unit_scales
from fl_subnet.models.cnn import FlowerCNN
from fl_subnet.models.mlp import MLP
from fl_subnet.models.resnet import PreActResNet
from fl_subnet.models.transformer import MHATransformer

CASES = {
    "mlp": (functools.partial(MLP, 6, [16, 12], 3), lambda: torch.randn(5, 6)),
    "flower-cnn": (functools.partial(FlowerCNN, 1, 10, 8), lambda: torch.randn(3, 1, 8, 8)),
    "resnet": (functools.partial(PreActResNet, 1, 10, (8, 12), 2), lambda: torch.randn(3, 1, 8, 8)),
    "mha-transformer": (functools.partial(MHATransformer, 16, 8, 16, 4, 24, 2, 2),
                        lambda: torch.randint(0, 16, (3, 8))),
}


def _mask(spec, seed: int, skip=()) -> Mask:
    """Half of every group's units, random which, and a random positive per-unit scale:
    two seeds give masks of the same structure and different values."""
    gen = torch.Generator().manual_seed(seed)
    indices, scale = {}, {}
    for g in spec.groups:
        k = max(1, g.size // 2)
        indices[g.name] = torch.randperm(g.size, generator=gen)[:k].sort().values
        scale[g.name] = 0.5 + torch.rand(k, generator=gen)
    return Mask(indices, scale, skip=frozenset(skip))


def _fresh(spec, state, mask):
    """The same build with the template cache emptied: the structure is compiled anew."""
    compact._TEMPLATES.pop(spec.graph, None)
    return spec.build(state, mask)


@pytest.mark.parametrize("name", sorted(CASES))
def test_a_cached_template_builds_the_same_model_as_a_fresh_build(name):
    factory, example = CASES[name]
    torch.manual_seed(0)
    spec = analyze(factory, example(), verify=False)
    full = factory().state_dict()
    skip = [spec.blocks[-1].name] if spec.blocks else []
    first, second = _mask(spec, 1, skip), _mask(spec, 2, skip)
    assert any(not torch.equal(first.indices[g], second.indices[g]) for g in first.indices)
    compact._TEMPLATES.pop(spec.graph, None)
    spec.build(spec.gather(full, first), first)
    cached = spec.build(spec.gather(full, second), second)  # from the first mask's template
    assert len(compact._TEMPLATES[spec.graph]) == 1, "the second build compiled a new template"
    fresh = _fresh(spec, spec.gather(full, second), second)
    assert type(cached) is not type(fresh)  # really two different compiled templates
    x = example()
    cached.eval(), fresh.eval()
    reference = spec.reference(full, second).eval()
    with torch.no_grad():
        got, want, ref = cached(x), fresh(x), reference(x)
    assert torch.equal(got, want)
    assert torch.allclose(got, ref, atol=1e-5, rtol=1e-4)
    assert cached.state_dict().keys() == fresh.state_dict().keys()
    for key, value in fresh.state_dict().items():
        assert torch.equal(cached.state_dict()[key], value), key
    scales, fresh_scales = unit_scales(cached), unit_scales(fresh)
    assert scales.keys() == fresh_scales.keys() and scales
    for g in scales:
        assert torch.equal(scales[g], fresh_scales[g]), g


def test_models_from_one_template_share_no_state():
    factory, example = CASES["mlp"]
    spec = analyze(factory, example(), verify=False)
    full = factory().state_dict()
    mask = _mask(spec, 3)
    a = spec.build(spec.gather(full, mask), mask)
    b = spec.build(spec.gather(full, mask), mask)
    assert type(a) is type(b)  # one compiled forward
    x = example()
    before = b(x).detach().clone()
    with torch.no_grad():
        for p in a.parameters():
            p.mul_(2.0)
    g = spec.groups[0].name
    set_unit_scales(a, {g: torch.full((int(mask.indices[g].numel()),), 7.0)})
    a.eval()
    assert torch.equal(b(x), before)
    assert not torch.equal(unit_scales(a)[g], unit_scales(b)[g])
    assert {id(p) for p in a.parameters()}.isdisjoint(id(p) for p in b.parameters())
    sites_a = [m for m in a.modules() if isinstance(m, UnitScale)]
    sites_b = [m for m in b.modules() if isinstance(m, UnitScale)]
    assert sites_a and all(sa is not sb and sa.plan is not sb.plan for sa, sb in zip(sites_a, sites_b))
    assert a.training is False and b.training is True


class _Tagged(torch.nn.Module):
    """A model whose layer carries a mutable Python attribute."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = torch.nn.Linear(4, 8), torch.nn.Linear(8, 2)
        self.fc1.tags = ["fc1"]

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def test_a_mutable_attribute_is_not_shared_between_built_models():
    spec = analyze(_Tagged, torch.randn(2, 4), verify=False)
    full = _Tagged().state_dict()
    mask = _mask(spec, 4)
    a = spec.build(spec.gather(full, mask), mask)
    b = spec.build(spec.gather(full, mask), mask)
    a.fc1.tags.append(1)
    assert b.fc1.tags == ["fc1"]


def test_the_template_cache_is_bounded(monkeypatch):
    monkeypatch.setattr(compact, "MAX_TEMPLATES", 3)
    factory, example = CASES["flower-cnn"]  # its flatten's size follows the kept channels
    spec = analyze(factory, example(), verify=False)
    full = factory().state_dict()
    compact._TEMPLATES.pop(spec.graph, None)
    for k in range(1, 7):  # a different kept count: another view size, another structure
        mask = Mask({g.name: torch.arange(k) for g in spec.groups}, {g.name: 2.0 for g in spec.groups})
        spec.build(spec.gather(full, mask), mask)
        assert len(compact._TEMPLATES[spec.graph]) == min(k, 3)
    mask = Mask({g.name: torch.arange(3) for g in spec.groups}, {g.name: 2.0 for g in spec.groups})
    spec.build(spec.gather(full, mask), mask)  # evicted (least recently used): rebuilt, still 3
    assert len(compact._TEMPLATES[spec.graph]) == 3
