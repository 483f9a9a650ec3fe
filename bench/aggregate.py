"""Server-side aggregation cost: Flower's FedAvg vs fl_subnet's gather + masked aggregate.

Measures, in one process and with ``time.perf_counter``, the server work of one round
with ``--clients`` replies for an MLP (default ``MLP(784, [1024, 1024], 10)``, ~1.86M
parameters):

* ``flower_fedavg``: ``flwr.serverapp.strategy.strategy_utils.aggregate_arrayrecords``
  over one RecordDict per client, each holding the FULL model as an ArrayRecord plus a
  ``MetricRecord({"num-examples": n_i})``. The records are built beforehand (not timed).
* ``fl_subnet_gather_aggregate``: for each client, ``Slicer.gather`` of its compact
  slice under a Bernoulli(ξ) mask (timed; none for a full mask, whose slice is the
  model itself, as ``SubnetStrategy.configure_train`` sends it); then, from replies that are
  ArrayRecords of those compact slices serialized beforehand (not timed, mirroring the
  Flower side), ``arrays_to_state(reply, copy=False)`` (the zero-copy decode the
  strategy uses) + ``MaskedAggregator.add`` for every client
  and one ``finalize()`` (timed).

Repeated ``--reps`` times, interleaved, for each ξ of ``--keep-probs`` (default 0.25,
0.5, 1.0); one JSON line per ξ (:mod:`bench.common`: median seconds, spread, FedAvg's
median, ratio, target 1.0 at ξ = 1), with a per-phase breakdown for fl_subnet and the
bytes of a full reply vs the mean compact reply (sum of ``len(Array.data)``).
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import time
from pathlib import Path

import torch
from flwr.app import ArrayRecord, MetricRecord, RecordDict
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import emit, interleaved, record  # noqa: E402
from fl_subnet.core.aggregate import MaskedAggregator
from fl_subnet.core.analysis import find_unit_groups  # noqa: E402
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
    for mask in masks:  # the server cuts every client's slice (what it sends out; a full
        if not slicer.is_full(mask):  # mask's slice is the model itself, as in configure_train)
            slicer.gather(state, mask)
    t1 = time.perf_counter()
    agg = MaskedAggregator(state, slicer)
    for reply, mask, w in zip(replies, masks, weights, strict=True):
        agg.add(arrays_to_state(reply, copy=False), mask, w)  # as the strategy decodes replies
    t2 = time.perf_counter()
    agg.finalize()
    t3 = time.perf_counter()
    return {"total": t3 - t0, "gather": t1 - t0, "add": t2 - t1, "finalize": t3 - t2}


def main(argv: list[str] | None = None) -> list[dict[str, object]]:
    """Measure every ``--keep-probs`` value; emit one JSON line each (and return them)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="10 clients, MLP(784, [256, 256], 10), 2 reps")
    p.add_argument("--clients", type=int, default=100)
    p.add_argument("--keep-probs", type=float, nargs="+", default=[0.25, 0.5, 1.0])
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--hidden", type=int, nargs="+", default=[1024, 1024])
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: leave)")
    args = p.parse_args(argv)
    if args.quick:
        args.clients, args.hidden, args.reps = 10, [256, 256], 2
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s", stream=sys.stderr)
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    torch.manual_seed(SEED)
    model = MLP(784, args.hidden, 10)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    num_params = sum(v.numel() for v in state.values())
    groups = find_unit_groups(model)
    slicer = Slicer(groups)
    gen = torch.Generator().manual_seed(SEED)
    weights = [int(n) for n in torch.randint(50, 500, (args.clients,), generator=gen)]
    log.info("building %d full replies (%d params)", args.clients, num_params)
    full_records = [
        RecordDict({"arrays": state_to_arrays(state), "metrics": MetricRecord({"num-examples": n})})
        for n in weights
    ]
    full_bytes = record_bytes(full_records[0]["arrays"])
    out = []
    for xi in args.keep_probs:
        masks = BernoulliSampler(xi, scale=True, seed=SEED).sample(groups, SERVER_ROUND, args.clients)
        replies = [state_to_arrays(slicer.gather(state, m)) for m in masks]
        compact_bytes = [record_bytes(r) for r in replies]
        phases: list[dict[str, float]] = []
        ours, flower = interleaved(lambda: phases.append(run_fl_subnet(state, slicer, masks, replies, weights)),
                                   lambda: run_flower(full_records), args.reps)
        setting = {"model": f"MLP(784, {args.hidden}, 10)", "num_params": num_params, "clients": args.clients,
                   "keep_prob": xi, "part": "gather + aggregate alone", "torch_threads": torch.get_num_threads()}
        line = record("aggregate", setting, ours, fedavg=flower, target=1.0 if xi == 1.0 else None,
                      phases={k: statistics.median(r[k] for r in phases[1:]) for k in ("gather", "add", "finalize")},
                      full_reply_bytes=full_bytes, compact_reply_bytes_mean=statistics.fmean(compact_bytes),
                      compact_over_full_bytes=statistics.fmean(compact_bytes) / full_bytes)
        emit(line)
        out.append(line)
        log.info("keep-prob %.2f: fl_subnet %.3f s, flower %.3f s, ratio %.3f", xi, line["median"],
                 line["fedavg_median"], line["ratio"])
    return out


if __name__ == "__main__":
    main()
