"""bench/lora.py: LoRA with heterogeneous ranks on a synthetic task (docs/lora.md,
"Heterogeneous ranks on a synthetic task").

The quick run (1 seed, 2 rounds, 4 variants) must give the JSON structure with accuracies
in [0, 1], each tier's adapter evaluated alone, and MB in proportion to the ranks sent, in
under a minute; docs/lora.md's table must be the one the bench renders from
docs/lora.json. The synthetic tasks follow their rule, and the zero-padded mean the bench
runs (``denominator="zero-pad"``) is the zero-padded mean through ``strategy.start``.
"""

import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import lora  # noqa: E402
from bench_runs import run_quick  # noqa: E402
from fl_subnet.experiments import lora_task as task  # noqa: E402

# transformers 5.23 warns about an attribute peft 0.21 reads; not ours to fix
pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    t0 = time.perf_counter()
    data, printed = run_quick("lora", tmp_path_factory.mktemp("lora"))
    return data, printed, time.perf_counter() - t0


def test_quick_run_structure(quick):
    data, printed, seconds = quick
    print(f"quick run: {seconds:.1f} s")  # a timing, not a check: the machine may be loaded
    assert data["bench"] == "lora" and data["wall_seconds"] > 0
    assert data["setting"]["rounds"] == lora.QUICK_ROUNDS and data["setting"]["seeds"] == list(lora.QUICK_SEEDS)
    assert {"cpu", "cores", "torch_threads", "torch", "flwr"} <= set(data["machine"])
    assert list(data["variants"]) == list(lora.QUICK_VARIANTS)
    pre = data["pretrain"]["0"]
    assert 0.0 <= pre["task-b-acc"] <= 1.0 and 0.0 <= pre["task-a-acc"] <= 1.0
    counts = pre["node-label-counts"]
    assert len(counts) == lora.NUM_NODES and all(sum(c) == lora.PER_NODE for c in counts)
    for variant, runs in data["variants"].items():
        assert list(runs) == [str(s) for s in lora.QUICK_SEEDS], variant
        for run in runs.values():
            assert run["rounds"] == lora.QUICK_ROUNDS
            rank = lora.rank_of(variant)
            for r in lora.RANKS:
                v = run[f"tier-{r}-acc"]
                if rank is None or r > rank:
                    assert v is None, (variant, r)
                else:
                    assert isinstance(v, float) and 0.0 <= v <= 1.0, (variant, r, v)
            assert 0.0 <= run["full-acc"] <= 1.0 and math.isfinite(run["full-loss"])
            assert math.isclose(run["total-mb"], run["mb-down"] + run["mb-up"])
            assert len(run["curve"]) == lora.QUICK_ROUNDS + 1 and run["curve"][0][0] == 0.0
            assert math.isclose(run["curve"][-1][0], run["total-mb"]) and run["curve"][-1][1] == run["full-acc"]
    # MB: the float32 trainable tensors each node holds (ranks 4 / 8 / 16 by partition-id mod 3 in
    # the tiered variants), both ways, plus at most 6 kB of headers and config per message
    per_rank = len(task.TARGETS) * task.LAYERS * 2 * task.HIDDEN  # a row of A and a column of B per adapter
    head = task.NUM_CLASSES * (task.HIDDEN + 1)
    full = data["variants"]["full-ft-fedavg"]["0"]["trainable-params"]
    node_params = {"full-ft-fedavg": [full] * lora.NUM_NODES,
                   "lora-r8-all": [lora.ONE_RANK * per_rank + head] * lora.NUM_NODES,
                   "hetlora-holder-mean": [lora.RANKS[i % 3] * per_rank + head for i in range(lora.NUM_NODES)]}
    node_params["product-space"] = node_params["hetlora-holder-mean"]
    assert data["variants"]["lora-r8-all"]["0"]["trainable-params"] == node_params["lora-r8-all"][0]
    messages = 2 * lora.NUM_NODES * lora.QUICK_ROUNDS
    for variant, runs in data["variants"].items():
        payload = 2 * lora.QUICK_ROUNDS * 4 * sum(node_params[variant]) / 1e6
        assert payload <= runs["0"]["total-mb"] <= payload + messages * 6e-3, (variant, runs["0"]["total-mb"], payload)
    assert data["variants"]["hetlora-holder-mean"]["0"]["total-mb"] < 0.2 * data["variants"]["full-ft-fedavg"]["0"][
        "total-mb"]
    # stdout: one measurement per variant as a JSON line (bench/common.py), the same runs
    assert [m["setting"]["variant"] for m in printed] == list(lora.QUICK_VARIANTS)
    for m in printed:
        assert m["bench"] == "lora" and m["metric"] == "accuracy" and m["reps"] == len(lora.QUICK_SEEDS)
        assert m["runs"] == data["variants"][m["setting"]["variant"]]
    table = lora.render_table(data)
    assert all(f"| {v} |" in table for v in lora.QUICK_VARIANTS)


def test_docs_table_is_rendered_from_the_json():
    data = json.loads(lora.JSON_OUT.read_text())
    assert lora.docs_table() == lora.render_table(data)
    assert list(data["variants"]) == list(lora.VARIANTS) and data["setting"]["seeds"] == list(lora.SEEDS)
    lora.check(data)


def test_docs_prose_states_the_bench_setting():
    """The setting written out in docs/lora.md's prose is the one the bench runs."""
    text = " ".join(lora.DOCS.read_text().split())
    for phrase in (f"{lora.NUM_NODES} nodes, {lora.PER_NODE} task-B sequences each",
                   f"Dirichlet({lora.DIRICHLET_ALPHA:g})", f"rank {lora.RANKS[0]}, {lora.RANKS[1]} or {lora.RANKS[2]}",
                   f"{lora.ROUNDS} rounds of {lora.LOCAL_STEPS} local SGD steps (batch {lora.BATCH_SIZE}, momentum "
                   f"{lora.MOMENTUM:g})", f"{lora.PRETRAIN_STEPS} AdamW steps",
                   f"rate is {lora.LR['lora']:g} for every LoRA variant and {lora.LR['full']:g} for full fine-tuning",
                   f"keep probability {lora.KEEP_PROB:g}",
                   f"`lora_alpha = {task.LORA_ALPHA}` at `r_max = {lora.R_MAX}`",
                   f"{lora.TEST_SIZE:,} balanced task-B sequences"):
        assert phrase in text, phrase


def test_plot_draws_the_json(tmp_path):
    """One line per variant (plus the line before fine-tuning), each the mean accuracy over
    the seeds in percent against the mean cumulative MB."""
    data = json.loads(lora.JSON_OUT.read_text())
    fig = lora.plot(data, tmp_path / "p.png")
    assert (tmp_path / "p.png").stat().st_size > 0
    lines = fig.axes[0].get_lines()
    assert len(lines) == len(data["variants"]) + 1
    for line, (variant, runs) in zip(lines, data["variants"].items()):
        mb, acc, _ = lora.mean_curve(runs)
        assert list(line.get_xdata()) == pytest.approx(mb[1:])
        assert list(line.get_ydata()) == pytest.approx([100 * a for a in acc[1:]])


# ------------------------------------------------------------------------ the tasks
@pytest.mark.parametrize("name", task.TASKS)
def test_a_task_follows_its_rule(name):
    gen = torch.Generator().manual_seed(0)
    labels = task.balanced(400, gen)
    data = task.make_task(name, labels, gen)
    x, y = data.tensors
    assert x.shape == (400, task.SEQ_LEN) and bool((x[:, 0] == task.CLS).all())
    assert bool(((x[:, 1:] >= 2) & (x[:, 1:] < task.VOCAB)).all())
    assert torch.equal(task.labels_of(x, name), y) and torch.equal(y, labels)
    assert torch.bincount(y).tolist() == [100] * task.NUM_CLASSES


def test_task_b_moves_half_of_every_group():
    a, b = task.groups("a")[2:], task.groups("b")[2:]
    assert int((a == b).sum()) == task.NUM_TOKENS // 2
    assert all(int((b == c).sum()) == 4 for c in range(task.NUM_CLASSES))


def test_dirichlet_split_sizes_and_skew():
    parts = task.dirichlet_split(9, 200, 0.5, torch.Generator().manual_seed(0))
    assert [len(p) for p in parts] == [200] * 9
    shares = torch.stack([torch.bincount(p, minlength=4) for p in parts]).float() / 200
    assert float(shares.max(1).values.mean()) > 0.4  # skewed: far from 0.25 each


# ------------------------------------------------------------- the zero-padded mean
def test_zero_pad_mean_is_the_zero_padded_mean():
    """One round of HeteroFL with ``denominator="zero-pad"`` on ranks 1 / 2 / 4 of r_max = 4: every adapter
    entry is the weighted sum of the nodes that held it over every node's weight (the
    others padded with 0); the head, held by all, is the weighted mean."""
    state = task.build_classifier(0).state_dict()
    factory = task.lora_factory(state, 0, 4)
    replies = []

    def load_data(context):
        pid = int(context.node_config["partition-id"])
        gen = torch.Generator().manual_seed(pid)
        return task.make_task("b", task.balanced(16 + 8 * pid, gen), gen), None

    def train_fn(model, data, cfg, seed, **kw):
        from fl_subnet.clients import train_local

        n, loss = train_local(model, data, cfg, seed, **kw)
        trained = {name for name, p in model.named_parameters() if p.requires_grad}
        replies.append(({k: v.detach().numpy().astype(np.float64).copy() for k, v in model.state_dict().items()
                         if k in trained}, n))
        return n, loss

    from fl_subnet.clients import make_client_app
    from fl_subnet.experiments.inprocess_grid import InProcessGrid
    from fl_subnet.wire import arrays_to_state

    tiers = (0.25, 0.5, 1.0)
    from fl_subnet.strategies import HeteroFL

    strategy = HeteroFL(factory, tiers, scale=False, order_by_partition=True, weighted=True, denominator="zero-pad",
                        fraction_train=1.0, min_train_nodes=3, min_available_nodes=3, fraction_evaluate=0.0)
    grid = InProcessGrid(make_client_app(factory, load_data, train_fn=train_fn), 3)
    torch.set_num_threads(1)
    result = strategy.start(grid=grid, initial_arrays=ArrayRecord(factory().state_dict()), num_rounds=1,
                            train_config=ConfigRecord({"lr": 0.1, "local-steps": 2, "batch-size": 8}))
    got = arrays_to_state(result.arrays)
    assert sorted(r["base_model.model.model.bert.encoder.layer.0.attention.self.query.lora_A.default.weight"]
                  .shape[0] for r, _ in replies) == [1, 2, 4]
    total = sum(n for _, n in replies)
    for key, value in got.items():
        want = np.zeros(tuple(value.shape))
        for reply, n in replies:
            t = reply[key]
            want[tuple(slice(0, s) for s in t.shape)] += n * t
        assert np.abs(value.numpy() - want / total).max() < 1e-6, key
