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


def pytest_collection_modifyitems(config, items):
    """Run the slow tests (real Flower runs, mostly waiting on processes) first: with
    ``pytest -n 2`` (make test) they then overlap each other and the fast tests fill the
    gaps, instead of the longest ones starting last and running alone."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)  # stable: file order kept within each
