"""Shared fixtures: small reference models and their unit groups."""

import pytest
import torch

from fl_subnet.core.analysis import find_unit_groups
from fl_subnet.models import MLP, ShallowReLU
from fl_subnet.core.slicing import Slicer


def mlp3() -> MLP:
    torch.manual_seed(0)
    return MLP(6, [10, 7], 3)


def shallow() -> ShallowReLU:
    return ShallowReLU(5, 40, out=1, seed=3)


@pytest.fixture(params=["mlp3", "shallow"])
def model_and_factory(request):
    factory = {"mlp3": mlp3, "shallow": shallow}[request.param]
    model = factory()
    groups = find_unit_groups(model)
    return model, factory, groups, Slicer(groups)
