"""FjORD (Horváth et al., NeurIPS 2021): ordered dropout per batch on the node, nested
max-width slices down, per-entry example-weighted mean over holders up.

Checked against: a hand-computed aggregation and a plain-numpy implementation of the rule
with the nested blocks written out by hand; one SGD step of the gated max-width model ≡
one step of the compact width-p model (MLP, CNNs with and without BatchNorm, attention
heads); per-entry update counts of a client's local training ≡ a numpy count from the
drawn widths; the shapes each node receives; FjORD with the single width 1 ≡ FedAvg;
the per-unit output scale on the wire; a short run on digits.
"""

import contextlib
import functools

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flwr.app import ArrayRecord, ConfigRecord, RecordDict
from torch.utils.data import TensorDataset

from fl_subnet import analyze
from fl_subnet.clients import make_client_app, train_local
from fl_subnet.clients.compact import width_schedule
from fl_subnet.core.compact import build_compact_graph
from fl_subnet.core.unit_scale import set_unit_scales, unit_scales
from fl_subnet.core.masks import Mask
from fl_subnet.core.ordered import build_ordered, ordered_width, set_width, width_generator
from fl_subnet.core.samplers import NestedPrefixSampler
from fl_subnet.experiments.inprocess_grid import InProcessGrid
from fl_subnet.models import CNNBN, MLP, FlowerCNN, MHATransformer
from fl_subnet.strategies import FjORD, SubnetFedAvg
from fl_subnet.strategies.replies import payload_bytes
from fl_subnet.wire import FJORD_WIDTHS, arrays_to_state, mask_from_config, mask_to_config, widths_from_config

WIDTHS = (0.2, 0.4, 0.6, 0.8, 1.0)


def ceil_prefix(size: int, p: float) -> int:
    """FjORD's ⌈p·size⌉ (at least 1), written independently of samplers.prefix_size."""
    return max(1, int(np.ceil(p * size - 1e-9)))


def numpy_max_width(capacity: float) -> float:
    return max(w for w in WIDTHS if w <= capacity + 1e-12)


mlp = functools.partial(MLP, 6, [10, 7], 3)
cnn = functools.partial(FlowerCNN, 1, 10, 8)


def cnn_blocks(p: float) -> dict[str, tuple[int, ...]]:
    """The nested width-p block of every FlowerCNN(1, 10, 8) tensor, by hand: channels
    then neurons in order; fc1's input is conv2's channels, each owning 2·2 positions."""
    k1, k2, k3, k4 = (ceil_prefix(n, p) for n in (6, 16, 120, 84))
    return {"conv1.weight": (k1, 1, 3, 3), "conv1.bias": (k1,), "conv2.weight": (k2, k1, 3, 3), "conv2.bias": (k2,),
            "fc1.weight": (k3, 4 * k2), "fc1.bias": (k3,), "fc2.weight": (k4, k3), "fc2.bias": (k4,),
            "fc3.weight": (10, k4), "fc3.bias": (10,)}


def sized_data(sizes):
    """load_data giving partition i a training set of sizes[i] Gaussian rows."""
    def load(context):
        pid = int(context.node_config["partition-id"])
        g = torch.Generator().manual_seed(10 + pid)
        n = sizes[pid]
        x = torch.randn(n, 1, 8, 8, generator=g)
        return TensorDataset(x, torch.randint(0, 3, (n,), generator=g)), None
    return load


def run_round(strategy, factory, load, train_fn, nodes=3, init=None, **cfg):
    torch.manual_seed(0)
    init = factory().state_dict() if init is None else init
    grid = InProcessGrid(make_client_app(factory, load, train_fn), nodes)
    config = ConfigRecord({"local-steps": 2, "lr": 0.05, "batch-size": 0, "loss": "cross-entropy", "seed": 3, **cfg})
    messages = list(strategy.configure_train(1, ArrayRecord(init), config, grid))
    replies = list(grid.send_and_receive(messages))
    arrays, metrics = strategy.aggregate_train(1, replies)
    return init, messages, replies, arrays_to_state(arrays), metrics


# ---------------------------------------------------------------------------- (a) aggregation
def test_aggregation_by_hand():
    """Group '1' (10 units), max widths 0.2 / 0.6 / 1.0 → nodes hold units 0-1 / 0-5 / 0-9
    with values 1 / 4 / 10 and 1 / 2 / 3 examples: unit 0 → (1·1 + 4·2 + 10·3)/6 = 6.5,
    unit 4 → (4·2 + 10·3)/5 = 7.6, unit 9 → 10 (a count mean would give 5, 7, 10)."""
    value = {1: 1.0, 2: 4.0, 3: 10.0}

    def fill(model, data, cfg, seed, before_step=None):
        with torch.no_grad():
            for p in model.parameters():
                p.fill_(value[len(data)])
        return len(data), 0.0

    def load(context):
        n = int(context.node_config["partition-id"]) + 1
        return TensorDataset(torch.randn(n, 6), torch.zeros(n, dtype=torch.long)), None

    strategy = FjORD(mlp, capacity_tiers=(0.2, 0.6, 1.0), fraction_evaluate=0.0, min_available_nodes=3)
    _, _, _, out, metrics = run_round(strategy, mlp, load, fill)
    assert metrics["num-replies"] == 3
    bias = out["1.bias"]
    assert bias[0] == pytest.approx(6.5) and bias[1] == pytest.approx(6.5)
    assert bias[2] == pytest.approx(7.6) and bias[4] == pytest.approx(7.6) and bias[9] == pytest.approx(10.0)
    assert out["5.bias"].tolist() == pytest.approx([6.5] * 3)  # the output layer's bias: every node holds it


@pytest.mark.parametrize("seed", range(3))
def test_aggregation_equals_numpy_rule(seed):
    """Random replies of 3 tiers on the Flower CNN: each entry is the example-weighted mean
    over the nodes whose max-width block holds it (blocks written out by hand), else the
    old value; each node's reply has exactly its block's shape."""
    rng = np.random.default_rng(seed)
    tiers = tuple(float(t) for t in rng.choice([0.25, 0.3, 0.5, 0.7, 1.0], size=3, replace=False))
    sizes = [int(s) for s in rng.integers(1, 20, size=3)]

    def randomize(model, data, cfg, s, before_step=None):
        g = torch.Generator().manual_seed(1000 * seed + len(data))
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(torch.randn(p.shape, generator=g))
        return len(data), 0.0

    strategy = FjORD(cnn, capacity_tiers=tiers, fraction_evaluate=0.0, min_available_nodes=3,
                     example_input=torch.zeros(1, 1, 8, 8))
    init, messages, replies, out, _ = run_round(strategy, cnn, sized_data(sizes), randomize)
    node_of = {m.metadata.message_id: m.metadata.dst_node_id for m in messages}
    num = {k: np.zeros(v.shape) for k, v in init.items()}
    den = {k: np.zeros(v.shape) for k, v in init.items()}
    for reply in replies:
        node = node_of[reply.metadata.reply_to_message_id]
        p_max = numpy_max_width(tiers[strategy._order.index(node) % 3])
        n = reply.content["metrics"]["num-examples"]
        compact = strategy.slice_state(reply.content["arrays"], node)
        for key, shape in cnn_blocks(p_max).items():
            assert tuple(compact[key].shape) == shape, (key, p_max)
            block = tuple(slice(0, s) for s in shape)
            num[key][block] += n * compact[key].numpy()
            den[key][block] += n
    for key, old in init.items():
        want = np.where(den[key] > 0, num[key] / np.maximum(den[key], 1e-300), old.numpy())
        np.testing.assert_allclose(out[key].numpy(), want, rtol=1e-5, atol=1e-6, err_msg=key)


# ---------------------------------------------------------------------------- (b) width ≡ compact
def _sgd_step(model, x, y, ctx=contextlib.nullcontext()):
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    with ctx:
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return float(loss.detach())


MODELS = {
    "mlp": (functools.partial(MLP, 64, [32, 20], 10), lambda g: torch.randn(16, 1, 8, 8, generator=g), 10),
    "cnn": (cnn, lambda g: torch.randn(16, 1, 8, 8, generator=g), 10),
    "cnn-bn": (functools.partial(CNNBN, 1, 10, 8), lambda g: torch.randn(16, 1, 8, 8, generator=g), 10),
    "attention": (functools.partial(MHATransformer, 12, 6, 16, 4, 32, 2, 2),
                  lambda g: torch.randint(0, 12, (16, 6), generator=g), 2),
}


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("p_max,p", [(0.8, 0.4), (1.0, 0.2), (0.6, 0.6)])
def test_one_step_at_width_p_equals_the_compact_width_p_model(name, p_max, p):
    factory, make_x, classes = MODELS[name]
    g = torch.Generator().manual_seed(7)
    x, y = make_x(g), torch.randint(0, classes, (16,), generator=g)
    spec = analyze(factory, x[:1], verify=False)
    torch.manual_seed(1)
    state = factory().state_dict()
    m_max, m_p = NestedPrefixSampler(scale=False).sample(spec.groups, 1, 2, capacities=[p_max, p])
    gated = build_ordered(spec, spec.gather(state, m_max), m_max)
    direct = spec.build(spec.gather(state, m_p), m_p)
    assert _sgd_step(gated, x, y, ordered_width(gated, p)) == pytest.approx(_sgd_step(direct, x, y), abs=1e-6)
    after = spec.scatter(gated.state_dict(), m_max, state)  # the gated node's result in the full model
    trained = spec.gather(after, m_p)
    for key, value in direct.state_dict().items():
        torch.testing.assert_close(trained[key], value, atol=1e-6, rtol=0, msg=key)
    held = spec.scatter({k: torch.ones_like(v) for k, v in direct.state_dict().items()}, m_p,
                        {k: torch.zeros_like(v) for k, v in state.items()})
    for key, old in state.items():  # entries outside the width-p prefix: untouched (BatchNorm statistics too)
        outside = held[key] == 0
        assert torch.equal(after[key][outside], old[outside]), key
    gated.eval()
    direct_max = spec.build(spec.gather(after, m_max), m_max).eval()
    with torch.no_grad():  # back at its max width after the block
        torch.testing.assert_close(gated(x), direct_max(x), atol=1e-6, rtol=0)


def test_width_errors():
    spec = analyze(mlp, torch.zeros(1, 6), verify=False)
    state = mlp().state_dict()
    (m,) = NestedPrefixSampler().sample(spec.groups, 1, 1, capacities=[0.5])
    model = build_ordered(spec, spec.gather(state, m), m)
    with pytest.raises(ValueError, match="group '1'.*above its max width"):
        set_width(model, 0.8)
    with pytest.raises(ValueError, match=r"width must be a number in \(0, 1\]"):
        set_width(model, 0.0)
    with pytest.raises(ValueError, match="build_ordered"):
        set_width(spec.build(spec.gather(state, m), m), 0.5)


# ---------------------------------------------------------------------------- (c) the client's widths
def _levels(size: int, allowed) -> np.ndarray:
    """Width level of each unit: the index in ``allowed`` of the smallest width whose
    prefix holds it (len(allowed) if none does)."""
    pref = [ceil_prefix(size, w) for w in allowed]
    return np.array([next((i for i, k in enumerate(pref) if j < k), len(allowed)) for j in range(size)])


def test_client_widths_and_per_entry_update_counts():
    """fl-subnet's ClientApp on FjORD messages: the widths come from the node's allowed
    set, reproducibly from (seed, round, partition), and each entry of the MLP is updated
    exactly in the steps whose width's prefix holds all its units."""
    tiers, steps, seed = (0.5, 1.0, 0.7), 40, 3
    records = {}

    def spy(model, data, cfg, s, before_step=None):
        snaps = []

        def hook(step):
            snaps.append({k: v.detach().clone() for k, v in model.state_dict().items()})
            before_step(step)

        out = train_local(model, data, cfg, s, before_step=hook)
        snaps.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        records[len(data)] = (snaps, list(before_step.history), before_step.widths)
        return out

    def load(context):
        pid = int(context.node_config["partition-id"])
        g = torch.Generator().manual_seed(pid)
        n = 64 + pid  # full batches of Gaussian rows
        return TensorDataset(torch.randn(n, 6, generator=g), torch.randint(0, 3, (n,), generator=g)), None

    torch.manual_seed(0)
    init = mlp().state_dict()
    init["1.bias"].fill_(2.0)  # every hidden unit active on (almost) every row: no unit silent on a batch
    init["3.bias"].fill_(2.0)
    strategy = FjORD(mlp, capacity_tiers=tiers, fraction_evaluate=0.0, min_available_nodes=3)
    run_round(strategy, mlp, load, spy, init=init, **{"local-steps": steps, "lr": 0.01, "seed": seed})
    for pid, tier in enumerate(tiers):
        snaps, history, allowed = records[64 + pid]
        p_max = numpy_max_width(tier)
        assert allowed == tuple(w for w in WIDTHS if w <= p_max)
        assert set(history) <= set(allowed) and len(history) == steps
        assert len(set(history)) == len(allowed)  # 40 uniform draws hit every allowed width
        gen = width_generator(seed, 1, pid)  # (seed, server-round, partition) alone
        assert history == [allowed[int(torch.randint(len(allowed), (1,), generator=gen))] for _ in range(steps)]
        lv1, lv3 = _levels(10, allowed), _levels(7, allowed)
        k1, k3 = ceil_prefix(10, p_max), ceil_prefix(7, p_max)
        level = {"1.weight": lv1[:k1, None] * np.ones((1, 6)), "1.bias": lv1[:k1],
                 "3.weight": np.maximum(lv3[:k3, None], lv1[None, :k1]), "3.bias": lv3[:k3],
                 "5.weight": np.ones((3, 1)) * lv3[None, :k3], "5.bias": np.zeros(3)}
        step_level = np.array([allowed.index(w) for w in history])
        for key, lv in level.items():
            counted = sum((snaps[t + 1][key] != snaps[t][key]).numpy().astype(int) for t in range(steps))
            expected = (step_level[:, None] >= lv.reshape(-1)[None, :]).sum(0).reshape(lv.shape)
            np.testing.assert_array_equal(counted, expected, err_msg=f"partition {pid} {key}")


def test_user_loop_helper_and_inactive_schedule():
    """width_schedule() in a user's own loop: inactive (a no-op) for a non-FjORD message."""
    from fl_subnet.clients import receive

    spec = analyze(mlp, torch.zeros(1, 6), verify=False)
    state = mlp().state_dict()
    (m,) = NestedPrefixSampler().sample(spec.groups, 1, 1, capacities=[0.6])
    config = {**mask_to_config(m, spec.groups), "server-round": 2, "seed": 5}
    content = RecordDict({"arrays": ArrayRecord(spec.gather(state, m)), "config": ConfigRecord(config)})
    plain = receive(content, mlp)
    with width_schedule(plain, 1) as schedule:
        assert not schedule.active and schedule(0) is None
    content["config"][FJORD_WIDTHS] = "0.2,0.6"
    got = receive(content, mlp)
    assert got.widths == (0.2, 0.6)
    with width_schedule(got, 1) as schedule:
        widths = [schedule(t) for t in range(10)]
    assert set(widths) <= {0.2, 0.6} and widths == schedule.history
    content["config"][FJORD_WIDTHS] = "0.2,0.8"
    with pytest.raises(ValueError, match="above its max width"):
        width_schedule(receive(content, mlp), 1)
    for bad in ("0.2,x", "0,0.5", ""):
        with pytest.raises(ValueError, match="'fjord-widths'"):
            widths_from_config({FJORD_WIDTHS: bad})


# ---------------------------------------------------------------------------- (d) what each node receives
def test_each_node_receives_its_max_width_slice_and_widths():
    tiers = (0.25, 0.5, 1.0)

    def nothing(model, data, cfg, s, before_step=None):
        return len(data), 0.0

    strategy = FjORD(cnn, capacity_tiers=tiers, fraction_evaluate=0.0, min_available_nodes=3,
                     example_input=torch.zeros(1, 1, 8, 8))
    _, messages, _, _, metrics = run_round(strategy, cnn, sized_data([5, 6, 7]), nothing)
    seen = set()
    for msg in messages:
        tier = tiers[strategy._order.index(msg.metadata.dst_node_id) % 3]
        p_max = numpy_max_width(tier)
        seen.add(p_max)
        got = {k: tuple(v.shape) for k, v in strategy.slice_state(msg.content["arrays"], msg.metadata.dst_node_id).items()}
        assert got == cnn_blocks(p_max), p_max
        assert widths_from_config(msg.content["config"]) == tuple(w for w in WIDTHS if w <= p_max)
    assert seen == {0.2, 0.4, 1.0}
    assert metrics["bytes-down"] == sum(payload_bytes(m.content["arrays"], m.content["config"]) for m in messages)


def test_single_width_one_equals_fedavg():
    """FjORD with widths (1.0,) and one tier 1.0 is FedAvg: bit-identical aggregate."""
    def load(context):
        pid = int(context.node_config["partition-id"])
        g = torch.Generator().manual_seed(pid)
        n = 20 + pid
        return TensorDataset(torch.randn(n, 6, generator=g), torch.randint(0, 3, (n,), generator=g)), None

    outs = []
    for strategy in (FjORD(mlp, widths=(1.0,), fraction_evaluate=0.0, min_available_nodes=3),
                     SubnetFedAvg(mlp, order_by_partition=True, fraction_evaluate=0.0, min_available_nodes=3)):
        outs.append(run_round(strategy, mlp, load, train_local, **{"batch-size": 8, "local-steps": 4})[3])
    for key in outs[0]:
        assert torch.equal(outs[0][key], outs[1][key]), key


def test_constructor_and_run_config():
    from fl_subnet.experiments.config import RunConfig
    from fl_subnet.strategies import build_strategy

    with pytest.raises(ValueError, match="capacity tier 0.1 is below FjORD's smallest width 0.2"):
        FjORD(mlp, capacity_tiers=(0.1, 1.0))
    with pytest.raises(ValueError, match="widths"):
        FjORD(mlp, widths=(0.0, 1.0))
    strategy = build_strategy(RunConfig(strategy="fjord", capacity_tiers="0.25,0.5,1.0", model="mlp"), mlp)
    assert isinstance(strategy, FjORD) and strategy.capacity_tiers == (0.25, 0.5, 1.0)
    assert not strategy.sampler.scale and strategy.weighted  # no 1/p scaler; example-weighted mean
    assert [strategy.max_width(r) for r in (0.25, 0.5, 0.99, 1.0)] == [0.2, 0.4, 0.8, 1.0]
    assert strategy.allowed_widths(0.5) == (0.2, 0.4)


# ---------------------------------------------------------------------------- per-unit output scale
def test_per_unit_scale_round_trips_and_is_validated():
    spec = analyze(mlp, torch.zeros(1, 6), verify=False)
    idx = {"1": torch.tensor([0, 3, 4, 8]), "3": torch.tensor([1, 2])}
    scale = {"1": torch.tensor([0.5, 2.0, 1.25, 3.0]), "3": 1.5}
    config = mask_to_config(Mask(idx, scale), spec.groups)
    assert config["scale"] == [0.0, 1.5]  # 0 marks group 1's per-unit scales; floats stay floats
    assert config["unit-scales"] == scale["1"].numpy().astype("<f4").tobytes()  # 16 bytes
    back = mask_from_config(config, spec.groups)
    assert torch.equal(back.scale["1"], scale["1"]) and back.scale["3"] == 1.5
    assert torch.equal(back.indices["1"], idx["1"])
    with pytest.raises(ValueError, match="group '1': a per-unit scale must have shape \\(4,\\)"):
        mask_to_config(Mask(idx, {"1": torch.ones(3)}), spec.groups)
    for bad in (torch.tensor([1.0, -1.0, 1.0, 1.0]), torch.tensor([1.0, float("nan"), 1.0, 1.0]),
                torch.tensor([1.0, 0.0, 1.0, 1.0])):
        with pytest.raises(ValueError, match="group '1'"):
            mask_to_config(Mask(idx, {"1": bad}), spec.groups)
        with pytest.raises(ValueError, match="'unit-scales' \\(group '1'\\)"):
            mask_from_config({**config, "unit-scales": bad.numpy().astype("<f4").tobytes()}, spec.groups)
    with pytest.raises(ValueError, match="'unit-scales' has 12 bytes, expected 16"):
        mask_from_config({**config, "unit-scales": b"\0" * 12}, spec.groups)
    with pytest.raises(ValueError, match="'unit-scales' has None bytes, expected 16"):
        mask_from_config({k: v for k, v in config.items() if k != "unit-scales"}, spec.groups)
    with pytest.raises(ValueError, match="'scale' must list"):
        mask_from_config({**config, "scale": [0.0, float("inf")]}, spec.groups)


def test_per_unit_scale_passes_validate_gather_and_the_aggregator():
    """A per-unit tensor scale is a valid Mask everywhere a float is (slicing and the
    aggregator's checks ignore the scale), and a wrong length or value names the group."""
    from fl_subnet.core.aggregate import MaskedAggregator

    spec = analyze(mlp, torch.zeros(1, 6), verify=False)
    idx = {"1": torch.tensor([0, 3, 4, 8]), "3": torch.tensor([1, 2])}
    mask = Mask(idx, {"1": torch.tensor([0.5, 2.0, 1.25, 3.0])})
    mask.validate(spec.groups)
    state = mlp().state_dict()
    compact = spec.slicer.gather(state, mask)
    assert mask.scale_of(spec.slicer.by_name["1"]).shape == (4,)
    agg = MaskedAggregator(state, spec.slicer)
    agg.add(compact, mask, 1.0)
    back = spec.slicer.gather(agg.finalize(), mask)  # one holder: the reply itself comes back
    assert all(torch.allclose(back[k], compact[k]) for k in compact)
    with pytest.raises(ValueError, match=r"scale\['1'\] must be a float tensor of shape \(4,\)"):
        Mask(idx, {"1": torch.ones(3)}).validate(spec.groups)
    with pytest.raises(ValueError, match=r"scale\['1'\] must be finite and > 0"):
        Mask(idx, {"1": torch.tensor([1.0, 0.0, 1.0, 1.0])}).validate(spec.groups)


def test_per_unit_scale_build_equals_reference_and_set_unit_scales():
    """A per-unit scale on the compact CNN ≡ the full reference with those scales; a model
    built with the group dynamic at scale 1 and then set_unit_scales(...) ≡ the same."""
    spec = analyze(cnn, torch.zeros(1, 1, 8, 8), verify=False)
    torch.manual_seed(0)
    state = cnn().state_dict()
    idx = {"conv2": torch.tensor([0, 2, 5, 9, 15]), "fc1": torch.arange(0, 120, 3)}
    scale = {"conv2": torch.tensor([0.5, 1.0, 2.0, 0.25, 3.0]), "fc1": torch.linspace(0.5, 1.5, 40)}
    x = torch.randn(4, 1, 8, 8)
    compact = spec.gather(state, Mask(idx))
    with torch.no_grad():
        ref = spec.reference(state, Mask(idx, scale)).eval()(x)
        built = spec.build(compact, Mask(idx, scale)).eval()(x)
        dyn = build_compact_graph(spec.graph, spec.resolved, compact, spec.slicer, Mask(idx),
                                  blocks={}, dynamic=["conv2", "fc1"]).eval()
        before = dyn(x)
        set_unit_scales(dyn, scale)
        after = dyn(x)
    torch.testing.assert_close(built, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(after, ref, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(before, after)
    assert torch.equal(unit_scales(dyn)["conv2"], scale["conv2"])
    with pytest.raises(ValueError, match="group 'conv2' must have shape \\(5,\\)"):
        set_unit_scales(dyn, {"conv2": torch.ones(4)})
    with pytest.raises(ValueError, match="'conv1' has no output-scale site"):
        set_unit_scales(dyn, {"conv1": torch.ones(6)})


# ---------------------------------------------------------------------------- (e) a short run
@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.slow
def test_fjord_run_on_digits(one_thread):
    from fl_subnet.app.client_app import app
    from fl_subnet.experiments.config import RunConfig
    from fl_subnet.experiments.experiment import run_server

    rc = {"strategy": "fjord", "model": "cnn", "dataset": "digits", "capacity-tiers": "0.25,0.5,1.0",
          "num-server-rounds": 2, "num-nodes": 3, "partitioning": "iid", "local-steps": 200, "lr": 0.05,
          "momentum": 0.9, "batch-size": 32, "seed": 0}
    rows = []
    run_server(InProcessGrid(app, 3, run_config=rc), RunConfig.from_mapping(rc), rows.append)
    assert [r["server-round"] for r in rows] == [0, 1, 2]
    assert rows[-1]["eval-acc"] > 0.2  # chance: 0.1 (measured 0.456)
    full = sum(v.numel() * 4 for v in cnn().state_dict().values())
    assert rows[-1]["bytes-down"] < 3 * full  # nodes of width 0.2 / 0.4 never receive the full model


def test_run_config_fjord_widths_reach_the_strategy_and_are_checked():
    from fl_subnet.experiments.config import RunConfig
    from fl_subnet.experiments.experiment import factory_for
    from fl_subnet.strategies.registry import build_strategy

    cfg = RunConfig.from_mapping({"strategy": "fjord", "fjord-widths": "0.25,0.5,1.0", "capacity-tiers": "0.25,1.0"})
    s = build_strategy(cfg, factory_for(cfg))
    assert s.widths == (0.25, 0.5, 1.0) and s.allowed_widths(0.5) == (0.25, 0.5)
    with pytest.raises(ValueError, match=r"capacity-tiers \(0.1,1.0\) has a tier 0.1 below the smallest of "
                                         r"fjord-widths"):
        RunConfig.from_mapping({"strategy": "fjord", "capacity-tiers": "0.1,1.0"})
