"""Server peak memory of one training round on a 103.5M-parameter MLP, vs Flower's FedAvg.

The model is ``MLP(784, [7000, 7000, 7000], 1)`` (103.5M float32 parameters, 414 MB),
the one ``bench/client.py`` measures the client on. Each side runs one round in a fresh
child process (``--reps`` processes per side; FedAvg's and the protocols' processes
alternate, each repetition starting with the other side):

1. set-up (not measured): the global ``ArrayRecord``, the strategy, an in-process grid of
   ``--replies`` node ids, and the replies' wire bytes, built as
   ``bench/server_round.py`` builds them (the node's slice, or the full model for FedAvg,
   plus 1e-3·N(0, 1), ``num-examples`` 50..500, serialized with Flower's protobuf serde);
2. ``gc.collect()``, the RSS before the round (``VmRSS``: imports, the global model, the
   replies' wire bytes), and the peak reset (``/proc/self/clear_refs``);
3. the round, in two phases, the peak (``VmHWM``) read and reset after each:
   ``configure``: ``configure_train`` and every outgoing message serialized
   (``message_to_proto(msg).SerializeToString()``), the bytes then dropped as a grid does
   once it has pushed them; ``aggregate``: every reply rebuilt from its bytes
   (``message_from_proto``) and ``aggregate_train``, the new global ``ArrayRecord`` kept
   (the caller holds the old one and the new one at the end of a round, as Flower's
   ``Strategy.start`` does).

The measurement is the round's peak RSS minus the RSS before it (bytes): what the round
adds to the server on top of the model it starts from and the replies it receives. Its
ratio to FedAvg's is set against the protocol's bytes ratio (the outgoing and reply
messages' serialized bytes, over FedAvg's); target: memory ratio ≤ 1.2 × bytes ratio
(docs/speed.md). Each line also gives the peak of each phase (``phase_peaks``), the RSS before
the round and the model's size.

fl-subnet's sides: ``dropout:ξ`` (:class:`~fl_subnet.strategies.FederatedDropout`,
Bernoulli ξ, every node trains) and ``ist:p`` (:class:`~fl_subnet.strategies.IST`,
``num_train_nodes`` = replies; float64 precision, its default). FedAvg: Flower's
``flwr.serverapp.strategy.FedAvg``.

Run: ``OMP_NUM_THREADS=1 python bench/server_memory.py`` (4 replies, dropout 0.5 and 0.25,
IST p = 4, 2 processes per side: about 8 GB at FedAvg's peak). ``--quick``: a
784-[700]×3-1 MLP, 1 process per side.
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import logging
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

log = logging.getLogger("bench.server_memory")

TARGET_BYTES_FACTOR = 1.2
SEED = 0
SERVER_ROUND = 1
TRAIN_CONFIG = {"lr": 0.05, "local-epochs": 1, "batch-size": 32, "loss": "mse", "seed": 1}


def make_side(side: str, hidden: list[int], num_nodes: int):
    """The strategy of ``side`` (``fedavg``, ``dropout:ξ``, ``ist:p``) for the MLP."""
    from flwr.serverapp.strategy import FedAvg

    from fl_subnet.models import MLP
    from fl_subnet.strategies import IST, FederatedDropout

    factory = functools.partial(MLP, 784, hidden, 1)
    kind, _, param = side.partition(":")
    common = dict(seed=SEED, fraction_evaluate=0.0)
    if kind == "fedavg":
        return FedAvg(fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=num_nodes,
                      min_available_nodes=num_nodes)
    if kind == "dropout":
        return FederatedDropout(factory, float(param), fraction_train=1.0, min_train_nodes=num_nodes,
                                min_available_nodes=num_nodes, **common)
    if kind == "ist":
        return IST(factory, int(param), num_train_nodes=num_nodes, **common)
    raise ValueError(f"unknown side {side!r}")


def child(side: str, hidden: list[int], num_nodes: int) -> dict[str, object]:
    """One round of ``side`` in this process (see the module docstring).

    Returns
    -------
    dict
        ``rss_before`` (bytes), ``peak`` (round peak RSS minus ``rss_before``, bytes),
        ``phase_peaks`` (the same per phase), ``bytes_down`` / ``bytes_up`` (serialized
        outgoing / reply messages, bytes), ``model_bytes`` (the global model's float
        bytes) and ``reset`` (whether the peak could be reset).
    """
    import torch
    from flwr.app import ConfigRecord

    from bench.common import reset_peak, status_bytes
    from bench.server_round import client_reply, fresh_copy, grid, pull_proto, push_proto
    from fl_subnet.models import MLP

    torch.manual_seed(SEED)
    from flwr.app import ArrayRecord
    model = MLP(784, hidden, 1)
    arrays = ArrayRecord(model.state_dict())
    model_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    del model
    strategy = make_side(side, hidden, num_nodes)
    g = grid(num_nodes)
    gen = torch.Generator().manual_seed(SEED + 1)
    sizes = torch.randint(50, 500, (num_nodes,), generator=gen).tolist()
    msgs = list(strategy.configure_train(SERVER_ROUND, fresh_copy(arrays), ConfigRecord(dict(TRAIN_CONFIG)), g))
    wired = []
    for i, (m, n) in enumerate(zip(msgs, sizes, strict=True)):
        m.metadata.__dict__["_message_id"] = f"setup-{i}"
        wired.append(push_proto([client_reply(m, num_examples=n, seed=i)])[0])
    del msgs
    gc.collect()

    rss_before = status_bytes("VmRSS")
    reset = reset_peak()
    phases = {}
    msgs = list(strategy.configure_train(SERVER_ROUND, fresh_copy(arrays), ConfigRecord(dict(TRAIN_CONFIG)), g))
    out = push_proto(msgs)
    bytes_down = sum(len(b) for b in out)
    del out, msgs
    phases["configure"] = status_bytes("VmHWM") - rss_before
    reset_peak()
    replies = pull_proto(wired)
    new, _ = strategy.aggregate_train(SERVER_ROUND, replies)
    del replies
    phases["aggregate"] = status_bytes("VmHWM") - rss_before
    assert new is not None, "the round kept the model"
    return {"side": side, "rss_before": rss_before, "peak": max(phases.values()), "phase_peaks": phases,
            "bytes_down": bytes_down, "bytes_up": sum(len(b) for b in wired), "model_bytes": model_bytes,
            "reset": reset}


def run_child(side: str, hidden: list[int], num_nodes: int) -> dict[str, object]:
    """:func:`child` in a fresh process."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", side, "--hidden", ",".join(map(str, hidden)),
           "--replies", str(num_nodes)]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{side} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    out = json.loads(done.stdout.strip().splitlines()[-1])
    log.info("%s: peak %.1f MB over %.1f MB before (phases %s)", side, out["peak"] / 1e6, out["rss_before"] / 1e6,
             {k: round(v / 1e6, 1) for k, v in out["phase_peaks"].items()})
    return out


def main(argv: list[str] | None = None) -> list[dict[str, object]]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="a 784-[700]x3-1 MLP, 1 process per side")
    p.add_argument("--hidden", default="7000,7000,7000", help="the MLP's hidden widths")
    p.add_argument("--replies", type=int, default=4, help="nodes (replies) per round")
    p.add_argument("--sides", default="dropout:0.5,dropout:0.25,ist:4",
                   help="fl-subnet's sides: dropout:ξ, ist:p (comma-separated)")
    p.add_argument("--reps", type=int, default=2, help="fresh processes per side")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.hidden, args.reps = "700,700,700", 1
    hidden = [int(h) for h in args.hidden.split(",")]
    if args.child:
        print(json.dumps(child(args.child, hidden, args.replies)))
        return []
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s", stream=sys.stderr)
    from bench.common import emit, record

    sides = [s.strip() for s in args.sides.split(",") if s.strip()]
    runs: dict[str, list[dict]] = {s: [] for s in ["fedavg", *sides]}
    for rep in range(args.reps):
        order = ["fedavg", *sides] if rep % 2 == 0 else [*sides, "fedavg"]
        for s in order:
            runs[s].append(run_child(s, hidden, args.replies))
    fedavg = runs["fedavg"]
    fedavg_bytes = statistics.median(r["bytes_down"] + r["bytes_up"] for r in fedavg)
    out = []
    for s in sides:
        ours = runs[s]
        bytes_ratio = statistics.median(r["bytes_down"] + r["bytes_up"] for r in ours) / fedavg_bytes
        setting = {"model": f"MLP(784, {hidden}, 1), {fedavg[0]['model_bytes'] / 4e6:.1f}M params",
                   "replies": args.replies, "side": s, "fedavg": "Flower FedAvg",
                   "measure": "round peak RSS minus RSS before the round (fresh process)"}
        line = record("server_memory", setting, [r["peak"] for r in ours], metric="bytes",
                      fedavg=[r["peak"] for r in fedavg], bytes_ratio=bytes_ratio,
                      target_ratio=TARGET_BYTES_FACTOR * bytes_ratio,
                      phase_peaks={k: statistics.median(r["phase_peaks"][k] for r in ours)
                                   for k in ours[0]["phase_peaks"]},
                      fedavg_phase_peaks={k: statistics.median(r["phase_peaks"][k] for r in fedavg)
                                          for k in fedavg[0]["phase_peaks"]},
                      rss_before=statistics.median(r["rss_before"] for r in ours),
                      fedavg_rss_before=statistics.median(r["rss_before"] for r in fedavg),
                      model_bytes=fedavg[0]["model_bytes"], peak_reset=all(r["reset"] for r in ours + fedavg))
        line["meets_target"] = bool(line["ratio"] <= line["target_ratio"])
        out.append(line)
        emit(line)
        log.info("%s: peak %.0f MB vs FedAvg %.0f MB: ratio %.3f, bytes ratio %.3f (target %.3f)", s,
                 line["median"] / 1e6, line["fedavg_median"] / 1e6, line["ratio"], bytes_ratio,
                 line["target_ratio"])
    return out


if __name__ == "__main__":
    main()
