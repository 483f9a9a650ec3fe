"""Run every benchmark under ``bench/``; collect ``bench/results.json`` and ``bench/results.md``.

Each benchmark script runs in its own process, one after the other (they measure time
and memory: never two at once). A script prints either JSON lines, one measurement
each, through ``bench/common.py``'s ``emit`` (``client``, ``simulation``, ``scale``,
``server_round``, ``bytes``), or one JSON object (``aggregate``, ``analysis``), which is
turned into measurements of the same shape here (:func:`from_object`). Its stderr (the
logs) passes through.

``results.json`` holds every measurement, the scripts that failed, the machine and the
command; ``results.md`` a Markdown table (bench, setting, ours, FedAvg, ratio, target,
met?) and the machine. A script that fails is listed there and the others still run;
the exit status is then 1.

Usage::

    python bench/run_all.py                    # everything, full settings (long)
    python bench/run_all.py --quick            # --quick to every script that takes it
    python bench/run_all.py --only client,scale
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

log = logging.getLogger("bench.run_all")

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
#: The order they run in; any other ``bench/*.py`` (but the helpers) runs after them.
ORDER = ("client", "server_round", "bytes", "aggregate", "analysis", "scale", "simulation")
HELPERS = {"common", "run_all"}


def discover(bench_dir: Path = HERE) -> list[str]:
    """Names of the benchmark scripts in ``bench_dir``: :data:`ORDER` first, then the rest
    sorted; helpers (``common``, ``run_all``, ``_*``) left out."""
    found = {p.stem for p in bench_dir.glob("*.py") if p.stem not in HELPERS and not p.stem.startswith("_")}
    return [n for n in ORDER if n in found] + sorted(found - set(ORDER))


def takes_quick(script: Path) -> bool:
    """Whether a script has a ``--quick`` option (its source names it)."""
    return '"--quick"' in script.read_text(encoding="utf-8")


# --------------------------------------------------------------------------- parsing
def parse_output(name: str, stdout: str) -> list[dict[str, object]]:
    """The measurements in a script's stdout: its JSON lines (objects with ``bench`` and
    ``median``), or else its stdout as one JSON object (:func:`from_object`).

    Raises
    ------
    ValueError
        If the output holds neither.
    """
    rows = []
    for line in stdout.splitlines():
        line = line.strip()
        if not line.startswith("{"):
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(obj, dict) and "bench" in obj and "median" in obj:
            rows.append(obj)
    if rows:
        return rows
    try:
        obj = json.loads(stdout)
    except json.JSONDecodeError:
        raise ValueError(f"{name}: no JSON measurement in its output") from None
    return from_object(name, obj)


def from_object(name: str, obj: Mapping[str, object]) -> list[dict[str, object]]:
    """Measurements from the one JSON object that ``aggregate.py`` / ``analysis.py`` print.

    ``aggregate``: fl-subnet's gather + masked aggregation against Flower's
    ``aggregate_arrayrecords`` (seconds, every repetition; target 1.0: not slower).
    ``analysis``: per model, the client's ``spec.build`` of the compact module against a
    FedAvg client's full construct + ``load_state_dict`` (seconds, medians).
    """
    sys.path.insert(0, str(HERE))
    from common import record

    if name == "aggregate":
        setting = {"model": obj["model"], "params": obj["num_params"], "clients": obj["clients"],
                   "keep_prob": obj["keep_prob"], "measure": "server: gather + decode + masked aggregate"}
        ours, theirs = obj["fl_subnet_gather_aggregate"], obj["flower_fedavg"]
        return [record("aggregate", setting, ours["reps_s"], fedavg=theirs["reps_s"], target=1.0,
                       phases_median_s=ours.get("phases_median_s"),
                       compact_over_full_bytes=obj.get("compact_over_full_bytes"))]
    if name == "analysis":
        out = []
        for m in obj["models"]:
            c = m["client"]
            setting = {"model": m["name"], "params": m["num_params"], "keep_prob": obj["keep_prob"],
                       "measure": "client: spec.build of the compact module vs full construct + load"}
            out.append(record("analysis", setting, [c["build_compact_seconds"]],
                              fedavg=c["fedavg_full_construct_and_load_seconds"],
                              repeats_per_median=obj["repeats"], analyze_seconds=m["analyze_seconds"],
                              compact_over_full_bytes=c["compact_over_full_bytes"]))
        return out
    raise ValueError(f"{name}: prints one JSON object that run_all cannot read (no JSON lines)")


# --------------------------------------------------------------------------- the table
def fmt_value(value: object, metric: str) -> str:
    """A number in its unit: seconds as s/ms, bytes as MB/GB."""
    if not isinstance(value, (int, float)) or (isinstance(value, float) and not math.isfinite(value)):
        return "—" if value is None else str(value)
    if metric == "seconds":
        return f"{value * 1e3:.1f} ms" if abs(value) < 1 else f"{value:.2f} s"
    if metric == "bytes":
        return f"{value / 1e9:.2f} GB" if abs(value) >= 1e9 else f"{value / 1e6:.1f} MB"
    return f"{value:.4g}"


def fmt_setting(setting: Mapping[str, object], limit: int = 48) -> str:
    """``key=value`` pairs of a setting; long free-text values are left out of the table
    (they stay in ``results.json``), but ``model`` and ``measure`` are kept."""
    parts = []
    for key, value in setting.items():
        text = json.dumps(value) if isinstance(value, (dict, list)) else str(value)
        if key in ("model", "measure") or len(text) <= limit:
            parts.append(f"{key}={text}")
    return ", ".join(parts).replace("|", "\\|")


def table_row(m: Mapping[str, object]) -> str:
    """One Markdown row: bench, setting, ours (median [min–max]), FedAvg, ratio, target, met?"""
    metric = str(m.get("metric", ""))
    spread = m.get("spread") or {}
    ours = fmt_value(m.get("median"), metric)
    if spread and m.get("reps", 1) > 1:
        ours += f" [{fmt_value(spread.get('min'), metric)}–{fmt_value(spread.get('max'), metric)}]"
    ratio = m.get("ratio")
    target = m.get("target")
    met = "—" if "meets_target" not in m else ("yes" if m["meets_target"] else "**no**")
    cells = [str(m.get("bench")), fmt_setting(m.get("setting") or {}), ours,
             fmt_value(m.get("fedavg_median"), metric),
             "—" if not isinstance(ratio, (int, float)) else f"{ratio:.3f}",
             "—" if target is None else f"≤ {target}", met]
    return "| " + " | ".join(cells) + " |"


def markdown(measurements: Sequence[Mapping[str, object]], failures: Sequence[Mapping[str, object]],
             machine: Mapping[str, object], command: str) -> str:
    """``results.md``: the table, then the failed scripts, the machine and the command."""
    lines = ["# Benchmarks", "",
             "Ours: fl-subnet; FedAvg: Flower's FedAvg measured in the same run; ratio = ours / FedAvg "
             "(medians); met: ratio ≤ target. `results.json` holds every repetition and setting.", "",
             "| bench | setting | ours | FedAvg | ratio | target | met? |",
             "|---|---|---|---|---|---|---|"]
    lines += [table_row(m) for m in measurements]
    if failures:
        lines += ["", "Failed scripts:", ""]
        lines += [f"- `{f['script']}`: exit {f['returncode']}: {f['error']}" for f in failures]
    lines += ["", "Machine: " + ", ".join(f"{k} {v}" for k, v in machine.items()), "",
              f"Command: `{command}`", ""]
    return "\n".join(lines)


def write_results(measurements: Sequence[Mapping[str, object]], out_dir: Path, *,
                  failures: Sequence[Mapping[str, object]] = (), machine: Mapping[str, object] | None = None,
                  command: str = "") -> tuple[Path, Path]:
    """Write ``results.json`` and ``results.md`` into ``out_dir``; return their paths."""
    if machine is None:
        sys.path.insert(0, str(HERE))
        from common import machine as this_machine

        machine = this_machine()
    out_dir.mkdir(parents=True, exist_ok=True)
    data = {"date": time.strftime("%Y-%m-%d %H:%M:%S %z"), "command": command, "machine": dict(machine),
            "measurements": list(measurements), "failures": list(failures)}
    json_path, md_path = out_dir / "results.json", out_dir / "results.md"
    json_path.write_text(json.dumps(data, indent=1) + "\n")
    md_path.write_text(markdown(measurements, failures, machine, command))
    return json_path, md_path


# --------------------------------------------------------------------------- running
def run_script(name: str, quick: bool, timeout: float | None) -> tuple[list[dict], dict | None]:
    """Run ``bench/<name>.py``; its measurements, and a failure record or None."""
    script = HERE / f"{name}.py"
    cmd = [sys.executable, str(script), *(["--quick"] if quick and takes_quick(script) else [])]
    log.info("running %s", " ".join(cmd))
    t0 = time.perf_counter()
    try:
        done = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=None, text=True, timeout=timeout,
                              check=False)
    except subprocess.TimeoutExpired as err:
        return _salvage(name, err.stdout), {"script": name, "returncode": None,
                                            "error": f"timed out after {timeout} s"}
    log.info("%s: exit %d after %.0f s", name, done.returncode, time.perf_counter() - t0)
    rows = _salvage(name, done.stdout)
    if done.returncode != 0:
        return rows, {"script": name, "returncode": done.returncode, "error": "see its log above"}
    if not rows:
        return rows, {"script": name, "returncode": 0, "error": "no measurement in its output"}
    return rows, None


def _salvage(name: str, stdout: str | bytes | None) -> list[dict]:
    if isinstance(stdout, bytes):
        stdout = stdout.decode(errors="replace")
    try:
        return parse_output(name, stdout or "")
    except (ValueError, KeyError, TypeError) as err:
        log.error("%s: %s", name, err)
        return []


def main(argv: Iterable[str] | None = None) -> int:
    names = discover()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", help=f"comma-separated scripts to run (of {', '.join(names)})")
    p.add_argument("--quick", action="store_true", help="pass --quick to every script that takes it")
    p.add_argument("--out-dir", default=str(HERE), help="where results.json and results.md go (default bench/)")
    p.add_argument("--timeout", type=float, default=None, help="seconds one script may run (default: no limit)")
    args = p.parse_args(list(argv) if argv is not None else None)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s", stream=sys.stderr)
    if args.only:
        wanted = [n.strip().removesuffix(".py") for n in args.only.split(",") if n.strip()]
        unknown = sorted(set(wanted) - set(names))
        if unknown:
            p.error(f"--only: unknown benchmark(s) {unknown}; known: {names}")
        names = [n for n in names if n in wanted]
    measurements, failures = [], []
    for name in names:
        rows, failure = run_script(name, args.quick, args.timeout)
        measurements += rows
        if failure is not None:
            failures.append(failure)
            log.error("%s failed: %s", name, failure["error"])
        for m in rows:
            log.info("%s", table_row(m))
    command = " ".join(["python bench/run_all.py", *(list(argv) if argv is not None else sys.argv[1:])])
    json_path, md_path = write_results(measurements, Path(args.out_dir), failures=failures, command=command)
    log.info("%d measurements from %d scripts: %s, %s", len(measurements), len(names), json_path, md_path)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
