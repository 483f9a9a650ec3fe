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
of each. Two JSON lines per strategy: the run's wall time (seconds, the whole process:
start-up, 10 rounds, results) and its peak RSS (bytes; target ≤ 1.2 × FedAvg's).
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

log = logging.getLogger("bench.scale")

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
TARGET_MEMORY_RATIO = 1.2


def scenario(args: argparse.Namespace, strategy: str) -> dict[str, object]:
    """The run config (kebab-case keys) of one run."""
    values: dict[str, object] = {
        "strategy": strategy, "num-nodes": args.nodes, "fraction-train": args.fraction,
        "num-server-rounds": args.rounds, "dataset": "digits", "model": "mlp", "partitioning": "iid",
        "local-steps": args.local_steps, "seed": 0, "fraction-evaluate": 0.0,
    }
    if strategy == "ist":
        values["num-subnets"] = 4
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


def child(kind: str, config: dict[str, object], out_dir: str) -> int:
    """One run in this fresh process (``--child``); writes ``<out_dir>.peak.json``."""
    if kind == "fedavg":
        fedavg_child(config, out_dir)
        code = 0
    else:  # the fl-subnet command, as `fl-subnet run SCENARIO --out DIR`
        import tomli_w

        from fl_subnet.experiments import cli

        path = Path(f"{out_dir}.toml")
        path.write_text(tomli_w.dumps(config))
        code = cli.main(["run", str(path), "--out", out_dir])
    Path(f"{out_dir}.peak.json").write_text(json.dumps({"vmhwm_bytes": peak_rss_bytes()}))
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
    peak = json.loads(Path(f"{out_dir}.peak.json").read_text())["vmhwm_bytes"]
    shutil.rmtree(out_dir, ignore_errors=True)
    log.info("%s: %.1f s, peak RSS %.1f MB, final eval-acc %.3f", kind, seconds, peak / 1e6, rows[-1]["eval-acc"])
    return {"seconds": seconds, "peak": peak, "rows": rows}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="100 nodes, 10 per round, 2 rounds, 1 run each")
    p.add_argument("--nodes", type=int, default=1000, help="virtual clients (num-nodes)")
    p.add_argument("--fraction", type=float, default=0.1, help="fraction-train (sampled per round)")
    p.add_argument("--rounds", type=int, default=10, help="server rounds")
    p.add_argument("--local-steps", type=int, default=10, help="τ")
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
        for _ in range(args.reps):
            runs["fedavg"].append(one_run("fedavg", scenario(args, "fedavg"), work))
            for s in strategies:
                runs[f"ours-{s}"].append(one_run(f"ours-{s}", scenario(args, s), work))
    fedavg = runs["fedavg"]
    for s in strategies:
        ours = runs[f"ours-{s}"]
        setting = {"nodes": args.nodes, "sampled_per_round": round(args.nodes * args.fraction),
                   "rounds": args.rounds, "strategy": s + (" p=4" if s == "ist" else "") + " (fl-subnet run)",
                   "fedavg": "Flower FedAvg + template client", "data": "digits, iid, MLP 64-128-64-10",
                   "local_steps": args.local_steps, "grid": "in-process, one fresh process per run"}
        extra = {"final_eval_acc": [r["rows"][-1]["eval-acc"] for r in ours],
                 "final_eval_acc_fedavg": [r["rows"][-1]["eval-acc"] for r in fedavg],
                 "replies_last_round": ours[-1]["rows"][-1]["num-replies"]}
        emit(record("scale", {**setting, "measure": "wall time of the whole run (process start to exit)"},
                    [r["seconds"] for r in ours], fedavg=[r["seconds"] for r in fedavg], **extra))
        emit(record("scale", {**setting, "measure": "peak RSS of the run's process (server + in-process clients)"},
                    [r["peak"] for r in ours], metric="bytes", fedavg=[r["peak"] for r in fedavg],
                    target=TARGET_MEMORY_RATIO, **extra))
    return 0


if __name__ == "__main__":
    sys.exit(main())
