"""fl-subnet installed into a separate Flower app's own environment, the documented way,
runs that app under ``flwr run`` with the pinned torch.

The documented way (README, "Install fl-subnet into your own Flower app"):

1. build a wheel of fl-subnet from a checkout (``pip wheel --no-deps``);
2. in the app's own virtual environment, install torch alone from the project's
   constraints file, then the wheel (and the app's other packages) with the same
   constraints file;
3. run Flower with ``FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1``, so the SuperLink
   uses that environment as it is instead of running ``uv sync`` on the app's
   dependencies (fl-subnet is not on PyPI, and an unconstrained resolve can pull a
   different torch).

The test does exactly that in ``tmp_path``: a fresh venv (not ``--system-site-packages``:
the point is an environment separate from the dev venv), a small Flower app written by
the test (IST on an MLP, the user's ClientApp calling ``compact_model``), and a
simulation SuperLink and ``flwr`` started from that venv's ``bin/`` with that ``bin/``
first on PATH and the dev venv's off it, so that SuperExec, the ServerApp and the
ClientApps all run in the app's environment. The ClientApp writes what it imported
(``torch.__version__``, ``torch.__file__``, ``fl_subnet.__file__``, ``sys.prefix``) to
files under the run's ``out-dir``; the test checks the version against constraints.txt
and the files against the app venv's site-packages.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

from flower_processes import (
    BIN,
    Processes,
    ROOT,
    flower_env,
    free_ports,
    http_ok,
    run_config_arg,
    simulation_options,
    wait_until,
    write_flower_config,
)

CONSTRAINTS = ROOT / "constraints.txt"
COPY_IGNORE = shutil.ignore_patterns(
    ".git", ".venv", "build", "dist", "runs", "*.egg-info", "__pycache__", ".pytest_cache",
    ".hypothesis", "*.fab",
)
SIMULATION_OPTIONS = simulation_options(2)
NUM_NODES = 2

# ------------------------------------------------------------------ the user's app
APP_PYPROJECT = """\
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "dropin-app"
version = "1.0.0"
description = "A user's own Flower app that trains with fl-subnet's IST"
license = "Apache-2.0"
dependencies = [
    "flwr[simulation]>=1.41,<1.43",
    "torch==2.13.0",
    "fl-subnet",
    "scikit-learn>=1.5",
]

[tool.hatch.build.targets.wheel]
packages = ["."]

[tool.flwr.app]
publisher = "someone-else"

[tool.flwr.app.components]
serverapp = "dropinapp.server_app:app"
clientapp = "dropinapp.client_app:app"

[tool.flwr.app.config]
num-server-rounds = 1
lr = 0.1
local-epochs = 5
out-dir = ""
"""

APP_TASK = '''\
"""dropinapp: the model and each node's data."""

import torch
from fl_subnet.models import MLP
from sklearn.datasets import load_digits


def Net():
    return MLP(64, [32], 10)


def load_data(partition_id: int, num_partitions: int):
    """Every num_partitions-th scikit-learn digit (bundled: nothing is downloaded)."""
    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x[partition_id::num_partitions] / 16.0, dtype=torch.float32)
    return x, torch.tensor(y[partition_id::num_partitions], dtype=torch.long)


def provenance() -> dict:
    """Where this process imported torch and fl-subnet from."""
    import sys

    import fl_subnet

    return {"torch-version": torch.__version__, "torch-file": torch.__file__,
            "fl-subnet-file": fl_subnet.__file__, "sys-prefix": sys.prefix,
            "executable": sys.executable}
'''

APP_CLIENT = '''\
"""dropinapp: the ClientApp."""

import json
from pathlib import Path

import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from fl_subnet.clients import compact_model

from dropinapp.task import Net, load_data, provenance

app = ClientApp()


@app.train()
def train(msg: Message, context: Context):
    model = compact_model(msg, Net)  # this node's compact sub-model
    pid = context.node_config["partition-id"]
    x, y = load_data(pid, context.node_config["num-partitions"])
    optimizer = torch.optim.SGD(model.parameters(), lr=msg.content["config"]["lr"])
    for _ in range(context.run_config["local-epochs"]):
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()

    out = Path(context.run_config["out-dir"])
    out.mkdir(parents=True, exist_ok=True)
    (out / f"clientapp-{pid}.json").write_text(json.dumps(provenance()))
    (out / "clientapp-torch-version.txt").write_text(torch.__version__)

    content = RecordDict({"arrays": ArrayRecord(model.state_dict()),
                          "metrics": MetricRecord({"train_loss": loss.item(), "num-examples": len(y)})})
    return Message(content=content, reply_to=msg)
'''

APP_SERVER = '''\
"""dropinapp: the ServerApp."""

import json
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp
from fl_subnet.strategies import IST

from dropinapp.task import Net, provenance

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    strategy = IST(Net, num_subnets=2, example_input=torch.zeros(1, 64),
                   order_by_partition=False, fraction_evaluate=0.0)
    result = strategy.start(grid=grid, initial_arrays=ArrayRecord(Net().state_dict()),
                            train_config=ConfigRecord({"lr": context.run_config["lr"]}),
                            num_rounds=context.run_config["num-server-rounds"])
    final = result.arrays.to_torch_state_dict()
    Net().load_state_dict(final)  # the aggregate is the full model again
    done = {"train": {str(r): dict(m) for r, m in result.train_metrics_clientapp.items()},
            "shapes": {k: list(v.shape) for k, v in final.items()},
            "serverapp": provenance()}
    out = Path(context.run_config["out-dir"])
    out.mkdir(parents=True, exist_ok=True)
    (out / "done.json").write_text(json.dumps(done))
'''


def write_app(app_dir: Path) -> None:
    pkg = app_dir / "dropinapp"
    pkg.mkdir(parents=True)
    (app_dir / "pyproject.toml").write_text(APP_PYPROJECT)
    (pkg / "__init__.py").write_text('"""dropinapp: a Flower app using fl-subnet."""\n')
    (pkg / "task.py").write_text(APP_TASK)
    (pkg / "client_app.py").write_text(APP_CLIENT)
    (pkg / "server_app.py").write_text(APP_SERVER)


# ------------------------------------------------------------------ install steps
def pinned(name: str) -> str:
    """The version constraints.txt pins ``name`` to."""
    for line in CONSTRAINTS.read_text().splitlines():
        m = re.fullmatch(rf"{re.escape(name)}==(\S+)", line.strip(), flags=re.IGNORECASE)
        if m:
            return m.group(1)
    raise AssertionError(f"{name} is not pinned in {CONSTRAINTS}")


def clean_env(venv: Path | None = None, base: dict[str, str] | None = None) -> dict[str, str]:
    """``base`` (os.environ) without the dev venv: its bin/ off PATH, no PYTHONPATH;
    with ``venv``, that venv activated (its bin/ first on PATH, VIRTUAL_ENV)."""
    env = {k: v for k, v in (os.environ if base is None else base).items()
           if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSAFEPATH", "PYTHONSTARTUP", "VIRTUAL_ENV")}
    path = [p for p in env.get("PATH", "").split(os.pathsep)
            if p and Path(p).resolve() != BIN.resolve()]
    if venv is not None:
        env["VIRTUAL_ENV"] = str(venv)
        path.insert(0, str(venv / "bin"))
    env["PATH"] = os.pathsep.join(path)
    return env


def run(args: list[str], cwd: Path, env: dict[str, str], timeout: float = 600) -> str:
    start = time.monotonic()
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    print(f"[{time.monotonic() - start:6.1f} s] {' '.join(str(a) for a in args[:6])}")
    assert proc.returncode == 0, f"{args} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc.stdout


def build_wheel(tmp_path: Path) -> Path:
    """``pip wheel --no-deps`` on a copy of the checkout (keeps build/ out of the repo).

    ``--no-build-isolation`` only keeps the test offline (setuptools comes from the dev
    venv); a user's ``pip wheel`` fetches setuptools into an isolated build env.
    """
    src, dist = tmp_path / "src", tmp_path / "dist"
    shutil.copytree(ROOT, src, ignore=COPY_IGNORE)
    run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
         "-w", str(dist), str(src)], tmp_path, clean_env())
    wheels = list(dist.glob("fl_subnet-*.whl"))
    assert len(wheels) == 1, wheels
    assert "fl_subnet/clients/__init__.py" in zipfile.ZipFile(wheels[0]).namelist()
    return wheels[0]


def make_app_venv(tmp_path: Path, wheel: Path) -> Path:
    """A new venv with torch, then fl-subnet's wheel, installed under constraints.txt."""
    venv = tmp_path / "appenv"
    env = clean_env(venv)
    run([sys.executable, "-m", "venv", str(venv)], tmp_path, clean_env())
    py = str(venv / "bin" / "python")
    # torch first and alone (as the Makefile does): the pin takes the CPU wheel.
    run([py, "-m", "pip", "install", "-q", "-c", str(CONSTRAINTS), f"torch=={pinned('torch')}"], tmp_path, env)
    run([py, "-m", "pip", "install", "-q", "-c", str(CONSTRAINTS), str(wheel), "scikit-learn"], tmp_path, env)
    run([py, "-m", "pip", "check"], tmp_path, env)
    return venv


def venv_purelib(venv: Path) -> Path:
    code = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
    return Path(run([str(venv / "bin" / "python"), "-c", code], venv, clean_env(venv)).strip())


# ------------------------------------------------------------------ the test
@pytest.mark.slow
def test_wheel_in_app_venv_runs_flwr_run_with_pinned_torch(tmp_path):
    started = time.monotonic()
    wheel = build_wheel(tmp_path)
    venv = make_app_venv(tmp_path, wheel)
    site = venv_purelib(venv)
    vbin = venv / "bin"
    assert not (site / "fl_subnet.egg-link").exists()
    assert not list(site.glob("__editable__*fl_subnet*")), "not an editable install"
    assert all((vbin / n).exists() for n in ("flwr", "flower-superlink", "flower-superexec", "flwr-simulation"))
    install_s = time.monotonic() - started

    app_dir, out_dir, home = tmp_path / "app", tmp_path / "out", tmp_path / "flwr-home"
    write_app(app_dir)
    (port,) = free_ports(1)
    write_flower_config(home, "dropin-sim", f"127.0.0.1:{port}", SIMULATION_OPTIONS)
    env = clean_env(venv, flower_env(home))  # the app venv's bin/ first, the dev venv's gone
    env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] = "1"  # as the README says
    procs = Processes(tmp_path / "logs", env)
    done = out_dir / "done.json"
    try:
        # No --disable-runtime-dependency-installation flag: the environment variable must do it.
        procs.start("superlink", [str(vbin / "flower-superlink"), "--insecure", "--simulation",
                                  "--host", "127.0.0.1", "--port", str(port)], cwd=tmp_path)
        wait_until(lambda: http_ok(f"http://127.0.0.1:{port}/health"), 60, "the SuperLink",
                   check=lambda: procs.check_alive("superlink"))
        flwr = procs.start("flwr-run", [str(vbin / "flwr"), "run", str(app_dir), "dropin-sim", "--run-config",
                                        run_config_arg({"out-dir": str(out_dir)}), "--stream"], cwd=tmp_path)
        wait_until(lambda: flwr.poll() is not None or done.exists(), 300, "the run to end",
                   check=lambda: procs.check_alive("superlink"))
        if flwr.poll() is None:
            flwr.wait(timeout=60)
        assert flwr.returncode == 0, f"flwr run exited with code {flwr.returncode}"
        # `flwr run --stream` exits 0 even when the ServerApp raised: its traceback is in the log.
        wait_until(done.exists, 5, f"{done} (did the ServerApp fail? see the flwr-run log)")
        superlink_log = (tmp_path / "logs" / "superlink.log").read_text(errors="replace")
        assert "uv sync" not in superlink_log
    except BaseException:
        print(procs.tails())
        raise
    finally:
        procs.stop_all()
    print(f"install {install_s:.0f} s, flwr run {time.monotonic() - started - install_s:.0f} s")

    result = json.loads(done.read_text())
    assert result["train"]["1"]["num-replies"] == NUM_NODES and result["train"]["1"]["num-rejected"] == 0
    assert result["shapes"]["1.weight"] == [32, 64]  # full size after aggregation
    clients = [json.loads((out_dir / f"clientapp-{pid}.json").read_text()) for pid in range(NUM_NODES)]
    torch_pin = pinned("torch")
    assert (out_dir / "clientapp-torch-version.txt").read_text().split("+")[0] == torch_pin
    for where in [*clients, result["serverapp"]]:
        assert where["torch-version"].split("+")[0] == torch_pin, where
        assert Path(where["sys-prefix"]).resolve() == venv.resolve(), where
        for key in ("torch-file", "fl-subnet-file"):
            path = Path(where[key]).resolve()
            assert path.is_relative_to(site.resolve()), f"{key} {path} is not in {site}"
            assert not path.is_relative_to(ROOT), f"{key} {path} comes from the checkout"
    assert Path(clients[0]["fl-subnet-file"]).resolve() == (site / "fl_subnet" / "__init__.py").resolve()
    shutil.rmtree(venv, ignore_errors=True)  # 1.6 GB; pytest keeps the last 3 tmp dirs (kept on failure)
