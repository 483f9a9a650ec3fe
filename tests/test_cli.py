"""The fl-subnet command: runs, result files, bad scenarios, interruptions."""

import json

import pytest

from fl_subnet.experiments import cli
from fl_subnet.experiments.results import RunRecorder

SMALL = """
strategy = "{strategy}"
num-server-rounds = 3
num-nodes = 4
local-steps = 5
lr = 0.1
momentum = 0.9
dataset = "digits"
partitioning = "iid"
hidden = "32"
seed = 1
"""


def _scenario(tmp_path, name, text):
    path = tmp_path / f"{name}.toml"
    path.write_text(text)
    return path


def test_run_writes_results(tmp_path):
    sc = _scenario(tmp_path, "ist", SMALL.format(strategy="ist") + "num-subnets = 2\n")
    out = tmp_path / "out"
    assert cli.main(["run", str(sc), "--out", str(out)]) == 0
    rows = json.loads((out / "metrics.json").read_text())
    assert [r["server-round"] for r in rows] == [0, 1, 2, 3]
    assert rows[-1]["eval-acc"] > rows[0]["eval-acc"]
    assert rows[-1]["cumulative-bytes"] == sum(r["bytes-down"] + r["bytes-up"] for r in rows)
    header = (out / "metrics.csv").read_text().splitlines()[0].split(",")
    for col in ("server-round", "strategy", "train-loss", "eval-loss", "eval-acc", "bytes-down",
                "bytes-up", "cumulative-bytes", "seconds"):
        assert col in header
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rounds"] == 3 and summary["final-eval-acc"] == rows[-1]["eval-acc"]
    assert json.loads((out / "config.json").read_text())["num-subnets"] == 2
    assert (out / "plots.png").stat().st_size > 10_000


def test_compare_same_data_fewer_bytes_for_subnetworks(tmp_path):
    a = _scenario(tmp_path, "a", SMALL.format(strategy="fedavg"))
    b = _scenario(tmp_path, "b", SMALL.format(strategy="federated-dropout") + "keep-prob = 0.5\n")
    out = tmp_path / "cmp"
    assert cli.main(["compare", str(a), str(b), "--out", str(out), "--rounds", "2"]) == 0
    summaries = {s["strategy"]: s for s in json.loads((out / "summary.json").read_text())}
    assert summaries["federated-dropout"]["total-mb"] < summaries["fedavg"]["total-mb"]
    assert (out / "compare.png").exists()
    # same data and seed: the round-0 model and evaluation are identical
    r0 = [json.loads((out / n / "metrics.json").read_text())[0] for n in ("a", "b")]
    assert r0[0]["eval-loss"] == r0[1]["eval-loss"]


@pytest.mark.parametrize("line,key", [
    ("keep-prob = 1.5", "keep-prob"),
    ("bogus-key = 1", "bogus-key"),
    ("num-server-rounds = \"three\"", "num-server-rounds"),
    ("partitioning = \"zipf\"", "partitioning"),
])
def test_bad_scenario_stops_before_training(tmp_path, capsys, line, key, monkeypatch):
    text = SMALL.format(strategy="fedavg")
    lines = [ln for ln in text.splitlines() if not ln.startswith(key + " ")]  # replace, not repeat
    sc = _scenario(tmp_path, "bad", "\n".join(lines) + "\n" + line + "\n")
    monkeypatch.setattr(cli, "run_one", lambda *a, **k: pytest.fail("training started"))
    assert cli.main(["run", str(sc), "--out", str(tmp_path / "o")]) == 2
    assert key in capsys.readouterr().err


def test_interrupted_run_keeps_finished_rounds(tmp_path, monkeypatch):
    sc = _scenario(tmp_path, "fa", SMALL.format(strategy="fedavg"))
    out = tmp_path / "int"
    original = RunRecorder.add_row

    def add_row(self, row):
        original(self, row)
        if row["server-round"] == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(RunRecorder, "add_row", add_row)
    assert cli.main(["run", str(sc), "--out", str(out)]) == 130
    rows = json.loads((out / "metrics.json").read_text())
    assert [r["server-round"] for r in rows] == [0, 1, 2]
