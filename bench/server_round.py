"""Server time of one training round, done as a Flower deployment does it, vs Flower's FedAvg.

One round, timed with ``time.perf_counter`` (seconds), in four phases:

1. ``configure``: the strategy's ``configure_train`` (node sample, masks, one Message per
   node with its compact slice as an ArrayRecord and the mask in its ConfigRecord);
2. ``serialize``: every outgoing message serialized. ``--serialization proto``
   (default): ``message_to_proto(msg).SerializeToString()`` per message, content
   included (Flower's protobuf serde, as the in-process grid and the message-level
   gRPC path carry it). ``--serialization objects``: Flower 1.41's SuperLink object
   store (``flwr.superlink.grid.http_grid.HttpGrid.push_messages``): the metadata
   protobuf of each message, then every distinct object of the content trees
   (RecordDict, ArrayRecord, ConfigRecord, Array, ArrayChunk) hashed (SHA-256 object
   id) and deflated; an object several messages share (FedAvg's one RecordDict) is
   serialized once, as Flower does;
3. ``deserialize``: every reply rebuilt from its bytes (``message_from_proto``, or
   ``inflate_object_from_contents`` as ``HttpGrid.pull_messages``);
4. ``aggregate``: the strategy's ``aggregate_train``.

The replies are built before timing, the way a client builds them: the node's slice
(full model for FedAvg) plus 1e-3·N(0, 1), under the same ArrayRecord key, with
``num-examples`` (50..500) and ``train-loss`` in a MetricRecord, then deflated to
objects. Each round gets a fresh copy of the global ArrayRecord (sharing its bytes), so
that Flower's object ids are computed once per round as in a run.

fl-subnet's strategies: federated dropout (:class:`~fl_subnet.strategies.FederatedDropout`,
Bernoulli ξ) and IST (:class:`~fl_subnet.strategies.IST`, ``p`` parts, ``num_train_nodes``
= number of replies). Reference: Flower's ``flwr.serverapp.strategy.FedAvg`` doing the same
round on full-model replies, in the same process: even repetitions run FedAvg's round
first, odd ones the protocols' (one untimed warm-up repetition first).

Also measures the "gather + aggregate part alone" (``--no-gather-aggregate`` to skip):
per node ``Slicer.gather`` of its compact slice, then ``MaskedAggregator.add`` of every
(already decoded) compact reply and one ``finalize``, against Flower's
``aggregate_arrayrecords`` on full replies (the same as ``bench/aggregate.py``).

One JSON line per measurement (:func:`bench.common.emit`). Default settings: the MLP
(1.86M params) with 10 and 100 replies, the zoo's ResNet (43.6k params) with 10, 100 and
1,000 replies (ξ = 0.25 and 1 only, one repetition: ~20 s a round on 2 cores; 1,000 MLP
replies would hold 7.4 GB per strategy: pass ``--models mlp-small --replies 1000``, or
``mlp`` on a machine that has the memory), ξ ∈ {0.25, 0.5, 1.0} and p ∈ {2, 4, 8}. Targets (ratio to FedAvg): whole round ≤ 1.0 at ξ = 1,
≤ 0.4 at ξ = 0.5, ≤ 0.2 at ξ = 0.25; gather + aggregate ≤ 1.0 at ξ = 1. The server's
torch threads are ``SubnetStrategy.server_threads`` (1) inside its hooks; the setting
records torch's process-wide number. ``--profile`` prints the top cProfile entries of
one of our rounds per setting to stderr instead of measuring.
"""

from __future__ import annotations

import argparse
import cProfile
import functools
import io
import logging
import pstats
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.app.message.message import remove_content_from_message
from flwr.clientapp import ClientApp
from flwr.common.serde import message_from_proto, message_to_proto
from flwr.proto.message_pb2 import Message as ProtoMessage  # pylint: disable=no-name-in-module
from flwr.serverapp.strategy import FedAvg
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords
from flwr.supercore.inflatable.inflatable_object import (
    get_all_nested_objects,
    get_object_tree,
    no_object_id_recompute,
)
from flwr.supercore.inflatable.inflatable_utils import inflate_object_from_contents
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import emit, interleaved, record, timed  # noqa: E402
from fl_subnet.core.aggregate import MaskedAggregator  # noqa: E402
from fl_subnet.experiments.inprocess_grid import InProcessGrid  # noqa: E402
from fl_subnet.models import MLP, PreActResNet  # noqa: E402
from fl_subnet.strategies import IST, FederatedDropout  # noqa: E402
from fl_subnet.wire.packed import RAW_STYPE, raw_array, raw_values  # noqa: E402
from fl_subnet.wire import arrays_to_state  # noqa: E402

log = logging.getLogger("bench.server_round")

SEED = 0
SERVER_ROUND = 1
TRAIN_CONFIG = {"lr": 0.05, "local-epochs": 1, "batch-size": 32, "loss": "cross-entropy", "seed": 1}

#: name → (factory, example input or None, description)
MODELS: dict[str, tuple[Callable[[], nn.Module], torch.Tensor | None, str]] = {
    "mlp": (functools.partial(MLP, 784, [1024, 1024], 10), None, "MLP(784, [1024, 1024], 10), 1.86M params"),
    "mlp-small": (functools.partial(MLP, 784, [256, 256], 10), None, "MLP(784, [256, 256], 10), 269k params"),
    "resnet": (functools.partial(PreActResNet, 3, 10, blocks_per_stage=2), torch.zeros(1, 3, 32, 32),
               "zoo 'resnet': PreActResNet(3, 10, widths (16, 32), blocks-per-stage 2), 43.6k params"),
}
WHOLE_ROUND_TARGETS = {1.0: 1.0, 0.5: 0.4, 0.25: 0.2}
PHASES = ("configure", "serialize", "deserialize", "aggregate")


# ----------------------------------------------------------------------------- the wire
def grid(num_nodes: int) -> InProcessGrid:
    """A grid of ``num_nodes`` node ids; its ClientApp is never called (the benchmarks
    answer the messages themselves)."""
    return InProcessGrid(ClientApp(), num_nodes)


def push_proto(messages: Sequence[Message]) -> list[bytes]:
    """Serialize every outgoing message as one protobuf (``message_to_proto`` +
    ``SerializeToString``, content included), as the in-process grid and Flower's
    message-level gRPC path do: nothing is shared between messages."""
    return [message_to_proto(m).SerializeToString() for m in messages]


def pull_proto(wired: Sequence[bytes]) -> list[Message]:
    """Rebuild replies from their protobuf bytes (``message_from_proto``)."""
    return [message_from_proto(ProtoMessage.FromString(b)) for b in wired]


def push(messages: Sequence[Message]) -> tuple[list[bytes], dict[str, bytes]]:
    """Serialize outgoing messages as ``HttpGrid.push_messages`` does.

    Returns
    -------
    (list of bytes, dict)
        One metadata protobuf per message, and the deflated bytes of every distinct
        object of the messages' content trees (object id → bytes).
    """
    with no_object_id_recompute():
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = msg.object_id
        protos, objects = [], {}
        for msg in messages:
            protos.append(message_to_proto(remove_content_from_message(msg)).SerializeToString())
            objects.update(get_all_nested_objects(msg))
            get_object_tree(msg)
        contents = {oid: obj.deflate() for oid, obj in objects.items()}
    return protos, contents


def wire_reply(reply: Message) -> tuple[str, dict[str, bytes]]:
    """A reply as the SuperLink holds it: its object id and its objects' bytes."""
    with no_object_id_recompute():
        oid = reply.object_id
        contents = {k: obj.deflate() for k, obj in get_all_nested_objects(reply).items()}
    return oid, contents


def pull(wired: Sequence[tuple[str, dict[str, bytes]]]) -> list[Message]:
    """Rebuild replies from their objects, as ``HttpGrid.pull_messages`` does."""
    out = []
    for oid, contents in wired:
        msg = inflate_object_from_contents(oid, contents, keep_object_contents=True)
        msg.metadata.__dict__["_message_id"] = oid
        out.append(msg)
    return out


def message_object_bytes(msg: Message) -> int:
    """Bytes one node pulls for ``msg`` on the SuperLink path: its metadata protobuf plus
    every object of its content tree (an object shared by several messages counts for
    each node that pulls it)."""
    with no_object_id_recompute():
        size = sum(len(o.deflate()) for o in get_all_nested_objects(msg).values())
    return size + len(message_to_proto(remove_content_from_message(msg)).SerializeToString())


def proto_bytes(msg: Message) -> int:
    """Bytes of ``msg`` as one protobuf (``message_to_proto(msg).ByteSize()``, what the
    in-process grid and Flower's gRPC message path carry)."""
    return message_to_proto(msg).ByteSize()


def client_reply(msg: Message, *, num_examples: int, noise: float = 1e-3, seed: int = 0) -> Message:
    """What a client sends back for train message ``msg``: its arrays plus ``noise`` ×
    N(0, 1) (float tensors), under the same ArrayRecord key, and ``num-examples`` /
    ``train-loss`` in a MetricRecord."""
    gen = torch.Generator().manual_seed(seed)
    (key, arrays), = msg.content.array_records.items()
    out = ArrayRecord()
    for name, a in arrays.items():
        packed = a.stype == RAW_STYPE  # a packed slice: the client packs its reply too
        t = torch.from_numpy(raw_values(a, name).copy() if packed else a.numpy())
        if t.is_floating_point():
            t = t + noise * torch.randn(t.shape, generator=gen, dtype=t.dtype)
        out[name] = raw_array(t.numpy()) if packed else Array(t.numpy())
    content = RecordDict({key: out,
                          "metrics": MetricRecord({"num-examples": int(num_examples), "train-loss": 0.5})})
    return Message(content, reply_to=msg)


def fresh_copy(arrays: ArrayRecord) -> ArrayRecord:
    """A new ArrayRecord sharing ``arrays``' bytes (no cached Flower object ids)."""
    return ArrayRecord({k: Array(dtype=a.dtype, shape=tuple(a.shape), stype=a.stype, data=a.data)
                        for k, a in arrays.items()})


# ----------------------------------------------------------------------------- settings
def make_strategy(protocol: str, param: float, model: str, num_nodes: int):
    """fl-subnet's strategy for a setting (``dropout``: ξ = ``param``; ``ist``: p = ``param``)."""
    factory, example, _ = MODELS[model]
    common = dict(seed=SEED, example_input=example, fraction_evaluate=0.0)
    if protocol == "dropout":
        return FederatedDropout(factory, float(param), fraction_train=1.0, min_train_nodes=num_nodes,
                                min_available_nodes=num_nodes, **common)
    if protocol == "ist":
        return IST(factory, int(param), num_train_nodes=num_nodes, **common)
    raise ValueError(f"unknown protocol {protocol!r}")


def initial_arrays(model: str) -> ArrayRecord:
    torch.manual_seed(SEED)
    return ArrayRecord(MODELS[model][0]().state_dict())


class Round:
    """One strategy's round on prepared replies: :meth:`__call__` runs it and keeps the
    seconds of each phase in :attr:`phases`."""

    def __init__(self, strategy, arrays: ArrayRecord, num_nodes: int, g: InProcessGrid,
                 serialization: str = "proto") -> None:
        self.strategy, self.arrays, self.grid, self.serialization = strategy, arrays, g, serialization
        self.phases: list[dict[str, float]] = []
        gen = torch.Generator().manual_seed(SEED + 1)
        sizes = torch.randint(50, 500, (num_nodes,), generator=gen).tolist()
        msgs = list(strategy.configure_train(SERVER_ROUND, fresh_copy(arrays), ConfigRecord(dict(TRAIN_CONFIG)), g))
        push(msgs)  # message ids, for the replies
        replies = (client_reply(m, num_examples=n, seed=i) for i, (m, n) in enumerate(zip(msgs, sizes, strict=True)))
        if serialization == "proto":
            self.wired = [message_to_proto(r).SerializeToString() for r in replies]
        else:
            self.wired = [wire_reply(r) for r in replies]
        self.bytes_down = 0

    def __call__(self) -> ArrayRecord | None:
        arrays = fresh_copy(self.arrays)
        t0 = time.perf_counter()
        msgs = list(self.strategy.configure_train(SERVER_ROUND, arrays, ConfigRecord(dict(TRAIN_CONFIG)), self.grid))
        t1 = time.perf_counter()
        if self.serialization == "proto":
            out = push_proto(msgs)
        else:
            out = list(push(msgs)[1].values())
        t2 = time.perf_counter()
        replies = pull_proto(self.wired) if self.serialization == "proto" else pull(self.wired)
        t3 = time.perf_counter()
        new, _ = self.strategy.aggregate_train(SERVER_ROUND, replies)
        t4 = time.perf_counter()
        self.bytes_down = sum(len(b) for b in out)
        self.phases.append(dict(zip(PHASES, (t1 - t0, t2 - t1, t3 - t2, t4 - t3))))
        return new


def phase_medians(phases: list[dict[str, float]]) -> dict[str, float]:
    return {k: statistics.median(p[k] for p in phases) for k in PHASES}


SERIALIZATIONS = {
    "proto": "message_to_proto(msg).SerializeToString() per message / message_from_proto per reply",
    "objects": "flwr 1.41 SuperLink object store (HttpGrid push: shared objects serialized once; "
               "pull: inflate_object_from_contents)",
}


def measure_rounds(model: str, num_nodes: int, protocols: Sequence[tuple[str, float]], reps: int,
                   serialization: str = "proto") -> list[dict[str, object]]:
    """Whole server round (seconds) of each protocol and of Flower's FedAvg on the same
    model and replies: even repetitions run FedAvg's round, then each protocol's, odd ones
    the protocols' first, so that drift and the memory one round leaves behind hit all
    alike (one untimed warm-up repetition first, FedAvg's)."""
    g = grid(num_nodes)
    arrays = initial_arrays(model)
    fedavg = Round(FedAvg(fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=num_nodes,
                          min_available_nodes=num_nodes), arrays, num_nodes, g, serialization)
    ours = [Round(make_strategy(p, v, model, num_nodes), arrays, num_nodes, g, serialization) for p, v in protocols]
    times: list[list[float]] = [[] for _ in ours]
    base: list[float] = []
    for rep in range(reps + 1):
        if rep % 2:  # odd repetitions: fl-subnet's rounds first, so that neither side always follows the other
            for i, r in enumerate(ours):
                times[i].append(timed(r))
        t = timed(fedavg)
        if rep:
            base.append(t)
        if not rep % 2:
            for i, r in enumerate(ours):
                t = timed(r)
                if rep:
                    times[i].append(t)
    out = []
    for (protocol, param), r, a in zip(protocols, ours, times, strict=True):
        setting = {"model": MODELS[model][2], "replies": num_nodes, "protocol": protocol,
                   "keep_prob" if protocol == "dropout" else "num_subnets": param,
                   "serialization": SERIALIZATIONS[serialization], "torch_threads": torch.get_num_threads()}
        target = WHOLE_ROUND_TARGETS.get(float(param)) if protocol == "dropout" else None
        out.append(record("server_round", setting, a, fedavg=base, target=target,
                          phases=phase_medians(r.phases[1:]), fedavg_phases=phase_medians(fedavg.phases[1:]),
                          bytes_serialized=r.bytes_down, fedavg_bytes_serialized=fedavg.bytes_down))
    return out


def measure_gather_aggregate(model: str, num_nodes: int, keep_prob: float, reps: int) -> dict[str, object]:
    """The gather + aggregate part alone (``bench/aggregate.py``'s measurement)."""
    strategy = make_strategy("dropout", keep_prob, model, num_nodes)
    slicer = strategy.slicer
    arrays = initial_arrays(model)
    state = arrays_to_state(arrays)
    masks = strategy.sampler.sample(strategy.groups, SERVER_ROUND, num_nodes)
    gen = torch.Generator().manual_seed(SEED + 1)
    weights = torch.randint(50, 500, (num_nodes,), generator=gen).tolist()
    full = [RecordDict({"arrays": fresh_copy(arrays), "metrics": MetricRecord({"num-examples": n})}) for n in weights]
    compact = [slicer.gather(state, m) for m in masks]

    def ours():
        for m in masks:
            if not slicer.is_full(m):  # a full mask's slice is the model itself (configure_train)
                slicer.gather(state, m)
        agg = MaskedAggregator(state, slicer)
        for c, m, w in zip(compact, masks, weights, strict=True):
            agg.add(c, m, w)
        agg.finalize()

    def flower():
        aggregate_arrayrecords(full, "num-examples")

    a, b = interleaved(ours, flower, reps)
    setting = {"model": MODELS[model][2], "replies": num_nodes, "protocol": "dropout", "keep_prob": keep_prob,
               "part": "gather + aggregate alone", "torch_threads": torch.get_num_threads()}
    return record("server_round.gather_aggregate", setting, a, fedavg=b,
                  target=1.0 if keep_prob == 1.0 else None)


def profile_round(model: str, num_nodes: int, protocol: str, param: float, top: int) -> str:
    """cProfile of one of our rounds (after a warm-up): the top entries by cumulative
    time (stderr text)."""
    g = grid(num_nodes)
    ours = Round(make_strategy(protocol, param, model, num_nodes), initial_arrays(model), num_nodes, g)
    ours()
    prof = cProfile.Profile()
    prof.enable()
    ours()
    prof.disable()
    out = io.StringIO()
    stats = pstats.Stats(prof, stream=out).sort_stats("tottime")
    stats.print_stats(top)
    return f"=== {model} {num_nodes} replies {protocol} {param}: phases {ours.phases[-1]}\n{out.getvalue()}"


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small setting (resnet, 10 replies, 2 reps): seconds")
    p.add_argument("--models", nargs="+", default=None, choices=sorted(MODELS))
    p.add_argument("--replies", type=int, nargs="+", default=None,
                   help="replies per round (default: 10 100 for the MLP, 10 100 1000 for the ResNet)")
    p.add_argument("--keep-probs", type=float, nargs="*", default=[0.25, 0.5, 1.0])
    p.add_argument("--num-subnets", type=int, nargs="*", default=[2, 4, 8])
    p.add_argument("--reps", type=int, default=None,
                   help="timed repetitions (default 5; 2 for 100 MLP replies, 1 for 1,000 replies)")
    p.add_argument("--no-gather-aggregate", action="store_true")
    p.add_argument("--profile", action="store_true", help="print cProfile tables to stderr instead of measuring")
    p.add_argument("--serialization", choices=sorted(SERIALIZATIONS), default="proto",
                   help="proto: one protobuf per message (default); objects: the SuperLink object store")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: leave)")
    return p.parse_args(argv)


#: default settings: (model, replies, protocols or None for all); 1,000 MLP replies would
#: hold 7.4 GB per strategy. 1,000 ResNet replies take ~20 s a round on 2 cores: only
#: ξ = 0.25 and 1 there by default (pass --models resnet --replies 1000 for all).
DEFAULT_SETTINGS = (("mlp", 10, None), ("mlp", 100, None), ("resnet", 10, None), ("resnet", 100, None),
                    ("resnet", 1000, (("dropout", 0.25), ("dropout", 1.0))))


def settings(args: argparse.Namespace) -> list[tuple[str, int, list[tuple[str, float]]]]:
    """(model, replies, protocols) to measure."""
    protocols = [("dropout", xi) for xi in args.keep_probs] + [("ist", p) for p in args.num_subnets]
    if args.quick:
        return [("resnet", 10, [("dropout", 0.5), ("dropout", 1.0), ("ist", 2)])]
    if args.models is None and args.replies is None:
        return [(m, n, list(p) if p else protocols) for m, n, p in DEFAULT_SETTINGS]
    models = args.models or ["mlp", "resnet"]
    return [(m, n, protocols) for m in models for n in (args.replies or ([10, 100] if m == "mlp" else [10, 100, 1000]))]


def main(argv: list[str] | None = None) -> list[dict[str, object]]:
    """Run the measurements, emit one JSON line each, and return them."""
    args = parse(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s", stream=sys.stderr)
    for name in ("flwr", "fl_subnet", "strategies"):
        logging.getLogger(name).setLevel(logging.WARNING)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    out = []
    for model, n, protocols in settings(args):
        reps = args.reps or (1 if n >= 1000 else 2 if args.quick or (model == "mlp" and n >= 100) else 5)
        if args.profile:
            for protocol, param in protocols:
                sys.stderr.write(profile_round(model, n, protocol, param, 25))
            continue
        for line in measure_rounds(model, n, protocols, reps, args.serialization):
            out.append(line)
            emit(line)
            s = line["setting"]
            log.info("%s %d %s %s: %.3f s vs FedAvg %.3f s, ratio %.3f", model, n, s["protocol"],
                     s.get("keep_prob", s.get("num_subnets")), line["median"], line["fedavg_median"], line["ratio"])
        if not args.no_gather_aggregate and (args.quick or (model == "mlp" and n == 100)):
            for xi in ([1.0] if args.quick else args.keep_probs):
                out.append(measure_gather_aggregate(model, n, xi, reps))
                emit(out[-1])
                log.info("%s %d gather+aggregate %s: ratio %.3f", model, n, xi, out[-1]["ratio"])
    return out


if __name__ == "__main__":
    main()
