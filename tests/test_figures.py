"""README images: one command (`make figures` → scripts/make_figures.py) makes them all,
and the plots stay readable (labelled log ticks, y-label inside the figure)."""

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.image  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402

from fl_subnet.experiments import cli  # noqa: E402
from fl_subnet.experiments.cli import load_scenario  # noqa: E402
from fl_subnet.experiments.plots import _log_ticks, runs_figure  # noqa: E402
from fl_subnet.experiments.sweep import floor_figure  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "make_figures.py"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _script():
    """scripts/make_figures.py as a module (it is a script, not part of the package)."""
    if "make_figures" not in sys.modules:
        spec = importlib.util.spec_from_file_location("make_figures", SCRIPT)
        module = importlib.util.module_from_spec(spec)
        sys.modules["make_figures"] = module  # dataclasses look their module up there
        spec.loader.exec_module(module)
    return sys.modules["make_figures"]


def _visible_labels(ax, axis="y") -> list[str]:
    """Non-empty tick labels (major and minor) whose tick lies inside the axis limits."""
    lo, hi = sorted(ax.get_ylim() if axis == "y" else ax.get_xlim())
    labels = ax.get_yticklabels(which="both") if axis == "y" else ax.get_xticklabels(which="both")
    index = 1 if axis == "y" else 0
    return [t.get_text() for t in labels
            if t.get_text().strip() and lo * (1 - 1e-9) <= t.get_position()[index] <= hi * (1 + 1e-9)]


def _inside(fig, artist_bbox) -> bool:
    box = fig.bbox
    return (artist_bbox.x0 >= box.x0 - 0.5 and artist_bbox.y0 >= box.y0 - 0.5
            and artist_bbox.x1 <= box.x1 + 0.5 and artist_bbox.y1 <= box.y1 + 0.5)


@pytest.mark.parametrize("floors", [
    [0.0455, 0.0447, 0.0424],           # paper-ist at lr ∝ 1/p: flat, no 1-2-5 tick inside
    [0.0752, 0.0678, 0.0474, 0.0358],   # paper-msd: less than a decade
    [0.04550, 0.04551],                 # almost equal
    [0.03, 0.4],                        # a bit more than a decade, one power of ten inside
])
def test_sweep_floor_plot_is_readable(floors):
    fig = floor_figure(list(range(1, len(floors) + 1)), floors, "num-subnets", title="paper-ist: num-subnets sweep")
    try:
        fig.canvas.draw()
        ax = fig.axes[0]
        assert ax.get_yscale() == "log"
        labels = _visible_labels(ax)
        assert len(labels) >= 2, labels
        assert len(set(labels)) == len(labels), labels  # enough digits to tell them apart
        renderer = fig.canvas.get_renderer()
        for artist in (ax.yaxis.label, ax.xaxis.label, ax.title):
            assert _inside(fig, artist.get_window_extent(renderer)), (artist.get_text(), fig.bbox)
    finally:
        plt.close(fig)


def test_runs_plot_log_axes_have_two_labels():
    rows = [{"server-round": r, "eval-acc": None, "eval-loss": 0.05 - 0.001 * r,
             "full-train-loss": 0.048 - 0.001 * r, "cumulative-bytes": 1e5 * r} for r in range(4)]
    fig = runs_figure({"a": rows, "b": [{**r, "full-train-loss": r["full-train-loss"] * 0.97} for r in rows]})
    try:
        fig.canvas.draw()
        log_axes = [ax for ax in fig.axes if ax.get_yscale() == "log"]
        assert len(log_axes) == 4  # regression: test loss and training loss, both on log axes
        for ax in log_axes:
            assert len(_visible_labels(ax)) >= 2, _visible_labels(ax)
        renderer = fig.canvas.get_renderer()
        for ax in fig.axes:
            assert _inside(fig, ax.yaxis.label.get_window_extent(renderer))
    finally:
        plt.close(fig)


@pytest.mark.parametrize("vmin, vmax", [(0.0418, 0.0458), (0.0455, 0.04551), (0.5, 0.9), (0.026, 0.46),
                                        (0.08, 0.11), (1e-6, 0.1), (1e-30, 1.0), (3.0, 3000.0)])
def test_log_ticks_at_least_two_inside(vmin, vmax):
    ticks = _log_ticks(vmin, vmax)
    assert len(ticks) >= 2
    assert all(vmin * (1 - 1e-9) <= t <= vmax * (1 + 1e-9) for t in ticks)
    assert len(ticks) <= 12


def test_every_readme_image_is_made_by_the_script():
    """The images of README.md (``docs/NAME.png``) and of the docs pages (``NAME.png``)."""
    readme = (ROOT / "README.md").read_text()
    shown = set(re.findall(r"!\[[^\]]*\]\(docs/([^)]+\.png)\)", readme))
    assert shown, "README shows no docs/*.png image"
    for page in (ROOT / "docs").glob("*.md"):
        shown |= set(re.findall(r"!\[[^\]]*\]\(([^)/]+\.png)\)", page.read_text()))
    made = {dst for fig in _script().figures().values() for _, dst in fig.outputs}
    assert shown <= made, f"README images not made by scripts/make_figures.py: {sorted(shown - made)}"


def test_figure_commands_name_valid_scenarios():
    for name, fig in _script().figures().items():
        if fig.module != "fl_subnet.experiments.cli":  # not an fl-subnet command on scenarios
            continue
        files = [a for a in fig.command if a.endswith(".toml")]
        assert files, name
        vary = [fig.command[i + 1] for i, a in enumerate(fig.command) if a == "--vary"]
        varied = cli._parse_vary(vary) if vary else {}
        for file in files:
            load_scenario(ROOT / file)  # raises on a missing or invalid scenario
            for values in zip(*varied.values()):  # keys varied together: the i-th run
                load_scenario(ROOT / file, dict(zip(varied, values)))


def test_only_rejects_an_unknown_figure(capsys):
    with pytest.raises(SystemExit) as exc:
        _script().main(["--only", "no-such-figure"])
    assert exc.value.code == 2
    assert "no-such-figure" in capsys.readouterr().err


@pytest.mark.slow
def test_make_figures_writes_the_images(tmp_path):
    """The real command on a tiny setting (1 round): one comparison and one sweep, in ~40 s."""
    docs, runs = tmp_path / "docs", tmp_path / "runs"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--rounds", "1", "--only", "transformer,paper-msd",
                           "--out", str(runs), "--docs", str(docs)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    expected = {"sequence-transformer.png", "paper-msd-loss.png", "paper-msd-floor.png"}
    assert {p.name for p in docs.iterdir()} == expected
    for name in expected:
        path = docs / name
        assert path.read_bytes()[:8] == PNG_SIGNATURE, name
        assert path.stat().st_size > 10_000, name
        height, width = matplotlib.image.imread(path).shape[:2]
        assert width >= 500 and height >= 400, (name, width, height)
        assert f"wrote {path}" in proc.stdout
    assert (runs / "paper-msd" / "sweep.json").is_file()
    assert (runs / "transformer" / "summary.json").is_file()


def test_tiers_plot_shows_every_runs_full_model_and_tiers(tmp_path):
    from fl_subnet.experiments.plots import plot_tiers, tier_columns

    summaries = [{"out-dir": "runs/heterofl", "total-mb": 3.0, "final-eval-acc": 0.9, "tier-0.25-acc": 0.5,
                  "tier-0.5-acc": 0.7, "tier-1-acc": 0.9},
                 {"out-dir": "runs/fedavg", "total-mb": 9.0, "final-eval-acc": 0.95}]
    assert tier_columns(summaries) == [0.25, 0.5, 1.0]
    path = plot_tiers(summaries, tmp_path / "tiers.png")
    assert path.stat().st_size > 10_000
    assert plot_tiers([summaries[1]], tmp_path / "none.png") is None and not (tmp_path / "none.png").exists()
