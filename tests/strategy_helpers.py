"""A small federated problem for strategy tests: an MLP on seeded per-node data."""

import functools

import torch
from flwr.app import ArrayRecord, ConfigRecord
from torch.utils.data import TensorDataset

from fl_subnet.clients import make_client_app
from fl_subnet.experiments.inprocess_grid import InProcessGrid
from fl_subnet.models import MLP

D_IN, HIDDEN, D_OUT = 8, [16], 3
factory = functools.partial(MLP, D_IN, HIDDEN, D_OUT)


def load_data(context):
    pid = int(context.node_config["partition-id"])
    g = torch.Generator().manual_seed(100 + pid)
    n = 20 + 5 * pid  # unequal sizes, so num-examples weighting matters
    x = torch.randn(n, D_IN, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()
    return TensorDataset(x, y), TensorDataset(x[:8], y[:8])


def initial_arrays(seed=0):
    torch.manual_seed(seed)
    return ArrayRecord(factory().state_dict())


def train_config(**over):
    cfg = {"local-steps": 3, "lr": 0.1, "batch-size": 8, "loss": "cross-entropy", "seed": 1}
    cfg.update(over)
    return ConfigRecord(cfg)


def grid(num_nodes=4):
    return InProcessGrid(make_client_app(factory, load_data), num_nodes)


def central_loss(arrays, num_nodes=4):
    """Cross-entropy of the full model in ``arrays`` on every node's training data
    (the union of the partitions ``load_data`` gives ``num_nodes`` nodes)."""
    from types import SimpleNamespace

    from fl_subnet.wire import arrays_to_state

    model = factory()
    model.load_state_dict(arrays_to_state(arrays))
    parts = [load_data(SimpleNamespace(node_config={"partition-id": i}))[0].tensors for i in range(num_nodes)]
    x, y = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
    with torch.no_grad():
        return float(torch.nn.functional.cross_entropy(model(x), y))


def robust_strategy(protocol: str, aggregation: str, num_nodes: int = 4):
    """IST (2 parts, 3 local steps) or federated dropout (ξ = 0.75) on ``num_nodes`` nodes
    a round, with the aggregation rule ``aggregation``: the robust rules' end-to-end runs."""
    from fl_subnet.strategies import IST, FederatedDropout

    if protocol == "ist":
        return IST(factory, 2, local_steps=3, num_train_nodes=num_nodes, aggregation=aggregation,
                   fraction_evaluate=0.0)
    return FederatedDropout(factory, 0.75, num_train_nodes=num_nodes, aggregation=aggregation,
                            fraction_evaluate=0.0)
