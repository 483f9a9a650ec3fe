"""The client, scale and simulation benchmarks (``--quick``) and run_all's table.

Asserts what the measurements say about the code, never a time ratio: the JSON parses,
the fl-subnet client received and replied exactly the compact slice of its mask (a
count computed here from the mask bits and the MLP's shapes), no tensor it created was
as large as a full-model tensor, and the table has one row per measurement.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
sys.path.insert(0, str(BENCH))

import run_all  # noqa: E402  (bench/ is not a package)
from common import record  # noqa: E402


def run_bench(name: str, *args: str, timeout: float = 300) -> list[dict]:
    done = subprocess.run([sys.executable, str(BENCH / f"{name}.py"), "--quick", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout, check=False)
    assert done.returncode == 0, done.stderr[-4000:]
    lines = [json.loads(line) for line in done.stdout.splitlines() if line.strip()]  # every stdout line is JSON
    assert lines == run_all.parse_output(name, done.stdout)
    return lines


def mlp_params(d_in: int, widths: list[int], d_out: int) -> int:
    """Weights and biases of Linear layers d_in → widths... → d_out."""
    sizes = [d_in, *widths, d_out]
    return sum(a * b + b for a, b in zip(sizes, sizes[1:]))


def test_client_quick_holds_only_its_compact_slice():
    lines = run_bench("client")
    assert [m["metric"] for m in lines] == ["seconds", "bytes"]
    for m in lines:
        assert m["bench"] == "client" and m["setting"]["model"] == "MLP(64, [256,256], 1)"
        assert m["median"] > 0 and m["fedavg_median"] > 0 and m["reps"] >= 1
        assert m["full_params"] == mlp_params(64, [256, 256], 1)
        # the kept units per hidden layer, read from the bits of the mask the server sent
        widths = [m["mask_widths"][g] for g in sorted(m["mask_widths"], key=int)]
        assert len(widths) == 2 and all(0 < w < 256 for w in widths), widths
        compact = mlp_params(64, widths, 1)
        assert m["received_params"] == compact  # the message held the slice, not the model
        assert m["reply_params"] == compact
        assert compact < 0.5 * m["full_params"]
        # no tensor as large as the full model's largest (256 x 256) was ever created
        assert m["largest_tensor_numel"] < m["full_largest_tensor_numel"] == 256 * 256
    assert lines[1]["target"] == 0.35 and "meets_target" in lines[1]


def test_scale_quick_runs_both_and_reports_memory():
    lines = run_bench("scale")
    assert [m["metric"] for m in lines] == ["seconds", "bytes", "seconds"]
    for m in lines:
        assert m["bench"] == "scale"
        assert m["setting"]["nodes"] == 100 and m["setting"]["sampled_per_round"] == 10
        assert m["replies_last_round"] == 10
        assert m["median"] > 0 and m["fedavg_median"] > 0
    peak = lines[1]
    assert 50e6 < peak["median"] < 24e9 and 50e6 < peak["fedavg_median"] < 24e9  # a process holding torch
    assert peak["target"] == 1.2
    cpu = lines[2]
    assert "steady round" in cpu["setting"]["measure"] and cpu["target"] == 1.0
    for parts, median in ((cpu["parts"], cpu["median"]), (cpu["parts_fedavg"], cpu["fedavg_median"])):
        assert set(parts) == {"configure", "aggregate", "clients", "rest"}
        assert parts["clients"] > 0 and parts["aggregate"] > 0  # 10 nodes trained and were aggregated
        assert sum(parts.values()) == pytest.approx(median)  # one run each: the parts add up
    assert cpu["median"] < lines[0]["median"]  # a round's CPU is within the run's wall time


def test_steady_cpu_is_the_rounds_after_the_first():
    from scale import steady_cpu

    marks = [(5.0, {}), (9.0, {"clients": 2.0}), (10.5, {"clients": 3.0, "aggregate": 0.25}),
             (12.5, {"clients": 4.0, "aggregate": 0.5})]
    cpu, parts = steady_cpu(marks)
    assert cpu == (12.5 - 9.0) / 2 and parts == {"aggregate": 0.25, "clients": 1.0}
    with pytest.raises(RuntimeError, match="rounds 0, 1 and at least 2"):
        steady_cpu(marks[:2])


@pytest.mark.slow
def test_simulation_quick_times_rounds_of_both():
    (m,) = run_bench("simulation", timeout=600)
    assert m["bench"] == "simulation" and m["setting"]["clients"] == 4
    assert m["reps"] == m["setting"]["rounds"] - 1  # rounds 2.. of one run
    assert m["median"] > 0 and m["fedavg_median"] > 0


def fake_lines() -> str:
    a = record("client", {"model": "MLP", "keep_prob": 0.25, "measure": "peak RSS"}, [1e8, 1.2e8],
               metric="bytes", fedavg=[5e8, 6e8], target=0.35)
    b = record("scale", {"nodes": 1000, "measure": "wall time"}, [30.0, 31.0], fedavg=[29.0])
    return "\n".join(["some log line", json.dumps(a), '{"not": "a measurement"}', json.dumps(b), ""])


def test_run_all_writes_one_table_row_per_measurement(tmp_path):
    rows = run_all.parse_output("fake", fake_lines())
    assert [r["bench"] for r in rows] == ["client", "scale"]
    failures = [{"script": "simulation", "returncode": 1, "error": "see its log"}]
    json_path, md_path = run_all.write_results(rows, tmp_path, failures=failures, command="test")
    data = json.loads(json_path.read_text())
    assert len(data["measurements"]) == 2 and data["failures"] == failures and data["machine"]["cores"]
    md = md_path.read_text()
    table = [line for line in md.splitlines() if line.startswith("| ")]
    assert table[0].startswith("| bench | setting | ours | FedAvg | ratio | target | met? |")
    body = table[1:]
    assert len(body) == 2
    assert body[0].startswith("| client |") and "0.200" in body[0] and "≤ 0.35" in body[0] and "yes" in body[0]
    assert body[1].startswith("| scale |") and body[1].endswith("| — | — |")
    assert "simulation" in md and "Machine:" in md


def test_run_all_reads_the_one_object_scripts_and_finds_the_scripts():
    agg = {"model": "MLP(784, [8], 10)", "num_params": 6442, "clients": 3, "keep_prob": 0.5,
           "flower_fedavg": {"median_s": 2.0, "reps_s": [2.0, 2.0]},
           "fl_subnet_gather_aggregate": {"median_s": 1.0, "reps_s": [1.0, 1.0], "phases_median_s": {}},
           "compact_over_full_bytes": 0.3}
    (row,) = run_all.parse_output("aggregate", json.dumps(agg, indent=2))
    assert row["median"] == 1.0 and row["fedavg_median"] == 2.0 and row["meets_target"] is True
    names = run_all.discover()
    assert {"client", "scale", "simulation", "aggregate", "analysis"} <= set(names)
    assert "common" not in names and "run_all" not in names
    assert run_all.takes_quick(BENCH / "client.py")
