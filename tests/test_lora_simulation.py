"""Heterogeneous LoRA ranks in a real Flower simulation: ``flwr run .`` with the run config's
``hf-classifier`` (a tiny BERT pre-trained on task A, LoRA on its attention) fine-tuned on
``shifted-majority`` by 3 SuperNodes of ranks 4, 8 and 16 (HeteroFL's nested prefixes, i.e.
HetLoRA's truncation), then each tier's adapter extracted and evaluated alone.

The run must equal the same scenario on the in-process grid (``fl-subnet run``), learn,
carry only the adapters and the head, and leave one file per tier whose model, loaded with
the model factory alone, gives the accuracy the run reported for that tier.
"""

import json

import pytest

from fl_subnet.experiments import cli

from flower_processes import assert_same_rows, missing_binaries, simulate_scenario

NUM_NODES = 3
TIERS = (0.25, 0.5, 1.0)
R_MAX = 16
SCENARIO = {"strategy": "heterofl", "model": "hf-classifier", "dataset": "shifted-majority", "num-samples": 600,
            "lora-rank": R_MAX, "lora-alpha": 32.0, "capacity-tiers": ",".join(map(str, TIERS)),
            "num-nodes": NUM_NODES, "partitioning": "dirichlet", "dirichlet-alpha": 0.5, "pretrain-steps": 300,
            "num-server-rounds": 3, "local-steps": 10, "batch-size": 32, "lr": 0.06, "momentum": 0.9,
            "aggregation": "mean", "seed": 0}

pytestmark = pytest.mark.slow


@pytest.mark.skipif(bool(missing_binaries("flwr", "flower-superlink")),
                    reason="Flower executables not installed")
def test_flwr_run_lora_rank_tiers(tmp_path):
    from fl_subnet.checkpoint import load_model
    from fl_subnet.clients.train import evaluate_model
    from fl_subnet.core.frozen import trainable_keys
    from fl_subnet.experiments.config import RunConfig
    from fl_subnet.experiments.experiment import factory_for
    from fl_subnet.experiments.lora_task import build_classifier
    from fl_subnet.tiers import load_submodel, tier_file

    scenario, out_dir = simulate_scenario(tmp_path, SCENARIO, NUM_NODES, timeout=420)
    rows = json.loads((out_dir / "metrics.json").read_text())
    assert [r["server-round"] for r in rows] == [0, 1, 2, 3]
    for row in rows[1:]:
        assert row["num-replies"] == NUM_NODES and row["num-rejected"] == 0, row
    assert rows[-1]["eval-acc"] > rows[0]["eval-acc"] + 0.05, rows  # task B before fine-tuning: ~0.47
    assert rows[-1]["full-train-loss"] < rows[0]["full-train-loss"], rows

    # only the trainable tensors (adapters and the head's copy) are the global model and travel:
    # a round's downlink is at most the 3 nodes' full adapters (float32), far below the base
    cfg = RunConfig.from_mapping(SCENARIO)
    factory = factory_for(cfg)
    model = factory()
    state = model.state_dict()
    adapters = sum(state[k].numel() * 4 for k in trainable_keys(model))
    base = sum(v.numel() * v.element_size() for v in build_classifier(0).state_dict().values())
    saved = load_model(out_dir / "model.safetensors")
    assert set(saved) == set(trainable_keys(model))
    assert all(adapters * 0.3 < row["bytes-up"] <= NUM_NODES * adapters * 1.01 for row in rows[1:]), (rows, adapters)
    assert all(row["bytes-down"] <= NUM_NODES * adapters * 1.05 for row in rows[1:]), (rows, adapters)
    assert all(row["bytes-down"] + row["bytes-up"] < NUM_NODES * base for row in rows[1:]), (rows, base)

    # each tier's adapter alone: r_max * capacity ranks, the accuracy the run reported
    from fl_subnet.experiments.data import load_centralized_test
    from fl_subnet.experiments.experiment import _dataset

    test = _dataset(cfg, *load_centralized_test(cfg.dataset, data_seed=cfg.seed, n=cfg.num_samples))
    accs = {}
    for r in TIERS:
        path = out_dir / tier_file(r)
        tier_state = load_model(path)
        ranks = {v.shape[0] for k, v in tier_state.items() if ".lora_A." in k}
        assert ranks == {int(r * R_MAX)}, (r, ranks)
        accs[r] = evaluate_model(load_submodel(path, factory), test, "cross-entropy")["eval-acc"]
        assert accs[r] == pytest.approx(rows[-1][f"tier-{r:g}-acc"], abs=1e-9), (r, accs, rows[-1])
    assert accs[1.0] == pytest.approx(rows[-1]["eval-acc"], abs=1e-9)
    assert all(a > rows[0]["eval-acc"] for a in accs.values()), (accs, rows[0])

    # the same scenario on the in-process grid gives the same rounds
    cli_out = tmp_path / "cli"
    assert cli.main(["run", str(scenario), "--out", str(cli_out)]) == 0
    assert_same_rows(rows, json.loads((cli_out / "metrics.json").read_text()))
    local = load_model(cli_out / "model.safetensors")
    diffs = {k: float((saved[k].double() - local[k].double()).abs().max()) for k in saved}
    assert max(diffs.values()) <= 1e-5, diffs
