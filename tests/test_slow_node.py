"""A slow node cannot hold a round: in a real local deployment (SuperLink + 3 SuperNodes,
one of which takes 10 minutes per message), every round ends after ``round-timeout``
seconds with the other two nodes' replies.

The app is fl-subnet's own ServerApp and a ClientApp that is fl-subnet's with a delay
read from the node config (written to a temporary app folder here, so the project's
own ClientApp carries no test hook).
"""

import json
import time
import tomllib

import pytest
import tomli_w

from flower_processes import (ROOT, Processes, binary, flower_env, free_ports, missing_binaries, run_config_arg,
                              start_superlink, wait_until, write_flower_config)

NUM_NODES, SLOW, ROUND_TIMEOUT = 3, 2, 90.0  # a fast node answers in 10-35 s (a fresh ClientApp process), over 60 s on a loaded 2-core machine
OVERRIDES = {"strategy": "fedavg", "num-server-rounds": 2, "num-nodes": NUM_NODES, "local-steps": 5, "seed": 0,
             "round-timeout": ROUND_TIMEOUT}

SLOW_CLIENT = '''
import time

from fl_subnet.experiments.client import run_config_factory as _factory
from fl_subnet.clients import make_client_app
from fl_subnet.experiments.experiment import context_data


def slow_data(context):
    time.sleep(float(context.node_config.get("delay-seconds", 0)))
    return context_data(context)


app = make_client_app(None, slow_data, context_factory=_factory)
'''

pytestmark = pytest.mark.slow


def write_app(folder):
    """pyproject.toml (fl-subnet's run config) + slownode.py."""
    with open(ROOT / "pyproject.toml", "rb") as f:
        project = tomllib.load(f)
    folder.mkdir()
    (folder / "slownode.py").write_text(SLOW_CLIENT)
    (folder / "pyproject.toml").write_text(tomli_w.dumps({
        "build-system": project["build-system"],
        "project": {"name": "slow-node-app", "version": "0.1.0", "dependencies": []},
        "tool": {"flwr": {"app": {"publisher": "fl-subnet-tests",
                                  "components": {"serverapp": "fl_subnet.app.server_app:app",
                                                 "clientapp": "slownode:app"},
                                  "config": project["tool"]["flwr"]["app"]["config"]}}},
    }))


@pytest.mark.skipif(bool(missing_binaries("flwr", "flower-superlink", "flower-supernode")),
                    reason="Flower executables not installed")
def test_rounds_end_at_round_timeout_without_the_slow_node(tmp_path):
    app = tmp_path / "app"
    write_app(app)
    out_dir = tmp_path / "out"
    home = tmp_path / "flwr-home"
    port, *node_ports = free_ports(1 + NUM_NODES)
    write_flower_config(home, "local", f"127.0.0.1:{port}")
    procs = Processes(tmp_path / "logs", flower_env(home))
    try:
        start_superlink(procs, port, simulation=False)
        for i, node_port in enumerate(node_ports):
            delay = 600 if i == SLOW else 0
            procs.start(f"supernode-{i}", [
                binary("flower-supernode"), "--insecure", "--superlink", f"127.0.0.1:{port}",
                "--port", str(node_port),
                "--node-config", f"partition-id={i} num-partitions={NUM_NODES} delay-seconds={delay}"])
        overrides = {**OVERRIDES, "out-dir": str(out_dir)}
        t0 = time.monotonic()
        run = procs.start("flwr-run", [binary("flwr"), "run", str(app), "local", "--run-config",
                                       run_config_arg(overrides), "--stream"], cwd=app)
        summary = out_dir / "summary.json"
        wait_until(lambda: summary.exists(), 400, "the run to end",
                   check=lambda: procs.check_alive("superlink", "supernode-0", "supernode-1"))
        elapsed = time.monotonic() - t0
        rows = json.loads((out_dir / "metrics.json").read_text())
        assert [r["server-round"] for r in rows] == [0, 1, 2]
        assert [r["num-replies"] for r in rows[1:]] == [NUM_NODES - 1] * 2, rows  # the slow node is left out
        # two rounds bounded by the timeout (plus ClientApp start-up and evaluation), far from the 600 s delay
        assert elapsed < 2 * ROUND_TIMEOUT + 150, elapsed
        run.wait(timeout=60)
    except BaseException:
        print(procs.tails())
        raise
    finally:
        procs.stop_all()
