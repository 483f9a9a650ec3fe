"""A real local deployment: a SuperLink, 2 SuperNodes and ``flwr run .``, all on loopback.

Slow by design: each message runs in a fresh ``flwr-clientapp`` process that imports
torch (≈ 15 s a round here), so it is kept to 2 nodes × 2 rounds. Each process logs to
a file under ``tmp_path/logs``; their tails are printed when the test fails.
"""

import json

import pytest

from flower_processes import (
    Processes,
    assert_same_rows,
    binary,
    flower_env,
    flwr_run,
    free_ports,
    inprocess_rows,
    missing_binaries,
    start_superlink,
    write_flower_config,
)

NUM_NODES = 2
OVERRIDES = {"strategy": "ist", "num-subnets": 2, "num-server-rounds": 2, "num-nodes": NUM_NODES,
             "lr": 0.5, "local-steps": 50, "seed": 0}

pytestmark = pytest.mark.slow


@pytest.mark.skipif(bool(missing_binaries("flwr", "flower-superlink", "flower-supernode")),
                    reason="Flower executables not installed")
def test_local_deployment_two_supernodes(tmp_path):
    out_dir = tmp_path / "out"
    home = tmp_path / "flwr-home"
    port, *node_ports = free_ports(1 + NUM_NODES)
    write_flower_config(home, "fl-subnet-local", f"127.0.0.1:{port}")
    overrides = {**OVERRIDES, "out-dir": str(out_dir)}
    procs = Processes(tmp_path / "logs", flower_env(home))
    try:
        start_superlink(procs, port, simulation=False)
        for i, node_port in enumerate(node_ports):
            procs.start(f"supernode-{i}", [
                binary("flower-supernode"), "--insecure", "--superlink", f"127.0.0.1:{port}",
                "--port", str(node_port),
                "--node-config", f"partition-id={i} num-partitions={NUM_NODES}"])
        # The strategy waits until NUM_NODES nodes are connected, so no wait here.
        flwr_run(procs, "fl-subnet-local", overrides, out_dir, timeout=300)
        rows = json.loads((out_dir / "metrics.json").read_text())
        assert json.loads((out_dir / "summary.json").read_text())["rounds"] == 2
        assert [r["server-round"] for r in rows] == [0, 1, 2]
        for row in rows[1:]:
            assert row["bytes-down"] > 0 and row["bytes-up"] > 0, row
        assert rows[-1]["eval-acc"] > rows[0]["eval-acc"], rows
        # Node ids are random per deployment; ordering by partition-id makes it match.
        assert_same_rows(rows, inprocess_rows(overrides, NUM_NODES))
    except BaseException:
        print(procs.tails())
        raise
    finally:
        procs.stop_all()
