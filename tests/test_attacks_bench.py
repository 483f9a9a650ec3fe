"""bench/attacks.py: adaptive rogue nodes against the defences (docs/attacks.md).

The quick run (1 seed, 3 rounds, FedAvg) must show a real attack that screening never
sees: undefended, both attacks cost accuracy against the honest run, and with the
screening on not one rogue reply is rejected and the rogues' ratio stays under the
bound. docs/attacks.md's table must be the one the bench renders from docs/attacks.json.
"""

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import attacks  # noqa: E402
from bench_runs import run_quick  # noqa: E402


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    data, printed = run_quick("attacks", tmp_path_factory.mktemp("attacks"))
    assert printed == data["measurements"]  # stdout: the measurements as JSON lines (bench/common.py)
    return data


def test_quick_run_structure(quick):
    assert quick["bench"] == "attacks"
    assert quick["setting"]["rounds"] == attacks.QUICK_ROUNDS and quick["setting"]["seeds"] == list(attacks.QUICK_SEEDS)
    cells = {(m["setting"]["protocol"], m["setting"]["defence"], m["setting"]["scenario"]): m
             for m in quick["measurements"]}
    assert set(cells) == {("fedavg", d, s) for d in attacks.DEFENCES for s in attacks.SCENARIOS}
    for m in quick["measurements"]:
        assert m["bench"] == "attacks" and m["metric"] == "accuracy" and m["reps"] == 1
        assert 0.0 <= m["median"] <= 1.0 and m["accuracies"] == [m["median"]] and m["sd"] == 0.0
        assert len(m["num_rejected"]) == 1
        assert ("bound_use" in m) == (m["setting"]["scenario"] in attacks.ATTACKS)
    honest = cells[("fedavg", "none", "honest")]["mean"]
    for attack in attacks.ATTACKS:
        # the attack is real: undefended, it costs accuracy
        assert cells[("fedavg", "none", attack)]["mean"] < honest - 0.05, attack
        for defence in attacks.DEFENCES:
            m = cells[("fedavg", defence, attack)]
            # adaptive: under the screening bound, never rejected by it
            assert m["bound_use"] < 1.0, (defence, attack, m["bound_use"])
            if not defence.endswith("+direction"):
                assert m["num_rejected"] == [0], (defence, attack)
            elif attack in ("ipm", "sign-flip"):  # pointed against the honest updates: each rogue reply rejected
                assert m["num_rejected"] == [len(attacks.ROGUES) * attacks.QUICK_ROUNDS], (defence, attack)
    for defence in attacks.DEFENCES:  # no honest reply is rejected by any defence
        assert cells[("fedavg", defence, "honest")]["num_rejected"] == [0], defence
    # screening alone changes no honest run
    assert cells[("fedavg", "screening", "honest")]["accuracies"] == cells[("fedavg", "none", "honest")]["accuracies"]


def test_docs_table_is_rendered_from_the_json():
    data = json.loads((ROOT / "docs" / "attacks.json").read_text())
    assert attacks.docs_table() == attacks.render_table(data)
