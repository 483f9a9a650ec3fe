"""Scale: 1,000 virtual clients, 100 sampled per round, 10 rounds of IST on digits.

Every run is a fresh process on the in-process grid (``fl_subnet.experiments.
inprocess_grid.InProcessGrid``: no Ray; the server and the sampled clients, one after
the other, in one process; messages cross Flower's protobuf serde), so its peak RSS is
its own (``VmHWM`` read by the process itself at its end, bytes):

* **ours**: ``fl-subnet run SCENARIO --out DIR`` (the project's CLI, its ``main`` called in
  the fresh process), the scenario being
  ``strategy = "ist"``, ``num-subnets = 4``, ``num-nodes = 1000``,
  ``fraction-train = 0.1``, ``num-server-rounds = 10``, digits with the App's default
  MLP (64-128-64-10), iid partitions (1,437 training rows over 1,000 nodes: one or two
  each; Dirichlet partitions could leave a node empty), τ = 10.
* **FedAvg**: the same settings with Flower's own ``FedAvg`` and Flower's template
  ClientApp on the same in-process grid (``bench/simulation.py``'s ``run_flower_fedavg``,
  ``bench/client.py``'s ``fedavg_client_app``; same evaluation, results files and
  checkpoints).

``--strategies`` adds fl-subnet's other strategies (e.g. ``fedavg``: fl-subnet's own
full-mask FedAvg) against the same Flower FedAvg runs. The runs alternate, ``--reps``
of each, every repetition starting with the side the previous one ended with (FedAvg
first in the first). Three JSON lines per strategy: the run's wall time (seconds, the
whole process: start-up, 10 rounds, results), its peak RSS (bytes; target ≤ 1.2 ×
FedAvg's), and the CPU seconds of a steady round (target ≤ 1.0 × FedAvg's): the
process's CPU time (``time.process_time``: server and in-process clients, every thread)
from the metrics row of round 1 to that of the last round, over the rounds between
(round 1 also pays the partition-id query of every node and the first imports). That
line's ``parts`` split a steady round's CPU seconds into the strategy's
``configure_train`` and ``aggregate_train``, the ClientApps' calls (``clients``) and
the rest (the grid's serde, evaluation rows, results files).
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

log = logging.getLogger("bench.scale")

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
TARGET_MEMORY_RATIO = 1.2
TARGET_CPU_RATIO = 1.0
PART_NAMES = ("configure", "aggregate", "clients")


def scenario(args: argparse.Namespace, strategy: str) -> dict[str, object]:
    """The run config (kebab-case keys) of one run."""
    values: dict[str, object] = {
        "strategy": strategy, "num-nodes": args.nodes, "fraction-train": args.fraction,
        "num-server-rounds": args.rounds, "dataset": "digits", "model": args.model, "partitioning": "iid",
        "local-steps": args.local_steps, "seed": 0, "fraction-evaluate": 0.0,
    }
    if strategy == "ist":
        values["num-subnets"] = 4
    if strategy == "federated-dropout" and args.keep_prob is not None:
        values["keep-prob"] = args.keep_prob
    return values


def fedavg_child(config: dict[str, object], out_dir: str) -> None:
    """The Flower-FedAvg run (``--child-fedavg``): in-process grid, template client."""
    sys.path.insert(0, str(HERE))
    from client import fedavg_client_app
    from simulation import run_flower_fedavg

    from fl_subnet.experiments.config import RunConfig
    from fl_subnet.experiments.inprocess_grid import InProcessGrid
    from fl_subnet.experiments.results import RunRecorder

    values = {**config, "out-dir": out_dir}
    cfg = RunConfig.from_mapping(values)
    recorder = RunRecorder(out_dir, cfg)
    grid = InProcessGrid(fedavg_client_app(), cfg.num_nodes, run_config=values)
    try:
        run_flower_fedavg(grid, cfg, recorder.add_row, checkpoint_dir=out_dir)
    finally:
        recorder.finish()


def peak_rss_bytes() -> int:
    """This process's peak RSS (``VmHWM``), bytes: its own high-water mark (``ru_maxrss``
    of a child started by ``subprocess`` starts at its parent's peak)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


#: The calls whose CPU time a steady round's ``parts`` report: (module, class, method, part).
CPU_PARTS = (
    ("flwr.serverapp.strategy", "FedAvg", "configure_train", "configure"),
    ("flwr.serverapp.strategy", "FedAvg", "aggregate_train", "aggregate"),
    ("fl_subnet.strategies.base", "SubnetStrategy", "configure_train", "configure"),
    ("fl_subnet.strategies.base", "SubnetStrategy", "aggregate_train", "aggregate"),
    ("flwr.clientapp", "ClientApp", "__call__", "clients"),
)


def count_cpu() -> list[tuple[float, dict[str, float]]]:
    """Start counting this process's CPU seconds: returns the list that gets, at every
    metrics row the run records, ``(process CPU seconds, CPU seconds so far per part)``
    (:data:`CPU_PARTS`; a call nested in another part counts in both)."""
    import importlib

    from fl_subnet.experiments import results

    marks: list[tuple[float, dict[str, float]]] = []
    parts: dict[str, float] = {}

    def timed(method, part):
        @functools.wraps(method)
        def wrapper(*args, **kwargs):
            start = time.process_time()
            try:
                return method(*args, **kwargs)
            finally:
                parts[part] = parts.get(part, 0.0) + time.process_time() - start
        return wrapper

    for module, cls_name, name, part in CPU_PARTS:
        cls = getattr(importlib.import_module(module), cls_name)
        setattr(cls, name, timed(getattr(cls, name), part))
    add_row = results.RunRecorder.add_row

    def counted_add_row(self, row):
        marks.append((time.process_time(), dict(parts)))
        return add_row(self, row)

    results.RunRecorder.add_row = counted_add_row
    return marks


def steady_cpu(marks: list[tuple[float, dict[str, float]]]) -> tuple[float, dict[str, float]]:
    """CPU seconds per round from the row of round 1 to the last row, and per part
    (:func:`count_cpu`'s marks: one per row, round 0 first)."""
    if len(marks) < 3:
        raise RuntimeError(f"need the rows of rounds 0, 1 and at least 2; got {len(marks)} rows")
    (t1, p1), (tn, pn) = marks[1], marks[-1]
    rounds = len(marks) - 2
    per_part = {k: (pn.get(k, 0.0) - p1.get(k, 0.0)) / rounds for k in sorted(set(pn) | set(p1))}
    return (tn - t1) / rounds, per_part


def child(kind: str, config: dict[str, object], out_dir: str) -> int:
    """One run in this fresh process (``--child``); writes ``<out_dir>.peak.json`` (peak
    RSS and the CPU marks of :func:`count_cpu`)."""
    marks = count_cpu()
    if kind == "fedavg":
        fedavg_child(config, out_dir)
        code = 0
    else:  # the fl-subnet command, as `fl-subnet run SCENARIO --out DIR`
        import tomli_w

        from fl_subnet.experiments import cli

        path = Path(f"{out_dir}.toml")
        path.write_text(tomli_w.dumps(config))
        code = cli.main(["run", str(path), "--out", out_dir])
    Path(f"{out_dir}.peak.json").write_text(json.dumps({"vmhwm_bytes": peak_rss_bytes(), "cpu_marks": marks}))
    return code


def one_run(kind: str, config: dict[str, object], work: Path) -> dict[str, object]:
    """One fresh process: its wall time (seconds), peak RSS (bytes) and metrics rows."""
    out_dir = work / f"{kind}-{time.monotonic_ns()}"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", "fedavg" if kind == "fedavg" else "ours",
           "--child-config", json.dumps(config), "--child-out", str(out_dir)]
    log_path = work / f"{out_dir.name}.log"
    t0 = time.perf_counter()
    with open(log_path, "wb") as out:
        code = subprocess.run(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                              check=False).returncode
    seconds = time.perf_counter() - t0
    if code != 0:
        raise RuntimeError(f"{kind} run failed ({code}):\n{log_path.read_text(errors='replace')[-3000:]}")
    rows = json.loads((out_dir / "metrics.json").read_text())
    if [r["server-round"] for r in rows] != list(range(int(config["num-server-rounds"]) + 1)):
        raise RuntimeError(f"{kind}: rounds {[r['server-round'] for r in rows]}")
    child_out = json.loads(Path(f"{out_dir}.peak.json").read_text())
    peak = child_out["vmhwm_bytes"]
    cpu, parts = steady_cpu([(t, p) for t, p in child_out["cpu_marks"]])
    shutil.rmtree(out_dir, ignore_errors=True)
    log.info("%s: %.1f s, peak RSS %.1f MB, CPU %.3f s a steady round %s, final eval-acc %.3f", kind, seconds,
             peak / 1e6, cpu, {k: round(v, 3) for k, v in parts.items()}, rows[-1]["eval-acc"])
    return {"seconds": seconds, "peak": peak, "cpu": cpu, "parts": parts, "rows": rows}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="100 nodes, 10 per round, 2 rounds, 1 run each")
    p.add_argument("--nodes", type=int, default=1000, help="virtual clients (num-nodes)")
    p.add_argument("--fraction", type=float, default=0.1, help="fraction-train (sampled per round)")
    p.add_argument("--rounds", type=int, default=10, help="server rounds")
    p.add_argument("--local-steps", type=int, default=10, help="τ")
    p.add_argument("--model", default="mlp", choices=("mlp", "cnn", "cnn-bn"),
                   help="the run config's model (mlp: 64-128-64-10; cnn: Flower's quickstart CNN on 8x8)")
    p.add_argument("--keep-prob", type=float, default=None, help="federated dropout's keep-prob (default: the "
                                                                 "run config's)")
    p.add_argument("--strategies", default="ist", help="comma-separated fl-subnet strategies to measure")
    p.add_argument("--reps", type=int, default=2, help="runs of each")
    p.add_argument("--child", choices=("fedavg", "ours"), help=argparse.SUPPRESS)
    p.add_argument("--child-config", help=argparse.SUPPRESS)
    p.add_argument("--child-out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s", stream=sys.stderr)
    if args.child:
        return child(args.child, json.loads(args.child_config), args.child_out)
    if args.quick:
        args.nodes, args.rounds, args.reps = 100, 2, 1
    sys.path.insert(0, str(HERE))
    from common import emit, record

    strategies = [s.strip() for s in args.strategies.split(",") if s.strip()]
    with tempfile.TemporaryDirectory(prefix="bench-scale-") as tmp:
        work = Path(tmp)
        runs: dict[str, list[dict]] = {k: [] for k in ["fedavg", *(f"ours-{s}" for s in strategies)]}
        sides = [("fedavg", "fedavg"), *((f"ours-{s}", s) for s in strategies)]  # (run key, strategy)
        for rep in range(args.reps):  # FedAvg first, then ours, then ours first, ...
            for key, strategy in sides if rep % 2 == 0 else reversed(sides):
                runs[key].append(one_run(key, scenario(args, strategy), work))
    fedavg = runs["fedavg"]
    for s in strategies:
        ours = runs[f"ours-{s}"]
        setting = {"nodes": args.nodes, "sampled_per_round": round(args.nodes * args.fraction),
                   "rounds": args.rounds, "strategy": s + (" p=4" if s == "ist" else "") + (
                       f" keep-prob={args.keep_prob}" if s == "federated-dropout" and args.keep_prob else "")
                   + " (fl-subnet run)",
                   "fedavg": "Flower FedAvg + template client",
                   "data": "digits, iid, " + ("MLP 64-128-64-10" if args.model == "mlp" else args.model),
                   "local_steps": args.local_steps, "grid": "in-process, one fresh process per run"}
        extra = {"final_eval_acc": [r["rows"][-1]["eval-acc"] for r in ours],
                 "final_eval_acc_fedavg": [r["rows"][-1]["eval-acc"] for r in fedavg],
                 "replies_last_round": ours[-1]["rows"][-1]["num-replies"]}
        emit(record("scale", {**setting, "measure": "wall time of the whole run (process start to exit)"},
                    [r["seconds"] for r in ours], fedavg=[r["seconds"] for r in fedavg], **extra))
        emit(record("scale", {**setting, "measure": "peak RSS of the run's process (server + in-process clients)"},
                    [r["peak"] for r in ours], metric="bytes", fedavg=[r["peak"] for r in fedavg],
                    target=TARGET_MEMORY_RATIO, **extra))
        parts = {k: statistics.median(r["parts"].get(k, 0.0) for r in ours) for k in PART_NAMES}
        parts_fedavg = {k: statistics.median(r["parts"].get(k, 0.0) for r in fedavg) for k in PART_NAMES}
        for side, vals, runs_ in (("ours", parts, ours), ("fedavg", parts_fedavg, fedavg)):
            vals["rest"] = statistics.median(r["cpu"] for r in runs_) - sum(vals.values())
        emit(record("scale", {**setting, "measure": "CPU seconds of a steady round (rounds 2..N; server + "
                                                    "in-process clients)"},
                    [r["cpu"] for r in ours], fedavg=[r["cpu"] for r in fedavg], target=TARGET_CPU_RATIO,
                    parts=parts, parts_fedavg=parts_fedavg, **extra))
    return 0


if __name__ == "__main__":
    sys.exit(main())
