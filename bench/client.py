"""Client cost of one train message: fl-subnet's ClientApp against a plain Flower FedAvg client.

What is measured, per keep probability ξ (``--keep-probs``), on one model (default the MLP
``MLP(784, [7000, 7000, 7000], 1)``, 103.5M parameters, on the ``synthetic-regression``
data set with 784 input features and ``--num-samples`` rows split over ``--num-nodes``
nodes; node 0's partition is trained):

* **ours**: the real ``fl_subnet.app.client_app.app`` (the ClientApp ``flwr run`` starts),
  pointed at that model by its run config (``dataset = "synthetic-regression"``,
  ``input-dim``, ``hidden``, ``num-samples``). Its message is the one the server sends:
  ``FederatedDropout(ξ)`` (``--strategy ist``: ``IST`` with p = round(1/ξ)) built by
  ``build_strategy`` and its ``configure_train`` run against an in-process grid; node
  slot 0's message is taken. The client decodes it, builds the compact module
  (``cached_spec`` on the ``meta`` device + ``spec.build``), takes τ local SGD steps and
  encodes the compact reply.
* **FedAvg**: Flower's own ``FedAvg.configure_train`` message (the full model) and a
  ClientApp written as Flower's PyTorch template writes it (:func:`fedavg_client_app`):
  construct the full model, ``load_state_dict(msg.content["arrays"].to_torch_state_dict())``,
  the same τ steps (the same ``train_local`` on the same data), reply
  ``ArrayRecord(model.state_dict())``.

Both messages cross the wire as a node receives them: serialized with Flower's protobuf
serde; a measurement starts from those bytes and ends with the serialized reply.

Two measurements per ξ (JSON lines through ``bench/common.py``):

* ``client`` / ``seconds``: time per message in one warm process (after one untimed
  message each, so the analysis cache is warm, as in a Ray actor), ours and FedAvg
  interleaved, ``--reps`` each. ``cold_median`` / ``cold_fedavg_median``: the same in a
  fresh process (the first message: includes the analysis on the ``meta`` device), from
  the memory runs.
* ``client`` / ``bytes``: peak memory of the message's work. Each repetition runs in a
  fresh child process (``--mem-reps`` of each client) that imports torch, flwr and
  fl_subnet and loads the node's data; then it resets its peak RSS (``/proc/self/
  clear_refs``), reads the message's wire bytes, handles it and encodes the reply. The
  measurement is its peak RSS (``VmHWM``) minus its RSS before the message, in bytes; it
  includes the received wire bytes, the decoded Message, the module, gradients,
  optimizer state, the reply and the first message's lazy initialisation (torch's
  autograd and fx, the same for both clients). Where the peak cannot be reset, the
  median peak of as many baseline children (imports and data only) is subtracted
  instead. ``ru_maxrss`` is not used: a child started by ``subprocess`` inherits its
  parent's peak there. Target: ours ≤ 0.35 × FedAvg's.

Every ``client`` line also says what the fl-subnet client held: ``received_params`` (numel
of the message's arrays), ``reply_params``, ``mask_widths`` (bits set per group in the
message's mask), ``full_params``, and ``largest_tensor_numel``: the largest tensor any
torch op created on the CPU while the fl-subnet client handled the message (a
``TorchDispatchMode`` pass, untimed), against ``full_largest_tensor_numel`` of the full
model: a client that built the full model would show a full-size tensor there.

Run ``python bench/client.py`` (the full measurement, a few minutes on 2 cores) or
``--quick`` (a 64-256-256-1 MLP, seconds).
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import math
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path

log = logging.getLogger("bench.client")

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
NODE_ID = 1001
RUN_ID = 1
TARGET_MEMORY_RATIO = 0.35


# --------------------------------------------------------------------------- the two clients
def fedavg_client_app():
    """A plain Flower ClientApp as Flower's PyTorch template writes it, on fl-subnet's data.

    Per train message: ``Net()`` (the full model, from the run config), ``load_state_dict``
    of the message's arrays, τ local steps (:func:`fl_subnet.clients.train.train_local`,
    the same loop fl-subnet's client runs) and ``ArrayRecord(model.state_dict())``.

    Returns
    -------
    flwr.clientapp.ClientApp
    """
    from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp

    from fl_subnet.clients.train import TrainConfig, train_local
    from fl_subnet.experiments.config import RunConfig
    from fl_subnet.experiments.experiment import context_data, factory_for

    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        cfg = RunConfig.from_mapping(context.run_config)
        model = factory_for(cfg)()
        model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
        train_set, _ = context_data(context)
        tc = TrainConfig.from_config(msg.content["config"])
        n, loss = train_local(model, train_set, tc, seed=tc.seed)
        content = RecordDict({"arrays": ArrayRecord(model.state_dict()),
                              "metrics": MetricRecord({"num-examples": int(n), "train-loss": float(loss)})})
        return Message(content=content, reply_to=msg)

    return app


def client_apps() -> dict[str, object]:
    """``{"ours": fl-subnet's ClientApp, "fedavg": the plain Flower one}``."""
    import fl_subnet.app.client_app

    return {"ours": fl_subnet.app.client_app.app, "fedavg": fedavg_client_app()}


def node_context(run_config: Mapping[str, object], num_nodes: int):
    """Node 0's Flower ``Context`` (partition 0 of ``num_nodes``)."""
    from flwr.app import Context, RecordDict

    return Context(run_id=RUN_ID, node_id=NODE_ID, node_config={"partition-id": 0, "num-partitions": num_nodes},
                   state=RecordDict(), run_config=dict(run_config))


def handle(app, wire: bytes, context) -> tuple[object, bytes]:
    """Decode ``wire`` into a Message, run ``app`` on it, encode the reply.

    Returns
    -------
    tuple
        The reply Message and its serialized bytes.
    """
    from flwr.common.serde import message_from_proto, message_to_proto
    from flwr.proto.message_pb2 import Message as ProtoMessage
    from flwr.supercore.date import now

    msg = message_from_proto(ProtoMessage.FromString(wire))
    msg.metadata.delivered_at = now().isoformat()
    reply = app(msg, context)
    if reply.has_error():
        raise RuntimeError(f"the ClientApp failed: {reply.error.reason}")
    return reply, message_to_proto(reply).SerializeToString()


# --------------------------------------------------------------------------- the server side
def run_config(args: argparse.Namespace, keep_prob: float) -> dict[str, object]:
    """The fl-subnet run config (kebab-case keys) of one setting."""
    cfg: dict[str, object] = {
        "dataset": "synthetic-regression", "model": "mlp", "input-dim": args.input_dim, "hidden": args.hidden,
        "num-samples": args.num_samples, "num-nodes": args.num_nodes, "partitioning": "iid",
        "local-steps": args.local_steps, "batch-size": args.batch_size, "lr": 0.01, "seed": 0,
        "num-server-rounds": 1, "fraction-evaluate": 0.0,
    }
    if args.strategy == "ist":
        cfg.update({"strategy": "ist", "num-subnets": max(1, round(1 / keep_prob))})
    else:
        cfg.update({"strategy": "federated-dropout", "keep-prob": keep_prob})
    return cfg


def _delivered(message, number: int) -> bytes:
    """``message`` as the node receives it: a message id set (as a Grid does), serialized."""
    from flwr.common.serde import message_to_proto

    message.metadata.__dict__["_message_id"] = f"{number:064x}"
    return message_to_proto(message).SerializeToString()


def server_messages(config: Mapping[str, object]) -> tuple[bytes, bytes, dict[str, object]]:
    """The wire bytes of node 0's train message from fl-subnet's strategy and from Flower's FedAvg.

    Returns
    -------
    tuple
        ``(ours, fedavg, info)``; ``info`` holds ``full_params``, ``full_largest_tensor_numel``
        and ``mask_widths`` (bits set per group in ours' mask).
    """
    import numpy as np
    import torch
    from flwr.app import ArrayRecord, ConfigRecord
    from flwr.serverapp.strategy import FedAvg

    import fl_subnet.app.client_app
    from fl_subnet.experiments.config import RunConfig
    from fl_subnet.experiments.experiment import example_input, factory_for
    from fl_subnet.experiments.inprocess_grid import InProcessGrid
    from fl_subnet.strategies import build_strategy
    from fl_subnet.wire import mask_from_config

    cfg = RunConfig.from_mapping(config)
    factory = factory_for(cfg)
    torch.manual_seed(cfg.seed)
    state = factory().state_dict()
    full = ArrayRecord(state)
    info: dict[str, object] = {"full_params": int(sum(v.numel() for v in state.values())),
                               "full_largest_tensor_numel": int(max(v.numel() for v in state.values()))}
    del state
    grid = InProcessGrid(fl_subnet.app.client_app.app, cfg.num_nodes, run_config=dict(config))
    node0 = grid.get_node_ids()[0]
    train_config = ConfigRecord(cfg.train_config())
    strategy = build_strategy(cfg, factory, example_input=example_input(cfg))
    ours = {m.metadata.dst_node_id: m for m in strategy.configure_train(1, full, train_config, grid)}[node0]
    (config_record,) = ours.content.config_records.values()
    sent = mask_from_config(config_record, strategy.spec.all_groups)
    info["mask_widths"] = {name: int(idx.numel()) for name, idx in sent.indices.items()}
    flower = FedAvg(fraction_train=1.0, fraction_evaluate=0.0, min_available_nodes=cfg.num_nodes)
    theirs = {m.metadata.dst_node_id: m
              for m in flower.configure_train(1, full, ConfigRecord(cfg.train_config()), grid)}[node0]
    return _delivered(ours, 1), _delivered(theirs, 2), info


# --------------------------------------------------------------------------- measurements
def largest_tensor_during(fn: Callable[[], object]) -> int:
    """The largest ``numel`` of any tensor a torch op creates off the ``meta`` device in ``fn()``."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    class Largest(TorchDispatchMode):
        largest = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in tree_leaves(out):
                if isinstance(t, torch.Tensor) and t.device.type != "meta":
                    self.largest = max(self.largest, t.numel())
            return out

    mode = Largest()
    with mode:
        fn()
    return mode.largest


def arrays_numel(message) -> int:
    """Number of entries in a Message's ArrayRecords."""
    return int(sum(math.prod(a.shape) for rec in message.content.array_records.values() for a in rec.values()))


def child(kind: str, wire_file: str | None, config: Mapping[str, object]) -> dict[str, object]:
    """One fresh-process measurement (``--child``).

    Imports what every kind imports and loads the node's data; then, for a client, resets
    the peak RSS, reads the message's wire bytes, handles it and encodes the reply.

    Returns
    -------
    dict
        ``maxrss_bytes`` (peak RSS, bytes), ``rss_before_bytes`` (RSS before the message),
        ``reset`` (whether the peak was reset there), and for a client ``seconds``,
        ``reply_params``, ``reply_wire_bytes``.
    """
    import fl_subnet.app.client_app  # noqa: F401  (every child imports the same modules)
    from common import reset_peak, status_bytes
    from fl_subnet.experiments.experiment import context_data

    context = node_context(config, int(config["num-nodes"]))
    context_data(context)  # the node's data: loaded and cached, as the baseline does
    apps = client_apps()
    gc.collect()
    out: dict[str, object] = {"kind": kind, "rss_before_bytes": status_bytes("VmRSS"), "reset": False}
    if kind != "baseline":
        out["reset"] = reset_peak()
        wire = Path(wire_file).read_bytes()
        t0 = time.perf_counter()
        reply, encoded = handle(apps[kind], wire, context)
        out["seconds"] = time.perf_counter() - t0
        out["reply_params"] = arrays_numel(reply)
        out["reply_wire_bytes"] = len(encoded)
    out["maxrss_bytes"] = status_bytes("VmHWM")
    return out


def run_child(kind: str, wire_file: Path | None, config: Mapping[str, object], threads: int) -> dict[str, object]:
    """Run :func:`child` in a fresh interpreter and return its JSON."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", kind, "--child-config", json.dumps(config)]
    if wire_file is not None:
        cmd += ["--child-wire", str(wire_file)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    from common import run_child_json

    return run_child_json(cmd, env, threads, ROOT)


def measure(args: argparse.Namespace, keep_prob: float, workdir: Path) -> list[dict[str, object]]:
    """Both measurements (seconds, bytes) of one keep probability."""
    from common import interleaved, record

    config = run_config(args, keep_prob)
    log.info("building the server's messages (%s, ξ = %g)", config["strategy"], keep_prob)
    ours_wire, fedavg_wire, info = server_messages(config)
    files = {"ours": workdir / f"ours-{keep_prob}.bin", "fedavg": workdir / f"fedavg-{keep_prob}.bin"}
    files["ours"].write_bytes(ours_wire)
    files["fedavg"].write_bytes(fedavg_wire)
    wires = {"ours": ours_wire, "fedavg": fedavg_wire}
    del ours_wire, fedavg_wire

    # what the fl-subnet client holds: its message and the largest tensor it ever creates
    from flwr.common.serde import message_from_proto
    from flwr.proto.message_pb2 import Message as ProtoMessage

    received = arrays_numel(message_from_proto(ProtoMessage.FromString(wires["ours"])))
    apps = client_apps()
    context = node_context(config, args.num_nodes)
    largest = largest_tensor_during(lambda: handle(apps["ours"], wires["ours"], context))
    held = {"full_params": info["full_params"], "received_params": received,
            "mask_widths": info["mask_widths"], "largest_tensor_numel": largest,
            "full_largest_tensor_numel": info["full_largest_tensor_numel"]}
    log.info("fl-subnet client: received %d of %d parameters; largest tensor %d (full model's: %d)",
             received, info["full_params"], largest, info["full_largest_tensor_numel"])

    log.info("timing %d messages each, interleaved", args.reps)
    ours_s, fedavg_s = interleaved(lambda: handle(apps["ours"], wires["ours"], context),
                                   lambda: handle(apps["fedavg"], wires["fedavg"], context), args.reps)
    reply, _ = handle(apps["ours"], wires["ours"], context)
    held["reply_params"] = arrays_numel(reply)
    del wires, reply, apps
    gc.collect()

    log.info("peak memory: %d fresh processes of each kind", args.mem_reps)
    runs: dict[str, list[dict[str, object]]] = {"ours": [], "fedavg": []}
    for _ in range(args.mem_reps):
        for kind in ("fedavg", "ours"):
            runs[kind].append(run_child(kind, files.get(kind), config, args.threads))
            log.info("%s: RSS %.1f MB before the message, peak %.1f MB", kind,
                     runs[kind][-1]["rss_before_bytes"] / 1e6, runs[kind][-1]["maxrss_bytes"] / 1e6)
    if all(r["reset"] for rs in runs.values() for r in rs):
        method = "peak RSS minus RSS before the message (peak reset through /proc/self/clear_refs)"
        peak = {k: [r["maxrss_bytes"] - r["rss_before_bytes"] for r in rs] for k, rs in runs.items()}
    else:  # no peak reset here: subtract the peak of processes that only import and load the data
        method = "peak RSS minus the median peak RSS of baseline processes (imports + data only)"
        base_runs = [run_child("baseline", None, config, args.threads) for _ in range(args.mem_reps)]
        base = statistics.median(r["maxrss_bytes"] for r in base_runs)
        peak = {k: [r["maxrss_bytes"] - base for r in rs] for k, rs in runs.items()}
    for f in files.values():
        f.unlink()

    setting = {
        "model": f"MLP({args.input_dim}, [{args.hidden}], 1)", "params": info["full_params"],
        "strategy": config["strategy"], "keep_prob": keep_prob,
        **({"num_subnets": config["num-subnets"]} if config["strategy"] == "ist" else {}),
        "local_steps": args.local_steps, "batch_size": args.batch_size,
        "data": f"synthetic-regression, {args.num_samples} rows over {args.num_nodes} nodes, node 0",
        "ours": "fl_subnet.app.client_app.app via its run config; message from the strategy's configure_train",
        "fedavg": "Flower's FedAvg.configure_train message + a template ClientApp (full model)",
    }
    cold = {"cold_median": statistics.median(r["seconds"] for r in runs["ours"]),
            "cold_fedavg_median": statistics.median(r["seconds"] for r in runs["fedavg"])}
    time_row = record("client", {**setting, "measure": "seconds per message (decode, build, τ steps, encode), "
                                                       "warm process"},
                      ours_s, fedavg=fedavg_s, **cold, **held)
    mem_row = record("client", {**setting, "measure": "peak RSS of the message's work (fresh process, "
                                                      f"{method})"},
                     peak["ours"], metric="bytes", fedavg=peak["fedavg"], target=TARGET_MEMORY_RATIO,
                     **held)
    return [time_row, mem_row]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="a 64-256-256-1 MLP, 2 reps: seconds, for a test")
    p.add_argument("--hidden", default="7000,7000,7000", help="hidden widths of the MLP")
    p.add_argument("--input-dim", type=int, default=784, help="input features (synthetic-regression)")
    p.add_argument("--keep-probs", default="0.25", help="comma-separated keep probabilities ξ")
    p.add_argument("--strategy", choices=("federated-dropout", "ist"), default="federated-dropout",
                   help="the fl-subnet strategy whose message is measured (ist: p = round(1/ξ))")
    p.add_argument("--local-steps", type=int, default=5, help="τ")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--num-samples", type=int, default=256, help="rows of the synthetic data set")
    p.add_argument("--num-nodes", type=int, default=4)
    p.add_argument("--reps", type=int, default=3, help="timed messages of each client (warm process)")
    p.add_argument("--mem-reps", type=int, default=3, help="fresh processes of each kind (peak memory)")
    p.add_argument("--threads", type=int, default=0, help="OMP_NUM_THREADS of the children (0: unset)")
    p.add_argument("--child", choices=("baseline", "ours", "fedavg"), help=argparse.SUPPRESS)
    p.add_argument("--child-wire", help=argparse.SUPPRESS)
    p.add_argument("--child-config", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        sys.stdout.write(json.dumps(child(args.child, args.child_wire, json.loads(args.child_config))) + "\n")
        return 0
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s", stream=sys.stderr)
    if args.quick:
        args.hidden, args.input_dim, args.keep_probs = "256,256", 64, "0.25"
        args.num_samples, args.reps, args.mem_reps = 64, 2, 1
    sys.path.insert(0, str(HERE))
    from common import emit

    with tempfile.TemporaryDirectory(prefix="bench-client-") as tmp:
        for keep_prob in (float(x) for x in args.keep_probs.split(",")):
            for row in measure(args, keep_prob, Path(tmp)):
                emit(row)
    return 0


if __name__ == "__main__":
    sys.exit(main())
