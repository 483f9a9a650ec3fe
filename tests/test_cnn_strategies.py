"""Strategies on a CNN through the in-process Grid: example input on the wire, custom
record keys end to end, bytes equal to the compact slices' size."""

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord
from torch.utils.data import TensorDataset

from fl_subnet.clients import make_client_app
from fl_subnet.experiments.inprocess_grid import InProcessGrid
from fl_subnet.models import FlowerCNN
from fl_subnet.strategies import IST, FederatedDropout
from fl_subnet.wire import arrays_to_state

EXAMPLE = torch.zeros(1, 1, 8, 8)


def load_data(context):
    pid = int(context.node_config["partition-id"])
    g = torch.Generator().manual_seed(7 + pid)
    x = torch.randn(24, 1, 8, 8, generator=g)
    return TensorDataset(x, (x.mean((1, 2, 3)) > 0).long()), None


def _run(strategy, nodes=2, rounds=2):
    torch.manual_seed(0)
    init = ArrayRecord(FlowerCNN().state_dict())
    grid = InProcessGrid(make_client_app(FlowerCNN, load_data), nodes)
    cfg = ConfigRecord({"local-steps": 2, "lr": 0.05, "batch-size": 8, "loss": "cross-entropy", "seed": 1})
    return strategy.start(grid=grid, initial_arrays=init, num_rounds=rounds, train_config=cfg), init


@pytest.mark.parametrize("make", [
    lambda **kw: IST(FlowerCNN, 2, example_input=EXAMPLE, seed=3, fraction_evaluate=0.0, **kw),
    lambda **kw: FederatedDropout(FlowerCNN, 0.5, example_input=EXAMPLE, seed=3, fraction_evaluate=0.0,
                                  min_available_nodes=2, **kw),
])
def test_cnn_trains_and_custom_record_keys_give_the_same_model(make):
    default, init = _run(make())
    custom, _ = _run(make(arrayrecord_key="params", configrecord_key="cfg"))
    a, b, start = arrays_to_state(default.arrays), arrays_to_state(custom.arrays), arrays_to_state(init)
    assert all(torch.equal(a[k], b[k]) for k in a)  # same wire contract under any record names
    assert any(not torch.equal(a[k], start[k]) for k in a)  # it trained
    for m in (default.train_metrics_clientapp[2], custom.train_metrics_clientapp[2]):
        assert m["num-replies"] == 2 and m["num-rejected"] == 0


def test_bytes_up_equal_the_compact_slices():
    strategy = IST(FlowerCNN, 2, example_input=EXAMPLE, seed=3, fraction_evaluate=0.0)
    result, _ = _run(strategy, rounds=1)
    masks = strategy.sampler.sample(strategy.groups, 1, 2)
    full = FlowerCNN().state_dict()
    raw = sum(4 * t.numel() for m in masks for t in strategy.spec.gather(full, m).values())
    up = result.train_metrics_clientapp[1]["bytes-up"]
    assert up == raw  # fl-subnet's ClientApp replies packed: raw float32 bytes, no header
    assert up < 0.6 * 2 * sum(4 * t.numel() for t in full.values())  # p = 2: about half each
