"""Helpers for the tests that start real Flower processes (SuperLink, SuperNodes, ``flwr``).

Everything runs on 127.0.0.1 with free ports and a temporary ``FLWR_HOME``, so a test
never touches the user's ``~/.flwr`` nor a SuperLink that is already running. Every
process is started through :class:`Processes`, whose ``stop_all`` (call it in a
``finally``) stops each one by PID — terminate, wait, kill — together with the
descendants it spawned (SuperExec, ServerApp/ClientApp processes, Ray), which Flower
starts in sessions of their own.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import tomllib
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
COMPARED = ("eval-acc", "eval-loss", "full-train-loss")
EXACT = ("server-round", "bytes-down", "bytes-up")


def binary(name: str) -> str | None:
    """Path of a Flower executable: the venv's own, else one on PATH."""
    own = BIN / name
    return str(own) if own.exists() else shutil.which(name)


def missing_binaries(*names: str) -> list[str]:
    return [n for n in names if binary(n) is None]


def free_ports(n: int) -> list[int]:
    """``n`` distinct free TCP ports on 127.0.0.1 (all bound at once, then released)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def flower_env(flwr_home: Path) -> dict[str, str]:
    """Environment for Flower processes: private FLWR_HOME, no ``uv sync``, offline."""
    env = dict(os.environ)
    local_http, local_control = free_ports(2)
    env.update({
        "FLWR_HOME": str(flwr_home),
        "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}",
        # Else the SuperLink runs `uv sync` on the FAB and pulls torch from the network.
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "FLWR_TELEMETRY_ENABLED": "0",
        # Only used if `flwr` ever auto-starts a ':local:' SuperLink: keep it off the
        # default ports (39091/39093) of a developer's own local SuperLink.
        "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(local_http),
        "FLWR_LOCAL_CONTROL_API_PORT": str(local_control),
        "PYTHONUNBUFFERED": "1",
    })
    return env


def write_flower_config(flwr_home: Path, name: str, address: str, options: str = "") -> Path:
    """Write ``$FLWR_HOME/config.toml`` with one default SuperLink connection ``name``.

    ``options`` is extra TOML for the connection table, e.g.
    ``"options.num-supernodes = 4"`` (simulation settings).
    """
    flwr_home.mkdir(parents=True, exist_ok=True)
    path = flwr_home / "config.toml"
    path.write_text(
        f'[superlink]\ndefault = "{name}"\n\n'
        f'[superlink.{name}]\naddress = "{address}"\ninsecure = true\n{options}\n'
    )
    return path


def simulation_options(num_supernodes: int) -> str:
    """The simulation connection's options for :func:`write_flower_config`: ``num_supernodes``
    SuperNodes on a Ray backend of 2 CPUs, one per ClientApp (the 2-core CI machine)."""
    return (f"options.num-supernodes = {num_supernodes}\n"
            "options.backend.client-resources.num-cpus = 1\n"
            "options.backend.init-args.num-cpus = 2\n")


def app_config(overrides: Mapping[str, object]) -> dict[str, object]:
    """The run config a ServerApp sees: ``[tool.flwr.app.config]`` fused with overrides."""
    with open(ROOT / "pyproject.toml", "rb") as f:
        config = tomllib.load(f)["tool"]["flwr"]["app"]["config"]
    unknown = set(overrides) - set(config)
    assert not unknown, f"keys missing from [tool.flwr.app.config]: {unknown}"
    return {**config, **overrides}


def run_config_arg(overrides: Mapping[str, object]) -> str:
    """``flwr run --run-config`` value: space-separated ``key=<TOML value>`` pairs."""
    def toml(v: object) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, str):
            return json.dumps(v)  # a TOML basic string for paths without backslashes
        return repr(v)
    return " ".join(f"{k}={toml(v)}" for k, v in overrides.items())


# ---------------------------------------------------------------- process tree (Linux)
def _stat(pid: int) -> tuple[int, str, int] | None:
    """(ppid, state, start time) of ``pid`` from /proc, None if gone/unreadable."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2:].split()
    return int(fields[1]), fields[0], int(fields[19])


def descendants(pid: int) -> list[tuple[int, int]]:
    """(pid, start time) of every live descendant of ``pid`` ([] without /proc)."""
    children: dict[int, list[int]] = {}
    starts: dict[int, int] = {}
    for entry in Path("/proc").glob("[0-9]*") if Path("/proc").is_dir() else []:
        info = _stat(int(entry.name))
        if info is not None and info[1] != "Z":
            children.setdefault(info[0], []).append(int(entry.name))
            starts[int(entry.name)] = info[2]
    found, todo = [], list(children.get(pid, []))
    while todo:
        p = todo.pop()
        found.append((p, starts[p]))
        todo.extend(children.get(p, []))
    return found


def _alive(pid: int, start: int) -> bool:
    info = _stat(pid)
    return info is not None and info[1] != "Z" and info[2] == start  # same process, not a reused PID


def _signal_all(procs: list[tuple[int, int]], sig: int) -> None:
    for pid, start in procs:
        if _alive(pid, start):
            try:
                os.kill(pid, sig)
            except OSError:
                pass


class Processes:
    """The processes a test started, each logging to ``<log_dir>/<name>.log``."""

    def __init__(self, log_dir: Path, env: Mapping[str, str]):
        self.log_dir = log_dir
        self.env = dict(env)
        self.procs: list[tuple[str, subprocess.Popen, Path]] = []
        self.killed: set[str] = set()  # ended on purpose: no longer checked by check_alive
        log_dir.mkdir(parents=True, exist_ok=True)

    def start(self, name: str, cmd: list[str], cwd: Path = ROOT) -> subprocess.Popen:
        log = self.log_dir / f"{name}.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen(cmd, cwd=cwd, env=self.env, stdin=subprocess.DEVNULL,
                                    stdout=out, stderr=subprocess.STDOUT)
        self.procs.append((name, proc, log))
        return proc

    def check_alive(self, *names: str) -> None:
        """Raise if one of the named (all, by default) processes has exited."""
        for name, proc, _ in self.procs:
            if (not names or name in names) and name not in self.killed and proc.poll() is not None:
                raise RuntimeError(f"{name} exited early with code {proc.returncode}")

    def kill(self, name: str) -> None:
        """SIGKILL the process ``name`` and every descendant (a crash: nothing can clean up)."""
        for n, proc, _ in self.procs:
            if n == name:
                tree = descendants(proc.pid)
                proc.kill()
                proc.wait(timeout=10)
                _signal_all(tree, signal.SIGKILL)
                self.killed.add(name)

    def stop_all(self, timeout: float = 20.0) -> None:
        """Stop every process, newest first, by PID, and then its leftover descendants."""
        for _name, proc, _ in reversed(self.procs):
            tree = descendants(proc.pid)
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=timeout)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=10)
            deadline = time.monotonic() + 10
            while any(_alive(*p) for p in tree) and time.monotonic() < deadline:
                time.sleep(0.2)
            _signal_all(tree, signal.SIGTERM)
            deadline = time.monotonic() + 5
            while any(_alive(*p) for p in tree) and time.monotonic() < deadline:
                time.sleep(0.2)
            _signal_all(tree, signal.SIGKILL)

    def tails(self, lines: int = 60) -> str:
        parts = []
        for name, proc, log in self.procs:
            text = log.read_text(errors="replace").splitlines() if log.exists() else []
            parts.append(f"===== {name} (pid {proc.pid}, rc {proc.poll()}): last {lines} lines of {log}\n"
                         + "\n".join(text[-lines:]))
        return "\n".join(parts)


def wait_until(predicate: Callable[[], bool], timeout: float, what: str,
               check: Callable[[], None] | None = None, interval: float = 0.5) -> None:
    """Poll ``predicate`` until true; ``check`` may raise early (a process died)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if check is not None:
            check()
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return 200 <= response.status < 300
    except (urllib.error.URLError, OSError):
        return False


def start_superlink(procs: Processes, port: int, *, simulation: bool, name: str = "superlink",
                    database: Path | None = None) -> subprocess.Popen:
    """A SuperLink whose Fleet, Control and Runtime HTTP APIs share 127.0.0.1:``port``;
    with ``database``, its state (registered nodes, runs) is kept in that SQLite file
    across restarts."""
    cmd = [binary("flower-superlink"), "--insecure", "--host", "127.0.0.1", "--port", str(port),
           "--disable-runtime-dependency-installation"]
    if database is not None:
        cmd += ["--database", str(database)]
    if simulation:
        cmd.append("--simulation")
    proc = procs.start(name, cmd)
    wait_until(lambda: http_ok(f"http://127.0.0.1:{port}/health"), 60, "the SuperLink",
               check=lambda: procs.check_alive(name))
    return proc


def flwr_run(procs: Processes, connection: str, overrides: Mapping[str, object] | Path, out_dir: Path,
             timeout: float) -> None:
    """``flwr run <repo> <connection> --run-config ... --stream``; wait for summary.json.

    ``--stream`` returns when the run ends (finished or failed); the results files are
    then complete. Raises if ``flwr`` fails, a started process dies, or time runs out.
    """
    if isinstance(overrides, Path):  # a scenario file (flwr takes no key=value beside it)
        config_args = ["--run-config", str(overrides)]
    else:
        config_args = ["--run-config", run_config_arg(overrides)]
    cmd = [binary("flwr"), "run", str(ROOT), connection, *config_args, "--stream"]
    run = procs.start("flwr-run", cmd)
    summary = out_dir / "summary.json"
    wait_until(lambda: run.poll() is not None or summary.exists(), timeout, "the run to end",
               check=lambda: procs.check_alive(*(n for n, _, _ in procs.procs if n != "flwr-run")))
    if run.poll() is None:  # summary written: the ServerApp is returning
        run.wait(timeout=60)
    if run.returncode != 0:
        raise RuntimeError(f"flwr run exited with code {run.returncode}")
    # `flwr run --stream` exits 0 even when the ServerApp raised (its traceback is in
    # the flwr-run log); summary.json is written before the run ends, so a short grace.
    wait_until(summary.exists, 5, f"{summary} (did the ServerApp fail? see the flwr-run log)")


def simulate_scenario(tmp_path: Path, scenario: Mapping[str, object], num_supernodes: int,
                      timeout: float) -> tuple[Path, Path]:
    """``flwr run`` of ``scenario`` (run-config keys) on a simulation SuperLink of
    ``num_supernodes`` started here (:func:`simulation_options`), in a private
    ``$FLWR_HOME`` under ``tmp_path``; every process stopped afterwards, their logs'
    tails printed if the run fails.

    Returns
    -------
    (scenario file, results folder) : tuple[Path, Path]
        The TOML file written (the same file ``fl-subnet run`` can take) and its ``out-dir``.
    """
    import tomli_w

    out_dir = tmp_path / "out"
    home = tmp_path / "flwr-home"
    (port,) = free_ports(1)
    write_flower_config(home, "fl-subnet-sim", f"127.0.0.1:{port}", simulation_options(num_supernodes))
    path = tmp_path / "scenario.toml"
    path.write_text(tomli_w.dumps({**scenario, "out-dir": str(out_dir)}))
    procs = Processes(tmp_path / "logs", flower_env(home))
    try:
        start_superlink(procs, port, simulation=True)
        flwr_run(procs, "fl-subnet-sim", path, out_dir, timeout=timeout)
    except BaseException:
        print(procs.tails())
        raise
    finally:
        procs.stop_all()
    return path, out_dir


def inprocess_rows(overrides: Mapping[str, object], num_nodes: int, checkpoint_dir: Path | None = None) -> list[dict]:
    """The metrics rows of the same run on :class:`InProcessGrid` (no Flower processes);
    with ``checkpoint_dir``, its model is saved there too."""
    import fl_subnet.app.client_app
    from fl_subnet.experiments.config import RunConfig
    from fl_subnet.experiments.experiment import run_server
    from fl_subnet.experiments.inprocess_grid import InProcessGrid

    config = app_config(overrides)
    rows: list[dict] = []
    grid = InProcessGrid(fl_subnet.app.client_app.app, num_nodes, run_config=config)
    run_server(grid, RunConfig.from_mapping(config), on_round=rows.append, checkpoint_dir=checkpoint_dir)
    return rows


def assert_same_rows(got: list[dict], expected: list[dict], tol: float = 1e-5) -> None:
    """Same rounds, metrics within ``tol``, bytes exactly."""
    assert [r["server-round"] for r in got] == [r["server-round"] for r in expected]
    for g, e in zip(got, expected, strict=True):
        for key in EXACT:
            assert g[key] == e[key], (g["server-round"], key, g[key], e[key])
        for key in COMPARED:
            assert abs(g[key] - e[key]) <= tol, (g["server-round"], key, g[key], e[key])
