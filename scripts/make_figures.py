#!/usr/bin/env python
"""Regenerate every image in the README from the current code (``make figures``).

    python scripts/make_figures.py [--rounds N] [--out DIR] [--docs DIR] [--only NAME[,NAME]]

Each figure is one documented ``fl-subnet`` command (the same one the README quotes),
run in a fresh process from the repository root; its plot is then copied into the docs
folder under the name the README uses:

    demo         fl-subnet compare scenarios/digits-{fedavg,ist,fedsubdrop}.toml   -> demo-digits.png,
                                                                                  demo-results.json
    quickstart   python -m fl_subnet.experiments.quickstart --seeds 0,1,2   -> quickstart-protocols.json
    example      python scripts/example_runs.py --runs 3 (three fresh flwr runs of each
                 example app)                                           -> example-runs.json
    quickstart-lr0.1  the same at Flower's own lr 0.1, 1 local epoch   -> quickstart-protocols-lr0.1.json
    cnn-bn       fl-subnet compare scenarios/digits-cnn-bn-*.toml                   -> cnn-bn-digits.png
    transformer  fl-subnet compare scenarios/sequence-transformer-*.toml            -> sequence-transformer.png
    tiers        fl-subnet compare scenarios/tiers-cnn-*.toml
                                  -> tiers-cnn-digits.png, tiers-cnn-submodels.png
    tiers-table  python scripts/bench_plot.py tiers (draws docs/tiers-table.json, which
                 python bench/tiers.py --write-docs measures)   -> tiers-table.png
    lora         python scripts/bench_plot.py lora (draws docs/lora.json, which
                 python bench/lora.py --write-docs measures)    -> lora-accuracy-vs-mb.png
    frontier-mlp fl-subnet frontier scenarios/digits-{fedavg,fedsubdrop,fedsubdrop-even,ist-mlp-bn,ist}.toml
                                  --seeds 0,1,2                              -> frontier-digits-mlp.png
    frontier-cnn fl-subnet frontier scenarios/digits-cnn-bn-*.toml --seeds 0,1,2 --rounds 60
                                                                             -> frontier-digits-cnn.png
    paper-msd    fl-subnet sweep scenarios/paper-msd.toml --vary num-subnets=1,2,4,8
                                                  -> paper-msd-loss.png, paper-msd-floor.png
    paper-ist    fl-subnet sweep scenarios/paper-ist.toml --vary num-subnets=2,4,8 -> paper-ist-floor.png
    paper-ist-ntk, paper-msd-ntk-xi, paper-msd-ntk-p, paper-ist-ntk-tau
                 the sweeps of scenarios/paper-{ist,msd}-ntk.toml that the README quotes
                                  -> paper-ist-ntk-{loss,floor}.png, paper-msd-ntk-{xi,p}-floor.png,
                                     paper-ist-ntk-tau.png, paper-ist-ntk-tau-floor.png

``--rounds N`` overrides num-server-rounds of every run (a quick check, not the README's
numbers); ``--out`` is where the runs go (default runs/figures/<name>), ``--docs`` where the
images go (default docs/). Exit status: 0 all written; 1 a command failed (nothing of that
figure is copied); 2 bad arguments.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Figure:
    """One README image set: an ``fl-subnet`` command and plot file → docs name."""

    command: tuple[str, ...]  # fl-subnet arguments, scenario paths relative to ROOT
    outputs: tuple[tuple[str, str], ...]  # (file under the run's --out, name under docs/)
    module: str = "fl_subnet.experiments.cli"  # run as python -m MODULE COMMAND --out DIR (a .py: a script)


def _scenarios(pattern: str) -> tuple[str, ...]:
    """The scenario files a shell glob in the README names, in the shell's (sorted) order."""
    found = sorted(p.relative_to(ROOT).as_posix() for p in ROOT.glob(pattern))
    if not found:
        raise SystemExit(f"make_figures: no scenario matches {pattern}")
    return tuple(found)


def figures() -> dict[str, Figure]:
    """Name → figure, in the order the README shows them."""
    return {
        "demo": Figure(("compare", "scenarios/digits-fedavg.toml", "scenarios/digits-ist.toml",
                        "scenarios/digits-fedsubdrop.toml"),
                       (("compare.png", "demo-digits.png"), ("summary.json", "demo-results.json"))),
        "quickstart": Figure(("--seeds", "0,1,2"), (("quickstart-protocols.json", "quickstart-protocols.json"),),
                             module="fl_subnet.experiments.quickstart"),
        "example": Figure(("--runs", "3"), (("example-runs.json", "example-runs.json"),),
                          module="scripts/example_runs.py"),
        "quickstart-lr0.1": Figure(("--seeds", "0,1,2", "--lr", "0.1", "--local-epochs", "1"),
                                   (("quickstart-protocols.json", "quickstart-protocols-lr0.1.json"),),
                                   module="fl_subnet.experiments.quickstart"),
        "cnn-bn": Figure(("compare", *_scenarios("scenarios/digits-cnn-bn-*.toml")),
                         (("compare.png", "cnn-bn-digits.png"),)),
        "transformer": Figure(("compare", *_scenarios("scenarios/sequence-transformer-*.toml")),
                              (("compare.png", "sequence-transformer.png"),)),
        "tiers": Figure(("compare", *_scenarios("scenarios/tiers-cnn-*.toml")),
                        (("compare.png", "tiers-cnn-digits.png"), ("compare-tiers.png", "tiers-cnn-submodels.png"))),
        "tiers-table": Figure(("tiers",), (("tiers-table.png", "tiers-table.png"),), module="scripts/bench_plot.py"),
        "lora": Figure(("lora",), (("lora-accuracy-vs-mb.png", "lora-accuracy-vs-mb.png"),),
                       module="scripts/bench_plot.py"),
        "frontier-mlp": Figure(("frontier", "scenarios/digits-fedavg.toml", "scenarios/digits-fedsubdrop.toml",
                                "scenarios/digits-fedsubdrop-even.toml", "scenarios/digits-ist-mlp-bn.toml",
                                "scenarios/digits-ist.toml", "--seeds", "0,1,2"),
                               (("frontier.png", "frontier-digits-mlp.png"), ("frontier.md", "frontier-digits-mlp.md"))),
        "frontier-cnn": Figure(("frontier", *_scenarios("scenarios/digits-cnn-bn-*.toml"), "--seeds", "0,1,2",
                                "--rounds", "60"),
                               (("frontier.png", "frontier-digits-cnn.png"),)),
        "paper-msd": Figure(("sweep", "scenarios/paper-msd.toml", "--vary", "num-subnets=1,2,4,8"),
                            (("sweep-loss.png", "paper-msd-loss.png"), ("sweep-floor.png", "paper-msd-floor.png"))),
        "paper-ist": Figure(("sweep", "scenarios/paper-ist.toml", "--vary", "num-subnets=2,4,8"),
                            (("sweep-floor.png", "paper-ist-floor.png"),)),
        "paper-ist-ntk": Figure(("sweep", "scenarios/paper-ist-ntk.toml", "--vary", "num-subnets=1,2,4,8",
                                 "--vary", "num-nodes=2,2,4,8"),
                                (("sweep-loss.png", "paper-ist-ntk-loss.png"),
                                 ("sweep-floor.png", "paper-ist-ntk-floor.png"))),
        "paper-msd-ntk-xi": Figure(("sweep", "scenarios/paper-msd-ntk.toml", "--vary", "keep-prob=0.25,0.5,0.75,1.0",
                                    "--vary", "lr=5.011,10.023,15.034,20.045"),
                                   (("sweep-floor.png", "paper-msd-ntk-xi-floor.png"),)),
        "paper-msd-ntk-p": Figure(("sweep", "scenarios/paper-msd-ntk.toml", "--vary", "num-subnets=1,2,4,8",
                                   "--vary", "num-nodes=1,2,4,8"),
                                  (("sweep-floor.png", "paper-msd-ntk-p-floor.png"),)),
        "paper-ist-ntk-tau": Figure(("sweep", "scenarios/paper-ist-ntk.toml", "--vary", "local-steps=1,2,5,10",
                                     "--vary", "num-server-rounds=200,100,40,20"),
                                    (("sweep-steps.png", "paper-ist-ntk-tau.png"),
                                     ("sweep-floor.png", "paper-ist-ntk-tau-floor.png"))),
    }


def make(name: str, fig: Figure, out: Path, docs: Path, rounds: int | None) -> list[Path]:
    """Run ``fig``'s command into ``out/name`` and copy its plots to ``docs``; the files written.

    Raises
    ------
    RuntimeError
        The command failed or did not write a plot (nothing is copied then).
    """
    run_dir = out / name
    for src, _ in fig.outputs:  # a plot left by an earlier run must not pass for a new one
        (run_dir / src).unlink(missing_ok=True)
    argv = [*fig.command, "--out", str(run_dir), *(["--rounds", str(rounds)] if rounds is not None else [])]
    print(f"\n== {name}: fl-subnet {' '.join(argv)}", flush=True)
    started = time.perf_counter()
    entry = [str(ROOT / fig.module)] if fig.module.endswith(".py") else ["-m", fig.module]
    rc = subprocess.call([sys.executable, *entry, *argv], cwd=ROOT)
    if rc != 0:
        raise RuntimeError(f"{name}: fl-subnet exited with status {rc}")
    missing = [src for src, _ in fig.outputs if not (run_dir / src).is_file()]
    if missing:
        raise RuntimeError(f"{name}: fl-subnet wrote no {', '.join(missing)} under {run_dir}")
    written = []
    for src, dst in fig.outputs:
        shutil.copyfile(run_dir / src, docs / dst)
        written.append(docs / dst)
        print(f"wrote {docs / dst} (from {run_dir / src})", flush=True)
    print(f"== {name}: {time.perf_counter() - started:.0f} s", flush=True)
    return written


def main(argv: list[str] | None = None) -> int:
    known = figures()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, help="override num-server-rounds of every run (quick check)")
    parser.add_argument("--out", default="runs/figures", help="where the runs go (default runs/figures)")
    parser.add_argument("--docs", default=str(ROOT / "docs"), help="where the images go (default docs/)")
    parser.add_argument("--only", metavar="NAME[,NAME]",
                        help=f"regenerate only these figures, of: {', '.join(known)}")
    args = parser.parse_args(argv)
    names = list(known)
    if args.only is not None:
        names = [n.strip() for n in args.only.split(",") if n.strip()]
        unknown = [n for n in names if n not in known]
        if unknown or not names:
            parser.error(f"--only: unknown figure {', '.join(unknown) or '(none given)'}; "
                         f"choose from {', '.join(known)}")
    if args.rounds is not None and args.rounds < 1:
        parser.error("--rounds must be at least 1")
    out, docs = Path(args.out).resolve(), Path(args.docs).resolve()
    out.mkdir(parents=True, exist_ok=True)
    docs.mkdir(parents=True, exist_ok=True)

    started, written, failed = time.perf_counter(), [], []
    for name in names:
        try:
            written += make(name, known[name], out, docs, args.rounds)
        except RuntimeError as err:
            print(f"make_figures: error: {err}", file=sys.stderr, flush=True)
            failed.append(name)
    minutes = (time.perf_counter() - started) / 60
    print(f"\n{len(written)} images written in {minutes:.1f} min:")
    for path in written:
        print(f"  {path}")
    if failed:
        print(f"make_figures: failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
