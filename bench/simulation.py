"""Round wall time in a real Flower simulation (Ray): IST against Flower's FedAvg.

Each run is ``flwr run`` on a simulation SuperLink started here (``flower-superlink
--simulation`` on 127.0.0.1, a private ``FLWR_HOME``; the process helpers of
``tests/flower_processes.py``), with ``num-supernodes`` = ``num-nodes`` = 10 and 100
(``--clients``), ``client-resources.num-cpus = 1`` and Ray's ``init-args.num-cpus = 2``
(two actors on this 2-core machine), ``OMP_NUM_THREADS = --threads`` (default 1: torch
threads in every Flower process; left unset, two actors plus the ServerApp
oversubscribe the 2 cores, which slows the full model's matrix products, hence FedAvg's
client, far more than IST's quarter-width ones: measured 5.3 s against 2.7 s a round
of FedAvg at 100 clients), on digits with an MLP of hidden widths ``--hidden`` (default
the App's 64-128-64-10), Dirichlet(0.5) partitions, every node trained every round
(``fraction-train = 1``), τ = ``local-steps`` = 10:

* **ours**: the project itself, ``flwr run .`` with ``strategy = "ist"``,
  ``num-subnets = 4`` (fl-subnet's ServerApp and ClientApp).
* **FedAvg**: Flower's own ``flwr.serverapp.strategy.FedAvg`` in a ServerApp of the same
  shape (:func:`run_flower_fedavg`: same initial model, same central evaluation, results
  and checkpoint after every round) and Flower's template ClientApp
  (``bench/client.py``'s ``fedavg_client_app``: full model, same local loop, same data).
  It runs as its own Flower App: a temporary project folder holding this file,
  ``bench/client.py`` and a copy of the project's ``pyproject.toml`` pointing at them.

Round wall time: the differences between consecutive rows' ``seconds`` in the run's
``metrics.json`` (seconds since the ServerApp's evaluation was set up, written after every
round's central evaluation), rounds 2 to ``--rounds`` only: round 1 pays Ray's actor
start-up. The steady rounds of ``--reps`` runs of each are pooled (median, spread); the
runs of IST and FedAvg alternate. Target: IST ≤ 0.8 × FedAvg with 100 clients.
Prints one JSON line per number of clients.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import tempfile
import time
import tomllib
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger("bench.simulation")

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
TARGET_100 = 0.8
BASELINE_MODULE = "baseline_apps"


# --------------------------------------------------------------------------- Flower's FedAvg App
def run_flower_fedavg(grid, cfg, on_round: Callable[[dict], None] | None = None, *,
                      checkpoint_dir: str | Path | None = None):
    """Run ``cfg`` with Flower's own ``FedAvg`` on ``grid``: the baseline's ServerApp body.

    The same initial model, train config and per-round central evaluation (metrics rows,
    checkpoint) as fl-subnet's :func:`~fl_subnet.experiments.experiment.run_server`,
    but Flower's strategy (``fraction-train`` of the nodes, full model each).

    Parameters
    ----------
    grid : flwr.serverapp.Grid
    cfg : fl_subnet.experiments.config.RunConfig
    on_round : Callable[[dict], None], optional
        One metrics row per round (with ``seconds``, wall time since the start, seconds).
    checkpoint_dir : str or Path, optional
        The global model is saved there after every round.

    Returns
    -------
    flwr.serverapp.strategy.Result
    """
    import torch
    from flwr.app import ArrayRecord, ConfigRecord
    from flwr.serverapp.strategy import FedAvg

    from fl_subnet.experiments.experiment import CentralEvaluation, factory_for

    factory = factory_for(cfg)
    torch.manual_seed(cfg.seed)
    initial = factory().state_dict()
    strategy = FedAvg(fraction_train=cfg.fraction_train, fraction_evaluate=0.0)
    evaluate = CentralEvaluation(cfg, None, on_round, checkpoint_dir=checkpoint_dir)
    return strategy.start(grid=grid, initial_arrays=ArrayRecord(initial), num_rounds=cfg.num_server_rounds,
                          timeout=cfg.round_timeout, train_config=ConfigRecord(cfg.train_config()),
                          evaluate_fn=evaluate)


def flower_server_app():
    """A ServerApp running :func:`run_flower_fedavg` on the run config, writing
    ``metrics.json`` etc. into ``out-dir`` as fl-subnet's ServerApp does."""
    from flwr.app import Context
    from flwr.serverapp import Grid, ServerApp

    from fl_subnet.experiments.config import RunConfig
    from fl_subnet.experiments.results import RunRecorder

    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        cfg = RunConfig.from_mapping(context.run_config)
        recorder = RunRecorder.for_config(cfg)
        try:
            run_flower_fedavg(grid, cfg, recorder.add_row, checkpoint_dir=recorder.out_dir)
        finally:
            recorder.finish()  # plots too, as fl-subnet's ServerApp does

    return app


def baseline_project(folder: Path) -> Path:
    """Write the Flower-FedAvg App as a project folder (for ``flwr run``); returns it."""
    import tomli_w

    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(HERE / "client.py", folder / "bench_client.py")
    shutil.copy(Path(__file__), folder / "bench_simulation.py")
    (folder / f"{BASELINE_MODULE}.py").write_text(
        '"""Flower\'s FedAvg ServerApp and template ClientApp (bench/simulation.py)."""\n'
        "from bench_client import fedavg_client_app\n"
        "from bench_simulation import flower_server_app\n\n"
        "server_app = flower_server_app()\nclient_app = fedavg_client_app()\n")
    with open(ROOT / "pyproject.toml", "rb") as f:
        project = tomllib.load(f)
    app = project["tool"]["flwr"]["app"]
    app.pop("fab-exclude", None)
    app["components"] = {"serverapp": f"{BASELINE_MODULE}:server_app", "clientapp": f"{BASELINE_MODULE}:client_app"}
    project["project"]["name"] = "flower-fedavg-bench"
    project["tool"] = {"flwr": project["tool"]["flwr"]}
    (folder / "pyproject.toml").write_text(tomli_w.dumps(project))
    return folder


# --------------------------------------------------------------------------- measurement
def round_seconds(rows: list[dict]) -> list[float]:
    """Wall time of rounds 2, 3, ... (seconds) from cumulative ``seconds`` of the rows."""
    seconds = {int(r["server-round"]): float(r["seconds"]) for r in rows}
    return [seconds[k] - seconds[k - 1] for k in sorted(seconds) if k >= 2 and k - 1 in seconds]


def one_run(project: Path, kind: str, clients: int, args: argparse.Namespace, work: Path) -> dict[str, object]:
    """Start a simulation SuperLink, ``flwr run`` one App, return its rows and wall time."""
    sys.path.insert(0, str(ROOT / "tests"))
    from flower_processes import Processes, flower_env, free_ports, start_superlink, write_flower_config

    tag = f"{kind}-{clients}-{time.monotonic_ns()}"
    out_dir, home = work / tag / "out", work / tag / "flwr-home"
    (port,) = free_ports(1)
    write_flower_config(home, "bench-sim", f"127.0.0.1:{port}",
                        f"options.num-supernodes = {clients}\n"
                        f"options.backend.client-resources.num-cpus = {args.client_cpus}\n"
                        f"options.backend.init-args.num-cpus = {args.ray_cpus}\n")
    overrides = {"num-nodes": clients, "num-server-rounds": args.rounds, "fraction-train": 1.0,
                 "local-steps": args.local_steps, "out-dir": str(out_dir), "seed": 0, "hidden": args.hidden}
    if kind == "ours":
        overrides.update({"strategy": "ist", "num-subnets": 4})
    env = flower_env(home)
    if args.threads:  # torch threads in every Flower process (SuperLink, ServerApp, Ray actors)
        env["OMP_NUM_THREADS"] = str(args.threads)
    procs = Processes(work / tag / "logs", env)
    try:
        start_superlink(procs, port, simulation=True)
        t0 = time.perf_counter()
        _flwr_run(procs, project, overrides, out_dir, timeout=args.timeout)
        wall = time.perf_counter() - t0
        rows = json.loads((out_dir / "metrics.json").read_text())
    except BaseException:
        log.error("%s run with %d clients failed:\n%s", kind, clients, procs.tails())
        raise
    finally:
        procs.stop_all()
    if [r["server-round"] for r in rows] != list(range(args.rounds + 1)):
        raise RuntimeError(f"{kind} with {clients} clients: rounds {[r['server-round'] for r in rows]}")
    steady = round_seconds(rows)
    log.info("%s, %d clients: %.1f s in all, steady rounds %s s, final eval-acc %.3f", kind, clients, wall,
             ", ".join(f"{s:.2f}" for s in steady), rows[-1]["eval-acc"])
    return {"rows": rows, "steady": steady, "wall": wall, "round1": rows[1]["seconds"] - rows[0]["seconds"]}


def _flwr_run(procs, project: Path, overrides: dict, out_dir: Path, timeout: float) -> None:
    """``flwr run <project> bench-sim --run-config ... --stream``; wait for summary.json."""
    from flower_processes import binary, run_config_arg, wait_until

    cmd = [binary("flwr"), "run", str(project), "bench-sim", "--run-config", run_config_arg(overrides), "--stream"]
    run = procs.start("flwr-run", cmd)
    summary = out_dir / "summary.json"
    wait_until(lambda: run.poll() is not None or summary.exists(), timeout, "the run to end",
               check=lambda: procs.check_alive("superlink"))
    if run.poll() is None:
        run.wait(timeout=60)
    wait_until(summary.exists, 5, f"{summary} (see the flwr-run log)")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="4 clients, 3 rounds, 1 run each (a smoke test)")
    p.add_argument("--clients", default="10,100", help="comma-separated numbers of simulated clients")
    p.add_argument("--rounds", type=int, default=5, help="server rounds per run (round 1 is not timed)")
    p.add_argument("--reps", type=int, default=1, help="runs of each App per number of clients")
    p.add_argument("--local-steps", type=int, default=10, help="τ")
    p.add_argument("--hidden", default="128,64",
                   help="hidden widths of the MLP on digits (the App's default 128,64: 17k parameters, where "
                        "per-message costs dominate; e.g. 1024,1024 for 1.1M)")
    p.add_argument("--client-cpus", type=int, default=1, help="client-resources.num-cpus")
    p.add_argument("--ray-cpus", type=int, default=2, help="Ray init-args num-cpus")
    p.add_argument("--threads", type=int, default=1,
                   help="OMP_NUM_THREADS of the Flower processes (0: leave unset)")
    p.add_argument("--timeout", type=float, default=600, help="seconds one flwr run may take")
    p.add_argument("--apps", default="fedavg,ours", help="which Apps to run (a diagnosis may run one)")
    p.add_argument("--work-dir", help="keep every run's logs and outputs there (default: a temporary folder)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s", stream=sys.stderr)
    if args.quick:
        args.clients, args.rounds, args.reps = "4", 3, 1
    sys.path.insert(0, str(HERE))
    from common import emit, record

    with tempfile.TemporaryDirectory(prefix="bench-sim-") as tmp:
        work = Path(args.work_dir or tmp)
        projects = {"ours": ROOT, "fedavg": baseline_project(work / "flower-fedavg-bench")}
        for clients in (int(c) for c in args.clients.split(",")):
            runs: dict[str, list[dict]] = {"ours": [], "fedavg": []}
            for _ in range(args.reps):
                for kind in args.apps.split(","):
                    runs[kind].append(one_run(projects[kind], kind, clients, args, work))
            steady = {k: [s for r in rs for s in r["steady"]] for k, rs in runs.items()}
            if not all(steady.values()):  # one App only (--apps): its rounds are in the log
                continue
            setting = {"clients": clients, "rounds": args.rounds, "timed_rounds": f"2-{args.rounds}",
                       "runs": args.reps, "ours": "IST p=4 (fl-subnet App)", "fedavg": "Flower FedAvg + template client",
                       "data": f"digits, dirichlet 0.5, MLP 64-{args.hidden.replace(',', '-')}-10",
                       "fraction_train": 1.0,
                       "local_steps": args.local_steps, "client_cpus": args.client_cpus, "ray_cpus": args.ray_cpus,
                       "omp_num_threads": args.threads or "unset",
                       "measure": "round wall time, Ray simulation (flwr run)"}
            emit(record("simulation", setting, steady["ours"], fedavg=steady["fedavg"],
                        target=TARGET_100 if clients >= 100 else None,
                        round1_median=_median([r["round1"] for r in runs["ours"]]),
                        round1_fedavg_median=_median([r["round1"] for r in runs["fedavg"]]),
                        run_seconds=[r["wall"] for r in runs["ours"]],
                        run_seconds_fedavg=[r["wall"] for r in runs["fedavg"]],
                        final_eval_acc=[r["rows"][-1]["eval-acc"] for r in runs["ours"]],
                        final_eval_acc_fedavg=[r["rows"][-1]["eval-acc"] for r in runs["fedavg"]]))
    return 0


def _median(values: list[float]) -> float:
    import statistics

    return statistics.median(values)


if __name__ == "__main__":
    sys.exit(main())
