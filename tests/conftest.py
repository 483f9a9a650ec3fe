"""Shared fixtures: small reference models and their unit groups; the partition cache
(fl_subnet.experiments.data) of a test session in a folder of its own, not the user's."""

import os
import tempfile

import pytest
import torch

# set before any test imports the data module; subprocesses (flwr run, SuperNodes) inherit it
os.environ.setdefault("FL_SUBNET_CACHE", tempfile.mkdtemp(prefix="fl-subnet-test-cache-"))

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


# The longest tests (each over a minute on 2 cores, mostly waiting on Flower's processes),
# longest first: started first, they overlap each other and the short tests fill the gaps.
LONGEST_FIRST = ("test_slow_node.py", "test_install_app.py", "test_deployment_heterofl.py", "test_bench_client.py",
                 "test_deployment.py", "test_tls.py", "test_simulation_models.py", "test_example_app.py")


def pytest_collection_modifyitems(config, items):
    """Run the longest tests first, then the other slow ones, then the rest (file order
    kept within each). With ``pytest -n N --maxschedchunk 1`` (make test) each worker
    takes the next test when it is free, so the long ones start at once on every worker
    instead of the last one starting alone near the end."""
    def rank(item) -> tuple[int, int]:
        name = item.path.name
        if name in LONGEST_FIRST:
            return 0, LONGEST_FIRST.index(name)
        return (1 if item.get_closest_marker("slow") is not None else 2), 0

    items.sort(key=rank)  # stable
