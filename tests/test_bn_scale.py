"""Output scales on batch-normalised models follow HeteroFL's reference code.

HeteroFL's models (github.com/diaoenmao/HeteroFL-Computation-and-Communication-Efficient-
Federated-Learning-for-Heterogeneous-Clients, src/models/conv.py and resnet.py) put the
1/r ``Scaler`` between a parametric layer and its norm: ``conv -> scaler -> norm -> ReLU``,
``relu(n1(scaler(conv1(x))))`` in the ResNet block. BatchNorm in training mode normalises
each channel by the batch's own statistics, so a positive per-channel factor before it is
cancelled up to BatchNorm's eps. The references below are those lines written out in
plain torch on the compact slice (the first ⌈r·size⌉ units of each hidden group); the
compact model fl-subnet builds for the same mask must give the same training forward.
A unit dropped by its scale 0 is still removed where it is mixed (FjORD's widths).
"""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fl_subnet.core.compact import build_compact_graph
from fl_subnet.core.masks import Mask
from fl_subnet.core.spec import analyze
from fl_subnet.core.unit_scale import set_unit_scales

RATE = 0.25
EPS = 1e-5


class MLPBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.bn1 = nn.Linear(12, 32), nn.BatchNorm1d(32)
        self.fc2, self.bn2 = nn.Linear(32, 16), nn.BatchNorm1d(16)
        self.out = nn.Linear(16, 5)

    def forward(self, x):
        x = F.relu(self.bn1(self.fc1(x)))
        x = F.relu(self.bn2(self.fc2(x)))
        return self.out(x)


class CNNBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.n1 = nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.c2, self.n2 = nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.fc = nn.Linear(16 * 2 * 2, 4)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.n1(self.c1(x))), 2)
        x = F.max_pool2d(F.relu(self.n2(self.c2(x))), 2)
        return self.fc(torch.flatten(x, 1))


def _randomise(model):
    torch.manual_seed(3)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    return model


def _prefix_mask(spec, rate):
    """HeteroFL's nested sub-model: the first ⌈r·size⌉ units of every group, scale 1/r."""
    idx = {g.name: torch.arange(math.ceil(rate * g.size)) for g in spec.groups}
    return Mask(idx, {g.name: 1.0 / rate for g in spec.groups}, scale_before_norm=True)


def _bn(x, s, key):
    """Training-mode BatchNorm with batch statistics on the compact slice ``s``."""
    return F.batch_norm(x, None, None, s[f"{key}.weight"], s[f"{key}.bias"], training=True, eps=EPS)


def _mlp_reference(s, x, rate, scaler=True):
    """HeteroFL's order: linear -> scaler -> norm -> ReLU (the scaler acts while training)."""
    sc = (lambda h: h / rate) if scaler else (lambda h: h)
    h = F.relu(_bn(sc(F.linear(x, s["fc1.weight"], s["fc1.bias"])), s, "bn1"))
    h = F.relu(_bn(sc(F.linear(h, s["fc2.weight"], s["fc2.bias"])), s, "bn2"))
    return F.linear(h, s["out.weight"], s["out.bias"])


def _mlp_dropout(s, x, keep):
    """Inverted dropout after the activation: linear -> norm -> ReLU -> x / ξ -> next."""
    h = F.relu(_bn(F.linear(x, s["fc1.weight"], s["fc1.bias"]), s, "bn1")) / keep
    h = F.relu(_bn(F.linear(h, s["fc2.weight"], s["fc2.bias"]), s, "bn2")) / keep
    return F.linear(h, s["out.weight"], s["out.bias"])


def _cnn_reference(s, x, rate, scaler=True):
    sc = (lambda h: h / rate) if scaler else (lambda h: h)
    h = F.max_pool2d(F.relu(_bn(sc(F.conv2d(x, s["c1.weight"], s["c1.bias"], padding=1)), s, "n1")), 2)
    h = F.max_pool2d(F.relu(_bn(sc(F.conv2d(h, s["c2.weight"], s["c2.bias"], padding=1)), s, "n2")), 2)
    return F.linear(torch.flatten(h, 1), s["fc.weight"], s["fc.bias"])


CASES = {"mlp-bn1d": (MLPBN, (64, 12), _mlp_reference), "cnn-bn2d": (CNNBN, (32, 1, 8, 8), _cnn_reference)}


def _setup(cls, shape, seed):
    """A model with BatchNorm affine parameters away from 1 / 0, an input batch, the analysis."""
    model = _randomise(cls())
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(seed))
    return model, x, analyze(lambda: _randomise(cls()), x[:2], verify=False)


@pytest.mark.parametrize("name", sorted(CASES))
def test_heterofl_training_forward_equals_reference_scaler_before_the_norm(name):
    cls, shape, reference = CASES[name]
    model, x, spec = _setup(cls, shape, 1)
    assert {g.name for g in spec.groups} and all(g.size > 1 for g in spec.groups)
    mask = _prefix_mask(spec, RATE)
    compact_state = spec.gather(model.state_dict(), mask)
    compact = spec.build(compact_state, mask)
    assert compact.training
    with torch.no_grad():
        got = compact(x)
        want = reference(compact_state, x, RATE)
        # the scaler is cancelled by the norm: the reference without it agrees as closely
        without = reference(compact_state, x, RATE, scaler=False)
    assert (got - want).abs().max() <= 1e-3, (got - want).abs().max()
    assert (want - without).abs().max() <= 1e-3


@pytest.mark.parametrize("name", sorted(CASES))
def test_a_zero_scale_still_removes_the_unit_behind_a_norm(name):
    """FjORD's per-batch widths set a unit's scale to 0: it stays out of the next layer."""
    cls, shape, _ = CASES[name]
    model, x, spec = _setup(cls, shape, 2)
    full = Mask({g.name: torch.arange(g.size) for g in spec.groups}, scale_before_norm=True)
    state = model.state_dict()
    dyn = build_compact_graph(spec.graph, spec.resolved, spec.gather(state, full), spec.slicer, full,
                              blocks={b.name: b for b in spec.blocks}, dynamic=[g.name for g in spec.groups])
    half = {g.name: (torch.arange(g.size) < g.size // 2).float() * 3.0 for g in spec.groups}
    set_unit_scales(dyn, half)
    small = _prefix_mask(spec, 0.5)
    ref = spec.build(spec.gather(state, small), Mask(small.indices))
    with torch.no_grad():
        assert torch.allclose(dyn(x), ref(x), atol=1e-4), (dyn(x) - ref(x)).abs().max()


def test_inverted_dropout_keeps_its_scale_after_the_norm():
    """Dropout-family masks (scale_before_norm False): kept units are scaled by 1/ξ where
    they are mixed, after the norm and ReLU, as a dropout layer there would; the scale
    before the classifier is not cancelled by any norm."""
    model, x, spec = _setup(MLPBN, (64, 12), 5)
    keep = 0.5
    mask = Mask({g.name: torch.arange(0, g.size, 2) for g in spec.groups}, {g.name: 1.0 / keep for g in spec.groups})
    state = spec.gather(model.state_dict(), mask)
    with torch.no_grad():
        got = spec.build(state, mask)(x)
        want = _mlp_dropout(state, x, keep)
    assert (got - want).abs().max() <= 1e-5, (got - want).abs().max()
    with torch.no_grad():  # the HeteroFL placement would differ
        assert (got - _mlp_reference(state, x, keep)).abs().max() > 0.1


def test_the_placement_travels_with_the_mask():
    """HeteroFL's and FedRolex's samplers mark their masks; the flag survives the wire and
    a malformed one is refused naming the key."""
    from fl_subnet.core.samplers import BernoulliSampler, NestedPrefixSampler, RollingWindowSampler
    from fl_subnet.wire import mask_from_config, mask_to_config

    groups = analyze(MLPBN, torch.zeros(2, 12), verify=False).groups
    for sampler, before in ((NestedPrefixSampler(1.0, scale=True), True), (RollingWindowSampler(1.0), True),
                            (BernoulliSampler(0.5, seed=0), False)):
        (mask,) = sampler.sample(groups, 1, 1, [0.5]) if before else sampler.sample(groups, 1, 1)
        assert mask.scale_before_norm is before
        cfg = mask_to_config(mask, groups)
        assert ("scale-before-norm" in cfg) is before
        assert mask_from_config(cfg, groups).scale_before_norm is before
    with pytest.raises(ValueError, match="'scale-before-norm'"):
        mask_from_config({**cfg, "scale-before-norm": "yes"}, groups)
