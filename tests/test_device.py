"""Devices (run-config keys ``device`` and ``amp``): where a node trains and evaluates.

This machine has no GPU, so the CUDA path is exercised only through what can be checked
on a CPU: ``device = "cpu"`` (and ``"auto"``, which is the CPU here) is bit for bit the
plain training loop and the run without the key; ``cuda`` is refused with one clear error
naming ``device``, by the run config's form check, the node and ``fl-subnet``; bf16
autocast runs whole rounds through ``Strategy.start`` and Flower's serde; FjORD's width
changes and BatchNorm buffer restores follow a model moved to another device (the
``meta`` device stands in for a GPU: a tensor left on the CPU fails there).
"""

import functools
import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from flwr.app import ArrayRecord, ConfigRecord, Context, RecordDict
from torch import nn
from torch.utils.data import TensorDataset

from fl_subnet import analyze
from fl_subnet.clients import TrainConfig, evaluate_model, make_client_app, node_device, train_local
from fl_subnet.clients.train import make_loader
from fl_subnet.core.device import autocast, check_amp, check_device_name, grad_scaler, model_device, resolve_device
from fl_subnet.core.ordered import WidthSchedule, build_ordered, set_width, width_generator
from fl_subnet.core.samplers import NestedPrefixSampler
from fl_subnet.experiments.config import RunConfig
from fl_subnet.experiments.inprocess_grid import InProcessGrid
from fl_subnet.strategies import FederatedDropout, FjORD
from fl_subnet.wire import arrays_to_state
from strategy_helpers import central_loss, factory, initial_arrays, load_data, train_config
from models_extra import TinyBN

NO_CUDA = not torch.cuda.is_available()
needs_no_cuda = pytest.mark.skipif(not NO_CUDA, reason="checks the error of a machine without CUDA")
C1, C2, CLASSES = TinyBN.C1, TinyBN.C2, TinyBN.CLASSES
EXAMPLE = torch.zeros(2, 1, 6, 6)


def bn_data(context):
    n = 2 * int(context.node_config["partition-id"]) + 6
    gen = torch.Generator().manual_seed(n)
    return TensorDataset(torch.randn(n, 1, 6, 6, generator=gen), torch.randint(CLASSES, (n,), generator=gen)), None


def assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key


def data(n=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g)
    return TensorDataset(x, (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long())


# ----------------------------------------------------------- (a) device "cpu" changes nothing
@pytest.mark.parametrize("device", [None, "cpu", "auto", torch.device("cpu")])
def test_train_local_on_the_cpu_is_the_plain_loop_bit_for_bit(device):
    """``train_local(..., device=d)`` for the CPU (and None, the model's own device) equals
    a plain SGD loop written out here: every tensor and the loss, bit for bit."""
    cfg = TrainConfig(local_steps=7, lr=0.1, momentum=0.9, weight_decay=1e-3, batch_size=8)
    torch.manual_seed(0)
    ours, ref = factory(), factory()
    ref.load_state_dict(ours.state_dict())
    n, loss = train_local(ours, data(), cfg, seed=5, **({} if device is None else {"device": device}))

    opt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    batches = itertools.islice(itertools.chain.from_iterable(itertools.repeat(make_loader(data(), 8, True, 5))), 7)
    total = 0.0
    ref.train()
    for x, y in batches:
        out = F.cross_entropy(ref(x), y)
        opt.zero_grad()
        out.backward()
        opt.step()
        total += float(out.detach())
    assert n == 40 and loss == total / 7
    assert_same_state(ours.state_dict(), ref.state_dict())
    assert model_device(ours) == torch.device("cpu")


def _round_trip(strategy, model_factory, load, rounds=2, run_config=None, node_configs=None, nodes=3, **cfg):
    torch.manual_seed(0)
    init = ArrayRecord(model_factory().state_dict())
    grid = InProcessGrid(make_client_app(model_factory, load), nodes, run_config=run_config,
                         node_configs=node_configs)
    config = ConfigRecord({"local-steps": 3, "lr": 0.05, "batch-size": 4, "loss": "cross-entropy", "seed": 3, **cfg})
    result = strategy().start(grid=grid, initial_arrays=init, num_rounds=rounds, train_config=config)
    return arrays_to_state(result.arrays), result


def _nodes(device, n=3):
    return [{"partition-id": i, "num-partitions": n, "device": device} for i in range(n)]


ROUND_CASES = {
    # federated dropout on the MLP: masks, 1/ξ scales, packed slices
    "federated-dropout": (lambda: FederatedDropout(factory, 0.5, seed=1, fraction_evaluate=0.0,
                                                   min_available_nodes=3), factory, load_data),
    # FjORD with per-width BatchNorm statistics: per-batch width changes, buffer restores, fjord-bn both ways
    "fjord-per-width-bn": (lambda: FjORD(TinyBN, capacity_tiers=(0.5, 1.0), widths=(0.25, 0.5, 1.0), bn="per-width",
                                         example_input=EXAMPLE, fraction_evaluate=0.0, min_available_nodes=3),
                           TinyBN, bn_data),
}


@pytest.mark.parametrize("case", sorted(ROUND_CASES))
def test_rounds_with_device_cpu_equal_the_rounds_without_the_key(case):
    """Whole rounds through ``Strategy.start`` and Flower's serde: run config ``device =
    "cpu"``, ``"auto"`` (the CPU here) and a node-config override give the model of the
    run without the key, bit for bit."""
    make, model_factory, load = ROUND_CASES[case]
    base, result = _round_trip(make, model_factory, load)
    assert all(m["num-replies"] == 3 and m["num-rejected"] == 0 for m in result.train_metrics_clientapp.values())
    variants = [{"run_config": {"device": "cpu"}}, {"node_configs": _nodes("cpu")}]
    if NO_CUDA:
        variants.append({"run_config": {"device": "auto"}})
    for kwargs in variants:
        got, _ = _round_trip(make, model_factory, load, **kwargs)
        assert_same_state(got, base)


def test_evaluate_model_on_the_cpu_is_unchanged():
    torch.manual_seed(0)
    model = factory()
    plain = evaluate_model(model, data(), "cross-entropy")
    assert evaluate_model(model, data(), "cross-entropy", device="cpu") == plain


# ------------------------------------------------------------------------------- (b) "auto"
def test_auto_is_cuda_if_available_else_cpu():
    want = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("auto") == resolve_device(None) == want
    assert RunConfig().device == "auto" and RunConfig().amp == "none"
    assert node_device(Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})) == want
    assert resolve_device("cpu") == torch.device("cpu")


def test_node_config_overrides_the_run_config():
    ctx = Context(run_id=1, node_id=1, node_config={"device": "cpu"}, state=RecordDict(),
                  run_config={"device": "cuda:3"})
    assert node_device(ctx) == torch.device("cpu")


# ---------------------------------------------------------------------- (c) bad values, cuda
@pytest.mark.parametrize("value", ["tpu", "CPU", "cuda:", "cuda:-1", "cuda:01", "cuda:0 ", "gpu", "", 0, None, True])
def test_bad_device_values_name_the_key(value):
    with pytest.raises(ValueError, match="^device must be"):
        RunConfig(device=value)
    with pytest.raises(ValueError, match="device"):
        check_device_name(value)
    if value is not None:
        ctx = Context(run_id=1, node_id=1, node_config={"device": value}, state=RecordDict(), run_config={})
        with pytest.raises(ValueError, match="^node-config key 'device' must be"):
            node_device(ctx)


@pytest.mark.parametrize("value", ["auto", "cpu", "cuda", "cuda:0", "cuda:12"])
def test_device_names_are_accepted_as_given(value):
    assert RunConfig(device=value).device == value  # syntax only: the node checks its hardware


@needs_no_cuda
@pytest.mark.parametrize("value", ["cuda", "cuda:0", "cuda:1"])
def test_cuda_without_cuda_is_one_clear_error(value):
    with pytest.raises(ValueError, match=rf"^device is '{value}' but this machine has no usable CUDA device"):
        resolve_device(value)
    with pytest.raises(ValueError, match="^device is 'cuda"):
        train_local(factory(), data(), TrainConfig(), device=value)
    with pytest.raises(ValueError, match="^device is 'cuda"):
        evaluate_model(factory(), data(), "cross-entropy", device=value)


@needs_no_cuda
def test_a_node_without_cuda_refuses_the_round_naming_device(caplog):
    """Run config ``device = "cuda"`` on nodes without CUDA: every node answers with an
    error naming the key (one per node, no training), the strategy rejects them all and
    keeps the model."""
    strategy = FederatedDropout(factory, 0.5, seed=1, fraction_evaluate=0.0, min_available_nodes=2)
    grid = InProcessGrid(make_client_app(factory, load_data), 2, run_config={"device": "cuda"})
    init = initial_arrays()
    messages = list(strategy.configure_train(1, init, train_config(), grid))
    replies = list(grid.send_and_receive(messages))
    assert all(r.has_error() for r in replies)
    for r in replies:
        assert "run-config key 'device' is 'cuda' but this machine has no usable CUDA device" in r.error.reason
    arrays, metrics = strategy.aggregate_train(1, replies)
    assert metrics["num-replies"] == 0 and metrics["num-rejected"] == 2
    # a node that overrides the run config trains on its CPU
    grid = InProcessGrid(make_client_app(factory, load_data), 2, run_config={"device": "cuda"},
                         node_configs=_nodes("cpu", 2))
    replies = list(grid.send_and_receive(list(strategy.configure_train(1, init, train_config(), grid))))
    assert not any(r.has_error() for r in replies)


@needs_no_cuda
def test_fl_subnet_refuses_cuda_on_this_machine(tmp_path):
    from fl_subnet.experiments.cli import load_scenario

    path = tmp_path / "gpu.toml"
    path.write_text('device = "cuda"\n')
    with pytest.raises(ValueError, match=r"gpu\.toml: device is 'cuda' but this machine has no usable CUDA"):
        load_scenario(path)
    path.write_text('amp = "fp16"\n')
    with pytest.raises(ValueError, match=r"gpu\.toml: amp 'fp16' needs a CUDA device"):
        load_scenario(path)


def test_bad_amp_values_name_the_key():
    with pytest.raises(ValueError, match="^amp must be one of"):
        RunConfig(amp="fp8")
    with pytest.raises(ValueError, match="^amp 'fp16' needs a CUDA device"):
        RunConfig(amp="fp16", device="cpu")
    assert RunConfig(amp="fp16", device="cuda").amp == "fp16"  # the node decides
    with pytest.raises(ValueError, match="config key 'amp' must be one of"):
        TrainConfig.from_config({"amp": "half"})
    with pytest.raises(ValueError, match="config key 'amp'"):
        TrainConfig.from_config({"amp": 16})
    with pytest.raises(ValueError, match="^amp 'fp16' needs a CUDA device"):
        train_local(factory(), data(), TrainConfig(amp="fp16"), device="cpu")
    with pytest.raises(ValueError, match="^amp 'fp16'"):
        check_amp("fp16", torch.device("cpu"))
    assert grad_scaler(torch.device("cpu"), "bf16") is None
    # the train config carries amp only when it is on: a run without it sends what it did before
    assert "amp" not in RunConfig().train_config() and RunConfig(amp="bf16").train_config()["amp"] == "bf16"
    assert TrainConfig.from_config(RunConfig(amp="bf16").train_config()).amp == "bf16"


# ------------------------------------------------------------------------- (d) bf16 on the CPU
def test_bf16_autocast_on_the_cpu_runs_rounds_and_the_loss_falls():
    """bf16 autocast through ``Strategy.start`` (messages through Flower's serde both
    ways): 4 rounds of federated dropout, every reply accepted, the central loss falls
    each round, and the model differs from the float32 run's (autocast did act)."""
    losses = []

    def evaluate(server_round, arrays):
        losses.append(central_loss(arrays))
        return None

    strategy = FederatedDropout(factory, 0.75, seed=1, fraction_evaluate=0.0, min_available_nodes=4)
    grid = InProcessGrid(make_client_app(factory, load_data), 4)
    result = strategy.start(grid=grid, initial_arrays=initial_arrays(), num_rounds=4,
                            train_config=train_config(amp="bf16", **{"local-steps": 5}), evaluate_fn=evaluate)
    assert [m["num-replies"] for m in result.train_metrics_clientapp.values()] == [4] * 4
    assert all(m["num-rejected"] == 0 for m in result.train_metrics_clientapp.values())
    assert all(math.isfinite(v) for v in losses) and all(b < a for a, b in zip(losses, losses[1:])), losses
    assert losses[-1] < 0.9 * losses[0], losses
    fp32 = FederatedDropout(factory, 0.75, seed=1, fraction_evaluate=0.0, min_available_nodes=4).start(
        grid=InProcessGrid(make_client_app(factory, load_data), 4), initial_arrays=initial_arrays(), num_rounds=4,
        train_config=train_config(**{"local-steps": 5}))
    a, b = arrays_to_state(result.arrays), arrays_to_state(fp32.arrays)
    assert any(not torch.equal(a[k], b[k]) for k in a)
    assert all(a[k].dtype == b[k].dtype == torch.float32 for k in a)  # parameters stay float32


def test_bf16_forward_runs_in_bfloat16():
    model = factory()
    with autocast(torch.device("cpu"), "bf16"):
        assert model(torch.randn(4, 8)).dtype == torch.bfloat16
    with autocast(torch.device("cpu"), "none"):
        assert model(torch.randn(4, 8)).dtype == torch.float32


def test_bf16_fjord_distill_trains_on_the_cpu():
    """FjORD+KD's two passes per batch under bf16 autocast: finite, and the loss falls."""
    spec = analyze(TinyBN, EXAMPLE)
    mask = NestedPrefixSampler(1.0, scale=False).sample(spec.groups, 0, 1, capacities=[1.0])[0]
    torch.manual_seed(0)
    model = build_ordered(spec, spec.gather(TinyBN().state_dict(), mask), mask)
    train, _ = bn_data(Context(run_id=1, node_id=1, node_config={"partition-id": 5}, state=RecordDict(),
                               run_config={}))
    cfg = TrainConfig(local_steps=1, lr=0.1, batch_size=0, amp="bf16")
    before = evaluate_model(model, train, "cross-entropy")["eval-loss"]
    with WidthSchedule(model, (0.5, 1.0), width_generator(0, 1, 0), distill=True) as schedule:
        for _ in range(15):
            model.train()
            _, loss = train_local(model, train, cfg, before_step=schedule, device="cpu")
            assert math.isfinite(loss)
    assert evaluate_model(model, train, "cross-entropy")["eval-loss"] < before


# ------------------------------------------------------- (e) a model on another device (meta)
def test_fjord_width_changes_follow_a_model_on_another_device():
    """FjORD's width gates, unit scales and BatchNorm buffer restores on a model moved off
    the CPU: on the ``meta`` device (a stand-in for a GPU here) any CPU tensor mixed with
    the model's raises, so this runs set_width, forward and backward there, at every width
    and back, with per-width statistics."""
    from fl_subnet.core.ordered import set_width_stats, width_stats_shapes

    spec = analyze(TinyBN, EXAMPLE)
    mask = NestedPrefixSampler(1.0, scale=False).sample(spec.groups, 0, 1, capacities=[1.0])[0]
    torch.manual_seed(0)
    model = build_ordered(spec, spec.gather(TinyBN().state_dict(), mask), mask)
    widths = (0.25, 0.5, 1.0)
    set_width_stats(model, {w: {k: torch.ones(s) for k, s in shapes.items()}
                            for w, shapes in width_stats_shapes(model, widths).items()})
    model.to("meta")
    x = torch.zeros(4, 1, 6, 6, device="meta")
    with WidthSchedule(model, widths, width_generator(0, 1, 0)) as schedule:
        model.train()
        for step in range(6):
            schedule(step)
            model(x).sum().backward()
        set_width(model, 0.25)
        model.eval()
        model(x)
    assert {t.device.type for t in itertools.chain(model.parameters(), model.buffers())} == {"meta"}
    assert len(set(schedule.history)) > 1


def reading_meta():
    """The error of reading a meta tensor's value (``float(t)``), and no other."""
    return pytest.raises((RuntimeError, NotImplementedError),
                         match="cannot be called on meta tensors|Cannot copy out of meta")


def test_train_local_moves_the_model_and_every_batch_to_its_device(monkeypatch):
    """``train_local(..., device=...)`` on a device other than the CPU's: ``resolve_device``
    is made to answer ``meta`` (no GPU here). The CPU model and the CPU batches are moved
    there and every step runs (a CPU tensor meeting a meta one in the loss raises "not on
    the expected device"); only reading the loss's value at the end fails, since a meta
    tensor has none. FjORD's per-batch widths run there too."""
    import fl_subnet.clients.train as train_mod


    monkeypatch.setattr(train_mod, "resolve_device", lambda value, **kw: torch.device("meta"))
    model = factory()
    with reading_meta():
        train_local(model, data(), TrainConfig(local_steps=3, batch_size=8, momentum=0.9), device="cuda")
    assert model_device(model) == torch.device("meta")
    with reading_meta():
        evaluate_model(factory(), data(), "cross-entropy", device="cuda")

    spec = analyze(TinyBN, EXAMPLE)
    mask = NestedPrefixSampler(1.0, scale=False).sample(spec.groups, 0, 1, capacities=[1.0])[0]
    ordered = build_ordered(spec, spec.gather(TinyBN().state_dict(), mask), mask)
    train, _ = bn_data(Context(run_id=1, node_id=1, node_config={"partition-id": 1}, state=RecordDict(),
                               run_config={}))
    with WidthSchedule(ordered, (0.25, 0.5, 1.0), width_generator(0, 1, 0), distill=True) as schedule:
        with reading_meta():
            train_local(ordered, train, TrainConfig(local_steps=4, batch_size=4), before_step=schedule, device="cuda")
    assert len(schedule.history) == 4


# --------------------------------------------------------------- the harness's central evaluation
def test_central_evaluation_device(caplog):
    """The server evaluates on the run config's ``device`` where it has it; a server without
    the nodes' CUDA evaluates on its CPU and says so (``fl-subnet`` refuses such a config
    before, see above); ``device = "cpu"`` gives the metrics of the run without the key."""
    from fl_subnet.experiments.experiment import CentralEvaluation, evaluation_device, factory_for

    assert evaluation_device(RunConfig(device="cpu")) == torch.device("cpu")
    if NO_CUDA:
        with caplog.at_level("WARNING"):
            assert evaluation_device(RunConfig(device="cuda:1")) == torch.device("cpu")
        assert "central evaluation runs on the CPU: device is 'cuda:1'" in caplog.text
    cfg = RunConfig(hidden="8", num_nodes=2)
    torch.manual_seed(0)
    arrays = ArrayRecord(factory_for(cfg)().state_dict())
    plain = CentralEvaluation(cfg, None)(0, arrays)
    on_cpu = CentralEvaluation(RunConfig(hidden="8", num_nodes=2, device="cpu"), None)
    assert on_cpu.device == torch.device("cpu") and dict(on_cpu(0, arrays)) == dict(plain)
