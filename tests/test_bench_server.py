"""Smoke tests of ``bench/server_round.py``, ``bench/server_memory.py``, ``bench/bytes.py`` and ``bench/aggregate.py``
with ``--quick``: they run, print well-formed JSON lines (bench/common.py), and the
bytes on the wire are within 1% of the float32 floor where Flower's format allows it."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _run(script: str) -> list[dict]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / script), "--quick"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]
    assert lines
    for m in lines:
        assert {"bench", "setting", "metric", "median", "spread", "reps", "machine"} <= set(m)
        assert m["median"] > 0 and m["fedavg_median"] > 0 and m["ratio"] > 0
    return lines


def test_server_round_quick_prints_json_lines():
    lines = _run("server_round.py")
    rounds = [m for m in lines if m["bench"] == "server_round"]
    assert {m["setting"]["protocol"] for m in rounds} == {"dropout", "ist"}
    for m in rounds:
        assert m["metric"] == "seconds" and m["reps"] >= 2
        assert set(m["phases"]) == {"configure", "serialize", "deserialize", "aggregate"}
        assert m["bytes_serialized"] > 0 and m["fedavg_bytes_serialized"] > 0
    targets = {m["setting"]["keep_prob"]: m["target"] for m in rounds if m["setting"]["protocol"] == "dropout"}
    assert targets == {0.5: 0.4, 1.0: 1.0}
    assert any(m["bench"] == "server_round.gather_aggregate" and m["target"] == 1.0 for m in lines)


def test_aggregate_quick_prints_json_lines():
    lines = _run("aggregate.py")
    assert [m["setting"]["keep_prob"] for m in lines] == [0.25, 0.5, 1.0]
    assert all(0 < m["compact_over_full_bytes"] <= 1 for m in lines)


def test_bytes_within_one_percent_of_the_float32_floor():
    lines = _run("bytes.py")
    assert {(m["setting"]["direction"], m["setting"]["serialization"]) for m in lines} == {
        ("down", "proto"), ("down", "objects"), ("up", "proto"), ("up", "objects")}
    mlp = [m for m in lines if m["setting"]["model"].startswith("MLP")]
    assert mlp
    for m in lines:
        # the floor really is the compact float32 payload: below FedAvg's full model
        assert 0 < m["floor"] <= m["median"] < m["fedavg_median"]
        # the mask encoding alone stays within 1% of the floor, on every model
        assert m["mask_config"] <= 0.01 * m["floor"], m["setting"]
    for m in mlp:
        # everything included (Flower's framing, the config, the mask): within 1%
        assert m["median"] <= 1.01 * m["floor"], (m["setting"], m["median"], m["floor"])
        assert m["mean"] <= 1.01 * m["floor_mean"], (m["setting"], m["mean"], m["floor_mean"])
        assert m["meets_target"] is True and m["within_1pct_of_floor"] is True


def test_server_memory_quick_prints_json_lines():
    """bench/server_memory.py --quick: one line per side, its ratios computed from its own
    numbers (memory over FedAvg's, bytes over FedAvg's, the target 1.2 x the bytes ratio)."""
    lines = _run("server_memory.py")
    assert {m["setting"]["side"] for m in lines} == {"dropout:0.5", "dropout:0.25", "ist:4"}
    for m in lines:
        assert m["bench"] == "server_memory" and m["metric"] == "bytes"
        assert abs(m["ratio"] - m["median"] / m["fedavg_median"]) < 1e-9
        assert 0 < m["bytes_ratio"] < 1 and abs(m["target_ratio"] - 1.2 * m["bytes_ratio"]) < 1e-9
        assert m["meets_target"] == (m["ratio"] <= m["target_ratio"])
        assert set(m["phase_peaks"]) == {"configure", "aggregate"} and m["model_bytes"] > 0
