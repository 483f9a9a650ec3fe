#!/usr/bin/env python
"""Run ``examples/quickstart-pytorch`` (and its FedAvg twin) the way its README says, N times.

    python scripts/example_runs.py [--runs 3] [--out runs/example-runs]

Each run is a fresh ``flwr run . --stream`` in the example's folder with Flower's
defaults (the local simulation SuperLink, 2 SuperNodes, the app's own run config): a new
``FLWR_HOME``, ``FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1``, and local ports of its
own; the SuperLink it started is stopped by the PID listening on its port afterwards.
The ServerApp's ``result.json`` (centralized accuracy per round) is collected into
``<out>/example-runs.json``, which ``make figures`` copies to ``docs/`` and a test holds
the example README's numbers to.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
APPS = {"ist": ROOT / "examples" / "quickstart-pytorch", "fedavg": ROOT / "examples" / "quickstart-pytorch-fedavg"}
RESULTS = "example-runs.json"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop_local_superlink(port: int) -> None:
    """Kill what listens on ``port`` (the local SuperLink this run started), if anything."""
    if shutil.which("lsof") is None:
        return
    pids = subprocess.run(["lsof", "-t", "-iTCP:%d" % port, "-sTCP:LISTEN"], capture_output=True, text=True).stdout
    for pid in pids.split():
        subprocess.run(["kill", pid], check=False)


def run_once(app: Path, out_dir: Path, timeout: float) -> dict:
    """One fresh ``flwr run . --stream``; the ServerApp's result.json."""
    bin_dir = Path(sys.executable).parent
    with tempfile.TemporaryDirectory(prefix="flwr-home-") as home:
        http, control = _free_port(), _free_port()
        env = dict(os.environ, FLWR_HOME=home, FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
                   FLWR_DISABLE_UPDATE_CHECK="1", FLWR_TELEMETRY_ENABLED="0",
                   FLWR_LOCAL_SUPERLINK_HTTP_API_PORT=str(http), FLWR_LOCAL_CONTROL_API_PORT=str(control),
                   PATH=f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}")
        result = out_dir / "result.json"
        try:
            subprocess.run([str(bin_dir / "flwr"), "run", ".", "--stream", "--run-config", f'out-dir="{out_dir}"'],
                           cwd=app, env=env, timeout=timeout, check=True, capture_output=True)
            deadline = time.monotonic() + 30
            while not result.exists() and time.monotonic() < deadline:
                time.sleep(0.5)
        finally:
            _stop_local_superlink(control)
            _stop_local_superlink(http)
        if not result.exists():
            raise RuntimeError(f"{app.name}: no {result} (the ServerApp failed; see `flwr log`)")
        return json.loads(result.read_text())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--out", default="runs/example-runs")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds a run may take")
    args = parser.parse_args(argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    runs = []
    for name, app in APPS.items():
        for i in range(args.runs):
            result = run_once(app, out / f"{name}-{i}", args.timeout)
            central = result["evaluate-serverapp"]
            acc = [central[r]["accuracy"] for r in sorted(central, key=int)]
            runs.append({"app": name, "run": i, "accuracy": acc})
            print(f"{name} run {i}: centralized accuracy by round {[round(a, 3) for a in acc]}", flush=True)
    (out / RESULTS).write_text(json.dumps({"runs": runs}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
