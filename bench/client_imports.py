"""Cost of one train message in a fresh process: fl-subnet's ClientApp against a template ClientApp.

Flower's SuperNode starts a new ``flwr-clientapp`` process for every message, so a node pays
its ClientApp's imports with every message, not once per run. What is measured, each in a
fresh Python process (``--reps`` of each, alternating which client runs first), with a
**warm partition cache**: all children share one fresh cache folder (``FL_SUBNET_CACHE``, see
``fl_subnet/experiments/data.py``, "Partition cache"), which one unmeasured child of ours
fills first (its cold-cache times are logged and kept as ``ours_cold_cache`` in each row),
so every measured message of ours reads node 0's partition from its safetensors file, as
every message after a node's first does:

* **ours**: ``import fl_subnet.app.client_app`` (the ClientApp ``flwr run`` starts), then
  one train message handled end to end: the wire bytes decoded into a Message, the App's
  train handler (analysis of the model on the ``meta`` device, the node's partition read
  from the cache, the compact module built, τ local SGD steps) and the reply encoded. The
  message is the one the server sends: the App's default run config (digits, Dirichlet
  partitions over 10 nodes, the MLP 64-128-64-10, τ = 10, batch 32) with IST p = 4
  (``--strategy``), built by ``build_strategy`` and its ``configure_train`` against an
  in-process grid; node slot 0's message.
* **template**: a plain torch + flwr ClientApp module written as Flower's PyTorch template
  writes one (:data:`TEMPLATE`, written to a temporary folder and imported from there):
  the same MLP as an ``nn.Sequential``, scikit-learn's digits split into 10 IID shards with
  numpy, ``Net()`` + ``load_state_dict`` of Flower's ``FedAvg.configure_train`` message (the
  full model), the same τ SGD steps, ``ArrayRecord(model.state_dict())`` back.

Per client and repetition the child reports the wall (``time.perf_counter``) and CPU
(``time.process_time``, all threads) seconds of the module import and of the message after
it, and which of the heavy modules (:data:`HEAVY`) the process had loaded at the end.
Measurements (JSON lines through ``bench/common.py``; ``fedavg_median`` is the template's
median, ``ratio`` ours / template): ``import`` (wall, CPU), ``message`` (after the import:
decode, handle, encode; wall, CPU) and ``import + message`` (wall, CPU), each with
``"partition cache": "warm"`` in its setting. Each line's ``loaded`` / ``template_loaded``
list the heavy modules the last repetition's process held, and ``ours_cold_cache`` the
seconds and modules of the unmeasured first child (a cold cache: flwr-datasets partitions).

Run ``python bench/client_imports.py`` (5 repetitions of each, about a minute on 2 cores)
or ``--quick`` (2 each).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

log = logging.getLogger("bench.client_imports")

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
NUM_NODES = 10
#: Modules whose presence after a message says what the message imported.
HEAVY = ("torch", "torch.fx", "torch._dynamo", "sklearn", "scipy", "pandas", "pyarrow", "matplotlib",
         "seaborn", "datasets", "flwr_datasets")

#: The template client: a plain torch + flwr ClientApp module, as Flower's PyTorch template
#: writes one, on scikit-learn's digits (a numpy IID split, no flwr-datasets).
TEMPLATE = '''"""A plain Flower ClientApp (Flower's PyTorch template, on scikit-learn's digits)."""

import numpy as np
import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

app = ClientApp()


def Net():
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 10))


def load_data(partition_id, num_partitions):
    from sklearn.datasets import load_digits

    digits = load_digits()
    part = np.array_split(np.random.default_rng(0).permutation(len(digits.target)), num_partitions)[partition_id]
    x = torch.tensor(digits.data[part] / 16.0, dtype=torch.float32)
    return TensorDataset(x, torch.tensor(digits.target[part], dtype=torch.int64))


@app.train()
def train(msg: Message, context: Context) -> Message:
    model = Net()
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    config = msg.content["config"]
    data = load_data(int(context.node_config["partition-id"]), int(context.node_config["num-partitions"]))
    loader = DataLoader(data, batch_size=int(config["batch-size"]), shuffle=True,
                        generator=torch.Generator().manual_seed(0))
    optimizer = torch.optim.SGD(model.parameters(), lr=float(config["lr"]))
    model.train()
    steps, seen, total = int(config["local-steps"]), 0, 0.0
    while seen < steps:
        for x, y in loader:
            optimizer.zero_grad()
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            optimizer.step()
            total += loss.item()
            seen += 1
            if seen == steps:
                break
    metrics = MetricRecord({"num-examples": len(data), "train-loss": total / steps})
    return Message(RecordDict({"arrays": ArrayRecord(model.state_dict()), "metrics": metrics}), reply_to=msg)
'''


# --------------------------------------------------------------------------- the server side
def run_config(strategy: str, num_subnets: int) -> dict[str, object]:
    """The App's default run config (``[tool.flwr.app.config]``) with ``strategy``."""
    from fl_subnet.experiments.config import RunConfig

    cfg = RunConfig()
    config: dict[str, object] = {"dataset": cfg.dataset, "model": cfg.model, "hidden": cfg.hidden,
                                 "num-nodes": NUM_NODES, "partitioning": cfg.partitioning,
                                 "dirichlet-alpha": cfg.dirichlet_alpha, "local-steps": cfg.local_steps,
                                 "batch-size": cfg.batch_size, "lr": cfg.lr, "seed": cfg.seed,
                                 "num-server-rounds": 1, "fraction-evaluate": 0.0, "strategy": strategy}
    if strategy == "ist":
        config["num-subnets"] = num_subnets
    return config


def template_message(template_dir: Path, config: dict[str, object]) -> bytes:
    """The wire bytes of Flower's ``FedAvg.configure_train`` message to node slot 0, with
    the template's full model and the run config's τ, batch size and learning rate."""
    import importlib

    from flwr.app import ArrayRecord, ConfigRecord
    from flwr.serverapp.strategy import FedAvg

    from client import _delivered  # bench/client.py
    from fl_subnet.experiments.inprocess_grid import InProcessGrid

    sys.path.insert(0, str(template_dir))
    template = importlib.import_module("template_client")
    grid = InProcessGrid(template.app, NUM_NODES)
    node0 = grid.get_node_ids()[0]
    train_config = ConfigRecord({"lr": float(config["lr"]), "local-steps": int(config["local-steps"]),
                                 "batch-size": int(config["batch-size"])})
    flower = FedAvg(fraction_train=1.0, fraction_evaluate=0.0, min_available_nodes=NUM_NODES)
    messages = flower.configure_train(1, ArrayRecord(template.Net().state_dict()), train_config, grid)
    return _delivered({m.metadata.dst_node_id: m for m in messages}[node0], 3)


# --------------------------------------------------------------------------- one fresh process
def child(kind: str, wire_file: str, config: dict[str, object], template_dir: str) -> dict[str, object]:
    """Import the ``kind`` client's module, then handle its train message (``--child``).

    Returns
    -------
    dict
        ``import_wall`` / ``import_cpu`` (seconds of the import), ``message_wall`` /
        ``message_cpu`` (decode, handle, encode), ``loaded`` (the :data:`HEAVY` modules
        then in ``sys.modules``) and ``reply_wire_bytes``.
    """
    import importlib

    module = "fl_subnet.app.client_app" if kind == "ours" else "template_client"
    if kind == "template":
        sys.path.insert(0, template_dir)
    w0, c0 = time.perf_counter(), time.process_time()
    app = importlib.import_module(module).app
    w1, c1 = time.perf_counter(), time.process_time()
    wire = Path(wire_file).read_bytes()
    from client import handle, node_context  # bench/client.py: decode, run the app, encode

    context = node_context(config, NUM_NODES)
    w2, c2 = time.perf_counter(), time.process_time()
    _, encoded = handle(app, wire, context)
    w3, c3 = time.perf_counter(), time.process_time()
    return {"kind": kind, "import_wall": w1 - w0, "import_cpu": c1 - c0, "message_wall": w3 - w2,
            "message_cpu": c3 - c2, "reply_wire_bytes": len(encoded),
            "loaded": [m for m in HEAVY if m in sys.modules]}


def run_child(kind: str, wire_file: Path, config: dict[str, object], template_dir: Path,
              threads: int) -> dict[str, object]:
    """Run :func:`child` in a fresh interpreter and return its JSON. Its partition cache
    folder (``FL_SUBNET_CACHE``) is ``template_dir/partition-cache``, shared by all children."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", kind, "--child-wire", str(wire_file),
           "--child-config", json.dumps(config), "--child-template", str(template_dir)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(HERE), os.environ.get("PYTHONPATH", "")]),
           "FL_SUBNET_CACHE": str(template_dir / "partition-cache")}
    from common import run_child_json

    return run_child_json(cmd, env, threads, ROOT)


def measure(args: argparse.Namespace, workdir: Path) -> list[dict[str, object]]:
    """The six measurements (import, message, both; wall and CPU seconds)."""
    from common import record

    config = run_config(args.strategy, args.num_subnets)
    (workdir / "template_client.py").write_text(TEMPLATE, encoding="utf-8")
    from client import server_messages  # bench/client.py: the strategy's message to node slot 0

    log.info("building the server's messages (%s on %s)", config["strategy"], config["dataset"])
    ours_wire, _, _ = server_messages(config)
    wires = {"ours": workdir / "ours.bin", "template": workdir / "template.bin"}
    wires["ours"].write_bytes(ours_wire)
    wires["template"].write_bytes(template_message(workdir, config))

    cold = run_child("ours", wires["ours"], config, workdir, args.threads)  # fills the partition cache
    cached = sorted(p.name for p in (workdir / "partition-cache").glob("*.safetensors"))
    if len(cached) != 1:
        raise RuntimeError(f"the cold child of ours left {cached} in the partition cache, expected one file")
    log.info("ours, cold partition cache (not measured): import %.2f s (CPU %.2f), message %.2f s (CPU %.2f); "
             "loaded %s; wrote %s", cold["import_wall"], cold["import_cpu"], cold["message_wall"],
             cold["message_cpu"], ",".join(cold["loaded"]), cached[0])
    log.info("measuring with a warm partition cache")
    runs: dict[str, list[dict[str, object]]] = {"ours": [], "template": []}
    for rep in range(args.reps):
        for kind in (("ours", "template") if rep % 2 == 0 else ("template", "ours")):
            runs[kind].append(run_child(kind, wires[kind], config, workdir, args.threads))
            r = runs[kind][-1]
            log.info("%s: import %.2f s (CPU %.2f), message %.2f s (CPU %.2f); loaded %s",
                     "ours (warm partition cache)" if kind == "ours" else kind, r["import_wall"], r["import_cpu"], r["message_wall"], r["message_cpu"],
                     ",".join(r["loaded"]))

    setting = {"model": "MLP(64, [128,64], 10)", "data": f"digits, {config['partitioning']} over {NUM_NODES} nodes, "
               "node 0", "strategy": config["strategy"],
               **({"num_subnets": config["num-subnets"]} if config["strategy"] == "ist" else {}),
               "local_steps": config["local-steps"], "batch_size": config["batch-size"],
               "threads": args.threads or "unset", "partition cache": "warm",
               "ours": "fl_subnet.app.client_app in a fresh process, partition read from the cache",
               "fedavg": "template ClientApp (plain torch + flwr, full model, FedAvg's message) in a fresh process"}
    extra = {"loaded": runs["ours"][-1]["loaded"], "template_loaded": runs["template"][-1]["loaded"],
             "ours_cold_cache": {k: cold[k] for k in ("import_wall", "import_cpu", "message_wall", "message_cpu",
                                                      "loaded")}}
    rows = []
    parts = {"import": ("import",), "message": ("message",), "import + message": ("import", "message")}
    for what, keys in parts.items():
        for clock in ("wall", "cpu"):
            ours = [sum(r[f"{k}_{clock}"] for k in keys) for r in runs["ours"]]
            theirs = [sum(r[f"{k}_{clock}"] for k in keys) for r in runs["template"]]
            rows.append(record("client_imports", {**setting, "measure": f"{what}, {clock} seconds, fresh process"},
                               ours, fedavg=theirs, **extra))
            log.info("%s (%s, warm cache): ours %.2f s, template %.2f s", what, clock, statistics.median(ours),
                     statistics.median(theirs))
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="2 repetitions of each")
    p.add_argument("--reps", type=int, default=5, help="fresh processes of each client")
    p.add_argument("--strategy", choices=("ist", "fedavg"), default="ist",
                   help="the fl-subnet strategy whose message ours handles (ist: p = --num-subnets)")
    p.add_argument("--num-subnets", type=int, default=4)
    p.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of the children (0: unset)")
    p.add_argument("--child", choices=("ours", "template"), help=argparse.SUPPRESS)
    p.add_argument("--child-wire", help=argparse.SUPPRESS)
    p.add_argument("--child-config", help=argparse.SUPPRESS)
    p.add_argument("--child-template", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        out = child(args.child, args.child_wire, json.loads(args.child_config), args.child_template)
        sys.stdout.write(json.dumps(out) + "\n")
        return 0
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s", stream=sys.stderr)
    if args.quick:
        args.reps = 2
    sys.path.insert(0, str(HERE))
    from common import emit

    with tempfile.TemporaryDirectory(prefix="bench-client-imports-") as tmp:
        for row in measure(args, Path(tmp)):
            emit(row)
    return 0


if __name__ == "__main__":
    sys.exit(main())
