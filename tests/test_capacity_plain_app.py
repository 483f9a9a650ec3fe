"""Capacity strategies (HeteroFL, FedRolex, FjORD) with a plain Flower ClientApp: only
``@app.train()`` and ``@app.evaluate()``, as in Flower's quickstart, with
``compact_model(msg, Net)``. No node is sent a message it cannot answer, every reply is
accepted, the tiers go to the nodes by node order, and the strategy says so once."""

import logging
import math

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from torch import nn

from fl_subnet.clients import compact_model
from fl_subnet.experiments.inprocess_grid import InProcessGrid
from fl_subnet.strategies import FedRolex, FjORD, HeteroFL

TIERS = (0.25, 0.5, 1.0)
HIDDEN = 16
NODE_IDS = [3005, 1007, 2002, 4001, 1500, 2600]  # node order (sorted ids) differs from partition order


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(8, HIDDEN)
        self.fc2 = nn.Linear(HIDDEN, 3)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def _data(context: Context):
    g = torch.Generator().manual_seed(int(context.node_config["partition-id"]))
    return torch.randn(20, 8, generator=g), torch.randint(0, 3, (20,), generator=g)


def plain_client_app(widths: dict[int, int]) -> ClientApp:
    """Flower's quickstart ClientApp with the one-line fl-subnet change: no query handler."""
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context):
        model = compact_model(msg, Net)
        widths[context.node_id] = model.fc1.out_features
        x, y = _data(context)
        opt = torch.optim.SGD(model.parameters(), lr=msg.content["config"]["lr"])
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        metrics = MetricRecord({"train_loss": loss.item(), "num-examples": len(y)})
        return Message(RecordDict({"arrays": ArrayRecord(model.state_dict()), "metrics": metrics}), reply_to=msg)

    @app.evaluate()
    def evaluate(msg: Message, context: Context):
        model = Net()
        model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
        x, y = _data(context)
        with torch.no_grad():
            loss = float(nn.functional.cross_entropy(model(x), y))
        return Message(RecordDict({"metrics": MetricRecord({"eval_loss": loss, "num-examples": len(y)})}),
                       reply_to=msg)

    return app


class RecordingGrid(InProcessGrid):
    """Counts QUERY messages and error replies."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.queries = 0
        self.errors = 0

    def send_and_receive(self, messages, *args, **kwargs):
        messages = list(messages)
        self.queries += sum(m.metadata.message_type == MessageType.QUERY for m in messages)
        replies = list(super().send_and_receive(messages, *args, **kwargs))
        self.errors += sum(r.has_error() for r in replies)
        return replies


@pytest.mark.parametrize("cls", [HeteroFL, FedRolex, FjORD])
def test_plain_clientapp_gets_tiers_by_node_order_without_errors(cls, caplog):
    widths: dict[int, int] = {}
    n = len(NODE_IDS)
    configs = [{"partition-id": i, "num-partitions": n} for i in range(n)]
    grid = RecordingGrid(plain_client_app(widths), n, node_configs=configs, node_ids=NODE_IDS)
    strategy = cls(Net, capacity_tiers=TIERS, fraction_train=1.0, fraction_evaluate=1.0, min_available_nodes=n)
    torch.manual_seed(0)
    with caplog.at_level(logging.INFO):
        result = strategy.start(grid=grid, initial_arrays=ArrayRecord(Net().state_dict()), num_rounds=2,
                                train_config=ConfigRecord({"lr": 0.1}))
    assert [result.train_metrics_clientapp[r]["num-replies"] for r in (1, 2)] == [n, n]
    assert [result.train_metrics_clientapp[r]["num-rejected"] for r in (1, 2)] == [0, 0]
    assert grid.queries == 0 and grid.errors == 0
    assert "No query function registered" not in caplog.text and "Traceback" not in caplog.text
    fallback = [r for r in caplog.records if "assigned by node order" in r.getMessage()]
    assert len(fallback) == 1, [r.getMessage() for r in fallback]
    assert "did not answer the partition-id query" in fallback[0].getMessage()
    assert "partition_reply" in fallback[0].getMessage() and "capacity=" in fallback[0].getMessage()
    for i, node in enumerate(sorted(NODE_IDS)):  # node order: the sorted node ids
        tier = TIERS[i % len(TIERS)]
        share = strategy.max_width(tier) if cls is FjORD else tier
        assert widths[node] == math.ceil(share * HIDDEN - 1e-9), (node, tier, widths[node])
