"""Smoke test of ``bench/analysis.py --quick``: runs, prints one well-formed JSON object."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CLIENT_TIMES = ("cached_spec_first_seconds", "cached_spec_cached_seconds", "build_compact_seconds",
                "plain_load_compact_seconds", "fedavg_full_construct_and_load_seconds")


def test_bench_analysis_quick_prints_json():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "analysis.py"), "--quick"], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout)

    assert out["keep_prob"] == 0.5 and out["repeats"] == 1 and out["torch_threads"] == 1
    for key in ("torch", "flwr", "python", "processor", "cpu_count"):
        assert out[key]
    assert [m["name"] for m in out["models"]] == ["CNNBN", "MHATransformer"]
    for m in out["models"]:
        assert m["num_params"] > 0 and m["num_groups"] > 0
        assert m["analyze_seconds"] > 0 and m["analyze_verify_seconds"] > 0
        c = m["client"]
        for key in (*CLIENT_TIMES, "build_over_plain", "build_over_fedavg_full"):
            assert c[key] > 0, (m["name"], key)
        assert 0 < c["compact_state_bytes"] < c["full_state_bytes"]
        assert c["compact_over_full_bytes"] < 1
    cold = out["models"][0]["cold_process"]  # --quick: a fresh process for the first model only
    assert len(cold) == 4 and all(v > 0 for v in cold.values())
