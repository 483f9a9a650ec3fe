"""``fl-subnet``: run and compare scenario files.

    fl-subnet run scenarios/digits-ist.toml [--rounds N] [--out DIR] [--set key=value ...]
    fl-subnet compare scenarios/a.toml scenarios/b.toml ... [--rounds N] [--out DIR]
    fl-subnet sweep scenarios/paper-msd.toml --vary num-subnets=1,2,4,8 [--out DIR]

A scenario is a TOML file of run-config keys (the same keys ``flwr run . --run-config``
takes). Runs use :class:`~fl_subnet.experiments.inprocess_grid.InProcessGrid`: the real ServerApp
and ClientApp code, one node after the other in this process, without Ray — the same
metrics as ``flwr run`` for the same scenario and seed (a test checks it).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tomllib
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from .config import RunConfig
from .results import RunRecorder

console = Console(width=max(Console().width, 110))  # room for the results table


def load_scenario(path: str | Path, overrides: dict | None = None) -> dict:
    """Read a scenario TOML (flat run-config keys) and validate it.

    Raises
    ------
    ValueError
        Naming the file and the key: unknown key, wrong type, value out of range;
        or a TOML syntax error.
    """
    path = Path(path)
    try:
        values = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as err:
        raise ValueError(f"{path}: not valid TOML: {err}") from None
    nested = [k for k, v in values.items() if isinstance(v, dict)]
    if nested:
        raise ValueError(f"{path}: scenario keys must be flat run-config keys, found table(s) {nested}")
    values.update(overrides or {})
    try:
        RunConfig.from_mapping(values)
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None
    return values


def run_one(values: dict, out_dir: Path, progress: Progress | None = None, label: str = "") -> dict:
    """Run one validated scenario into ``out_dir``; return its summary."""
    from fl_subnet.client_app import app as client_app
    from .experiment import run_server
    from .inprocess_grid import InProcessGrid

    values = {**values, "out-dir": str(out_dir)}
    cfg = RunConfig.from_mapping(values)
    recorder = RunRecorder(out_dir, cfg)
    task = progress.add_task(label or cfg.strategy, total=cfg.num_server_rounds) if progress else None

    def on_round(row: dict) -> None:
        recorder.add_row(row)
        if progress is not None and row["server-round"] > 0:
            acc = row["eval-acc"]
            progress.update(task, advance=1, description=f"{label or cfg.strategy}: "
                            + (f"acc {acc:.3f}" if acc == acc else f"loss {row['full-train-loss']:.3g}"))

    grid = InProcessGrid(client_app, cfg.num_nodes, run_config=values)
    run_server(grid, cfg, on_round=on_round)
    return recorder.finish()


def _table(summaries: list[dict]) -> Table:
    table = Table(title="fl-subnet results")
    for col in ("run", "strategy", "rounds", "final acc", "final train loss", "total MB", "seconds"):
        table.add_column(col, justify="left" if col in ("run", "strategy") else "right")
    for s in summaries:
        acc = s["final-eval-acc"]
        table.add_row(Path(s["out-dir"]).name, s["strategy"], str(s["rounds"]),
                      "-" if acc is None else f"{acc:.3f}", f"{s['final-full-train-loss']:.4g}",
                      f"{s['total-mb']:.1f}", f"{s['seconds']:.1f}")
    return table


def _progress() -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), console=console)


def _parse_set(items: list[str]) -> dict:
    out = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep:
            raise ValueError(f"--set expects key=value, got {item!r}")
        try:
            out[key] = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            out[key] = raw  # a bare string
    return out


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``fl-subnet`` command; returns the exit status."""
    parser = argparse.ArgumentParser(prog="fl-subnet", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p_run = sub.add_parser("run", help="run one scenario")
    p_run.add_argument("scenario")
    p_cmp = sub.add_parser("compare", help="run several scenarios on the same data and seeds")
    p_cmp.add_argument("scenarios", nargs="+")
    p_sw = sub.add_parser("sweep", help="run one scenario per value of a key; plot the loss floor")
    p_sw.add_argument("scenario")
    p_sw.add_argument("--vary", required=True, metavar="KEY=V1,V2,...",
                      help="the key and its values, e.g. num-subnets=1,2,4,8")
    for p in (p_run, p_cmp, p_sw):
        p.add_argument("--rounds", type=int, help="override num-server-rounds")
        p.add_argument("--out", help="output folder (default runs/<name>)")
        p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="override run-config keys")
        p.add_argument("-v", "--verbose", action="store_true", help="show Flower's and fl-subnet's logs")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    import flwr.common.logger  # noqa: F401  (Flower sets up its logger on import: do it first)

    logging.getLogger("flwr").setLevel(logging.INFO if args.verbose else logging.ERROR)

    files = args.scenarios if args.command == "compare" else [args.scenario]
    try:
        overrides = _parse_set(args.set)
        if args.rounds is not None:
            overrides["num-server-rounds"] = args.rounds
        if args.command == "sweep":
            key, _, raw = args.vary.partition("=")
            sweep_values = [_parse_set([f"{key}={v}"])[key] for v in raw.split(",") if v]
            if not sweep_values:
                raise ValueError(f"--vary expects KEY=V1,V2,..., got {args.vary!r}")
            stem = Path(files[0]).stem
            scenarios = [(f"{stem}-{key}-{v}", load_scenario(files[0], {**overrides, key: v}))
                         for v in sweep_values]
        else:
            scenarios = [(Path(f).stem, load_scenario(f, overrides)) for f in files]
    except (ValueError, OSError) as err:
        console.print(f"[red]error:[/red] {err}")
        return 2
    default = {"run": scenarios[0][0], "compare": "compare", "sweep": Path(files[0]).stem + "-sweep"}
    base = Path(args.out or (Path("runs") / default[args.command]))
    summaries = []
    try:
        with _progress() as progress:
            for name, values in scenarios:
                out = base if args.command == "run" else base / name
                summaries.append(run_one(values, out, progress, label=name))
    except KeyboardInterrupt:
        console.print(f"[yellow]interrupted[/yellow]: metrics of the finished rounds are in {base}")
        return 130
    console.print(_table(summaries))
    if args.command == "sweep":
        from .results import load_rows
        from .sweep import write_sweep

        runs = {Path(s["out-dir"]).name: load_rows(s["out-dir"]) for s in summaries}
        result = write_sweep(base, key, sweep_values, runs, title=f"{Path(files[0]).stem}: {key} sweep")
        for v, (label, floor) in zip(sweep_values, result["floors"].items()):
            console.print(f"{key} = {v}: loss floor {floor:.4g}")
        console.print(f"plots: {base / 'sweep-loss.png'}, {base / 'sweep-floor.png'}")
    if args.command == "compare":
        from .plots import plot_runs
        from .results import load_rows

        runs = {Path(s["out-dir"]).name: load_rows(s["out-dir"]) for s in summaries}
        plot = plot_runs(runs, base / "compare.png", title="fl-subnet: " + " vs ".join(runs))
        (base / "summary.json").write_text(json.dumps(summaries, indent=2))
        console.print(f"comparison plot: {plot}")
    console.print(f"results (metrics.json, metrics.csv, summary.json, plots.png) under {base.resolve()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
