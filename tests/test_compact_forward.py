"""Compact forward ≡ full forward with dropped units zeroed and kept ones scaled."""

import math

import torch
import torch.nn.functional as F

from fl_subnet.core.spec import analyze
from fl_subnet.core.samplers import BernoulliSampler, PartitionSampler

from conftest import mlp3, shallow
from fl_subnet.core.analysis import find_unit_groups
from fl_subnet.core.slicing import Slicer


def _dense(mask, group, xi):
    v = torch.zeros(group.size)
    v[mask.indices[group.name]] = 1.0 / xi
    return v


def test_mlp_compact_forward_matches_masked_full_forward():
    model = mlp3()
    groups = find_unit_groups(model)
    slicer = Slicer(groups)
    s = model.state_dict()
    x = torch.randn(9, 6)
    for xi in (0.3, 0.7, 1.0):
        mask = BernoulliSampler(xi, seed=4).sample(groups, 1, 1)[0]
        compact = analyze(mlp3, verify=False).build(slicer.gather(s, mask), mask)
        # independent full computation with plain tensor algebra
        d1, d2 = _dense(mask, groups[0], xi), _dense(mask, groups[1], xi)
        h1 = F.relu(x @ s["1.weight"].T + s["1.bias"]) * d1
        h2 = F.relu(h1 @ s["3.weight"].T + s["3.bias"]) * d2
        want = h2 @ s["5.weight"].T + s["5.bias"]
        assert torch.allclose(compact(x), want, atol=1e-6)
        # the compact module really is smaller
        n_compact = sum(p.numel() for p in compact.parameters())
        n_full = sum(p.numel() for p in model.parameters())
        assert xi == 1.0 or n_compact < n_full
        assert compact.get_submodule("1").out_features == mask.indices["1"].numel()


def test_shallow_relu_compact_forward_matches_paper_formula():
    model = shallow()
    groups = find_unit_groups(model)
    slicer = Slicer(groups)
    s = model.state_dict()
    x = F.normalize(torch.randn(11, 5), dim=1)
    W, a = s["hidden.weight"], s["readout.weight"][0]
    m = W.shape[0]
    for sampler, xi in ((BernoulliSampler(0.5, seed=9), 0.5),
                        (PartitionSampler(4, scale=4.0, seed=9), 0.25)):
        mask = sampler.sample(groups, 2, 1)[0]
        compact = analyze(shallow, verify=False).build(slicer.gather(s, mask), mask)
        # f(W, x) = 1/sqrt(m) * sum_r a_r relu(<w_r, x>) * mask_r / xi
        want = (F.relu(x @ W.T) * a * _dense(mask, groups[0], xi)).sum(1, keepdim=True) / math.sqrt(m)
        assert torch.allclose(compact(x), want, atol=1e-6)
        assert compact.hidden.weight.shape == (mask.indices["hidden"].numel(), 5)
        assert not compact.readout.weight.requires_grad


def test_compact_module_never_allocates_full_tensors():
    """Built on the meta device: the full-size weight of a huge model is never made."""
    from fl_subnet.models import MLP
    from fl_subnet.core.masks import Mask

    def huge():
        return MLP(1000, [200_000], 10)  # 200M-parameter first layer if it were allocated

    with torch.device("meta"):
        groups = find_unit_groups(huge())
    keep = torch.arange(0, 200_000, 1000)
    mask = Mask({"1": keep})
    compact_state = {
        "1.weight": torch.randn(200, 1000), "1.bias": torch.randn(200),
        "3.weight": torch.randn(10, 200), "3.bias": torch.randn(10),
    }
    model = analyze(huge, verify=False).build(compact_state, mask)
    assert model(torch.randn(2, 1000)).shape == (2, 10)
    assert all(p.device.type == "cpu" for p in model.parameters())
