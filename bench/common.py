"""What every benchmark under ``bench/`` shares: timing, the machine, one JSON line per
measurement.

A measurement is one JSON object on its own line of stdout::

    {"bench": "server_round", "setting": {...}, "metric": "seconds",
     "median": 0.081, "spread": {"min": ..., "max": ..., "iqr": ...}, "reps": 5,
     "fedavg_median": 0.092, "ratio": 0.88, "target": 1.0, "meets_target": true,
     "machine": {...}}

``ratio`` is ``median / fedavg_median``: Flower's FedAvg measured in the same run and
process, interleaved with fl-subnet's repetitions, because these machines are noisy.
``bench/run_all.py`` collects the lines of every script into ``bench/results.json``
and a Markdown table.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path


def machine() -> dict[str, object]:
    """Where a number was measured: CPU, cores, Python, torch and Flower versions."""
    import torch

    try:
        import flwr

        flwr_version = flwr.__version__
    except Exception:  # noqa: BLE001 — a benchmark without Flower still runs
        flwr_version = None
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(), "torch": torch.__version__, "flwr": flwr_version}


def spread(values: Sequence[float]) -> dict[str, float]:
    """Min, max and interquartile range of repeated measurements."""
    values = sorted(values)
    if len(values) >= 2:
        q = statistics.quantiles(values, n=4, method="inclusive")
        iqr = q[2] - q[0]
    else:
        iqr = 0.0
    return {"min": values[0], "max": values[-1], "iqr": iqr}


def timed(fn: Callable[[], object]) -> float:
    """Seconds one call of ``fn`` takes (``time.perf_counter``)."""
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def interleaved(ours: Callable[[], object], fedavg: Callable[[], object], reps: int,
                warmup: int = 1) -> tuple[list[float], list[float]]:
    """Seconds of ``reps`` calls of each, alternating so that drift hits both alike,
    after ``warmup`` untimed calls of each."""
    for _ in range(warmup):
        fedavg()
        ours()
    a, b = [], []
    for _ in range(reps):
        b.append(timed(fedavg))
        a.append(timed(ours))
    return a, b


def record(bench: str, setting: Mapping[str, object], values: Sequence[float], metric: str = "seconds",
           fedavg: Sequence[float] | float | None = None, target: float | None = None,
           **extra: object) -> dict[str, object]:
    """One measurement: median and spread of ``values``, and their ratio to FedAvg's.

    Parameters
    ----------
    bench : str
        The script's name (``server_round``, ``bytes``, ...).
    setting : mapping
        What was measured (model, replies, keep probability, ...).
    values : sequence of float
        The repeated measurements, in ``metric`` units (seconds, bytes, ...).
    fedavg : sequence of float or float, optional
        Flower's FedAvg in the same run (repetitions, or one value).
    target : float, optional
        The ratio the issue asks for (``ratio <= target``).
    """
    med = statistics.median(values)
    out: dict[str, object] = {"bench": bench, "setting": dict(setting), "metric": metric, "median": med,
                              "spread": spread(values), "reps": len(values)}
    if fedavg is not None:
        fa = statistics.median(fedavg) if isinstance(fedavg, Sequence) else float(fedavg)
        out["fedavg_median"] = fa
        out["ratio"] = med / fa if fa else float("nan")
        if target is not None:
            out["target"] = target
            out["meets_target"] = bool(out["ratio"] <= target)
    out.update(extra)
    out["machine"] = machine()
    return out


def emit(measurement: Mapping[str, object]) -> None:
    """Print one measurement as a JSON line (and flush: run_all reads it as it comes)."""
    sys.stdout.write(json.dumps(measurement) + "\n")
    sys.stdout.flush()


def replace_between(path: Path, start: str, end: str, body: str) -> None:
    """Replace the text between the markers ``start`` and ``end`` of ``path`` with
    ``body`` (a generated docs table; the markers stay)."""
    text = path.read_text(encoding="utf-8")
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    path.write_text(f"{head}{start}\n{body}{end}{tail}", encoding="utf-8")


def between(path: Path, start: str, end: str) -> str:
    """The text currently between the markers ``start`` and ``end`` of ``path``."""
    text = path.read_text(encoding="utf-8")
    return text.split(start, 1)[1].split(end, 1)[0].lstrip("\n")


def run_line(data: Mapping[str, object], command: str) -> list[str]:
    """The line under a generated table saying which command made it, in how many
    seconds, on which machine (empty when ``data`` lacks them)."""
    if "wall_seconds" not in data or "machine" not in data:
        return []
    mach = data["machine"]
    return ["", f"`{data.get('command', command)}`: {data['wall_seconds']:.0f} s on {mach.get('cpu')}, "
                f"{mach.get('torch_threads')} torch thread(s), torch {mach.get('torch')}, flwr {mach.get('flwr')}."]


def run_child_json(cmd: Sequence[str], env: Mapping[str, str], threads: int, cwd: Path) -> dict[str, object]:
    """Run ``cmd`` (a benchmark's child in a fresh interpreter) with ``env`` (and
    ``OMP_NUM_THREADS = threads`` when ``threads``) and return the JSON of its last line
    of stdout.

    Raises
    ------
    RuntimeError
        If the child exits with a non-zero status (with the end of its stderr).
    """
    import subprocess

    env = dict(env)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    done = subprocess.run(list(cmd), capture_output=True, text=True, env=env, cwd=cwd, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"child {cmd[3] if len(cmd) > 3 else cmd} failed ({done.returncode}):\n"
                           f"{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def status_bytes(field: str) -> int:
    """``VmRSS`` (resident now) or ``VmHWM`` (peak resident) of this process, in bytes (Linux).

    ``VmHWM`` is this process's own high-water mark, unlike ``ru_maxrss``, which a child
    started by ``subprocess`` (vfork + exec) inherits from its parent's peak.
    """
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))


def reset_peak() -> bool:
    """Reset this process's peak RSS (``VmHWM``) to its current RSS (Linux
    ``/proc/self/clear_refs``); False where that is not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


def add_docs_options(p, json_out: Path, root: Path, page: str) -> None:
    """The options of a benchmark that writes a JSON file and renders it into a docs page:
    ``--out`` (default ``json_out``; ``--quick`` writes none unless given), ``--write-docs``
    (render into ``page``) and ``--render-only`` (run nothing, render the JSON)."""
    p.add_argument("--out", type=Path, default=None, help=f"the JSON file (default {json_out.relative_to(root)}; "
                                                          "--quick writes none unless given)")
    p.add_argument("--write-docs", action="store_true", help=f"render the table into {page}")
    p.add_argument("--render-only", action="store_true", help="run nothing: render the JSON into the docs")


def output_file(args, json_out: Path) -> Path | None:
    """Where :func:`add_docs_options`' benchmark writes its JSON: ``--out``, else
    ``json_out`` unless ``--quick`` (None: nowhere)."""
    return args.out if args.out is not None or args.quick else json_out


def bench_logging(log: logging.Logger) -> None:
    """A bench script's logging: warnings of every library to stderr, its own ``log`` at INFO
    (its progress); stdout stays for the JSON lines."""
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s", stream=sys.stderr)
    log.setLevel(logging.INFO)


def quiet_runs() -> None:
    """Before a bench's runs: one torch thread (a run is measured on one core) and Flower's
    logger quieted (its per-run banners and per-round summaries; Flower sets its logger up
    on import, so it is imported first)."""
    import torch

    torch.set_num_threads(1)
    import flwr.common.logger  # noqa: F401

    logging.getLogger("flwr").setLevel(logging.ERROR)
