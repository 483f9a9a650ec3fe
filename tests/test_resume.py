"""No lost work: the global model is saved after every round, a run continued from its
checkpoint ends with exactly the model of an uninterrupted run — also after a SIGKILL at
any moment — and every results file on disk is always complete."""

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fl_subnet.checkpoint import load_checkpoint, load_model
from fl_subnet.experiments.config import RunConfig
from fl_subnet.experiments.experiment import RunFailed, run_server
from fl_subnet.experiments.inprocess_grid import InProcessGrid
from fl_subnet.experiments.results import RunRecorder

VALUES = {"strategy": "federated-dropout", "num-nodes": 3, "num-server-rounds": 4, "local-steps": 3,
          "hidden": "32", "lr": 0.1, "seed": 3, "partitioning": "iid"}


def run(out: Path, rounds: int, resume: bool = False, **over) -> None:
    """``fl-subnet run`` in-process: results and checkpoints in ``out``."""
    import fl_subnet.app.client_app

    values = {**VALUES, **over, "num-server-rounds": rounds, "out-dir": str(out)}
    cfg = RunConfig.from_mapping(values)
    recorder = RunRecorder(out, cfg)
    if resume:
        recorder.resume(load_checkpoint(out)[1]["server-round"])
    grid = InProcessGrid(fl_subnet.app.client_app.app, cfg.num_nodes, run_config=values)
    run_server(grid, cfg, on_round=recorder.add_row, checkpoint_dir=out, resume=resume)
    recorder.finish(plot=False)


def temporaries(out: Path) -> list[str]:
    return [p.name for p in out.iterdir() if p.name.startswith(".")]


def assert_files_valid(out: Path, killed: bool = False) -> None:
    """Every file there is complete: JSON parses, CSV has the JSON's rows, the model loads.

    A writer SIGKILLed between its temporary file and the rename leaves that temporary
    behind (nothing can remove it as the process dies); ``killed`` allows those, and the
    next run in the folder removes them. ``metrics.csv`` is renamed after ``metrics.json``:
    killed between the two, it holds the rows but the last (the next run rewrites it)."""
    rows = json.loads((out / "metrics.json").read_text()) if (out / "metrics.json").exists() else []
    if (out / "metrics.csv").exists():
        with open(out / "metrics.csv", newline="") as f:
            csv_rows = list(csv.DictReader(f))
        assert len(csv_rows) in ((len(rows), len(rows) - 1) if killed else (len(rows),))
        assert [int(r["server-round"]) for r in csv_rows] == [r["server-round"] for r in rows[:len(csv_rows)]]
    if (out / "model.safetensors").exists():
        state, meta = load_checkpoint(out)
        assert meta["server-round"] <= max((r["server-round"] for r in rows), default=0)
    if not killed:
        assert not temporaries(out), "temporary files left"


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("full")
    run(out, 4)
    return out


def test_model_saved_every_round_and_loads_into_the_users_model(uninterrupted):
    from fl_subnet.models import MLP

    state, meta = load_checkpoint(uninterrupted)
    assert meta["server-round"] == 4 and meta["config"]["strategy"] == "federated-dropout"
    model = MLP(64, [32], 10)
    model.load_state_dict(load_model(uninterrupted / "model.safetensors"))  # as the README shows
    assert_files_valid(uninterrupted)


def test_resumed_run_ends_with_the_uninterrupted_model(uninterrupted, tmp_path):
    run(tmp_path, 2)  # "stopped" after round 2
    run(tmp_path, 4, resume=True)
    a, b = load_model(uninterrupted / "model.safetensors"), load_model(tmp_path / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    rows_a = json.loads((uninterrupted / "metrics.json").read_text())
    rows_b = json.loads((tmp_path / "metrics.json").read_text())
    assert [r["server-round"] for r in rows_b] == [0, 1, 2, 3, 4]
    assert [r["eval-acc"] for r in rows_a] == [r["eval-acc"] for r in rows_b]
    assert [r["cumulative-bytes"] for r in rows_a] == [r["cumulative-bytes"] for r in rows_b]


def test_resume_restores_the_server_optimizer_state(tmp_path):
    """With FedAdam on the masked pseudo-gradient the optimizer's moments are part of the
    run state: a run resumed after round 2 ends with the uninterrupted run's model."""
    adam = {"server-optimizer": "fedadam", "server-lr": 0.01}
    run(tmp_path / "full", 4, **adam)
    run(tmp_path / "cut", 2, **adam)
    assert sorted(p.name for p in (tmp_path / "cut").glob("server-optimizer-*")) == ["server-optimizer-2.safetensors"]
    run(tmp_path / "cut", 4, resume=True, **adam)
    a, b = load_model(tmp_path / "full" / "model.safetensors"), load_model(tmp_path / "cut" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    plain = tmp_path / "plain"
    run(plain, 4)
    c = load_model(plain / "model.safetensors")
    assert not all(torch.equal(a[k], c[k]) for k in a)  # the optimizer changed the model


def test_resume_with_batchnorm_and_a_server_optimizer(tmp_path):
    """CNN with BatchNorm and FedAdam: the optimizer file holds state for the parameters
    only (the running statistics take the nodes' average, unstepped), and the run resumed
    after round 2 ends with the uninterrupted run's model, running statistics included."""
    from fl_subnet.checkpoint import load_optimizer_state
    from fl_subnet.models import CNNBN

    bn = {"model": "cnn-bn", "server-optimizer": "fedadam", "server-lr": 0.01, "num-nodes": 2}
    run(tmp_path / "full", 3, **bn)
    run(tmp_path / "cut", 2, **bn)
    model = CNNBN()
    params, buffers = set(dict(model.named_parameters())), set(dict(model.named_buffers()))
    saved = load_optimizer_state(tmp_path / "cut", 2)
    assert {k.rpartition("/")[0] for k in saved} == params and buffers
    run(tmp_path / "cut", 3, resume=True, **bn)
    a, b = load_model(tmp_path / "full" / "model.safetensors"), load_model(tmp_path / "cut" / "model.safetensors")
    assert a.keys() == b.keys() >= buffers and all(torch.equal(a[k], b[k]) for k in a)


def test_a_checkpoint_older_than_a_config_key_resumes(tmp_path):
    """A checkpoint written before a run-config key existed resumes: the key counts with
    its default (here ``fjord-widths`` is removed from the saved config)."""
    from fl_subnet.checkpoint import save_checkpoint

    run(tmp_path, 1)
    state, meta = load_checkpoint(tmp_path)
    del meta["config"]["fjord-widths"]
    save_checkpoint(tmp_path, state, meta)
    run(tmp_path, 2, resume=True)
    assert load_checkpoint(tmp_path)[1]["server-round"] == 2


def test_resume_refuses_another_config(uninterrupted, tmp_path):
    run(tmp_path, 1)
    import fl_subnet.app.client_app

    values = {**VALUES, "lr": 0.2, "out-dir": str(tmp_path)}
    grid = InProcessGrid(fl_subnet.app.client_app.app, 3, run_config=values)
    with pytest.raises(ValueError, match=r"\['lr'\]"):
        run_server(grid, RunConfig.from_mapping(values), checkpoint_dir=tmp_path, resume=True)


def test_a_run_with_no_valid_reply_fails_after_writing(tmp_path):
    from flwr.app import Message, RecordDict
    from flwr.clientapp import ClientApp

    broken = ClientApp()

    @broken.train()
    def train(msg, context):  # a ClientApp that cannot train the compact slice
        return Message(RecordDict(), reply_to=msg)

    values = {**VALUES, "num-server-rounds": 2, "out-dir": str(tmp_path)}
    cfg = RunConfig.from_mapping(values)
    recorder = RunRecorder(tmp_path, cfg)
    with pytest.raises(RunFailed, match="no node produced a valid train reply"):
        run_server(InProcessGrid(broken, 3, run_config=values), cfg, on_round=recorder.add_row,
                   checkpoint_dir=tmp_path)
    rows = json.loads((tmp_path / "metrics.json").read_text())
    assert [r["num-replies"] for r in rows] == [0, 0, 0] and [r["num-rejected"] for r in rows] == [0, 3, 3]


KILLER = """
import sys
sys.path.insert(0, {tests!r})
from test_resume import run
from pathlib import Path
run(Path({out!r}), 4)
"""


@pytest.mark.slow
@pytest.mark.parametrize("after_rows,delay", [(1, 0.0), (2, 0.05), (3, 0.2), (2, 0.5), (4, 0.1)])
def test_sigkill_at_any_moment_then_resume(uninterrupted, tmp_path, after_rows, delay):
    script = KILLER.format(tests=str(Path(__file__).parent), out=str(tmp_path))
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    deadline = time.monotonic() + 120
    metrics = tmp_path / "metrics.json"
    while proc.poll() is None and time.monotonic() < deadline:
        try:
            if len(json.loads(metrics.read_text())) >= after_rows:
                break
        except (OSError, ValueError):
            pass  # not written yet (never a partial file: see assert_files_valid)
        time.sleep(0.01)
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert_files_valid(tmp_path, killed=True)
    if (tmp_path / "model.safetensors").exists():
        run(tmp_path, 4, resume=True)
    else:  # killed before the first checkpoint: start again
        run(tmp_path, 4)
    a, b = load_model(uninterrupted / "model.safetensors"), load_model(tmp_path / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [r["server-round"] for r in json.loads(metrics.read_text())] == [0, 1, 2, 3, 4]
    assert_files_valid(tmp_path)  # the restart removed what the kill left


def test_a_restart_removes_the_temporaries_a_kill_left(tmp_path):
    (tmp_path / ".model.safetensors.70d_t985").write_bytes(b"half a model")
    (tmp_path / ".metrics.json.ab12cd34").write_text("[{")
    (tmp_path / ".hidden-by-the-user").write_text("keep")
    run(tmp_path, 1)
    assert temporaries(tmp_path) == [".hidden-by-the-user"]
    assert_files_valid(tmp_path, killed=True)


def test_cli_resume_continues_to_the_same_model(uninterrupted, tmp_path):
    import tomli_w

    from fl_subnet.experiments import cli

    scenario = tmp_path / "s.toml"
    scenario.write_text(tomli_w.dumps({**VALUES, "num-server-rounds": 2}))
    out = tmp_path / "run"
    assert cli.main(["run", str(scenario), "--out", str(out)]) == 0
    assert cli.main(["run", "--resume", str(out), "--rounds", "4"]) == 0
    a, b = load_model(uninterrupted / "model.safetensors"), load_model(out / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert cli.main(["run", "--resume", str(tmp_path / "nothing")]) == 2
    assert cli.main(["run", str(scenario), "--resume", str(out)]) == 2  # one of the two
