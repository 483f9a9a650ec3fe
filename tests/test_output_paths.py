"""Where ``flwr run`` results land: never in the SuperLink's working directory.

A ServerApp runs in the SuperLink's working directory; Flower's local SuperLink keeps the
directory of whichever ``flwr run`` started it, so a path relative to it is arbitrary.
fl-subnet's ServerApp and the example apps take a relative ``out-dir`` (and their
default) under ``~/flwr-runs/`` and an absolute one as it is, and say the absolute folder
at the end of the run. Each test runs with HOME and the working directory in tmp_path.
"""

from __future__ import annotations

import logging
import re
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from flwr.app import Context, RecordDict

import fl_subnet.app.server_app as server_app
from fl_subnet.experiments.results import COLUMNS, server_out_dir

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = [ROOT / "examples" / "quickstart-pytorch-fedavg", ROOT / "examples" / "quickstart-pytorch"]


@pytest.fixture
def home_and_cwd(tmp_path, monkeypatch):
    """HOME in tmp_path/home, the working directory (the 'SuperLink's') tmp_path/superlink-cwd."""
    home, cwd = tmp_path / "home", tmp_path / "superlink-cwd"
    home.mkdir()
    cwd.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(cwd)
    return home, cwd


def context(run_config: dict) -> Context:
    return Context(run_id=1234, node_id=0, node_config={}, state=RecordDict(), run_config=run_config)


def test_server_out_dir(home_and_cwd, tmp_path):
    home, _ = home_and_cwd
    runs = home / "flwr-runs"
    assert server_out_dir("results/ist", "ist") == runs / "results" / "ist"
    assert server_out_dir(str(tmp_path / "abs"), "ist") == tmp_path / "abs"
    assert server_out_dir("~/elsewhere", "ist") == home / "elsewhere"
    default = server_out_dir("", "federated-dropout")
    assert default.parent == runs and re.fullmatch(r"federated-dropout-\d{8}-\d{6}", default.name), default


@pytest.mark.parametrize("out_dir", ["my-run", ""])
def test_fl_subnet_server_app_writes_under_home_and_logs_the_absolute_folder(home_and_cwd, monkeypatch, caplog,
                                                                              out_dir):
    """The ServerApp itself (its strategy run stubbed): results under ~/flwr-runs/, none
    in the working directory, and the folder's absolute path in the log's last lines."""
    home, cwd = home_and_cwd
    seen = {}

    def fake_run_server(grid, cfg, on_round, checkpoint_dir, **kwargs):
        seen["dir"] = checkpoint_dir
        on_round({**{k: 0.0 for k in COLUMNS}, "server-round": 0, "strategy": cfg.strategy})

    monkeypatch.setattr(server_app, "run_server", fake_run_server)
    with caplog.at_level(logging.INFO, logger="fl_subnet"):
        server_app.main(None, context({"strategy": "ist", "out-dir": out_dir}))

    out = seen["dir"]
    assert out.is_absolute() and out.parent == home / "flwr-runs", out
    if out_dir:
        assert out.name == out_dir
    assert (out / "metrics.json").is_file() and (out / "summary.json").is_file()
    assert list(cwd.iterdir()) == []  # nothing in the SuperLink's working directory
    last = [r.getMessage() for r in caplog.records][-2:]
    assert last == [f"fl-subnet: results in {out}", f"fl-subnet: model saved in {out / 'model.safetensors'}"]


class FakeStrategy:
    """Stands in for FedAvg / IST: start() returns a Result-like object at once."""

    def __init__(self, *args, **kwargs):
        pass

    def start(self, *, initial_arrays, **kwargs):
        return SimpleNamespace(arrays=initial_arrays, train_metrics_clientapp={},
                               evaluate_metrics_clientapp={}, evaluate_metrics_serverapp={})


@pytest.mark.parametrize("app_dir", EXAMPLES, ids=lambda p: p.name)
@pytest.mark.parametrize("out_dir", ["relative/run", ""])
def test_example_app_saves_final_model_under_home(home_and_cwd, monkeypatch, capsys, app_dir, out_dir):
    """Both example apps: final_model.pt and result.json under ~/flwr-runs/ (``out-dir``
    or the run id), not in the working directory, and the absolute folder printed."""
    home, cwd = home_and_cwd
    saved = {k: sys.modules.pop(k) for k in list(sys.modules) if k.split(".")[0] == "pytorchexample"}
    sys.path.insert(0, str(app_dir))
    try:
        from pytorchexample import server_app as example

        for name in ("FedAvg", "IST"):
            if hasattr(example, name):
                monkeypatch.setattr(example, name, FakeStrategy)
        example.main(None, context({"fraction-evaluate": 0.5, "num-server-rounds": 1, "lr": 0.05,
                                    "out-dir": out_dir}))
        net = example.Net
    finally:
        sys.path.remove(str(app_dir))
        for k in [k for k in sys.modules if k.split(".")[0] == "pytorchexample"]:
            del sys.modules[k]
        sys.modules.update(saved)

    out = home / "flwr-runs" / (out_dir or "1234")
    net().load_state_dict(torch.load(out / "final_model.pt"))
    assert (out / "result.json").is_file()
    assert list(cwd.iterdir()) == []
    assert str(out) in capsys.readouterr().out
