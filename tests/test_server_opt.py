"""Masked server optimizers (FedAvgM, FedAdam, FedYogi, FedAdagrad; Reddi et al. 2021).

* With the full mask each equals Flower's own strategy (≤ 1e-6) over 3 rounds, both as
  ``SubnetFedAvg(server_optimizer=...)`` and composed, ``class X(SubnetFedAvg, FedAdam)``,
  on a model without buffers.
* Buffers (BatchNorm's running statistics, ``num_batches_tracked``) take the aggregate,
  the mean over their holders, with no optimizer state; only the parameters are stepped.
  Flower's strategies step the buffers too, so with BatchNorm the full mask equals
  Flower's strategy on the parameters only.
* An entry no node held keeps its value and its optimizer state (Flower's FedAdam
  applied to the masked aggregate would move it through momentum).
* The masked rules equal a plain-numpy implementation on random inputs and masks.
"""

import numpy as np
import pytest
import torch
from torch import nn
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp.strategy import FedAdagrad, FedAdam, FedAvgM, FedYogi

from fl_subnet.core.aggregate import MaskedAggregator
from fl_subnet.core.masks import Mask
from fl_subnet.core.server_opt import (MaskedFedAdagrad, MaskedFedAdam, MaskedFedAvgM, MaskedFedYogi,
                                       make_server_optimizer)
from fl_subnet.core.spec import analyze
from fl_subnet.strategies import FederatedDropout, SubnetFedAvg
from fl_subnet.experiments.inprocess_grid import InProcessGrid
from fl_subnet.clients import receive
from fl_subnet.wire.packed import is_packed
from fl_subnet.wire import arrays_to_state

from strategy_helpers import D_IN, D_OUT, factory, grid, initial_arrays, train_config

FLOWER = {
    "fedadam": (FedAdam, dict(eta=0.05, beta_1=0.9, beta_2=0.99, tau=1e-3),
                lambda kw: MaskedFedAdam(**kw)),
    "fedyogi": (FedYogi, dict(eta=0.02, beta_1=0.8, beta_2=0.95, tau=1e-3),
                lambda kw: MaskedFedYogi(**kw)),
    "fedadagrad": (FedAdagrad, dict(eta=0.05, tau=1e-3), lambda kw: MaskedFedAdagrad(**kw)),
    "fedavgm": (FedAvgM, dict(server_learning_rate=0.7, server_momentum=0.9),
                lambda kw: MaskedFedAvgM(**kw)),
}
NODES = 3


def _echo_grid(num_nodes, model_factory=factory):
    """Nodes that answer a train message with deterministic updates: node i returns the
    arrays it was sent plus noise seeded by (server round, i), num-examples 10 + 5i (as
    float32, whatever dtype it received: Flower's FedAdam sends float64). A BatchNorm
    variance stays positive (times e^noise), ``num_batches_tracked`` counts one more."""
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        i = int(context.node_config["partition-id"])
        rnd = int(msg.content["config"]["server-round"])
        gen = torch.Generator().manual_seed(1000 * rnd + i)
        arrays = msg.content["arrays"]  # a sub-model's slice is packed: decoded as a node does
        sent = receive(msg, model_factory).model.state_dict() if is_packed(arrays) else arrays_to_state(arrays)
        state = {k: _noisy(k, v, gen) for k, v in sent.items()}
        return Message(RecordDict({"arrays": ArrayRecord(state),
                                   "metrics": MetricRecord({"num-examples": 10 + 5 * i})}), reply_to=msg)

    return InProcessGrid(app, num_nodes)


def _noisy(key, v, gen):
    if key.endswith("num_batches_tracked"):
        return v.double().round().long() + 1  # Flower's FedAdam sends it as a float
    noise = 0.05 * torch.randn(v.shape, generator=gen)
    return v.float() * noise.exp() if key.endswith("running_var") else v.float() + noise


def _replies(strategy, g, arrays, server_round):
    return g.send_and_receive(list(strategy.configure_train(server_round, arrays, train_config(), g)))


def _run(strategy, rounds=3, model_factory=factory, replies=None):
    """``rounds`` rounds on the echo grid; the aggregated state of each (float64). The
    replies of each round are appended to ``replies`` if given."""
    g = _echo_grid(NODES, model_factory)
    torch.manual_seed(3)
    arrays = ArrayRecord(model_factory().state_dict())
    out = []
    for rnd in range(1, rounds + 1):
        got = list(_replies(strategy, g, arrays, rnd))
        if replies is not None:
            replies.append(got)
        arrays, _ = strategy.aggregate_train(rnd, got)
        out.append({k: torch.as_tensor(v, dtype=torch.float64) for k, v in arrays_to_state(arrays).items()})
    return out


def _flower(name):
    cls, kw, _ = FLOWER[name]
    return cls(fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=NODES, min_available_nodes=NODES, **kw)


@pytest.mark.parametrize("name", list(FLOWER))
@pytest.mark.parametrize("how", ["argument", "composed"])
def test_full_mask_equals_flowers_own_over_three_rounds(name, how):
    cls, kw, masked = FLOWER[name]
    assert not dict(factory().named_buffers())  # with buffers see test_with_batchnorm_...
    common = dict(fraction_evaluate=0.0, min_train_nodes=NODES, min_available_nodes=NODES, num_train_nodes=NODES)
    if how == "argument":
        ours = SubnetFedAvg(factory, server_optimizer=masked(kw), **common)
    else:
        Composed = type(f"SubnetFedAvg{cls.__name__}", (SubnetFedAvg, cls), {})
        ours = Composed(factory, **common, **kw)
        assert type(ours.server_optimizer).__name__ == f"Masked{cls.__name__}"
    theirs = _run(_flower(name))
    mine = _run(ours)
    for rnd, (a, b) in enumerate(zip(theirs, mine), 1):
        for key in a:
            err = float((a[key] - b[key]).abs().max())
            assert err <= 1e-6, (name, rnd, key, err)
    # and the optimizer did something: not plain FedAvg
    plain = _run(SubnetFedAvg(factory, **common))
    assert max(float((plain[-1][k] - mine[-1][k]).abs().max()) for k in plain[-1]) > 1e-3


def bn_factory():
    """An MLP whose BatchNorm keeps running statistics: buffers 1.running_mean,
    1.running_var, 1.num_batches_tracked."""
    return nn.Sequential(nn.Linear(D_IN, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, D_OUT))


BUFFERS = ("1.running_mean", "1.running_var", "1.num_batches_tracked")


@pytest.mark.parametrize("name", list(FLOWER))
def test_buffers_take_the_aggregate_and_parameters_the_step(name):
    """BatchNorm's running statistics (and ``num_batches_tracked``) are the masked
    aggregate as is, with no optimizer state; each parameter is the optimizer's step,
    equal to the same optimizer given the parameters alone. The strategy hands the
    optimizer its model's parameter names. Two rounds: every unit held, then units 0..7."""
    opt = FLOWER[name][2](FLOWER[name][1])
    spec = SubnetFedAvg(bn_factory, server_optimizer=opt).spec
    alone = FLOWER[name][2](FLOWER[name][1])
    (g,) = spec.groups
    torch.manual_seed(0)
    w = bn_factory().state_dict()
    params = [k for k in w if k not in BUFFERS]
    assert sorted(params) == sorted(dict(bn_factory().named_parameters()))
    gen = torch.Generator().manual_seed(5)
    for kept in (torch.arange(g.size), torch.arange(8)):
        mask = Mask({g.name: kept})
        agg = MaskedAggregator(w, spec.slicer)
        for weight in (1.0, 2.0):
            agg.add({k: _noisy(k, v, gen) for k, v in spec.slicer.gather(w, mask).items()}, mask, weight)
        aggregated, held = agg.finalize(), agg.held()
        new = opt.step(w, aggregated, held)
        want = alone.step({k: w[k] for k in params}, {k: aggregated[k] for k in params}, held)
        for key in BUFFERS:
            assert torch.equal(new[key], aggregated[key]), (key, new[key], aggregated[key])
            assert not torch.equal(new[key], w[key]), key
        for key in params:
            assert torch.equal(new[key], want[key]), key
        assert not torch.equal(new["0.weight"], aggregated["0.weight"])  # the optimizer did step
        assert not set(opt.state) & set(BUFFERS)
        assert not any(k.rpartition("/")[0] in BUFFERS for k in opt.state_dict())
        w = new


@pytest.mark.parametrize("how", ["argument", "composed"])
def test_with_batchnorm_buffers_are_the_holder_mean_and_parameters_flowers_fedadam_step(how):
    """Where the full mask does not equal Flower's FedAdam: Flower sees an ArrayRecord and
    steps BatchNorm's running statistics like weights; fl-subnet's are the mean of the
    replies' statistics weighted by num-examples (computed here from the replies), while
    the parameters equal Flower's FedAdam step (<= 1e-6) in each of 3 rounds."""
    cls, kw, masked = FLOWER["fedadam"]
    common = dict(fraction_evaluate=0.0, min_train_nodes=NODES, min_available_nodes=NODES, num_train_nodes=NODES)
    if how == "argument":
        ours = SubnetFedAvg(bn_factory, server_optimizer=masked(kw), **common)
    else:
        ours = type("SubnetFedAvgFedAdam", (SubnetFedAvg, cls), {})(bn_factory, **common, **kw)
    replies = []
    mine = _run(ours, model_factory=bn_factory, replies=replies)
    theirs = _run(_flower("fedadam"), model_factory=bn_factory)
    params = set(dict(bn_factory().named_parameters()))
    for rnd, (a, b, got) in enumerate(zip(theirs, mine, replies), 1):
        for key in params:
            err = float((a[key] - b[key]).abs().max())
            assert err <= 1e-6, (rnd, key, err)
        n = [float(r.content["metrics"]["num-examples"]) for r in got]
        for key in ("1.running_mean", "1.running_var"):
            stats = [torch.as_tensor(r.content["arrays"][key].numpy(), dtype=torch.float64) for r in got]
            mean = sum(ni * x for ni, x in zip(n, stats)) / sum(n)
            assert float((b[key] - mean).abs().max()) <= 1e-6, (rnd, key)
            assert float((a[key] - mean).abs().max()) > 1e-3, (rnd, key)  # Flower stepped it
        assert float(b["1.num_batches_tracked"]) == rnd  # each node counts one batch a round


def test_optimizer_state_of_buffers_is_not_loaded():
    """A checkpoint that holds optimizer state for a buffer (written when buffers were
    stepped) loads: that state is dropped, the parameters' is kept."""
    opt = MaskedFedAdam()
    SubnetFedAvg(bn_factory, server_optimizer=opt)
    opt.load_state_dict({"0.weight/m": torch.ones(16, D_IN), "1.running_mean/m": torch.ones(16),
                         "1.running_mean/v": torch.ones(16)})
    assert set(opt.state_dict()) == {"0.weight/m"}


def _state():
    torch.manual_seed(0)
    return {k: v.detach().clone() for k, v in factory().state_dict().items()}


@pytest.mark.parametrize("name", ["fedadam", "fedyogi", "fedadagrad", "fedavgm"])
def test_untouched_entries_keep_value_and_state(name):
    """Round 1 holds every unit, round 2 only hidden units {0..7}: units 8.. keep their
    value and their m, v, t (momentum) exactly; Flower's rule on the same aggregate moves them."""
    spec = analyze(factory)
    (g,) = spec.groups
    opt = FLOWER[name][2](FLOWER[name][1])
    w = _state()
    gen = torch.Generator().manual_seed(5)
    for rnd, kept in ((1, torch.arange(g.size)), (2, torch.arange(8))):
        mask = Mask({g.name: kept})
        agg = MaskedAggregator(w, spec.slicer)
        compact = {k: v + 0.1 * torch.randn(v.shape, generator=gen) for k, v in spec.slicer.gather(w, mask).items()}
        agg.add(compact, mask, 1.0)
        aggregated = agg.finalize()
        before = {k: {s: t.clone() for s, t in slots.items()} for k, slots in opt.state.items()}
        new = opt.step(w, aggregated, agg.held())
        if rnd == 2:
            rows = slice(8, None)
            for key, cols in (("1.weight", None), ("1.bias", None), ("3.weight", 1)):
                sl = (slice(None), rows) if cols == 1 else (rows,)
                assert torch.equal(new[key][sl], w[key][sl]), key
                for slot, t in opt.state[key].items():
                    assert torch.equal(t[sl], before[key][slot][sl]), (key, slot)
                assert not torch.equal(new[key][(slice(None), slice(0, 8)) if cols == 1 else (slice(0, 8),)],
                                       w[key][(slice(None), slice(0, 8)) if cols == 1 else (slice(0, 8),)])
            # Flower's own rule applied to the same aggregate moves them through momentum
            # (FedAdagrad has β₁ = 0: Δ = 0 gives no step, so the naive rule is right there)
            naive = _naive(name, before, w, aggregated)
            moved = not torch.equal(naive["1.weight"][8:], w["1.weight"][8:].double())
            assert moved == (name != "fedadagrad")
        w = new


def _naive(name, state, w, a):
    """Flower's rule on every entry (Δ = 0 at unheld entries), from the optimizer state ``state``."""
    kw = FLOWER[name][1]
    out = {}
    for k in w:
        d = (a[k] - w[k]).double()
        if name == "fedavgm":
            u = kw["server_momentum"] * state[k]["momentum"].double() - d
            out[k] = w[k].double() - kw["server_learning_rate"] * u
            continue
        b1 = kw.get("beta_1", 0.0)
        m = b1 * state[k]["m"].double() + (1 - b1) * d
        v = state[k]["v"].double() + d ** 2 if name == "fedadagrad" else (
            kw["beta_2"] * state[k]["v"].double() + (1 - kw["beta_2"]) * d ** 2 if name == "fedadam" else
            state[k]["v"].double() - (1 - kw["beta_2"]) * d ** 2 * torch.sign(state[k]["v"].double() - d ** 2))
        out[k] = w[k].double() + kw["eta"] * m / (v.sqrt() + kw["tau"])
    return out


@pytest.mark.parametrize("name", list(FLOWER))
def test_masked_rule_equals_numpy_reference(name):
    """4 rounds on a (5, 4) tensor with random held entries (p = 0.6) and updates."""
    rng = np.random.default_rng(7)
    kw = FLOWER[name][1]
    shape = (5, 4)
    w0 = rng.normal(size=shape)
    rounds = [(rng.random(shape) < 0.6, rng.normal(scale=0.1, size=shape)) for _ in range(4)]
    opt = FLOWER[name][2](kw)
    cur, ours = torch.tensor(w0), []
    for held, d in rounds:
        a = torch.where(torch.tensor(held), cur + torch.tensor(d), cur)
        cur = opt.step({"x": cur}, {"x": a}, {"x": torch.tensor(held)})["x"]
        ours.append(cur.numpy().copy())
    w, st = w0.copy(), {}
    for (held, d), o in zip(rounds, ours):
        w = _numpy_masked_step(name, kw, w, np.where(held, w + d, w), held, st)
        np.testing.assert_allclose(o, w, rtol=0, atol=1e-12)


def _numpy_masked_step(name, kw, w, a, held, st):
    """One round of the masked rule, entry by entry in numpy (float64), with persistent
    state ``st``: the optimizer's update and its state (m, v, t; u) only where held."""
    st.setdefault("m", np.zeros_like(w))
    st.setdefault("v", np.zeros_like(w))
    st.setdefault("t", np.zeros_like(w))
    new = w.copy()
    m, v, t = st["m"], st["v"], st["t"]
    for e in np.ndindex(w.shape):
        if not held[e]:
            continue
        d = a[e] - w[e]
        if name == "fedavgm":
            m[e] = kw["server_momentum"] * m[e] - d
            new[e] = w[e] - kw["server_learning_rate"] * m[e]
            continue
        b1 = kw.get("beta_1", 0.0)
        m[e] = b1 * m[e] + (1 - b1) * d
        if name == "fedadam":
            v[e] = kw["beta_2"] * v[e] + (1 - kw["beta_2"]) * d * d
            t[e] += 1
            step = kw["eta"] * np.sqrt(1 - kw["beta_2"] ** (t[e] + 1)) / (1 - b1 ** (t[e] + 1))
        elif name == "fedyogi":
            v[e] = v[e] - (1 - kw["beta_2"]) * d * d * np.sign(v[e] - d * d)
            step = kw["eta"]
        else:
            v[e] = v[e] + d * d
            step = kw["eta"]
        new[e] = w[e] + step * m[e] / (np.sqrt(v[e]) + kw["tau"])
    return new


def test_held_marks_exactly_the_entries_some_reply_held():
    spec = analyze(factory)
    (g,) = spec.groups
    w = _state()
    agg = MaskedAggregator(w, spec.slicer)
    for kept in (torch.tensor([0, 3]), torch.tensor([3, 5])):
        mask = Mask({g.name: kept})
        agg.add(spec.slicer.gather(w, mask), mask, 2.0)
    held = agg.held()
    want = torch.zeros(g.size, dtype=torch.bool)
    want[[0, 3, 5]] = True
    assert torch.equal(held["1.weight"].expand_as(w["1.weight"]), want[:, None].expand_as(w["1.weight"]))
    assert torch.equal(held["3.weight"].expand_as(w["3.weight"]), want[None, :].expand_as(w["3.weight"]))
    assert bool(held["3.bias"].all())


def test_dropout_composed_with_fedadam_runs_and_keeps_untouched_units():
    """FederatedDropout + Flower's FedAdam, end to end on the in-process grid: a unit no
    node kept in a round has the same value and Adam state after it."""
    class DropoutAdam(FederatedDropout, FedAdam):
        pass

    s = DropoutAdam(factory, 0.3, seed=4, eta=0.05, num_train_nodes=2, min_available_nodes=2,
                    fraction_evaluate=0.0)
    assert s.eta == 0.05 and isinstance(s.server_optimizer, MaskedFedAdam)
    g = grid(2)
    arrays = initial_arrays()
    (group,) = s.groups
    checked = 0
    for rnd in (1, 2, 3):
        msgs = list(s.configure_train(rnd, arrays, train_config(), g))
        untouched = torch.ones(group.size, dtype=torch.bool)
        for mask in s._sent.values():
            untouched[mask.kept(group)] = False
        before = arrays_to_state(arrays)
        state_before = {k: {n: t.clone() for n, t in v.items()} for k, v in s.server_optimizer.state.items()}
        arrays, _ = s.aggregate_train(rnd, g.send_and_receive(msgs))
        after = arrays_to_state(arrays)
        if untouched.any() and state_before:
            rows = untouched.nonzero().flatten()
            assert torch.equal(after["1.weight"][rows], before["1.weight"][rows])
            assert torch.equal(s.server_optimizer.state["1.weight"]["m"][rows],
                               state_before["1.weight"]["m"][rows])
            checked += 1
        assert not torch.equal(after["1.weight"], before["1.weight"])
    assert checked >= 1  # keep-prob 0.3 with 2 nodes leaves ~half the units untouched


def test_flower_first_order_and_skipped_hooks_are_refused_with_the_fix():
    from flwr.serverapp.strategy import FedMedian, FedProx

    with pytest.raises(TypeError, match=r"class Bad\(FederatedDropout, FedAdam\)"):
        class Bad(FedAdam, FederatedDropout):  # noqa: F841
            pass
    with pytest.raises(TypeError, match="FedProx.configure_train would never run"):
        class WithProx(FederatedDropout, FedProx):  # noqa: F841
            pass
    with pytest.raises(TypeError, match="aggregation=\"median\""):
        class WithMedian(FederatedDropout, FedMedian):  # noqa: F841
            pass

    class Mixin:
        def aggregate_train(self, server_round, replies):  # a user hook placed after: skipped
            return None, None

    from flwr.serverapp.strategy import Strategy

    class StrategyMixin(Strategy, Mixin):
        configure_train = configure_evaluate = aggregate_evaluate = aggregate_train = Mixin.aggregate_train

    with pytest.raises(TypeError, match="would never run"):
        class Skipped(FederatedDropout, StrategyMixin):  # noqa: F841
            pass


def test_server_optimizer_twice_is_refused():
    class DropoutAdam(FederatedDropout, FedAdam):
        pass

    with pytest.raises(ValueError, match="already a fedadam strategy"):
        DropoutAdam(factory, 0.5, server_optimizer=MaskedFedYogi())


@pytest.mark.parametrize("bad, match", [
    (dict(name="adam"), "server-optimizer must be one of"),
    (dict(name="fedadam", lr=0.0), "eta must be > 0"),
    (dict(name="fedavgm", momentum=1.0), r"server_momentum must be in \[0.0, 1.0\)"),
    (dict(name="fedyogi", beta_2=-0.1), "beta_2 must be in"),
])
def test_bad_settings_name_the_parameter(bad, match):
    with pytest.raises(ValueError, match=match):
        make_server_optimizer(**bad)


def test_dp_wrapper_is_refused_for_sub_models_and_works_with_the_full_model():
    from flwr.serverapp.strategy import DifferentialPrivacyServerSideFixedClipping

    g = grid(2)
    dropout = FederatedDropout(factory, 0.5, num_train_nodes=2, min_available_nodes=2, fraction_evaluate=0.0)
    wrapped = DifferentialPrivacyServerSideFixedClipping(dropout, noise_multiplier=0.1, clipping_norm=1.0,
                                                         num_sampled_clients=2)
    with pytest.raises(TypeError, match=r"sensitivity clip/h, not clip/n"):
        wrapped.start(grid=g, initial_arrays=initial_arrays(), num_rounds=1, train_config=train_config())
    full = SubnetFedAvg(factory, num_train_nodes=2, min_available_nodes=2, fraction_evaluate=0.0)
    wrapped = DifferentialPrivacyServerSideFixedClipping(full, noise_multiplier=0.0, clipping_norm=1e6,
                                                         num_sampled_clients=2)
    result = wrapped.start(grid=g, initial_arrays=initial_arrays(), num_rounds=1, train_config=train_config())
    assert set(arrays_to_state(result.arrays)) == set(initial_arrays())


def test_summary_logs_the_protocols_knobs_then_flowers(caplog):
    import logging

    class DropoutAdam(FederatedDropout, FedAdam):
        pass

    s = DropoutAdam(factory, 0.5, eta=0.05, local_steps=3)
    flwr_logger = logging.getLogger("flwr")  # Flower's logger (it may not propagate to the root)
    flwr_logger.addHandler(caplog.handler)
    try:
        with caplog.at_level(logging.INFO, logger="flwr"):
            s.summary()
    finally:
        flwr_logger.removeHandler(caplog.handler)
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "BernoulliSampler(" in text and "keep_prob=0.5" in text
    assert "MaskedFedAdam(eta=0.05" in text
    assert "FedOpt settings" in text  # Flower's own summary ran after ours
    assert text.index("BernoulliSampler(") < text.index("FedOpt settings")


def test_run_config_choices_equal_the_librarys_and_build_the_optimizer():
    from fl_subnet.core.server_opt import SERVER_OPTIMIZERS
    from fl_subnet.experiments.config import CHOICES, RunConfig
    from fl_subnet.experiments.experiment import factory_for
    from fl_subnet.strategies.registry import build_strategy

    assert CHOICES["server-optimizer"] == ("none",) + SERVER_OPTIMIZERS
    cfg = RunConfig(strategy="federated-dropout", server_optimizer="fedyogi", server_momentum=0.5)
    s = build_strategy(cfg, factory_for(cfg))
    assert isinstance(s.server_optimizer, MaskedFedYogi)
    assert (s.server_optimizer.eta, s.server_optimizer.beta_1) == (0.01, 0.5)
    with pytest.raises(ValueError, match="server-optimizer"):
        RunConfig.from_mapping({"server-optimizer": "adam"})


def test_flowers_fedadam_float64_arrays_train_on_fl_subnets_client():
    """Flower's FedAdam returns float64 arrays; fl-subnet's ClientApp builds the float32
    model from them (as load_state_dict would) and trains, instead of failing on a dtype
    mismatch, for two rounds of Flower's own FedAdam."""
    strategy = _flower("fedadam")
    g = grid(NODES)
    arrays = initial_arrays()
    for rnd in (1, 2):
        replies = list(g.send_and_receive(list(strategy.configure_train(rnd, arrays, train_config(), g))))
        assert not any(r.has_error() for r in replies), [r.error.reason for r in replies if r.has_error()]
        assert all(a.dtype == "float32" for r in replies for a in r.content["arrays"].values())
        arrays, _ = strategy.aggregate_train(rnd, replies)
    assert all(a.dtype == "float64" for a in arrays.values())  # what Flower sent in round 2
