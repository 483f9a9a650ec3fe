"""Bytes per node per round, down and up, as Flower serializes them, vs FedAvg and vs the floor.

For each setting (model × protocol) one round is configured on ``--nodes`` nodes and
every node's reply is built as a client would (:func:`bench.server_round.client_reply`:
its slice plus a small perturbation, ``num-examples`` and ``train-loss`` in a
MetricRecord). Sizes in bytes, per node, averaged over the nodes (the median and spread
across nodes are in each line):

* ``proto``: ``message_to_proto(msg).ByteSize()``, the whole message as one protobuf
  (what the in-process grid and Flower's message-level gRPC path carry);
* ``objects``: what a node pulls from Flower 1.41's SuperLink object store: the message's
  metadata protobuf plus every deflated object of its content tree
  (:func:`bench.server_round.message_object_bytes`);
* ``floor``: the raw size of the compact slice, ``Σ numel · element_size`` over its
  tensors (float32: 4 bytes an entry): what any encoding must carry (median over the
  nodes; ``within_1pct_of_floor``: every node's message within 1% of its own floor).

Each line compares ours with Flower's FedAvg (``fedavg_median``: the same direction
and serialization, full model) and sets ``target = 1.01 · floor / fedavg``: the target
is met when ours (median over the nodes) is within 1% of the floor, everything included (Flower's ``.npy``
headers and protobuf framing, the train config, the mask encoding). The extra fields
break the overhead down: ``npy_headers`` (Flower's Array format), ``mask_config`` (the
mask and scale entries of the ConfigRecord, serialized) and ``other`` (the rest: keys,
metadata, the train config, framing).
"""

from __future__ import annotations

import argparse
import logging
import math
import statistics
import sys
from pathlib import Path

import numpy as np
import torch
from flwr.app import ConfigRecord, Message
from flwr.common.serde import config_record_to_proto
from flwr.serverapp.strategy import FedAvg

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import emit, record  # noqa: E402
from bench.server_round import (  # noqa: E402
    MODELS,
    SERVER_ROUND,
    TRAIN_CONFIG,
    client_reply,
    grid,
    initial_arrays,
    make_strategy,
    message_object_bytes,
    proto_bytes,
    push,
)
from fl_subnet.wire import MASK_KEY, SCALE_KEY, SKIP_KEY, UNIT_SCALES_KEY  # noqa: E402

log = logging.getLogger("bench.bytes")

TOLERANCE = 0.01  # within 1% of the floor


def floor_bytes(msg: Message) -> int:
    """Raw bytes of the arrays of ``msg``: ``Σ numel · element_size`` (the floor)."""
    (arrays,) = msg.content.array_records.values()
    return sum(math.prod(a.shape) * np.dtype(a.dtype).itemsize for a in arrays.values())


def npy_header_bytes(msg: Message) -> int:
    """Bytes of the ``.npy`` headers of the arrays of ``msg`` (Flower's Array format;
    none in a packed slice's raw arrays)."""
    (arrays,) = msg.content.array_records.values()
    return sum(len(a.data) for a in arrays.values()) - floor_bytes(msg)


def mask_config_bytes(msg: Message) -> int:
    """Serialized bytes of the mask entries of the message's ConfigRecord (``mask``,
    ``scale``, ``unit-scales``, ``skip``): the record's protobuf size with them minus without them."""
    configs = list(msg.content.config_records.values())
    if not configs:
        return 0
    config = configs[0]
    rest = ConfigRecord({k: v for k, v in config.items()
                         if k not in (MASK_KEY, SCALE_KEY, UNIT_SCALES_KEY, SKIP_KEY)})
    return config_record_to_proto(config).ByteSize() - config_record_to_proto(rest).ByteSize()


def sizes(msgs: list[Message]) -> dict[str, list[int]]:
    """Per message: proto, objects, floor, npy headers, mask config (bytes)."""
    return {"proto": [proto_bytes(m) for m in msgs], "objects": [message_object_bytes(m) for m in msgs],
            "floor": [floor_bytes(m) for m in msgs], "npy_headers": [npy_header_bytes(m) for m in msgs],
            "mask_config": [mask_config_bytes(m) for m in msgs]}


def round_messages(strategy, model: str, nodes: int) -> tuple[list[Message], list[Message]]:
    """One round's train messages and the replies a client would send (built here)."""
    g = grid(nodes)
    msgs = list(strategy.configure_train(SERVER_ROUND, initial_arrays(model), ConfigRecord(dict(TRAIN_CONFIG)), g))
    push(msgs)  # message ids, as a SuperLink gives them
    replies = [client_reply(m, num_examples=100 + i, seed=i) for i, m in enumerate(msgs)]
    return msgs, replies


def measure(model: str, protocol: str, param: float, nodes: int,
            fedavg: dict[str, dict[str, list[int]]]) -> list[dict[str, object]]:
    """The lines of one setting: {down, up} × {proto, objects}."""
    msgs, replies = round_messages(make_strategy(protocol, param, model, nodes), model, nodes)
    out = []
    for direction, ours in (("down", sizes(msgs)), ("up", sizes(replies))):
        for serialization in ("proto", "objects"):
            values = ours[serialization]
            fa = statistics.fmean(fedavg[direction][serialization])
            # masks differ per node: compare medians (the overhead per node is nearly
            # constant, so the median node of the sizes is that of the floors)
            floor = statistics.median(ours["floor"])
            mean = statistics.fmean(values)
            per_node = all(v <= (1 + TOLERANCE) * f for v, f in zip(values, ours["floor"], strict=True))
            setting = {"model": MODELS[model][2], "protocol": protocol,
                       "keep_prob" if protocol == "dropout" else "num_subnets": param, "nodes": nodes,
                       "direction": direction, "serialization": serialization}
            line = record("bytes", setting, values, metric="bytes", fedavg=fa, target=(1 + TOLERANCE) * floor / fa,
                          mean=mean, floor=floor, floor_mean=statistics.fmean(ours["floor"]),
                          over_floor=statistics.median(values) / floor - 1,
                          within_1pct_of_floor=per_node,
                          npy_headers=statistics.fmean(ours["npy_headers"]),
                          mask_config=statistics.fmean(ours["mask_config"]),
                          other=mean - statistics.fmean(ours["floor"]) - statistics.fmean(ours["npy_headers"])
                          - statistics.fmean(ours["mask_config"]),
                          fedavg_over_floor=fa / statistics.fmean(fedavg[direction]["floor"]) - 1)
            out.append(line)
    return out


def fedavg_sizes(model: str, nodes: int) -> dict[str, dict[str, list[int]]]:
    strategy = FedAvg(fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=nodes, min_available_nodes=nodes)
    msgs, replies = round_messages(strategy, model, nodes)
    return {"down": sizes(msgs), "up": sizes(replies)}


def main(argv: list[str] | None = None) -> list[dict[str, object]]:
    """Measure, emit one JSON line per measurement, and return them."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="the MLP and the ResNet at ξ = 0.5 and p = 2, 4 nodes")
    p.add_argument("--models", nargs="+", default=["mlp", "resnet"], choices=sorted(MODELS))
    p.add_argument("--keep-probs", type=float, nargs="*", default=[0.25, 0.5, 1.0])
    p.add_argument("--num-subnets", type=int, nargs="*", default=[2, 4, 8])
    p.add_argument("--nodes", type=int, default=8, help="nodes per round (per-node sizes are averaged)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s", stream=sys.stderr)
    for name in ("flwr", "fl_subnet", "strategies"):
        logging.getLogger(name).setLevel(logging.WARNING)
    protocols = [("dropout", xi) for xi in args.keep_probs] + [("ist", p) for p in args.num_subnets]
    if args.quick:
        args.nodes, protocols = 4, [("dropout", 0.5), ("ist", 2)]
    out = []
    torch.manual_seed(0)
    for model in args.models:
        fedavg = fedavg_sizes(model, args.nodes)
        for protocol, param in protocols:
            for line in measure(model, protocol, param, args.nodes, fedavg):
                emit(line)
                out.append(line)
                s = line["setting"]
                log.info("%s %s %s %s %s: %.0f B (floor %.0f, +%.3f%%; FedAvg %.0f)", model, protocol, param,
                         s["direction"], s["serialization"], line["mean"], line["floor"],
                         100 * line["over_floor"], line["fedavg_median"])
    return out


if __name__ == "__main__":
    main()
