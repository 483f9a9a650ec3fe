"""Accuracy against bytes over seeds (``fl-subnet frontier``)."""

import json

import pytest

from fl_subnet.experiments.frontier import frontier_table, mb_to_reach, mean_curve


def _rows(accs, mb_per_round):
    return [{"server-round": r, "eval-acc": a, "cumulative-bytes": int(r * mb_per_round * 1e6)}
            for r, a in enumerate(accs)]


def test_mean_curve_and_bytes_to_target_by_hand():
    a = mean_curve("a", [_rows([0.1, 0.5, 0.9], 10), _rows([0.1, 0.7, 0.95], 10)])
    assert a.acc == pytest.approx([0.1, 0.6, 0.925]) and a.mb == pytest.approx([0, 10, 20])
    assert a.acc_std == pytest.approx([0.0, 0.1, 0.025])
    b = mean_curve("b", [_rows([0.1, 0.92, 0.93], 3)])
    assert mb_to_reach(a, 0.915) == pytest.approx(20) and mb_to_reach(b, 0.915) == pytest.approx(3)
    assert mb_to_reach(b, 0.99) is None
    rows = frontier_table([a, b], "a", 0.01)
    assert rows[0]["target"] == pytest.approx(0.915)
    assert rows[1]["mb-to-target"] == pytest.approx(3) and rows[1]["fraction-of-reference-mb"] == pytest.approx(0.15)
    assert rows[1]["gap-points"] == pytest.approx(100 * (0.925 - 0.93))
    with pytest.raises(ValueError, match="different rounds"):
        mean_curve("c", [_rows([0.1, 0.2], 1), _rows([0.1], 1)])


def test_frontier_command_runs_every_seed_and_writes_table_and_plot(tmp_path):
    from fl_subnet.experiments.cli import main

    sc = tmp_path / "tiny.toml"
    sc.write_text('strategy = "fedavg"\nnum-nodes = 2\nnum-server-rounds = 2\nhidden = "16"\nlocal-steps = 3\n')
    sd = tmp_path / "tiny-dropout.toml"
    sd.write_text('strategy = "federated-dropout"\nnum-nodes = 2\nnum-server-rounds = 2\nhidden = "16"\n'
                  'local-steps = 3\n')
    out = tmp_path / "out"
    assert main(["frontier", str(sc), str(sd), "--seeds", "0,1", "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == [
        "tiny-dropout-seed0", "tiny-dropout-seed1", "tiny-seed0", "tiny-seed1"]
    data = json.loads((out / "frontier.json").read_text())
    assert [c["label"] for c in data["curves"]] == ["tiny", "tiny-dropout"]
    seeds = [json.loads((out / f"tiny-seed{s}" / "metrics.json").read_text())[-1]["eval-acc"] for s in (0, 1)]
    assert data["curves"][0]["acc"][-1] == pytest.approx(sum(seeds) / 2)
    assert (out / "frontier.png").stat().st_size > 10_000
    assert "MB to reach tiny's final" in (out / "frontier.md").read_text()
    assert main(["frontier", str(sc), "--seeds", "a,b", "--out", str(out)]) == 2
