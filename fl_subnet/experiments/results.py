"""Run results on disk: resolved config, per-round metrics (JSON + CSV), summary.

Files are rewritten atomically (temporary file, then rename) after every round, so an
interrupted run keeps the metrics of the rounds it finished and every file on disk is
always complete and valid.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import logging
import math
import time
from pathlib import Path

from fl_subnet.checkpoint import CheckpointError, atomic_write_text, remove_stale_temporaries

from .config import RunConfig

log = logging.getLogger(__name__)

COLUMNS = ["server-round", "strategy", "train-loss", "full-train-loss", "eval-loss", "eval-acc",
           "bytes-down", "bytes-up", "cumulative-bytes", "coverage", "num-replies", "num-rejected", "model-kept",
           "seconds"]


def config_dict(cfg: RunConfig) -> dict:
    """Every run-config key (kebab-case) → value."""
    values = cfg.model_dump() if hasattr(cfg, "model_dump") else dataclasses.asdict(cfg)
    return {k.replace("_", "-"): v for k, v in values.items()}


def _clean(value):
    return None if isinstance(value, float) and not math.isfinite(value) else value


#: Where a ServerApp's relative ``out-dir`` (and its default) is taken: under the home directory.
SERVER_RUNS = Path("~") / "flwr-runs"


def server_out_dir(out_dir: str, strategy: str) -> Path:
    """The absolute results folder of a ServerApp run (``flwr run``).

    An absolute ``out-dir`` (``~`` expanded) is used as it is; a relative one is taken
    under ``~/flwr-runs/``; an empty one is ``~/flwr-runs/<strategy>-<time>``. A relative
    path is not resolved against the working directory, since a ServerApp runs in the
    SuperLink's: for Flower's local SuperLink, the directory of whichever ``flwr run``
    started it, not the app's.
    """
    path = Path(out_dir or f"{strategy}-{time.strftime('%Y%m%d-%H%M%S')}").expanduser()
    return (SERVER_RUNS.expanduser() / path).resolve()  # an absolute path replaces the base


class RunRecorder:
    """Writes ``config.json``, ``metrics.json``, ``metrics.csv`` and ``summary.json``.

    Parameters
    ----------
    out_dir : str or Path
        Created if missing.
    cfg : RunConfig
        Saved as ``config.json`` (every key, defaults included).
    """

    def __init__(self, out_dir: str | Path, cfg: RunConfig) -> None:
        self.out_dir = Path(out_dir).resolve()
        self.out_dir.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(self.out_dir)
        self.cfg = cfg
        self.rows: list[dict] = []
        atomic_write_text(self.out_dir / "config.json", json.dumps(config_dict(cfg), indent=2))

    def resume(self, last_round: int) -> None:
        """Continue a run: keep the saved rows up to ``last_round`` (the checkpoint's).

        Raises
        ------
        CheckpointError
            If ``metrics.json`` is missing or lacks a row of rounds ``0..last_round``
            (:meth:`saved_rows`).
        """
        self.rows = self.saved_rows(self.out_dir, last_round)
        self._write()

    @staticmethod
    def saved_rows(out_dir: str | Path, last_round: int) -> list[dict]:
        """The ``metrics.json`` rows of rounds ``0..last_round`` of the run in ``out_dir``
        (rows after it, written before a kill reached the checkpoint, are dropped).

        Raises
        ------
        CheckpointError
            If the file is missing or unreadable, or its rounds are not exactly
            ``0..last_round`` (a resumed run would silently lose or repeat rows).
        """
        path = Path(out_dir) / "metrics.json"
        try:
            rows = json.loads(path.read_text())
            kept = [r for r in rows if r["server-round"] <= last_round]
            rounds = [r["server-round"] for r in kept]
        except FileNotFoundError:
            raise CheckpointError(f"{path} is missing: the checkpoint is of round {last_round}, and resuming "
                                  "without the earlier rounds' rows would drop them") from None
        except (OSError, ValueError, TypeError, KeyError) as err:
            raise CheckpointError(f"{path}: not a list of metrics rows ({err!r})") from None
        if rounds != list(range(last_round + 1)):
            raise CheckpointError(f"{path} holds rounds {rounds} but the checkpoint is of round {last_round}: "
                                  f"resuming needs exactly the rows of rounds 0..{last_round}")
        return kept

    @classmethod
    def for_config(cls, cfg: RunConfig) -> "RunRecorder":
        """The recorder of a ServerApp: into :func:`server_out_dir` of the config."""
        return cls(server_out_dir(cfg.out_dir, cfg.strategy), cfg)

    def add_row(self, row: dict) -> None:
        """Append one round's metrics and rewrite the metrics files."""
        self.rows.append({**{k: _clean(row.get(k)) for k in COLUMNS},  # + capacity tiers' final metrics
                          **{k: _clean(v) for k, v in row.items() if k.startswith("tier-")}})
        self._write()

    def _write(self) -> None:
        atomic_write_text(self.out_dir / "metrics.json", json.dumps(self.rows, indent=1))
        buf = io.StringIO()
        extra = dict.fromkeys(k for r in self.rows for k in r if k not in COLUMNS)  # tier-<r>-acc, ...
        writer = csv.DictWriter(buf, fieldnames=[*COLUMNS, *extra], lineterminator="\n")
        writer.writeheader()
        writer.writerows(self.rows)
        atomic_write_text(self.out_dir / "metrics.csv", buf.getvalue())

    def summary(self) -> dict:
        """Final accuracy/loss, total MB and seconds of the rows so far."""
        last = self.rows[-1] if self.rows else {}
        return {
            "strategy": self.cfg.strategy, "rounds": max((r["server-round"] for r in self.rows), default=0),
            "final-eval-acc": last.get("eval-acc"), "final-eval-loss": last.get("eval-loss"),
            "final-full-train-loss": last.get("full-train-loss"),
            "total-mb": (last.get("cumulative-bytes") or 0) / 1e6, "seconds": last.get("seconds"),
            "out-dir": str(self.out_dir),
            **{k: v for k, v in last.items() if k.startswith("tier-")},  # fl_subnet.tiers.evaluate_tiers
        }

    def finish(self, plot: bool = True) -> dict:
        """Write ``summary.json`` and, with matplotlib, ``plots.png``; return the summary."""
        summary = self.summary()
        atomic_write_text(self.out_dir / "summary.json", json.dumps(summary, indent=2))
        if plot and self.rows:
            from .plots import plot_runs

            plot_runs({self.cfg.strategy: self.rows}, self.out_dir / "plots.png",
                      title=f"{self.cfg.strategy} on {self.cfg.dataset}")
        return summary


def load_rows(run_dir: str | Path) -> list[dict]:
    """The ``metrics.json`` rows of a finished (or interrupted) run."""
    return json.loads((Path(run_dir) / "metrics.json").read_text())


def markdown_table(summaries: list[dict]) -> str:
    """The README's table of a ``fl-subnet compare`` (its ``summary.json``): per run, the
    strategy, the final test accuracy and the total MB, as ``make demo`` prints them,
    and the MB against the first run's (FedAvg in the demo)."""
    base = summaries[0]["total-mb"] if summaries else 0.0
    lines = ["| run | strategy | final test accuracy | total MB (down + up) | MB vs first run |",
             "|---|---|---|---|---|"]
    for s in summaries:
        acc = s["final-eval-acc"]
        lines.append(f"| {Path(s['out-dir']).name} | {s['strategy']} | {'-' if acc is None else f'{acc:.3f}'} "
                     f"| {s['total-mb']:.1f} | {s['total-mb'] / base:.2f} |")
    return "\n".join(lines)
