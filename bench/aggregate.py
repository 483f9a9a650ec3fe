"""Server-side aggregation cost: Flower's FedAvg vs fl_subnet's gather + masked aggregate.

Measures, in one process and with ``time.perf_counter``, the server work of one round
with ``--clients`` replies for an MLP (default ``MLP(784, [1024, 1024], 10)``, ~1.86M
parameters):

* ``flower_fedavg``: ``flwr.serverapp.strategy.strategy_utils.aggregate_arrayrecords``
  over one RecordDict per client, each holding the FULL model as an ArrayRecord plus a
  ``MetricRecord({"num-examples": n_i})``. The records are built beforehand (not timed).
* ``fl_subnet_gather_aggregate``: for each client, ``Slicer.gather`` of its compact
  slice under a Bernoulli(ξ = ``--keep-prob``) mask (timed); then, from replies that are
  ArrayRecords of those compact slices serialized beforehand (not timed, mirroring the
  Flower side), ``arrays_to_state(reply, copy=False)`` (the zero-copy decode the
  strategy uses) + ``MaskedAggregator.add`` for every client
  and one ``finalize()`` (timed).

Each is repeated ``--reps`` times; the median and every repetition are reported, with
a per-phase breakdown for fl_subnet, the bytes of a full reply vs the mean compact reply
(sum of ``len(Array.data)``), and the ratio fl_subnet / Flower. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import statistics
import time

import torch
from flwr.app import ArrayRecord, MetricRecord, RecordDict
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

from fl_subnet.core.aggregate import MaskedAggregator
from fl_subnet.core.analysis import find_unit_groups
from fl_subnet.models import MLP
from fl_subnet.wire import arrays_to_state, state_to_arrays
from fl_subnet.core.samplers import BernoulliSampler
from fl_subnet.core.slicing import Slicer

log = logging.getLogger("bench.aggregate")

SEED = 0
SERVER_ROUND = 1


def record_bytes(record: ArrayRecord) -> int:
    """Payload size of an ArrayRecord: sum of ``len(Array.data)``."""
    return sum(len(a.data) for a in record.values())


def run_flower(records: list[RecordDict]) -> float:
    t0 = time.perf_counter()
    aggregate_arrayrecords(records, "num-examples")
    return time.perf_counter() - t0


def run_fl_subnet(state, slicer, masks, replies, weights) -> dict[str, float]:
    t0 = time.perf_counter()
    for mask in masks:  # the server cuts every client's slice (what it sends out)
        slicer.gather(state, mask)
    t1 = time.perf_counter()
    agg = MaskedAggregator(state, slicer)
    for reply, mask, w in zip(replies, masks, weights, strict=True):
        agg.add(arrays_to_state(reply, copy=False), mask, w)  # as the strategy decodes replies
    t2 = time.perf_counter()
    agg.finalize()
    t3 = time.perf_counter()
    return {"total": t3 - t0, "gather": t1 - t0, "add": t2 - t1, "finalize": t3 - t2}


def summary(values: list[float]) -> dict[str, object]:
    return {"median_s": statistics.median(values), "reps_s": values}


def main(argv: list[str] | None = None) -> dict[str, object]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clients", type=int, default=100)
    p.add_argument("--keep-prob", type=float, default=0.5)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--hidden", type=int, nargs="+", default=[1024, 1024])
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: leave)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    torch.manual_seed(SEED)
    model = MLP(784, args.hidden, 10)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    num_params = sum(v.numel() for v in state.values())
    groups = find_unit_groups(model)
    slicer = Slicer(groups)
    masks = BernoulliSampler(args.keep_prob, scale=True, seed=SEED).sample(groups, SERVER_ROUND, args.clients)
    gen = torch.Generator().manual_seed(SEED)
    weights = [int(n) for n in torch.randint(50, 500, (args.clients,), generator=gen)]

    log.info("building %d full and %d compact replies (%d params)", args.clients, args.clients, num_params)
    full_records = [
        RecordDict({"arrays": state_to_arrays(state), "metrics": MetricRecord({"num-examples": n})})
        for n in weights
    ]
    replies = [state_to_arrays(slicer.gather(state, m)) for m in masks]
    full_bytes = record_bytes(full_records[0]["arrays"])
    compact_bytes = [record_bytes(r) for r in replies]

    # One full warm-up round each (allocator, lazy imports), not reported.
    run_flower(full_records)
    run_fl_subnet(state, slicer, masks, replies, weights)

    flower, ours = [], []
    for rep in range(args.reps):  # interleaved so drift hits both alike
        flower.append(run_flower(full_records))
        ours.append(run_fl_subnet(state, slicer, masks, replies, weights))
        log.info("rep %d: flower %.3f s, fl_subnet %.3f s", rep, flower[-1], ours[-1]["total"])

    ours_total = [r["total"] for r in ours]
    ratio = statistics.median(ours_total) / statistics.median(flower)
    return {
        "model": f"MLP(784, {args.hidden}, 10)",
        "num_params": num_params,
        "clients": args.clients,
        "keep_prob": args.keep_prob,
        "reps": args.reps,
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "flower_fedavg": summary(flower),
        "fl_subnet_gather_aggregate": {
            **summary(ours_total),
            "phases_median_s": {k: statistics.median(r[k] for r in ours) for k in ("gather", "add", "finalize")},
        },
        "full_reply_bytes": full_bytes,
        "compact_reply_bytes_mean": statistics.fmean(compact_bytes),
        "compact_over_full_bytes": statistics.fmean(compact_bytes) / full_bytes,
        "time_ratio_fl_subnet_over_flower": ratio,
        "fl_subnet_not_slower": ratio <= 1.0,
    }


if __name__ == "__main__":
    print(json.dumps(main(), indent=2))
