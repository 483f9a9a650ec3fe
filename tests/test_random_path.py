"""Random-path depth training (RaPTr, Panigrahi et al. 2024; ResIST, Dun et al. 2022).

The sampler keeps the first and the last depth block and exactly L of B, follows the
stage schedule, is a function of (seed, round, slot), and keeps each middle block (and
each pair) as often as a uniform subset does, like a plain-numpy draw. The server's
aggregation equals a hand-computed example and a plain-numpy "per-tensor mean over the
replies that held it"; a path's message carries exactly its blocks' bytes; the compact
module of a path equals the ResNet with the skipped blocks removed by hand, forward and
backward; a real ``flwr run`` simulation's bytes follow the path formula.
"""

import io
import json
import math

import numpy as np
import pytest
import tomli_w
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fl_subnet import Mask, analyze
from fl_subnet.core.aggregate import MaskedAggregator
from fl_subnet.core.paths import RandomPathSampler, progressive_schedule, resolve_length
from fl_subnet.experiments.config import RunConfig
from fl_subnet.experiments.experiment import example_input, factory_for
from fl_subnet.experiments.inprocess_grid import InProcessGrid
from fl_subnet.models import MLP, FlowerCNN, MHATransformer, PreActResNet
from fl_subnet.strategies import RandomPath, build_strategy
from fl_subnet.clients import receive
from fl_subnet.wire import SKIP_KEY, arrays_to_state

from flower_processes import Processes, flower_env, flwr_run, free_ports, missing_binaries, simulation_options, \
    start_superlink, write_flower_config
from test_depth import _by_hand

IMAGES = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
NAMES = [f"b{i}" for i in range(8)]  # B = 8 abstract blocks for the sampler


def resnet3():
    """B = 5 depth blocks: stages.0.{0,1,2} (16 channels) and stages.1.{1,2} (32 channels)."""
    return PreActResNet(1, 10, widths=(16, 32), blocks_per_stage=3)


def resnet_flat():
    """One stage of 4 equal blocks (all with an identity shortcut): B = 4 equal-sized blocks."""
    return PreActResNet(1, 10, widths=(16,), blocks_per_stage=4)


SPEC3 = analyze(resnet3, IMAGES[:1], verify=False)
BLOCKS3 = [b.name for b in SPEC3.blocks]


def kept_of(mask: Mask, names) -> list[str]:
    return [b for b in names if b not in mask.skip]


# ---------------------------------------------------------------- (a) the sampler

@pytest.mark.parametrize("length", [2, 3, 5, 8, 0.5, 1.0])
def test_first_and_last_always_kept_and_exactly_l_blocks(length):
    sampler = RandomPathSampler(length, blocks=NAMES, seed=3)
    want = length if isinstance(length, int) else math.ceil(length * 8)
    for rnd in range(1, 30):
        for mask in sampler.sample(SPEC3.groups, rnd, 5):
            kept = kept_of(mask, NAMES)
            assert len(kept) == want and kept[0] == "b0" and kept[-1] == "b7"
            assert mask.skip == frozenset(NAMES) - set(kept)
            assert all(torch.equal(mask.kept(g), torch.arange(g.size)) for g in SPEC3.groups)  # width full
            assert all(mask.scale_of(g) == 1.0 for g in SPEC3.groups)


def test_schedule_lengths_per_round():
    sampler = RandomPathSampler(schedule=((1, 3), (4, 5), (7, 1.0)), blocks=NAMES)
    assert [sampler.length(r) for r in range(1, 10)] == [3, 3, 3, 5, 5, 5, 8, 8, 8]
    for rnd in range(1, 10):
        assert {len(kept_of(m, NAMES)) for m in sampler.sample([], rnd, 4)} == {sampler.length(rnd)}
    # RaPTr's equal stages over R = 10 rounds: starts 1 + floor(i*10/3) = 1, 4, 7
    assert progressive_schedule([0.5, 0.75, 1.0], 10) == ((1, 0.5), (4, 0.75), (7, 1.0))
    staged = RandomPathSampler(schedule=progressive_schedule([0.5, 0.75, 1.0], 10), blocks=NAMES)
    assert [staged.length(r) for r in range(1, 11)] == [4] * 3 + [6] * 3 + [8] * 4  # ceil(f * 8)
    assert resolve_length(0.1, 8) == 2 and resolve_length(0.3, 5) == 2 and resolve_length(1, 1) == 1


def test_paths_depend_on_seed_round_and_slot_only():
    a = RandomPathSampler(4, blocks=NAMES, seed=7)
    b = RandomPathSampler(4, blocks=NAMES, seed=7)
    for rnd in (1, 2, 50):
        few, many = a.sample([], rnd, 3), b.sample([], rnd, 6)
        assert [m.skip for m in few] == [m.skip for m in many[:3]]  # slot i's path ignores the others

    def draws(seed):
        return [m.skip for r in range(1, 20) for m in RandomPathSampler(4, blocks=NAMES, seed=seed).sample([], r, 3)]

    assert draws(7) == draws(7) and draws(7) != draws(8)
    assert len(set(draws(7))) > 5  # the rounds and slots differ


def test_keep_frequencies_match_a_uniform_subset_and_numpy():
    names, length, draws = NAMES[:7], 4, 6000  # B = 7, L = 4: each middle block kept w.p. 2/5
    sampler = RandomPathSampler(length, blocks=names, seed=0)
    ours = np.array([[b not in m.skip for b in names] for r in range(1, draws // 4 + 1)
                     for m in sampler.sample([], r, 4)], dtype=float)
    rng = np.random.default_rng(0)
    ref = np.zeros((draws, 7))
    ref[:, [0, 6]] = 1
    for row in ref:
        row[1 + rng.choice(5, size=length - 2, replace=False)] = 1
    p = (length - 2) / (len(names) - 2)
    tol = 5 * math.sqrt(p * (1 - p) / draws)
    assert np.all(ours[:, [0, 6]] == 1) and np.all(ours.sum(1) == length)
    np.testing.assert_allclose(ours[:, 1:6].mean(0), p, atol=tol)
    np.testing.assert_allclose(ref[:, 1:6].mean(0), p, atol=tol)
    # pairs of middle blocks: a uniform L-2 subset holds both w.p. (L-2)(L-3)/((B-2)(B-3)) = 1/10
    pair = (length - 2) * (length - 3) / ((len(names) - 2) * (len(names) - 3))
    both = (ours[:, 1:6, None] * ours[:, None, 1:6]).mean(0)[np.triu_indices(5, 1)]
    ref_both = (ref[:, 1:6, None] * ref[:, None, 1:6]).mean(0)[np.triu_indices(5, 1)]
    pair_tol = 5 * math.sqrt(pair * (1 - pair) / draws)
    np.testing.assert_allclose(both, pair, atol=pair_tol)
    np.testing.assert_allclose(ref_both, pair, atol=pair_tol)


@pytest.mark.parametrize("nodes", [1, 2, 3, 6, 9])
def test_resist_partition_gives_each_middle_block_exactly_one_holder(nodes):
    sampler = RandomPathSampler(mode="partition", blocks=NAMES, seed=1)
    for rnd in range(1, 10):
        masks = sampler.sample([], rnd, nodes)
        held = np.array([[b not in m.skip for b in NAMES] for m in masks])
        assert held[:, [0, 7]].all()  # first and last: every node
        np.testing.assert_array_equal(held[:, 1:7].sum(0), np.ones(6))  # middle: exactly one node
        sizes = held[:, 1:7].sum(1)
        assert sizes.max() - sizes.min() <= 1
        assert [m.skip for m in masks] == [m.skip for m in sampler.sample([], rnd, nodes)]


def test_resist_strategy_sends_each_middle_block_to_one_node():
    strategy = RandomPath(resnet3, mode="partition", seed=2, example_input=IMAGES[:1], fraction_evaluate=0.0,
                          min_available_nodes=3, min_train_nodes=3)
    torch.manual_seed(0)
    sent = list(strategy.configure_train(1, ArrayRecord(resnet3().state_dict()), ConfigRecord({}),
                                         InProcessGrid(_random_reply_app(resnet3), 3)))
    holders = {b: [m.metadata.dst_node_id for m in sent
                   if f"{b}.conv1.weight" in strategy.slice_state(m.content["arrays"], m.metadata.dst_node_id)]
               for b in BLOCKS3}
    assert len(holders[BLOCKS3[0]]) == len(holders[BLOCKS3[-1]]) == 3
    assert all(len(holders[b]) == 1 for b in BLOCKS3[1:-1])


@pytest.mark.parametrize("kwargs,match", [
    (dict(path_length=0), "path-length"), (dict(path_length=-2), "path-length"),
    (dict(path_length=1.5), "path-length"), (dict(path_length=True), "path-length"),
    (dict(path_length="3"), "path-length"), (dict(path_length=float("nan")), "path-length"),
    (dict(), "exactly one of path-length"), (dict(path_length=3, schedule=((1, 3),)), "exactly one"),
    (dict(schedule=((2, 3),)), "start at round 1"), (dict(schedule=((1, 3), (1, 4))), "strictly increasing"),
    (dict(schedule=((1, 4), (3, 3))), "must not decrease"), (dict(schedule=((1, 0.5), (3, 2.0))), "schedule length"),
    (dict(schedule=5), "schedule"), (dict(schedule=((1, 3, 4),)), "schedule"),
    (dict(path_length=3, mode="layers"), "path-mode"), (dict(path_length=3, mode="partition"), "not used"),
])
def test_bad_arguments_name_the_key(kwargs, match):
    with pytest.raises(ValueError, match=match):
        RandomPathSampler(**kwargs)


def test_lengths_are_checked_against_the_blocks():
    with pytest.raises(ValueError, match="path-length must keep between 2.*and 8 blocks.*got 9"):
        RandomPathSampler(9, blocks=NAMES)
    with pytest.raises(ValueError, match="path-length must keep between 2"):
        RandomPathSampler(1, blocks=NAMES)
    with pytest.raises(ValueError, match="must not decrease"):
        RandomPathSampler(schedule=((1, 0.9), (5, 3)), blocks=NAMES)  # 8 blocks, then 3
    with pytest.raises(ValueError, match="path-length has 3 stages but the run has only 2"):
        progressive_schedule([0.5, 0.7, 1.0], 2)
    with pytest.raises(RuntimeError, match="bind"):
        RandomPathSampler(3).sample([], 1, 1)


@pytest.mark.parametrize("factory,name", [(lambda: MLP(64, [32], 10), "MLP"),
                                          (lambda: FlowerCNN(1, 10, 8), "FlowerCNN")])
def test_a_model_without_depth_blocks_is_refused(factory, name):
    x = torch.zeros(1, 64) if name == "MLP" else IMAGES[:1]
    with pytest.raises(ValueError, match=f"depth blocks.*{name} has none.*PreActResNet.*transformers"):
        RandomPath(factory, 0.5, example_input=x)


def test_run_config_refuses_random_path_without_depth_blocks():
    for model in ("mlp", "cnn", "cnn-bn"):
        with pytest.raises(ValueError, match=f"strategy 'random-path'.*model '{model}' has none"):
            RunConfig(strategy="random-path", model=model)
    with pytest.raises(ValueError, match="blocks-per-stage >= 2"):
        RunConfig(strategy="random-path", model="resnet")
    with pytest.raises(ValueError, match="path-length must be a string of comma-separated, non-decreasing"):
        RunConfig(strategy="random-path", model="resnet", blocks_per_stage=2, path_length="0.75,0.5")
    with pytest.raises(ValueError, match="path-length has 3 stages but num-server-rounds is 2"):
        RunConfig(strategy="random-path", model="resnet", blocks_per_stage=2, path_length="0.5,0.7,1",
                  num_server_rounds=2)
    cfg = RunConfig(strategy="random-path", model="resnet", blocks_per_stage=3, path_length="0.6,1.0",
                    num_server_rounds=4)
    strategy = build_strategy(cfg, factory_for(cfg), example_input=example_input(cfg))
    assert isinstance(strategy, RandomPath) and [b.name for b in strategy.spec.blocks] == BLOCKS3
    assert [strategy.sampler.length(r) for r in (1, 2, 3, 4)] == [3, 3, 5, 5]  # ceil(0.6 * 5), then all


# ---------------------------------------------------------------- (b) aggregation

def test_aggregation_hand_computed():
    """Replies of constant value: A = 1 (weight 1) and C = 10 (weight 1) skip stages.0.1,
    B = 4 (weight 2) holds every block. stages.0.1 = 4 (B alone); everything else
    (1 + 2*4 + 10) / 4 = 4.75; a block nobody held keeps its value."""
    spec = analyze(lambda: PreActResNet(1, 10, widths=(16, 32), blocks_per_stage=2), IMAGES[:1], verify=False)
    assert [b.name for b in spec.blocks] == ["stages.0.0", "stages.0.1", "stages.1.1"]
    torch.manual_seed(0)
    state = PreActResNet(1, 10, widths=(16, 32), blocks_per_stage=2).state_dict()
    short = RandomPathSampler(2, blocks=[b.name for b in spec.blocks]).sample(spec.groups, 1, 1)[0]
    full = RandomPathSampler(3, blocks=[b.name for b in spec.blocks]).sample(spec.groups, 1, 1)[0]
    assert short.skip == {"stages.0.1"} and full.skip == frozenset()

    def const(mask, v):
        return {k: torch.full_like(t, v) if t.is_floating_point() else torch.full_like(t, int(v))
                for k, t in spec.gather(state, mask).items()}

    agg = MaskedAggregator(state, spec.slicer)
    for mask, v, w in ((short, 1.0, 1.0), (full, 4.0, 2.0), (short, 10.0, 1.0)):
        agg.add(const(mask, v), mask, w)
    out = agg.finalize()
    for k, t in state.items():
        if not t.is_floating_point():
            want = 4 if k.startswith("stages.0.1.") else 10  # integer buffers: max over holders
        else:
            want = 4.0 if k.startswith("stages.0.1.") else 4.75
        assert torch.equal(out[k], torch.full_like(t, want)), k
    nobody = MaskedAggregator(state, spec.slicer, untouched="zero")
    nobody.add(const(short, 1.0), short)
    kept = nobody.finalize()
    assert all(torch.equal(kept[k], state[k]) for k in state if k.startswith("stages.0.1."))


def _random_reply_app(factory) -> ClientApp:
    """A node that answers with random tensors of the shapes it received (one array per
    tensor) and a random weight."""
    app = ClientApp()

    @app.train()
    def train(msg, context):
        got = receive(msg, factory)
        key, config = got.arrays_key, got.config
        g = torch.Generator().manual_seed(1000 * int(config["server-round"]) + int(context.node_config["partition-id"]))
        state = {k: (torch.randn(t.shape, generator=g) if t.is_floating_point()
                     else torch.randint(0, 100, t.shape, generator=g, dtype=t.dtype))
                 for k, t in got.model.state_dict().items()}
        n = int(torch.randint(1, 50, (1,), generator=g))
        return Message(RecordDict({key: ArrayRecord(state), "metrics": MetricRecord({"num-examples": n})}),
                       reply_to=msg)

    return app


def numpy_mean_over_holders(old: dict, replies: list[tuple[dict, float, set[str]]]) -> dict:
    """Per tensor: Σ n_c W_c / Σ n_c over the replies whose path held its block (a key of
    block b starts with "b."); integer tensors: the maximum; held by nobody: the old value."""
    out = {}
    for key, value in old.items():
        holders = [(w, n) for w, n, skip in replies if not any(key.startswith(b + ".") for b in skip)]
        if not holders:
            out[key] = value
        elif np.issubdtype(value.dtype, np.integer):
            out[key] = np.max([w[key] for w, _ in holders], axis=0)
        else:
            num = sum(n * w[key].astype(np.float64) for w, n in holders)
            out[key] = (num / sum(n for _, n in holders)).astype(value.dtype)
    return out


def test_aggregation_equals_numpy_mean_over_holders_on_random_replies():
    strategy = RandomPath(resnet3, 3, seed=4, example_input=IMAGES[:1], fraction_evaluate=0.0,
                          min_available_nodes=3, min_train_nodes=3)
    # a round in which some middle block has two holders and another none
    rnd = next(r for r in range(1, 100) if {sum(b not in m.skip for m in strategy.sampler.sample([], r, 3))
                                            for b in BLOCKS3[1:-1]} >= {0, 2})
    grid = InProcessGrid(_random_reply_app(resnet3), 3)
    torch.manual_seed(0)
    old = resnet3().state_dict()
    sent = list(strategy.configure_train(rnd, ArrayRecord(old), ConfigRecord({}), grid))
    replies = list(grid.send_and_receive(sent))
    new, metrics = strategy.aggregate_train(rnd, replies)
    assert metrics["num-replies"] == 3
    by_id = {m.metadata.message_id: m for m in sent}
    ref_in = []
    for r in replies:
        skip = by_id[r.metadata.reply_to_message_id].content["config"].get(SKIP_KEY, "")
        state = {k: a.numpy() for k, a in r.content["arrays"].items()}
        ref_in.append((state, float(r.content["metrics"]["num-examples"]), {s for s in skip.split(",") if s}))
    assert {len(s) for _, _, s in ref_in} == {2}  # 3 of 5 blocks kept: two skipped each
    ref = numpy_mean_over_holders({k: v.numpy() for k, v in old.items()}, ref_in)
    got = arrays_to_state(new)
    unheld = [b for b in BLOCKS3 if all(b in s for _, _, s in ref_in)]
    assert unheld and all(torch.equal(got[k], old[k]) for k in old if k.startswith(unheld[0] + "."))
    for k in old:
        np.testing.assert_allclose(got[k].numpy(), ref[k], rtol=1e-6, atol=1e-6, err_msg=k)


# ---------------------------------------------------------------- (c) bytes

def _block_bytes(state, names) -> dict[str, int]:
    """Raw bytes (numel × element size) of each block's tensors."""
    return {b: sum(t.numel() * t.element_size() for k, t in state.items() if k.startswith(b + ".")) for b in names}


def _raw_bytes(state) -> int:
    return sum(t.numel() * t.element_size() for t in state.values())


@pytest.mark.parametrize("factory", [resnet3, resnet_flat])
def test_a_path_costs_exactly_its_blocks_bytes(factory):
    strategy = RandomPath(factory, 2, example_input=IMAGES[:1], fraction_evaluate=0.0, min_available_nodes=1,
                          min_train_nodes=1)
    names = [b.name for b in strategy.spec.blocks]
    torch.manual_seed(0)
    full_state = factory().state_dict()
    full = ArrayRecord(full_state)
    per_block = _block_bytes(full_state, names)
    rest = _raw_bytes(full_state) - sum(per_block.values())
    grid = InProcessGrid(_random_reply_app(factory), 1)
    for length in range(2, len(names) + 1):
        strategy.sampler = RandomPathSampler(length, blocks=names, seed=length)
        for rnd in (1, 2, 3):
            (msg,) = strategy.configure_train(rnd, full, ConfigRecord({}), grid)
            arrays = msg.content["arrays"]
            state = strategy.slice_state(arrays, msg.metadata.dst_node_id)
            got = _block_bytes(state, names)
            kept = [b for b in names if b not in strategy._sent[msg.metadata.dst_node_id].skip]
            assert len(kept) == length
            assert sum(got.values()) == sum(per_block[b] for b in kept)
            assert all(got[b] == (per_block[b] if b in kept else 0) for b in names)
            assert _raw_bytes(state) - sum(got.values()) == rest  # the rest: whole
            if length == len(names):  # the full model: Flower's own record, shared, one array per tensor
                assert arrays is full
                continue
            # on the wire: exactly those raw bytes, in one raw array per kind (float, int)
            assert sorted(arrays) == ["packed-float", "packed-int"]
            assert sum(len(a.data) for a in arrays.values()) == _raw_bytes(state)
            if factory is resnet_flat:  # equal-sized blocks: exactly the fraction L/B
                assert sum(got.values()) / sum(per_block.values()) == length / len(names)
    if factory is resnet3:  # 3 blocks of 16 channels, 2 of 32: the fraction depends on which are kept
        sizes = [per_block[b] for b in names]
        assert sizes[0] == sizes[1] == sizes[2] < sizes[3] == sizes[4]


# ---------------------------------------------------------------- (d) the compact module

@pytest.mark.parametrize("skip", [{"stages.0.1"}, {"stages.0.1", "stages.0.2"}, {"stages.0.2", "stages.1.1"}])
def test_compact_path_equals_the_resnet_without_those_blocks(skip):
    torch.manual_seed(0)
    model = resnet3()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    mask = Mask({g.name: torch.arange(g.size) for g in SPEC3.groups}, skip=frozenset(skip))
    compact = SPEC3.build(SPEC3.gather(state, mask), mask)
    assert set(compact.state_dict()) == set(state) - {k for b in skip for k in state if k.startswith(b + ".")}
    ref = model
    for block in skip:
        ref = _by_hand("resnet", ref, block)
    x = torch.randn(6, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    y = torch.arange(6) % 10
    compact.eval(), ref.eval()
    with torch.no_grad():
        torch.testing.assert_close(compact(x), ref(x), atol=1e-6, rtol=1e-5)
    compact.train(), ref.train()
    for m in (compact, ref):
        torch.nn.functional.cross_entropy(m(x), y).backward()
    ref_grads = dict(ref.named_parameters())
    for name, p in compact.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        torch.testing.assert_close(p.grad, ref_grads[name].grad, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("skip", [{"blocks.0.ffn", "blocks.1.attn"},
                                  {"blocks.0.attn", "blocks.0.ffn", "blocks.1.attn"}])
def test_compact_path_equals_the_transformer_without_those_branches(skip):
    """Consecutive skipped branches (an add whose identity is a skipped add) on the transformer."""
    tokens = torch.randint(0, 16, (3, 8), generator=torch.Generator().manual_seed(0))
    spec = analyze(MHATransformer, tokens, verify=False)
    torch.manual_seed(0)
    model = MHATransformer().eval()
    mask = Mask({}, skip=frozenset(skip))
    compact = spec.build(spec.gather(model.state_dict(), mask), mask).eval()
    for block in skip:
        model = _by_hand("mha", model, block)
    with torch.no_grad():
        torch.testing.assert_close(compact(tokens), model(tokens), atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- (e) a real Flower simulation

NUM_NODES = 3
SIM = {"strategy": "random-path", "model": "resnet", "blocks-per-stage": 3, "path-length": "0.6,1.0",
       "dataset": "digits", "partitioning": "iid", "num-nodes": NUM_NODES, "num-server-rounds": 2,
       "local-steps": 2, "lr": 0.05, "momentum": 0.9, "batch-size": 32, "seed": 0}


def _npy_bytes(t: torch.Tensor) -> int:
    buf = io.BytesIO()
    np.save(buf, t.numpy())
    return len(buf.getvalue())


@pytest.mark.slow
@pytest.mark.skipif(bool(missing_binaries("flwr", "flower-superlink")), reason="Flower executables not installed")
def test_flwr_run_random_path_resnet_on_digits(tmp_path):
    home = tmp_path / "flwr-home"
    (port,) = free_ports(1)
    write_flower_config(home, "fl-subnet-sim", f"127.0.0.1:{port}", simulation_options(NUM_NODES))
    procs = Processes(tmp_path / "logs", flower_env(home))
    out_dir = tmp_path / "random-path"
    scenario = tmp_path / "random-path.toml"
    scenario.write_text(tomli_w.dumps({**SIM, "out-dir": str(out_dir)}))
    try:
        start_superlink(procs, port, simulation=True)
        flwr_run(procs, "fl-subnet-sim", scenario, out_dir, timeout=240)
    except BaseException:
        print(procs.tails())
        raise
    finally:
        procs.stop_all()
    rows = json.loads((out_dir / "metrics.json").read_text())
    assert [r["server-round"] for r in rows] == [0, 1, 2]
    assert all(math.isfinite(r["eval-acc"]) and math.isfinite(r["full-train-loss"]) for r in rows), rows
    # the path formula: per node, the tensors outside the blocks plus the blocks on its path
    cfg = RunConfig.from_mapping(SIM)
    torch.manual_seed(0)
    state = factory_for(cfg)().state_dict()
    block = {b: sum(_npy_bytes(t) for k, t in state.items() if k.startswith(b + ".")) for b in BLOCKS3}
    rest = sum(_npy_bytes(t) for t in state.values()) - sum(block.values())
    sampler = build_strategy(cfg, factory_for(cfg), example_input=example_input(cfg)).sampler
    assert [sampler.length(r) for r in (1, 2)] == [3, 5]  # ceil(0.6 * 5), then the full path
    raw = _block_bytes(state, BLOCKS3)
    raw_rest = _raw_bytes(state) - sum(raw.values())
    for row in rows[1:]:
        paths = sampler.sample([], row["server-round"], NUM_NODES)
        # a path: exactly its raw bytes, packed into two raw arrays (float, int); the full
        # model: Flower's one .npy per tensor
        want = sum(raw_rest + sum(raw[b] for b in BLOCKS3 if b not in m.skip) if m.skip
                   else rest + sum(block.values()) for m in paths)
        assert row["bytes-up"] == want, (row["server-round"], row["bytes-up"], want)
        assert 0 < row["bytes-down"] - row["bytes-up"] < 2000 * NUM_NODES  # the same slices plus the configs
    full = NUM_NODES * (rest + sum(block.values()))
    assert rows[2]["bytes-up"] == full and rows[1]["bytes-up"] < full
