"""Real Flower simulations (``flwr run``) of federated dropout with the CNN+BN on digits and
IST with the transformer on the offline sequence task, 2 rounds each.

The bytes every round's nodes sent back must equal the analytic size of their compact
slices: per node, the tensor sizes written out by hand below from the kept counts of
its mask (the masks are redrawn from the strategy's seeded sampler), packed into one
raw array per dtype kind (float32 and, for BatchNorm's counters, int64): exactly their
raw bytes, no header.
"""

import json

import numpy as np
import pytest
import tomli_w

from fl_subnet.experiments.config import RunConfig
from fl_subnet.experiments.experiment import example_input, factory_for
from fl_subnet.strategies import build_strategy

from flower_processes import (Processes, flower_env, flwr_run, free_ports, missing_binaries, simulation_options,
                              start_superlink, write_flower_config)

NUM_NODES = 4
SIMULATION_OPTIONS = simulation_options(NUM_NODES)
COMMON = {"num-server-rounds": 2, "num-nodes": NUM_NODES, "num-subnets": NUM_NODES, "keep-prob": 0.5,
          "local-steps": 5, "seed": 0, "partitioning": "iid", "momentum": 0.9}
MODELS = {
    "cnn-bn": {"model": "cnn-bn", "dataset": "digits", "lr": 0.05},
    "transformer": {"model": "transformer", "dataset": "synthetic-sequence", "num-samples": 400,
                    "input-dim": 8, "lr": 0.01},
}

pytestmark = pytest.mark.slow


def cnn_bn_shapes(k: dict[str, int]) -> list[tuple[tuple[int, ...], str]]:
    """CNNBN(1, 10, width 16) with k1, k2, k3 kept channels of conv1..3."""
    k1, k2, k3 = k["conv1"], k["conv2"], k["conv3"]
    out = []
    for c_out, c_in, n in ((k1, 1, 1), (k2, k1, 2), (k3, k2, 3)):
        out += [((c_out, c_in, 3, 3), "f4"), ((c_out,), "f4")]          # conv weight, bias
        out += [((c_out,), "f4")] * 4 + [((), "i8")]                     # bn w, b, mean, var, count
    return out + [((10, k3), "f4"), ((10,), "f4")]                       # fc


def transformer_shapes(k: dict[str, int], seq_len: int = 8) -> list[tuple[tuple[int, ...], str]]:
    """MHATransformer(vocab 16, T, dim 32, 4 heads of 8, ffn 64, depth 2, 2 classes)."""
    out = [((16, 32), "f4"), ((1, seq_len, 32), "f4")]                   # embed, pos
    for b in (0, 1):
        h, f = 8 * k[f"blocks.{b}.attn"], k[f"blocks.{b}.ffn.fc1"]
        out += [((32,), "f4")] * 2                                       # ln1
        out += [((3 * h, 32), "f4"), ((3 * h,), "f4"), ((32, h), "f4"), ((32,), "f4")]  # q/k/v rows, out cols
        out += [((32,), "f4")] * 2                                       # ln2
        out += [((f, 32), "f4"), ((f,), "f4"), ((32, f), "f4"), ((32,), "f4")]          # fc1, fc2
    return out + [((32,), "f4")] * 2 + [((2, 32), "f4"), ((2,), "f4")]  # ln, head


SHAPES = {"cnn-bn": cnn_bn_shapes, "transformer": transformer_shapes}


def expected_bytes_up(overrides: dict, rounds: int) -> list[int]:
    """Per round: Σ over the nodes' masks of Σ over tensors of their raw bytes (the
    packed slice's raw arrays carry nothing else)."""
    cfg = RunConfig.from_mapping(overrides)
    strategy = build_strategy(cfg, factory_for(cfg), example_input=example_input(cfg))
    out = []
    for rnd in range(1, rounds + 1):
        total = 0
        for mask in strategy.sampler.sample(strategy.groups, rnd, NUM_NODES):
            kept = {g.name: int(mask.kept(g).numel()) for g in strategy.groups}
            shapes = SHAPES[cfg.model](kept)
            for dtype in {d for _, d in shapes}:
                count = sum(int(np.prod(s)) for s, d in shapes if d == dtype)
                total += count * np.dtype(dtype).itemsize
        out.append(total)
    return out


@pytest.fixture(scope="module")
def simulation_link(tmp_path_factory):
    """One simulation SuperLink for this module's runs (per pytest worker)."""
    if missing_binaries("flwr", "flower-superlink"):
        pytest.skip("Flower executables not installed")
    tmp = tmp_path_factory.mktemp("sim-link")
    home = tmp / "flwr-home"
    (port,) = free_ports(1)
    write_flower_config(home, "fl-subnet-sim", f"127.0.0.1:{port}", SIMULATION_OPTIONS)
    procs = Processes(tmp / "logs", flower_env(home))
    try:
        start_superlink(procs, port, simulation=True)
        yield procs
    finally:
        procs.stop_all()


@pytest.mark.parametrize("model, strategy", [("cnn-bn", "federated-dropout"), ("transformer", "ist")])
def test_flwr_run_cnn_bn_and_transformer_with_ist_and_federated_dropout(simulation_link, tmp_path, model,
                                                                        strategy):
    """Each model and each protocol once: the CNN's BatchNorm counters (int64) with
    federated dropout's random masks and scale 2, the transformer's heads with IST's
    partition."""
    procs = simulation_link
    try:
        out_dir = tmp_path / f"{model}-{strategy}"
        overrides = {**COMMON, **MODELS[model], "strategy": strategy}
        scenario = tmp_path / f"{model}-{strategy}.toml"
        scenario.write_text(tomli_w.dumps({**overrides, "out-dir": str(out_dir)}))
        flwr_run(procs, "fl-subnet-sim", scenario, out_dir, timeout=300)
        rows = json.loads((out_dir / "metrics.json").read_text())
        assert [r["server-round"] for r in rows] == [0, 1, 2], (model, strategy)
        assert all(np.isfinite(r["full-train-loss"]) for r in rows), rows
        assert [r["bytes-up"] for r in rows[1:]] == expected_bytes_up(overrides, 2), (model, strategy)
        if strategy == "ist":  # a partition: every unit trained by exactly one node
            assert all(r["coverage"] == 1.0 for r in rows[1:]), rows
    except BaseException:
        print(procs.tails())
        raise
