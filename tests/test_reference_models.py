"""The extra reference models: shapes, fx-traceability, size, and torch-pruning as a reference."""

import pytest
import torch
import torch.fx

from fl_subnet.models import (
    CNNBN,
    FlowerCNN,
    HandAttentionTransformer,
    MHATransformer,
    PreActResNet,
    resnet18_shaped,
)
from models_extra import ResidualMLP, UnsupportedOnPath
from torch_pruning_ref import prune_with_torch_pruning, torch_pruning_groups


def _cases():
    g = torch.Generator().manual_seed(0)
    img = torch.randn(2, 1, 8, 8, generator=g)
    tokens = torch.randint(0, 16, (2, 8), generator=g)
    return {
        "flower_cnn": (lambda: FlowerCNN(), img, (2, 10)),
        "flower_cnn_rgb32": (
            lambda: FlowerCNN(3, 10, 32),
            torch.randn(2, 3, 32, 32, generator=g),
            (2, 10),
        ),
        "cnn_bn": (lambda: CNNBN(), img, (2, 10)),
        "preact": (lambda: PreActResNet(), img, (2, 10)),
        "preact_2x3": (lambda: PreActResNet(1, 5, (8, 16, 32), 2), img, (2, 5)),
        "hand_attention": (lambda: HandAttentionTransformer(), tokens, (2, 2)),
        "mha": (lambda: MHATransformer(), tokens, (2, 2)),
        "residual_mlp": (lambda: ResidualMLP(), torch.randn(2, 16, generator=g), (2, 4)),
        "unsupported": (lambda: UnsupportedOnPath(), torch.randn(2, 8, generator=g), (2, 4)),
    }


CASES = _cases()


@pytest.mark.parametrize("name", sorted(CASES))
def test_forward_shape_and_fx_trace(name):
    factory, x, shape = CASES[name]
    torch.manual_seed(0)
    model = factory().eval()
    y = model(x)
    assert tuple(y.shape) == shape
    gm = torch.fx.symbolic_trace(model)
    torch.testing.assert_close(gm(x), y)


def test_resnet18_shaped_size():
    n = sum(p.numel() for p in resnet18_shaped().parameters())
    assert 10_000_000 <= n <= 12_000_000
    y = resnet18_shaped().eval()(torch.randn(1, 3, 32, 32))
    assert tuple(y.shape) == (1, 10)


def _keep(n, drop):
    return torch.tensor([i for i in range(n) if i not in drop])


def test_torch_pruning_flower_cnn_conv2():
    torch.manual_seed(0)
    model = FlowerCNN(image_size=8)
    s = 2
    x = torch.randn(2, 1, 8, 8)
    drop = [1, 3]
    sd = prune_with_torch_pruning(model, x, "conv2", drop)
    keep = _keep(16, drop)
    assert sd["conv2.weight"].shape == (14, 6, 3, 3)
    assert sd["fc1.weight"].shape == (120, 14 * s * s)
    w2 = model.conv2.weight.detach()
    torch.testing.assert_close(sd["conv2.weight"], w2.index_select(0, keep))
    torch.testing.assert_close(sd["conv2.bias"], model.conv2.bias.detach().index_select(0, keep))
    # Flatten is channel-major: channel c owns columns c*s*s .. c*s*s + s*s - 1.
    cols = (keep[:, None] * s * s + torch.arange(s * s)[None, :]).reshape(-1)
    torch.testing.assert_close(sd["fc1.weight"], model.fc1.weight.detach().index_select(1, cols))
    torch.testing.assert_close(sd["fc1.bias"], model.fc1.bias.detach())
    torch.testing.assert_close(sd["conv1.weight"], model.conv1.weight.detach())
    assert model.conv2.weight.shape == (16, 6, 3, 3)  # the original is untouched


def test_torch_pruning_cnnbn_conv1():
    torch.manual_seed(0)
    model = CNNBN(width=8)
    model.train()
    x = torch.randn(4, 1, 8, 8)
    model(x)  # non-trivial running statistics
    drop = [1, 3]
    sd = prune_with_torch_pruning(model, x, "conv1", drop)
    keep = _keep(8, drop)
    assert sd["conv1.weight"].shape == (6, 1, 3, 3)
    assert sd["bn1.running_mean"].shape == (6,)
    assert sd["conv2.weight"].shape == (8, 6, 3, 3)
    w1 = model.conv1.weight.detach()
    torch.testing.assert_close(sd["conv1.weight"], w1.index_select(0, keep))
    for key in ("weight", "bias", "running_mean", "running_var"):
        ref = getattr(model.bn1, key).detach().index_select(0, keep)
        torch.testing.assert_close(sd[f"bn1.{key}"], ref)
    w2 = model.conv2.weight.detach()
    torch.testing.assert_close(sd["conv2.weight"], w2.index_select(1, keep))
    assert model.training  # prune_with_torch_pruning works on a copy


def test_torch_pruning_groups_residual():
    groups = torch_pruning_groups(ResidualMLP(), torch.randn(2, 16))
    assert {"fc_in", "fc2", "fc1", "head"} in groups
    assert {"fc1", "fc2"} in groups
    groups = torch_pruning_groups(PreActResNet(), torch.randn(2, 1, 8, 8))
    stem = next(g for g in groups if "stem" in g)
    assert {"stem", "stages.0.0.conv2", "stages.1.0.conv1", "stages.1.0.shortcut"} <= stem
