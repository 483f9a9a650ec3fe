"""The result tables of the README and the docs pages are rendered from the results files
that ``make figures`` writes into docs/ (never typed): the quickstart comparison and the
demo in the README, the MLP frontier in docs/ist-and-dropout.md."""

import json
from pathlib import Path

import numpy as np

from fl_subnet.experiments.quickstart import table
from fl_subnet.experiments.results import markdown_table

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def page(name: str) -> str:
    """The text of the docs page docs/<name>.md."""
    return (ROOT / "docs" / f"{name}.md").read_text()


def test_quickstart_table_is_rendered_from_its_results_file():
    results = json.loads((ROOT / "docs" / "quickstart-protocols.json").read_text())
    assert table(results) in README


def test_quickstart_results_every_protocol_within_5_points_of_fedavg():
    """The claim the README makes of the table: at a setting where Flower's FedAvg learns
    stably, every protocol at its defaults ends within 5 points of it (mean over seeds),
    with no NaN in any round."""
    results = json.loads((ROOT / "docs" / "quickstart-protocols.json").read_text())
    assert len(results["settings"]["seeds"]) >= 3 and results["settings"]["rounds"] >= 10
    final = {p: np.mean([r["accuracy"][-1] for r in results["runs"] if r["protocol"] == p])
             for p in results["protocols"]}
    assert {"fedavg", "ist", "federated-dropout", "heterofl", "fedrolex", "fjord"} <= set(final)
    for protocol, acc in final.items():
        assert acc >= final["fedavg"] - 0.05, (protocol, acc, final["fedavg"])
    assert all(np.isfinite(r["loss"]).all() for r in results["runs"])


def test_demo_table_is_rendered_from_its_results_file():
    summaries = json.loads((ROOT / "docs" / "demo-results.json").read_text())
    assert [Path(s["out-dir"]).name for s in summaries] == ["digits-fedavg", "digits-ist", "digits-fedsubdrop"]
    assert markdown_table(summaries) in README


def test_markdown_table_by_hand():
    rows = [{"out-dir": "/x/a", "strategy": "fedavg", "final-eval-acc": 0.9714, "total-mb": 100.0},
            {"out-dir": "/x/b", "strategy": "ist", "final-eval-acc": None, "total-mb": 12.96}]
    assert markdown_table(rows).splitlines()[2:] == ["| a | fedavg | 0.971 | 100.0 | 1.00 |",
                                                     "| b | ist | - | 13.0 | 0.13 |"]


def test_quickstart_at_flowers_own_lr_is_what_the_readme_says():
    """At lr 0.1 with 1 local epoch the sub-model protocols have a seed far below FedAvg's
    worst, the unscaled FedRolex and FjORD included (the README's reason to lower the lr)."""
    results = json.loads((ROOT / "docs" / "quickstart-protocols-lr0.1.json").read_text())
    assert results["settings"]["lr"] == 0.1 and results["settings"]["local-epochs"] == 1
    worst = {p: min(r["accuracy"][-1] for r in results["runs"] if r["protocol"] == p) for p in results["protocols"]}
    for protocol in ("ist", "federated-dropout", "fedrolex", "fjord"):
        assert worst[protocol] < worst["fedavg"] - 0.2, (protocol, worst)


def test_example_readme_states_the_range_of_its_fresh_runs():
    """The example README's accuracies are the min-max of docs/example-runs.json (three
    fresh `flwr run` runs of each app, scripts/example_runs.py), to two decimals."""
    runs = json.loads((ROOT / "docs" / "example-runs.json").read_text())["runs"]
    text = " ".join((ROOT / "examples" / "quickstart-pytorch" / "README.md").read_text().split())
    for app, label in (("ist", "IST ended at"), ("fedavg", "FedAvg (`../quickstart-pytorch-fedavg`) at")):
        final = [r["accuracy"][-1] for r in runs if r["app"] == app]
        assert len(final) >= 3
        assert f"{label} {min(final):.2f}–{max(final):.2f}" in text, (app, final)


def test_mlp_frontier_table_is_the_generated_one():
    assert (ROOT / "docs" / "frontier-digits-mlp.md").read_text().strip() in page("ist-and-dropout")


def test_mlp_frontier_claims_hold_in_the_generated_table():
    """What docs/ist-and-dropout.md says of the MLP frontier table: federated dropout ends
    level with FedAvg (within a point) and reaches the target; even coverage gains nothing
    over it; IST on mlp-bn reaches the target with the smallest fraction of FedAvg's bytes;
    IST at its default on the plain MLP ends lowest and does not reach the target."""
    rows = {}
    for line in (ROOT / "docs" / "frontier-digits-mlp.md").read_text().splitlines()[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0]] = {"acc": float(cells[1].split("±")[0]), "fraction": cells[4]}
    assert set(rows) == {"digits-fedavg", "digits-fedsubdrop", "digits-fedsubdrop-even", "digits-ist-mlp-bn",
                         "digits-ist"}, rows
    fedavg, drop = rows["digits-fedavg"], rows["digits-fedsubdrop"]
    assert abs(drop["acc"] - fedavg["acc"]) <= 0.01 and drop["fraction"] != "—", rows
    assert rows["digits-fedsubdrop-even"]["acc"] <= drop["acc"], rows
    reached = {name: float(r["fraction"]) for name, r in rows.items() if r["fraction"] != "—"}
    assert min(reached, key=reached.get) == "digits-ist-mlp-bn", reached
    assert min(rows, key=lambda name: rows[name]["acc"]) == "digits-ist" and rows["digits-ist"]["fraction"] == "—"


def test_readme_generated_blocks_are_current():
    """Every generated block of the README (the protocol table from the registered protocols,
    the demo and quickstart tables from their results files) equals its rendering
    (``python -m fl_subnet.experiments.readme`` rewrites them; ``make figures`` runs it)."""
    from fl_subnet.experiments.readme import BLOCK, RENDERERS, render

    names = [m.group("name") for m in BLOCK.finditer(README)]
    assert sorted(names) == sorted(RENDERERS), names  # each block once, each renderer used
    assert render(README)[1] == [], "stale: run python -m fl_subnet.experiments.readme"


def test_protocol_table_has_one_row_per_registered_protocol():
    from fl_subnet.strategies import PROTOCOLS, protocol_table

    rows = protocol_table().splitlines()[2:]
    assert [row.split("|")[1].strip(" `") for row in rows] == list(PROTOCOLS)
    assert [row.split("|")[2].strip(" `") for row in rows] == [p.cls.__name__ for p in PROTOCOLS.values()]
