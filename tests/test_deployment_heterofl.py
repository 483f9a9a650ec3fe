"""A real local deployment of HeteroFL: a SuperLink, 3 SuperNodes that declare their capacity
in their node config (``--node-config "... capacity=r"``, r = 0.25, 0.5, 1.0) and
``flwr run .`` for 2 rounds, all on loopback.

The run config leaves ``capacity-tiers`` at its default "1.0", so any smaller sub-model a
node trains comes from its own node config. Each node's ClientApp logs, per round, the
bytes of arrays it received and the width of every unit group; the deployed processes'
logging is switched on by a ``sitecustomize`` module on their ``PYTHONPATH`` (fl-subnet's
INFO lines then reach each SuperNode's log file, one file per node). The test compares
them with the shapes of the first ⌈r·size⌉ rows/columns computed here by hand, and the
server's byte counts with their sums.
"""

import json
import math
import re

import numpy as np
import pytest
from flwr.app import Array

from flower_processes import (
    Processes,
    binary,
    flower_env,
    flwr_run,
    free_ports,
    missing_binaries,
    start_superlink,
    write_flower_config,
)

CAPACITIES = (0.25, 0.5, 1.0)
D_IN, HIDDEN, D_OUT = 64, (128, 64), 10  # the default model: an MLP on digits (8x8 pixels, 10 classes)
OVERRIDES = {"strategy": "heterofl", "num-server-rounds": 2, "num-nodes": len(CAPACITIES), "lr": 0.2,
             "local-steps": 5, "partitioning": "iid", "seed": 0}
SITECUSTOMIZE = """import logging, sys
_handler = logging.StreamHandler(sys.stderr)
_handler.setFormatter(logging.Formatter("FL-SUBNET %(name)s: %(message)s"))
logging.getLogger("fl_subnet").addHandler(_handler)
logging.getLogger("fl_subnet").setLevel(logging.INFO)
"""
LINE = re.compile(r"FL-SUBNET fl_subnet\.clients\.app: node \d+ round (\d+): received (\d+) bytes of arrays, "
                  r"widths (\S+)")

pytestmark = pytest.mark.slow


def tier_shapes(r: float) -> dict[str, tuple[int, ...]]:
    """The tier's tensor shapes by hand: HeteroFL's int(np.ceil(r * size)) per hidden layer."""
    a, b = (math.ceil(round(r * h, 9)) for h in HIDDEN)
    return {"1.weight": (a, D_IN), "1.bias": (a,), "3.weight": (b, a), "3.bias": (b,),
            "5.weight": (D_OUT, b), "5.bias": (D_OUT,)}


def tier_bytes(r: float) -> int:
    """Bytes of the tier's arrays as sent: a sub-model's tensors packed into one raw
    float32 array (exactly its raw bytes, 4 an entry); the full model (r = 1) as Flower
    serializes it, one float32 .npy payload (header included) per tensor."""
    shapes = tier_shapes(r).values()
    if r == 1:
        return sum(len(Array(np.zeros(s, dtype=np.float32)).data) for s in shapes)
    return 4 * sum(math.prod(s) for s in shapes)


@pytest.mark.skipif(bool(missing_binaries("flwr", "flower-superlink", "flower-supernode")),
                    reason="Flower executables not installed")
def test_heterofl_deployment_each_node_receives_its_tier(tmp_path):
    out_dir = tmp_path / "out"
    home = tmp_path / "flwr-home"
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
    port, *node_ports = free_ports(1 + len(CAPACITIES))
    write_flower_config(home, "fl-subnet-hetero", f"127.0.0.1:{port}")
    env = flower_env(home)
    env["PYTHONPATH"] = str(site) + (":" + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    procs = Processes(tmp_path / "logs", env)
    try:
        start_superlink(procs, port, simulation=False)
        for i, (r, node_port) in enumerate(zip(CAPACITIES, node_ports)):
            procs.start(f"supernode-{i}", [
                binary("flower-supernode"), "--insecure", "--superlink", f"127.0.0.1:{port}",
                "--port", str(node_port),
                "--node-config", f"partition-id={i} num-partitions={len(CAPACITIES)} capacity={r}"])
        flwr_run(procs, "fl-subnet-hetero", {**OVERRIDES, "out-dir": str(out_dir)}, out_dir, timeout=480)  # ~80 s on an idle 2-core machine

        rows = json.loads((out_dir / "metrics.json").read_text())
        assert [r["server-round"] for r in rows] == [0, 1, 2]
        for i, r in enumerate(CAPACITIES):  # per node: its own log, its own tier
            text = (tmp_path / "logs" / f"supernode-{i}.log").read_text(errors="replace")
            got = {int(m[1]): (int(m[2]), m[3]) for m in LINE.finditer(text)}
            shapes = tier_shapes(r)
            want = (tier_bytes(r), f"1={shapes['1.bias'][0]},3={shapes['3.bias'][0]}")
            assert got == {1: want, 2: want}, (f"supernode-{i} (capacity {r})", got, want)
        expected_up = sum(tier_bytes(r) for r in CAPACITIES)
        for row in rows[1:]:
            assert row["num-replies"] == 3 and row["num-rejected"] == 0, row  # every reply had its mask's shapes
            assert row["bytes-up"] == expected_up, row  # the replies: exactly the three tiers' arrays
            # bytes-down = the same arrays + each node's config (train keys, the mask bits and
            # scale: ~130 B a node; a full-capacity node's scale 1 is not sent)
            assert 0 < row["bytes-down"] - expected_up < 3 * 256
        assert rows[1]["bytes-down"] == rows[2]["bytes-down"]
        summary = json.loads((out_dir / "summary.json").read_text())
        for r in CAPACITIES:  # the declared capacities are the run's tiers, each evaluated alone and saved
            assert 0.0 <= summary[f"tier-{r:g}-acc"] <= 1.0
            assert summary[f"tier-{r:g}-params"] == sum(math.prod(s) for s in tier_shapes(r).values())
            assert (out_dir / f"tier-{r:g}.safetensors").is_file()
    except BaseException:
        print(procs.tails())
        raise
    finally:
        procs.stop_all()
