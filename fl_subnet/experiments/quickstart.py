"""Every protocol in Flower's own PyTorch quickstart, with the quickstart's training loop.

    python -m fl_subnet.experiments.quickstart [--seeds 0,1,2] [--rounds 10] [--lr 0.03]
        [--local-epochs 2] [--out runs/quickstart] [--protocols ist,...]

The model (``Net``), ``train`` and ``test`` are those of Flower's ``quickstart-pytorch``
template (``examples/quickstart-pytorch/pytorchexample/task.py`` in the Flower
repository, Apache-2.0): a CIFAR-10 CNN trained with SGD, momentum 0.9, cross-entropy,
the lr and local epochs taken from the message. CIFAR-10 needs a download, so the data
is scikit-learn's bundled digits (1,797 real 8×8 images) upsampled to 3×32×32: 360
images held out for the central evaluation, the rest split IID over 2 nodes (Flower's
default simulation), 80% of each node's share for training. The ClientApp is the
template's, switched as the README says: ``compact_model(msg, Net)`` instead of
``Net()`` + ``load_state_dict``; every fl-subnet strategy runs at its defaults.

Each protocol runs through ``strategy.start`` on the in-process grid (Flower's serde
both ways) for every seed; the JSON written holds, per protocol, the central accuracy
and loss of every round per seed and the bytes of a round. :func:`table` renders the
README's table from it; ``make figures`` (``--only quickstart``) copies it to
``docs/quickstart-protocols.json``, which a test holds the README's table to.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import random
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp.strategy import FedAvg
from torch import nn
from torch.utils.data import DataLoader

log = logging.getLogger(__name__)

RESULTS = "quickstart-protocols.json"
NUM_NODES = 2
NUM_CENTRALIZED = 360
EXAMPLE = (1, 3, 32, 32)
TIERS = (1.0, 0.5)  # capacities of the two nodes for HeteroFL, FedRolex and FjORD
KEEP_PROB = 0.5
NUM_SUBNETS = 2


class Net(nn.Module):
    """Flower quickstart-pytorch's CNN ('PyTorch: A 60 Minute Blitz'), 3×32×32 inputs."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 5)
        self.pool = nn.MaxPool2d(2, 2)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.fc1 = nn.Linear(16 * 5 * 5, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, 10)

    def forward(self, x):
        x = self.pool(F.relu(self.conv1(x)))
        x = self.pool(F.relu(self.conv2(x)))
        x = x.view(-1, 16 * 5 * 5)
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return self.fc3(x)


def train(net: nn.Module, trainloader: DataLoader, epochs: int, lr: float) -> float:
    """The template's ``train``: SGD(lr, momentum=0.9), cross-entropy; mean batch loss."""
    criterion = torch.nn.CrossEntropyLoss()
    optimizer = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9)
    net.train()
    running_loss = 0.0
    for _ in range(epochs):
        for batch in trainloader:
            optimizer.zero_grad()
            loss = criterion(net(batch["img"]), batch["label"])
            loss.backward()
            optimizer.step()
            running_loss += loss.item()
    return running_loss / (epochs * len(trainloader))


def test(net: nn.Module, testloader: DataLoader) -> tuple[float, float]:
    """The template's ``test``: (mean batch cross-entropy, accuracy)."""
    criterion = torch.nn.CrossEntropyLoss()
    correct, loss = 0, 0.0
    net.eval()
    with torch.no_grad():
        for batch in testloader:
            outputs = net(batch["img"])
            loss += criterion(outputs, batch["label"]).item()
            correct += (outputs.argmax(1) == batch["label"]).sum().item()
    return loss / len(testloader), correct / len(testloader.dataset)


_SAMPLES: list[dict] | None = None


def samples() -> list[dict]:
    """scikit-learn's digits, shuffled (seed 42), upsampled to 3×32×32 in [-1, 1]."""
    global _SAMPLES
    if _SAMPLES is None:
        from sklearn.datasets import load_digits

        images, labels = load_digits(return_X_y=True)
        order = np.random.default_rng(42).permutation(len(labels))
        x = torch.tensor(images[order] / 16.0, dtype=torch.float32).view(-1, 1, 8, 8)
        x = F.interpolate(x, size=32, mode="bilinear", align_corners=False).repeat(1, 3, 1, 1)
        x = (x - 0.5) / 0.5  # the template's Normalize((0.5,), (0.5,))
        y = torch.tensor(labels[order], dtype=torch.long)
        _SAMPLES = [{"img": a, "label": b} for a, b in zip(x, y)]
    return _SAMPLES


def load_data(partition_id: int, num_partitions: int, batch_size: int = 32):
    """A node's (train, test) loaders: every ``num_partitions``-th non-held-out sample."""
    part = samples()[NUM_CENTRALIZED:][partition_id::num_partitions]
    k = int(0.8 * len(part))
    return DataLoader(part[:k], batch_size=batch_size, shuffle=True), DataLoader(part[k:], batch_size=batch_size)


def client_app(subnet: bool, epochs: int) -> ClientApp:
    """The template's ClientApp train handler; ``subnet``: switched to fl-subnet."""
    from fl_subnet.clients import compact_model

    app = ClientApp()

    @app.train()
    def _train(msg: Message, context):
        if subnet:
            model = compact_model(msg, Net)
        else:
            model = Net()
            model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
        trainloader, _ = load_data(int(context.node_config["partition-id"]),
                                   int(context.node_config["num-partitions"]))
        loss = train(model, trainloader, epochs, float(msg.content["config"]["lr"]))
        metrics = MetricRecord({"train_loss": loss, "num-examples": len(trainloader.dataset)})
        return Message(RecordDict({"arrays": ArrayRecord(model.state_dict()), "metrics": metrics}), reply_to=msg)

    return app


def central_evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
    """The template's ``global_evaluate`` on the held-out images."""
    model = Net()
    model.load_state_dict(arrays.to_torch_state_dict())
    loss, accuracy = test(model, DataLoader(samples()[:NUM_CENTRALIZED], batch_size=128))
    return MetricRecord({"accuracy": accuracy, "loss": loss})


def _strategies() -> dict[str, tuple[str, Callable[[], object]]]:
    from fl_subnet import strategies as S

    ex = torch.zeros(EXAMPLE)
    common = dict(example_input=ex, fraction_evaluate=0.0)
    return {
        "fedavg": ("FedAvg (Flower's)", lambda: FedAvg(fraction_evaluate=0.0)),
        "ist": (f"IST, p = {NUM_SUBNETS}", lambda: S.IST(Net, NUM_SUBNETS, **common)),
        "federated-dropout": (f"Federated dropout, ξ = {KEEP_PROB}",
                              lambda: S.FederatedDropout(Net, KEEP_PROB, **common)),
        "heterofl": (f"HeteroFL, r = {TIERS[0]:g} / {TIERS[1]:g}", lambda: S.HeteroFL(Net, TIERS, **common)),
        "fedrolex": (f"FedRolex, r = {TIERS[0]:g} / {TIERS[1]:g}", lambda: S.FedRolex(Net, TIERS, **common)),
        "fjord": (f"FjORD, p_max = {TIERS[0]:g} / {TIERS[1]:g}", lambda: S.FjORD(Net, TIERS, **common)),
    }


PROTOCOLS = tuple(_strategies())


def run_one(protocol: str, seed: int, rounds: int, lr: float, epochs: int) -> dict:
    """One run: per-round central accuracy and loss (round 0 = the initial model) and
    the bytes of a round (down + up, summed over the nodes)."""
    from fl_subnet.experiments.inprocess_grid import InProcessGrid

    random.seed(seed)  # Flower's node sampling
    torch.manual_seed(seed)
    initial = ArrayRecord(Net().state_dict())
    strategy = _strategies()[protocol][1]()
    grid = InProcessGrid(client_app(protocol != "fedavg", epochs), NUM_NODES)
    t0 = time.perf_counter()
    result = strategy.start(grid=grid, initial_arrays=initial, num_rounds=rounds,
                            train_config=ConfigRecord({"lr": lr}), evaluate_fn=central_evaluate)
    ev = result.evaluate_metrics_serverapp
    train_metrics = result.train_metrics_clientapp
    if protocol == "fedavg":  # the full model down and up, for every node
        per_round = 2 * NUM_NODES * sum(len(a.data) for a in initial.values())
    else:
        per_round = float(np.mean([train_metrics[r]["bytes-down"] + train_metrics[r]["bytes-up"]
                                   for r in sorted(train_metrics)]))
    return {"protocol": protocol, "seed": seed,
            "accuracy": [float(ev[r]["accuracy"]) for r in sorted(ev)],
            "loss": [float(ev[r]["loss"]) for r in sorted(ev)],
            "bytes-per-round": per_round, "seconds": time.perf_counter() - t0}


def table(results: dict) -> str:
    """The README's markdown table from :func:`main`'s JSON: final accuracy and loss
    (mean ± std over seeds), worst seed, bytes per round against FedAvg's."""
    runs = results["runs"]
    labels = {k: v[0] for k, v in _strategies().items()}
    fedavg = [r for r in runs if r["protocol"] == "fedavg"]
    base_bytes = float(np.mean([r["bytes-per-round"] for r in fedavg])) if fedavg else float("nan")
    s = results["settings"]
    lines = [f"| protocol ({s['rounds']} rounds, lr {s['lr']:g}, {s['local-epochs']} local epochs, "
             f"{len(s['seeds'])} seeds) | final accuracy | worst seed | final loss | KB per round | bytes vs FedAvg |",
             "|---|---|---|---|---|---|"]
    for protocol in results["protocols"]:
        rs = [r for r in runs if r["protocol"] == protocol]
        acc = np.array([r["accuracy"][-1] for r in rs])
        loss = np.array([r["loss"][-1] for r in rs])
        b = float(np.mean([r["bytes-per-round"] for r in rs]))
        show_loss = f"{loss.mean():.3f} ± {loss.std():.3f}" if np.isfinite(loss).all() else "NaN"
        lines.append(f"| {labels[protocol]} | {acc.mean():.3f} ± {acc.std():.3f} | {acc.min():.3f} | {show_loss} "
                     f"| {b / 1e3:.1f} | {b / base_bytes:.2f} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--lr", type=float, default=0.03)
    parser.add_argument("--local-epochs", type=int, default=2)
    parser.add_argument("--protocols", default=",".join(PROTOCOLS))
    parser.add_argument("--out", default="runs/quickstart", help="folder of quickstart-protocols.json")
    args = parser.parse_args(argv)
    protocols = [p for p in args.protocols.split(",") if p]
    unknown = sorted(set(protocols) - set(PROTOCOLS))
    if unknown:
        parser.error(f"--protocols: unknown {unknown}; choose from {list(PROTOCOLS)}")
    seeds = [int(s) for s in args.seeds.split(",")]
    logging.basicConfig(level=logging.WARNING)
    for name in ("flwr", "fl_subnet"):
        logging.getLogger(name).setLevel(logging.ERROR)
    torch.set_num_threads(1)
    runs = []
    for protocol in protocols:
        for seed in seeds:
            run = run_one(protocol, seed, args.rounds, args.lr, args.local_epochs)
            runs.append(run)
            log.warning("%s seed %d: accuracy %.3f, loss %.3f (%.0f s)", protocol, seed, run["accuracy"][-1],
                        run["loss"][-1], run["seconds"])
    results = {"settings": {"seeds": seeds, "rounds": args.rounds, "lr": args.lr, "local-epochs": args.local_epochs,
                            "nodes": NUM_NODES, "momentum": 0.9, "batch-size": 32},
               "protocols": protocols, "runs": runs}
    out = Path(args.out) / RESULTS
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1, allow_nan=True))
    sys.stdout.write(table(results) + "\n")
    return 0 if all(math.isfinite(r["loss"][-1]) for r in runs) else 1


if __name__ == "__main__":
    raise SystemExit(main())
