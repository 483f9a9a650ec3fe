"""Screening against the median with one or two replies per round.

A median of one or two update ratios cannot tell a scaled update from an honest one, so
such a round takes the median over its ratios together with the accepted ratios of
earlier rounds (Defences.HISTORY of them). Runs of one or two nodes per round (dropout,
IST with p = 2, multi-sample dropout with p = 2) are screened from their second round;
the history is part of the checkpoint, so a resumed run screens as the uninterrupted one.
"""

import logging

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord

from fl_subnet.checkpoint import load_checkpoint, load_model, save_checkpoint
from fl_subnet.clients import make_client_app
from fl_subnet.clients.train import train_local
from fl_subnet.experiments.inprocess_grid import InProcessGrid
from fl_subnet.strategies import SubnetFedAvg
from fl_subnet.strategies.defences import Defences

from test_poisoning import accuracy, digits_loader, factory
from test_resume import run as run_resumable

NODES, ROGUE, ROUNDS, ATTACK_FROM = 2, 0, 6, 3


def test_bound_uses_earlier_ratios_when_the_round_has_too_few():
    d = Defences(max_ratio_to_median=3.0)
    assert d.bound([1.0, 50.0]) is None  # nothing to compare with: not screened
    assert d.bound([1.0, 50.0], [0.5, 2.0]) == pytest.approx(3.0 * 1.0)  # median of 0.5, 1, 2, 50
    assert d.bound([8.0], [1.0, 2.0, 4.0]) == pytest.approx(3.0 * 2.0)  # 1, 2, 4, 8: the lower middle (torch)
    # three or more replies: the round's own median, whatever the history says
    assert d.bound([1.0, 2.0, 3.0], [100.0] * 5) == pytest.approx(6.0)
    # only the latest HISTORY earlier ratios count
    old = [1000.0] * 10 + [1.0] * Defences.HISTORY
    assert d.bound([1.0], old) == pytest.approx(3.0)
    # max-update-ratio still bounds alone
    assert Defences(max_update_ratio=2.0, max_ratio_to_median=3.0).bound([9.0]) == 2.0


load_data = digits_loader(NODES)


def rogue_trainer():
    """Honest for ATTACK_FROM - 1 rounds, then node ROGUE sends -100 × its update."""
    calls = {}

    def rogue_train(model, train_set, cfg, seed):
        start = {k: v.detach().clone() for k, v in model.state_dict().items()}
        n, loss = train_local(model, train_set, cfg, seed)
        calls[train_set.partition_id] = calls.get(train_set.partition_id, 0) + 1  # one train message a round
        if train_set.partition_id == ROGUE and calls[ROGUE] >= ATTACK_FROM:
            with torch.no_grad():
                for k, p in model.state_dict().items():
                    if p.is_floating_point():
                        p.copy_(start[k] - 100.0 * (p - start[k]))
        return n, loss

    return rogue_train


def run_two_nodes(defended: bool, screen: str = "reject", history: list | None = None):
    torch.manual_seed(0)
    kwargs = {"defences": Defences(max_ratio_to_median=3.0, screen=screen)} if defended else {}
    strategy = SubnetFedAvg(factory, seed=1, fraction_evaluate=0.0, min_available_nodes=NODES, **kwargs)
    app = make_client_app(factory, load_data, rogue_trainer())
    cfg = ConfigRecord({"local-steps": 10, "lr": 0.1, "batch-size": 32, "loss": "cross-entropy", "seed": 0})
    result = strategy.start(grid=InProcessGrid(app, NODES), initial_arrays=ArrayRecord(factory().state_dict()),
                            num_rounds=ROUNDS, train_config=cfg)
    acc = accuracy({k: torch.from_numpy(v.numpy()) for k, v in result.arrays.items()})
    rejected = [int(result.train_metrics_clientapp[r]["num-rejected"]) for r in range(1, ROUNDS + 1)]
    if history is not None:
        history.extend(strategy.ratio_history)
    return acc, rejected


def test_two_nodes_per_round_a_scaled_update_is_rejected(caplog):
    with caplog.at_level(logging.WARNING, logger="fl_subnet.strategies.base"):
        acc, rejected = run_two_nodes(defended=True)
    assert rejected == [0] * (ATTACK_FROM - 1) + [1] * (ROUNDS - ATTACK_FROM + 1), rejected
    assert acc > 0.5, acc
    # round 1 has 2 replies and no history: said, not silently skipped
    assert any("round 1: 2 replies and 0 earlier ratios" in r.getMessage() for r in caplog.records)
    undefended, none_rejected = run_two_nodes(defended=False)
    assert none_rejected == [0] * ROUNDS
    assert undefended < acc - 0.3, (undefended, acc)  # the attack is real


def test_resume_screens_with_the_saved_history(tmp_path):
    """max-ratio-to-median 1 on 2 nodes rejects a reply whenever it is above the median of
    the round's and the history's ratios, so the history decides the model."""
    over = {"strategy": "fedavg", "num-nodes": 2, "max-ratio-to-median": 1.0}
    run_resumable(tmp_path / "full", 4, **over)
    run_resumable(tmp_path / "cut", 2, **over)
    state, meta = load_checkpoint(tmp_path / "cut")
    assert len(meta["ratio-history"]) >= 2 and all(r > 0 for r in meta["ratio-history"])
    stripped = tmp_path / "stripped"
    save_checkpoint(stripped, state, {k: v for k, v in meta.items() if k != "ratio-history"})
    (stripped / "metrics.json").write_bytes((tmp_path / "cut" / "metrics.json").read_bytes())
    run_resumable(tmp_path / "cut", 4, resume=True, **over)
    run_resumable(stripped, 4, resume=True, **over)
    full, cut = load_model(tmp_path / "full" / "model.safetensors"), load_model(tmp_path / "cut" / "model.safetensors")
    assert all(torch.equal(full[k], cut[k]) for k in full)
    without = load_model(stripped / "model.safetensors")
    assert not all(torch.equal(full[k], without[k]) for k in full)  # the history mattered


def test_a_clipped_update_enters_the_history_at_its_bound():
    """With screen = "clip" the rogue's update is scaled down to the bound and kept; its
    ratio enters the history at that bound, not at its 100x, so it cannot raise later
    rounds' median."""
    rejected_history, clipped_history = [], []
    run_two_nodes(defended=True, history=rejected_history)
    run_two_nodes(defended=True, screen="clip", history=clipped_history)
    assert len(clipped_history) == len(rejected_history) + (ROUNDS - ATTACK_FROM + 1)
    assert max(clipped_history) <= 3.0 * max(rejected_history), (max(clipped_history), max(rejected_history))
