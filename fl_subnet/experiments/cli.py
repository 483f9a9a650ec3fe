"""``fl-subnet``: run and compare scenario files.

    fl-subnet run scenarios/digits-ist.toml [--rounds N] [--out DIR] [--set key=value ...]
    fl-subnet compare scenarios/a.toml scenarios/b.toml ... [--rounds N] [--out DIR]
    fl-subnet sweep scenarios/paper-msd.toml --vary num-subnets=1,2,4,8 [--out DIR]
    fl-subnet extract runs/heterofl --capacity 0.25 [--out FILE] [--scale]

A scenario is a TOML file of run-config keys (the same keys ``flwr run . --run-config``
takes). Runs use :class:`~fl_subnet.experiments.inprocess_grid.InProcessGrid`: the real ServerApp
and ClientApp code, one node after the other in this process, without Ray — the same
metrics as ``flwr run`` for the same scenario and seed (a test checks it).

Every scenario is validated before anything is loaded or trained. A bad one (a file
that is missing or not UTF-8 TOML, an unknown key, a value of the wrong type or out of
range, keys that do not fit together) gets one line on stderr naming the file and the
key, never a traceback; ``compare`` and ``sweep`` run the valid ones all the same.
Exit status: 0 all runs finished; 2 bad input (a scenario, ``--set``, ``--vary``);
1 a run failed (e.g. a data set that cannot be loaded); 130 interrupted.
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

from .config import RunConfig, unknown_key_message
from .results import RunRecorder

console = Console(width=max(Console().width, 110))  # room for the results table


#: A scenario is a short text file; anything larger is refused before it is read.
MAX_SCENARIO_BYTES = 1 << 20


def read_scenario_file(path: str | Path) -> dict:
    """The flat key/value table of a scenario file, without validating the keys.

    Raises
    ------
    ValueError
        Naming the file: missing, not a regular file (a directory, a device), larger
        than :data:`MAX_SCENARIO_BYTES`, unreadable, not UTF-8 text, or not valid TOML.
    """
    path = Path(path)
    try:
        if path.is_dir():
            raise ValueError(f"{path}: is a directory, not a scenario file")
        if not path.exists():
            raise ValueError(f"{path}: no such scenario file")
        if not path.is_file():
            raise ValueError(f"{path}: not a regular file")
        size = path.stat().st_size
        if size > MAX_SCENARIO_BYTES:
            raise ValueError(f"{path}: {size} bytes is too large for a scenario file "
                             f"(at most {MAX_SCENARIO_BYTES}); a scenario is a short TOML text file")
        data = path.read_bytes()
    except OSError as err:
        raise ValueError(f"{path}: cannot read scenario file: {err.strerror or err}") from None
    try:
        text = data.decode("utf-8-sig")  # a UTF-8 byte-order mark (some editors write one) is fine
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not a UTF-8 text file (byte 0x{data[err.start]:02x} at offset {err.start}); "
                         "a scenario is a TOML text file") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise ValueError(f"{path}: not valid TOML: {err}") from None


def load_scenario(path: str | Path, overrides: dict | None = None) -> dict:
    """Read a scenario TOML (flat run-config keys) and validate it.

    An empty file is a valid scenario: every key at its default. Validation covers every
    key on its own and the combinations (:class:`RunConfig`), before any data is loaded,
    and, since ``fl-subnet`` runs every node on this machine, whether this machine has the
    ``device`` (and ``amp``) asked for (:func:`~fl_subnet.experiments.experiment.local_device`).

    Raises
    ------
    ValueError
        One line naming the file and the key: unknown key, wrong type, value out of
        range, keys that do not fit together; or a file that is not a TOML text file
        (see :func:`read_scenario_file`).
    """
    values = read_scenario_file(path)
    known = set(RunConfig.keys())
    tables = [k for k, v in values.items() if isinstance(v, dict) and k not in known]
    if tables:
        raise ValueError(f"{path}: [{tables[0]}] is a table; a scenario file holds flat run-config keys "
                         f"(no [sections]); accepted keys: {', '.join(RunConfig.keys())}")
    values.update(overrides or {})
    from .experiment import local_device

    try:
        local_device(RunConfig.from_mapping(values))
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None
    return values


def run_one(values: dict, out_dir: Path, progress: Progress | None = None, label: str = "",
            resume: bool = False) -> dict:
    """Run one validated scenario into ``out_dir`` (results, and the model checkpointed
    after every round); ``resume``: continue from the checkpoint there. Returns the summary."""
    from fl_subnet.checkpoint import load_checkpoint
    from .client import harness_client_app
    from .experiment import run_server
    from .inprocess_grid import InProcessGrid

    values = {**values, "out-dir": str(out_dir)}
    cfg = RunConfig.from_mapping(values)
    if cfg.resume_from:
        raise ValueError("resume-from is the ServerApp's key (flwr run); fl-subnet run continues a run with "
                         "--resume DIR")
    done = 0
    if resume:  # verified before anything is written there
        done = int(load_checkpoint(out_dir)[1]["server-round"])
        RunRecorder.saved_rows(out_dir, done)
    recorder = RunRecorder(out_dir, cfg)
    if resume:
        recorder.resume(done)
    task = progress.add_task(label or cfg.strategy, total=cfg.num_server_rounds, completed=done) if progress else None

    def on_round(row: dict) -> None:
        recorder.add_row(row)
        if progress is not None and row["server-round"] > 0:
            acc = row["eval-acc"]
            progress.update(task, advance=1, description=f"{label or cfg.strategy}: "
                            + (f"acc {acc:.3f}" if acc == acc else f"loss {row['full-train-loss']:.3g}"))

    grid = InProcessGrid(harness_client_app(), cfg.num_nodes, run_config=values)
    try:
        run_server(grid, cfg, on_round=on_round, checkpoint_dir=out_dir, resume=resume)
    finally:
        summary = recorder.finish()  # what it has, also when the run failed
    return summary


def _resume_scenario(folder: Path) -> dict:
    """The saved run's config (``config.json``), for --resume.

    Raises
    ------
    FileNotFoundError / ValueError
        Naming the folder: no such run, or no checkpoint yet (start the run again).
    """
    from fl_subnet.checkpoint import MODEL_FILE

    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"--resume: {folder} holds no run (no config.json)")
    if not (folder / MODEL_FILE).is_file():
        raise ValueError(f"--resume: {folder} has no checkpoint yet (killed before round 0 was saved): "
                         "start the run again")
    values = json.loads((folder / "config.json").read_text())
    values.pop("out-dir", None)
    return values


def _table(summaries: list[dict]) -> Table:
    from .plots import tier_columns

    caps = tier_columns(summaries)
    table = Table(title="fl-subnet results")
    for col in ("run", "strategy", "rounds", "final acc", *(f"tier {r:g} acc" for r in caps),
                "final train loss", "total MB", "seconds"):
        table.add_column(col, justify="left" if col in ("run", "strategy") else "right")
    for s in summaries:
        acc = s["final-eval-acc"]
        tiers = [s.get(f"tier-{r:g}-acc") for r in caps]
        table.add_row(Path(s["out-dir"]).name, s["strategy"], str(s["rounds"]),
                      "-" if acc is None else f"{acc:.3f}", *("-" if t is None else f"{t:.3f}" for t in tiers),
                      f"{s['final-full-train-loss']:.4g}", f"{s['total-mb']:.1f}", f"{s['seconds']:.1f}")
    return table


def _progress() -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), console=console)


def _error(err: object) -> None:
    """One line on stderr (never a traceback): ``fl-subnet: error: <message>``."""
    print("fl-subnet: error: " + " ".join(str(err).split("\n")), file=sys.stderr, flush=True)


def _parse_set(items: list[str]) -> dict:
    out = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ValueError(f"--set expects key=value, got {item!r}")
        try:
            out[key] = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            out[key] = raw  # a bare string
    return out


def extract_run(run_dir: str | Path, capacity: float, out: str | Path | None = None,
                scale: bool = False) -> tuple[Path, dict[str, float]]:
    """Cut the tier of width ``capacity`` out of a run's saved global model.

    Reads ``RUN_DIR/model.safetensors`` (its header holds the run config: model, data
    set, seed), writes the sub-model with :func:`fl_subnet.tiers.save_submodel` to
    ``out`` (default ``RUN_DIR/tier-<r>.safetensors``; load it with
    :func:`fl_subnet.tiers.load_submodel` and the model factory alone) and evaluates it
    on the run's test set. Static BatchNorm runs get the sub-model's statistics
    recomputed on the training set.

    Returns
    -------
    tuple[Path, dict[str, float]]
        The file written and ``eval-loss`` (plus ``eval-acc`` for classification).

    Raises
    ------
    FileNotFoundError, ValueError
        Naming the folder: no saved model, or a capacity outside (0, 1].
    """
    from torch.utils.data import TensorDataset

    from fl_subnet.checkpoint import load_checkpoint
    from fl_subnet.clients.train import evaluate_model
    from fl_subnet.tiers import save_submodel, tier_file

    from .data import load_centralized_test
    from .experiment import CentralEvaluation, _batches, as_model_input, data_kwargs, example_input, factory_for

    state, meta = load_checkpoint(run_dir)
    cfg = RunConfig.from_mapping(meta.get("config", {}), ignore_unknown=True)
    x, y = load_centralized_test(cfg.dataset, data_seed=cfg.seed, **data_kwargs(cfg))
    calib = _batches(CentralEvaluation.train_set(cfg), cfg.batch_size) if cfg.batchnorm == "static" else None
    path = Path(out) if out else Path(run_dir) / tier_file(capacity)
    tier = save_submodel(path, state, factory_for(cfg), capacity, example_input=example_input(cfg), scale=scale,
                         calibration_batches=calib, meta={"config": meta.get("config", {}),
                                                          "server-round": meta.get("server-round")})
    return path, evaluate_model(tier.module(), TensorDataset(as_model_input(cfg, x), y), cfg.loss_name)


def _extract_command(args) -> int:
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    log = logging.getLogger(__name__)
    log.setLevel(logging.INFO)
    try:
        path, metrics = extract_run(args.run_dir, args.capacity, args.out, args.scale)
    except (OSError, ValueError) as err:
        _error(f"extract: {err}")
        return 2
    log.info("tier %g of %s: %s, eval-loss %.4g%s", args.capacity, args.run_dir, path, metrics["eval-loss"],
             f", test accuracy {metrics['eval-acc']:.4f}" if "eval-acc" in metrics else "")
    return 0


def _write_frontier(base: Path, files: list[str], seeds: list[int], summaries: list[dict],
                    reference: str | None, margin: float) -> None:
    """Mean curves over the seeds of each scenario, the bytes-to-target table, the plot."""
    from .frontier import curves_json, frontier_table, mean_curve, plot_frontier, table_markdown
    from .results import load_rows

    curves = []
    for f in files:
        stem = Path(f).stem
        names = {f"{stem}-seed{sd}" for sd in seeds}  # the run folders planned for this scenario
        runs = [load_rows(s["out-dir"]) for s in summaries if Path(s["out-dir"]).name in names]
        if runs:
            curves.append(mean_curve(stem, runs))
    ref = Path(reference).stem if reference else curves[0].label
    if ref not in [c.label for c in curves]:
        _error(f"--reference {reference!r} is not one of the scenarios run ({', '.join(c.label for c in curves)})")
        return
    rows = frontier_table(curves, ref, margin)
    (base / "frontier.json").write_text(json.dumps(curves_json(curves, rows), indent=1))
    text = table_markdown(rows, ref, margin)
    (base / "frontier.md").write_text(text)
    plot = plot_frontier(curves, base / "frontier.png", title=f"accuracy against bytes ({curves[0].seeds} seeds)",
                         target=rows[0]["target"])
    console.print(text)
    console.print(f"frontier plot: {plot}")


def _parse_vary(specs: list[str]) -> dict[str, list]:
    """``["k=1,2", "j=a,b"]`` → ``{"k": [1, 2], "j": ["a", "b"]}`` (values as ``--set`` parses them).

    Raises
    ------
    ValueError
        For a spec without ``KEY=`` or values, a key given twice, or lists of unequal length.
    """
    varied: dict[str, list] = {}
    for spec in specs:
        key, _, raw = spec.partition("=")
        key = key.strip()
        values = [_parse_set([f"{key}={v}"])[key] for v in raw.split(",") if v.strip()] if key else []
        if not key or not values:
            raise ValueError(f"--vary expects KEY=V1,V2,..., got {spec!r}")
        if key in varied:
            raise ValueError(f"--vary: {key} given twice")
        varied[key] = values
    if len({len(v) for v in varied.values()}) > 1:
        raise ValueError("--vary: keys varied together need as many values each, got "
                         + ", ".join(f"{k}: {len(v)}" for k, v in varied.items()))
    return varied


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``fl-subnet`` command; returns the exit status."""
    parser = argparse.ArgumentParser(prog="fl-subnet", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p_run = sub.add_parser("run", help="run one scenario")
    p_run.add_argument("scenario", nargs="?", help="scenario TOML file (not with --resume)")
    p_run.add_argument("--resume", metavar="DIR", help="continue the run saved in DIR after its last finished "
                       "round (its config.json, verified; --rounds may extend it, --set may change the defences and "
                       "timeouts: fl_subnet.experiments.config.RESUMABLE_KEYS)")
    p_cmp = sub.add_parser("compare", help="run several scenarios on the same data and seeds")
    p_cmp.add_argument("scenarios", nargs="+")
    p_sw = sub.add_parser("sweep", help="run one scenario per value of a key; plot the loss floor")
    p_sw.add_argument("scenario")
    p_sw.add_argument("--vary", required=True, action="append", metavar="KEY=V1,V2,...",
                      help="the key and its values, e.g. num-subnets=1,2,4,8; repeat it to vary keys together "
                           "(the i-th run takes every key's i-th value)")
    p_fr = sub.add_parser("frontier", help="run scenarios with several seeds; accuracy against MB (mean, spread) "
                                           "and the MB each needs to reach the reference's final accuracy")
    p_fr.add_argument("scenarios", nargs="+")
    p_fr.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (default 0,1,2)")
    p_fr.add_argument("--reference", help="scenario whose final mean accuracy sets the target (default: the first)")
    p_fr.add_argument("--margin", type=float, default=0.01, help="target = reference's final accuracy - margin "
                      "(default 0.01: one point)")
    p_ex = sub.add_parser("extract", help="cut a capacity tier (nested-prefix sub-model) out of a run's model")
    p_ex.add_argument("run_dir", metavar="RUN_DIR", help="a run folder holding model.safetensors")
    p_ex.add_argument("--capacity", type=float, required=True, help="the tier's width r in (0, 1]")
    p_ex.add_argument("--out", help="the file to write (default RUN_DIR/tier-<r>.safetensors)")
    p_ex.add_argument("--scale", action="store_true", help="keep HeteroFL's training-time 1/r scaler")
    p_ex.add_argument("-v", "--verbose", action="store_true", help="show fl-subnet's logs")
    for p in (p_run, p_cmp, p_sw, p_fr):
        p.add_argument("--rounds", type=int, help="override num-server-rounds")
        p.add_argument("--out", help="output folder (default runs/<name>)")
        p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="override run-config keys")
        p.add_argument("-v", "--verbose", action="store_true", help="show Flower's and fl-subnet's logs")
    args = parser.parse_args(argv)
    if args.command == "extract":
        return _extract_command(args)

    # Validate every scenario first: a bad one fails in well under a second, before
    # Flower's logging, data loading or model building.
    files = args.scenarios if args.command in ("compare", "frontier") else [args.scenario]
    resume = getattr(args, "resume", None)
    if args.command == "run" and (resume is None) == (args.scenario is None):
        _error("run takes a scenario file or --resume DIR (one of the two)")
        return 2
    resumed: dict | None = None
    if resume is not None:
        try:
            resumed = _resume_scenario(Path(resume))
        except (OSError, ValueError) as err:
            _error(err)
            return 2
        files = [str(Path(resume) / "config.json")]
        if args.out is not None and Path(args.out).resolve() != Path(resume).resolve():
            _error("--resume continues in its own folder: drop --out")
            return 2
        args.out = resume
    try:
        overrides = _parse_set(args.set)
        if args.rounds is not None:
            overrides["num-server-rounds"] = args.rounds
        varied: dict[str, list] = {}
        if args.command == "sweep":
            varied = _parse_vary(args.vary)
        for k in [*overrides, *varied]:
            if k not in RunConfig.keys():
                raise ValueError(f"{'--vary' if k in varied else '--set'}: {unknown_key_message(k)}")
        key = "+".join(varied)
        sweep_values = [v[0] if len(varied) == 1 else "/".join(map(str, v)) for v in zip(*varied.values())] \
            if varied else []
        if args.command == "sweep":
            read_scenario_file(files[0])  # a file-level error once, not once per value
    except ValueError as err:
        _error(err)
        return 2
    if args.command == "sweep":
        stem = Path(files[0]).stem
        planned = [(f"{stem}-" + "-".join(f"{k}-{v}" for k, v in run.items()), files[0], run,
                    ", ".join(f"{k}={v}" for k, v in run.items()) + ": ")
                   for run in (dict(zip(varied, vs)) for vs in zip(*varied.values()))]
    elif args.command == "frontier":
        try:
            seeds = [int(v) for v in args.seeds.split(",") if v.strip()]
            if not seeds:
                raise ValueError
        except ValueError:
            _error(f"--seeds expects comma-separated integers, got {args.seeds!r}")
            return 2
        planned = [(f"{Path(f).stem}-seed{sd}", f, {"seed": sd}, f"seed={sd}: ") for f in files for sd in seeds]
    else:
        planned = [(Path(f).stem, f, {}, "") for f in files]
    scenarios, good_values, invalid, seen = [], [], 0, set()
    for (name, file, extra, prefix), value in zip(planned, sweep_values or [None] * len(planned)):
        try:
            if resumed is not None:
                from .experiment import local_device

                local_device(RunConfig.from_mapping({**resumed, **overrides}))
                scenarios.append((Path(resume).name, {**resumed, **overrides}))
            else:
                scenarios.append((name, load_scenario(file, {**overrides, **extra})))
            good_values.append(value)
        except ValueError as err:
            invalid += 1
            if str(err) not in seen:  # a sweep's base scenario error: once, not per value
                seen.add(str(err))
                _error(f"{prefix}{err}")
    if not scenarios:
        return 2
    if invalid:
        _error(f"{invalid} of {len(planned)} scenarios are invalid and skipped; running the other {len(scenarios)}")

    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    import flwr.common.logger  # noqa: F401  (Flower sets up its logger on import: do it first)

    logging.getLogger("flwr").setLevel(logging.INFO if args.verbose else logging.ERROR)

    from .experiment import RunFailed  # after validation: torch and Flower are loaded by now

    default = {"run": scenarios[0][0], "compare": "compare", "sweep": Path(files[0]).stem + "-sweep",
               "frontier": "frontier"}
    base = Path(args.out or (Path("runs") / default[args.command]))
    summaries, ran_values, failed = [], [], 0
    try:
        with _progress() as progress:
            for (name, values), value in zip(scenarios, good_values):
                out = base if args.command == "run" else base / name
                try:
                    summaries.append(run_one(values, out, progress, label=name, resume=resume is not None))
                    ran_values.append(value)
                except (ValueError, OSError, RunFailed) as err:  # no Dirichlet split, data offline, diverged
                    logging.getLogger(__name__).info("run %s failed", name, exc_info=True)  # -v shows where
                    _error(f"{name}: run failed: {err}")
                    failed += 1
    except KeyboardInterrupt:
        console.print(f"[yellow]interrupted[/yellow]: metrics of the finished rounds are in {base}")
        return 130
    if not summaries:
        return 1
    console.print(_table(summaries))
    if args.command == "sweep":
        from .results import load_rows
        from .sweep import write_sweep

        runs = {Path(s["out-dir"]).name: load_rows(s["out-dir"]) for s in summaries}
        taus = [json.loads((Path(s["out-dir"]) / "config.json").read_text())["local-steps"] for s in summaries] \
            if "local-steps" in varied else None
        result = write_sweep(base, key, ran_values, runs, title=f"{Path(files[0]).stem}: {key} sweep", local_steps=taus)
        for v, (label, floor) in zip(ran_values, result["floors"].items()):
            state = "flattened" if result["flattened"][label] else "still falling: an upper bound"
            console.print(f"{key} = {v}: loss floor {floor:.4g} ({state})")
        console.print(f"plots: {base / 'sweep-loss.png'}, {base / 'sweep-floor.png'}")
    if args.command == "frontier":
        _write_frontier(base, files, seeds, summaries, args.reference, args.margin)
    if args.command == "compare":
        from .plots import plot_runs, plot_tiers
        from .results import load_rows

        runs = {Path(s["out-dir"]).name: load_rows(s["out-dir"]) for s in summaries}
        plot = plot_runs(runs, base / "compare.png", title="fl-subnet: " + " vs ".join(runs))
        (base / "summary.json").write_text(json.dumps(summaries, indent=2))
        console.print(f"comparison plot: {plot}")
        tiers = plot_tiers(summaries, base / "compare-tiers.png", title="each capacity tier's sub-model alone, and the full model")
        if tiers is not None:
            console.print(f"capacity tiers plot: {tiers}")
    console.print(f"results (metrics.json, metrics.csv, summary.json, plots.png) under {base.resolve()}")
    return 2 if invalid else 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
