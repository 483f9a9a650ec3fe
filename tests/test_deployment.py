"""A real local deployment: a SuperLink, 2 SuperNodes and ``flwr run .``, all on loopback;
the SuperLink is killed after round 2, started again, and the run continued with
``resume-from`` ends with the model of an uninterrupted run.

Slow by design: each message runs in a fresh ``flwr-clientapp`` process that imports
torch (≈ 15 s a round here), so it is kept to 2 nodes × 3 rounds. Each process logs to
a file under ``tmp_path/logs``; their tails are printed when the test fails.
"""

import json

import pytest

from fl_subnet.checkpoint import load_model
from flower_processes import (
    ROOT,
    Processes,
    assert_same_rows,
    binary,
    flower_env,
    flwr_run,
    free_ports,
    inprocess_rows,
    missing_binaries,
    run_config_arg,
    start_superlink,
    wait_until,
    write_flower_config,
)

NUM_NODES = 2
OVERRIDES = {"strategy": "ist", "num-subnets": 2, "num-server-rounds": 3, "num-nodes": NUM_NODES,
             "lr": 0.5, "local-steps": 50, "seed": 0}

pytestmark = pytest.mark.slow


@pytest.mark.skipif(bool(missing_binaries("flwr", "flower-superlink", "flower-supernode")),
                    reason="Flower executables not installed")
def test_local_deployment_two_supernodes_resumes_after_a_superlink_crash(tmp_path):
    out_dir = tmp_path / "out"
    home = tmp_path / "flwr-home"
    port, *node_ports = free_ports(1 + NUM_NODES)
    write_flower_config(home, "fl-subnet-local", f"127.0.0.1:{port}")
    overrides = {**OVERRIDES, "out-dir": str(out_dir)}
    procs = Processes(tmp_path / "logs", flower_env(home))
    try:
        database = tmp_path / "superlink.db"  # the registered SuperNodes outlive a SuperLink restart
        start_superlink(procs, port, simulation=False, database=database)
        for i, node_port in enumerate(node_ports):
            procs.start(f"supernode-{i}", [
                binary("flower-supernode"), "--insecure", "--superlink", f"127.0.0.1:{port}",
                "--port", str(node_port),
                "--node-config", f"partition-id={i} num-partitions={NUM_NODES}"])
        # The strategy waits until NUM_NODES nodes are connected, so no wait here.
        procs.start("flwr-run", [binary("flwr"), "run", str(ROOT), "fl-subnet-local", "--run-config",
                                 run_config_arg(overrides), "--stream"])
        wait_until(lambda: saved_round(out_dir) >= 2, 300, "the checkpoint of round 2",
                   check=lambda: procs.check_alive("superlink", "supernode-0", "supernode-1"))
        procs.kill("superlink")  # a crash after round 2: the run is gone from the SuperLink
        procs.kill("flwr-run")
        (out_dir / "summary.json").unlink(missing_ok=True)  # the killed ServerApp may have written one
        assert saved_round(out_dir) == 2
        before = json.loads((out_dir / "metrics.json").read_text())[:3]
        assert [r["server-round"] for r in before] == [0, 1, 2]

        start_superlink(procs, port, simulation=False, name="superlink-restarted", database=database)
        flwr_run(procs, "fl-subnet-local", {**overrides, "resume-from": str(out_dir)}, out_dir, timeout=300)
        rows = json.loads((out_dir / "metrics.json").read_text())
        assert json.loads((out_dir / "summary.json").read_text())["rounds"] == 3
        assert [r["server-round"] for r in rows] == [0, 1, 2, 3]
        assert rows[:3] == before  # rounds 1 and 2 were not run again (their rows keep their seconds)
        for row in rows[1:]:
            assert row["bytes-down"] > 0 and row["bytes-up"] > 0, row
        assert rows[-1]["eval-acc"] > rows[0]["eval-acc"], rows
        # Node ids are random per deployment; ordering by partition-id makes it match.
        reference = tmp_path / "uninterrupted"
        assert_same_rows(rows, inprocess_rows(overrides, NUM_NODES, checkpoint_dir=reference), tol=1e-5)
        a, b = load_model(reference / "model.safetensors"), load_model(out_dir / "model.safetensors")
        assert a.keys() == b.keys()
        diff = max(float((a[k].double() - b[k].double()).abs().max()) for k in a)
        print(f"resumed deployment vs uninterrupted in-process run: max |model difference| {diff:.3g}")
        assert diff <= 1e-6, diff
    except BaseException:
        print(procs.tails())
        raise
    finally:
        procs.stop_all()


def saved_round(out_dir) -> int:
    """The round of the run's checkpoint (-1 before the first)."""
    try:
        return int(json.loads((out_dir / "checkpoint.json").read_text())["server-round"])
    except (OSError, ValueError, KeyError):
        return -1
