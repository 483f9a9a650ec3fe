"""Rogue nodes: one well-formed rogue node of 4 on real digits cannot ruin the model.

For FedAvg and federated dropout, with the defences on (update screening relative to
the round's median update norm, a cap on the reported ``num-examples``), the final test
accuracy with the rogue stays within 2 points of the run in which that node is simply
absent (the best any defence can do: its data is lost either way), and an honest run is
bit-identical with and without the defences.
"""

import functools

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context
from torch.utils.data import TensorDataset

from fl_subnet.clients import make_client_app
from fl_subnet.clients.train import evaluate_model, train_local
from fl_subnet.experiments.data import load_centralized_test, load_partition
from fl_subnet.experiments.inprocess_grid import InProcessGrid
from fl_subnet.models import MLP
from fl_subnet.strategies import FederatedDropout, SubnetFedAvg
from fl_subnet.strategies.defences import Defences
from fl_subnet.wire import arrays_to_state

NODES, ROGUE, ROUNDS = 4, 2, 8
DEFENCES = Defences(max_ratio_to_median=3.0, max_num_examples=400)  # 400 ≥ the largest partition (≈ 290)


def factory():
    return MLP(64, [64], 10)


class Partition(TensorDataset):
    partition_id = -1


def digits_loader(num_nodes: int):
    """The ClientApp's data function: node i's iid digits partition of ``num_nodes``,
    knowing its partition id (a rogue node's train function reads it)."""
    def load_data(context: Context):
        pid = int(context.node_config["partition-id"])
        tx, ty, _, _ = load_partition("digits", pid, num_nodes, "iid", seed=0)
        data = Partition(tx, ty)
        data.partition_id = pid
        return data, None

    return load_data


load_data = digits_loader(NODES)


def rogue_train(attack: str, model, train_set, cfg, seed):
    """Honest training, then the rogue node (partition ROGUE) tampers with its reply."""
    start = {k: v.detach().clone() for k, v in model.state_dict().items()}
    n, loss = train_local(model, train_set, cfg, seed)
    if train_set.partition_id != ROGUE or attack == "none":
        return n, loss
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for k, p in model.state_dict().items():
            if not p.is_floating_point():
                continue
            if attack == "huge":
                p.fill_(1e30)
            elif attack == "inflated":
                p.copy_(start[k] + torch.randn(p.shape, generator=gen))
            elif attack == "sign-flip":
                p.copy_(start[k] - 5.0 * (p - start[k]))
            elif attack == "absent":
                raise RuntimeError("this node is down")  # an error reply: the node is simply absent
    return (10**12 if attack == "inflated" else n), loss


def run(strategy_cls, attack: str, defended: bool) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    init = ArrayRecord(factory().state_dict())
    kwargs = {"defences": DEFENCES} if defended else {}
    if strategy_cls is FederatedDropout:
        strategy = FederatedDropout(factory, 0.75, seed=1, fraction_evaluate=0.0, min_available_nodes=NODES, **kwargs)
    else:
        strategy = SubnetFedAvg(factory, seed=1, fraction_evaluate=0.0, min_available_nodes=NODES, **kwargs)
    app = make_client_app(factory, load_data, functools.partial(rogue_train, attack))
    cfg = ConfigRecord({"local-steps": 10, "lr": 0.1, "batch-size": 32, "loss": "cross-entropy", "seed": 0})
    result = strategy.start(grid=InProcessGrid(app, NODES), initial_arrays=init, num_rounds=ROUNDS, train_config=cfg)
    return arrays_to_state(result.arrays)


def accuracy(state) -> float:
    model = factory()
    model.load_state_dict(state)
    return evaluate_model(model, TensorDataset(*load_centralized_test("digits")), "cross-entropy")["eval-acc"]


@pytest.mark.parametrize("strategy_cls", [SubnetFedAvg, FederatedDropout])
def test_one_rogue_of_four_cannot_ruin_the_model(strategy_cls):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        clean = run(strategy_cls, "none", defended=False)
        clean_defended = run(strategy_cls, "none", defended=True)
        assert all(torch.equal(clean[k], clean_defended[k]) for k in clean)  # defences change no honest run
        absent = accuracy(run(strategy_cls, "absent", defended=True))
        assert absent > 0.7
        for attack in ("huge", "inflated", "sign-flip"):
            undefended = accuracy(run(strategy_cls, attack, defended=False))
            defended = accuracy(run(strategy_cls, attack, defended=True))
            assert defended >= absent - 0.02, (attack, defended, absent)
            assert undefended < absent - 0.2, (attack, undefended)  # the attack is real
    finally:
        torch.set_num_threads(threads)
