"""A model that is never replaced by NaN or Inf.

Finite replies near the float32 maximum (3.4e38) used to overflow the float32 weighted
sums of the masked aggregation: the ``inf`` model became the global model and every
later honest reply, trained from it, came back NaN and was rejected. Now the sums that
overflow (and every sum when the weights themselves do not fit float32) are redone in
float64, so the mean of finite replies is finite; and a round whose new model or
server-optimizer state would still hold NaN or Inf (a server optimizer's step, BatchNorm
recalibration) keeps the current model, logs one error line and reports ``model-kept``.
"""

import logging
import math

import pytest
import torch
from torch import nn
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp.strategy import FedAdam

from fl_subnet.clients import make_client_app
from fl_subnet.core.aggregate import MaskedAggregator
from fl_subnet.core.analysis import find_unit_groups
from fl_subnet.core.flat import FlatMap
from fl_subnet.core.robust import MaskedMedian, MaskedTrimmedMean
from fl_subnet.core.samplers import BernoulliSampler
from fl_subnet.core.server_opt import MaskedFedAvgM
from fl_subnet.core.slicing import Slicer
from fl_subnet.experiments.inprocess_grid import InProcessGrid
from fl_subnet.models import MLP
from fl_subnet.wire.packed import is_packed
from fl_subnet.strategies import SubnetFedAvg
from fl_subnet.wire import METRICS_KEY, arrays_to_state, read_train

from strategy_helpers import D_IN, D_OUT, central_loss, factory, initial_arrays, load_data, train_config

NODES, ROGUE = 4, 3  # node partition 3 holds the most examples (35 of 110)
NEAR_MAX = 3.4e38  # < float32 max 3.4028e38


class SubnetFedAdam(SubnetFedAvg, FedAdam):
    """Flower's FedAdam at its defaults, stepping the masked aggregate."""


def bn_factory():
    """The strategy helpers' MLP with a BatchNorm layer (running statistics)."""
    return nn.Sequential(nn.Linear(D_IN, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, D_OUT))


def rogue_app(rounds, value=None, num_examples=None, model=factory):
    """The honest ClientApp, except that partition ROGUE's train replies in ``rounds``
    hold ``value`` in every float tensor and/or report ``num_examples``."""
    honest = make_client_app(model, load_data)
    app = ClientApp()

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        return honest(msg, context)

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        reply = honest(msg, context)
        rnd = read_train(msg.content)[2]["server-round"]
        if int(context.node_config["partition-id"]) != ROGUE or rnd not in rounds:
            return reply
        (key, arrays), = reply.content.array_records.items()
        assert not is_packed(arrays)  # SubnetFedAvg: the full model, one array per tensor
        state = arrays_to_state(arrays)
        if value is not None:
            state = {k: torch.full_like(v, value) if v.is_floating_point() else v for k, v in state.items()}
        metrics = MetricRecord(dict(reply.content.metric_records[METRICS_KEY]))
        if num_examples is not None:
            metrics["num-examples"] = num_examples
        return Message(content=RecordDict({key: ArrayRecord(state), METRICS_KEY: metrics}), reply_to=msg)

    return app


def run(app, rounds=3, **kwargs):
    """SubnetFedAvg with every defence at its default (off) on NODES nodes; the global
    model after each round (from ``evaluate_fn``), the train metrics per round."""
    strategy = SubnetFedAvg(factory, fraction_evaluate=0.0, min_available_nodes=NODES, **kwargs)
    models = {}

    def record(rnd, arrays):
        models[rnd] = arrays_to_state(arrays)

    result = strategy.start(grid=InProcessGrid(app, NODES), initial_arrays=initial_arrays(), num_rounds=rounds,
                            train_config=train_config(), evaluate_fn=record)
    return models, result.train_metrics_clientapp, result


def finite(state):
    return all(bool(torch.isfinite(v).all()) for v in state.values() if v.is_floating_point())


# ---------------------------------------------------------------- the aggregator

@pytest.fixture(params=["per-tensor", "flat"])
def make_agg(request):
    def make(old, slicer, **kw):
        flat = None
        if request.param == "flat":
            flat = FlatMap(slicer, {k: tuple(v.shape) for k, v in old.items() if v.is_floating_point()})
        agg = MaskedAggregator(old, slicer, flat=flat, **kw)
        assert (agg.flat is not None) == (request.param == "flat")
        return agg
    return make


def _problem(dtype=torch.float32):
    torch.manual_seed(0)
    model = MLP(5, [12, 9], 4)
    slicer = Slicer(find_unit_groups(model))
    return {k: v.to(dtype) for k, v in model.state_dict().items()}, slicer


def _exact(old, slicer, replies):
    """The same masked mean computed on float64 copies (sums that cannot overflow),
    cast back to the model's dtype."""
    agg = MaskedAggregator({k: v.double() for k, v in old.items()}, slicer, precision="float64")
    for compact, mask, w in replies:
        agg.add({k: v.double() for k, v in compact.items()}, mask, w)
    return {k: v.to(old[k].dtype) for k, v in agg.finalize().items()}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mean_of_two_replies_near_the_float32_maximum_is_their_finite_mean(make_agg, dtype):
    old, slicer = _problem(dtype)
    masks = BernoulliSampler(0.6, seed=1).sample(slicer.groups, 1, 2)
    replies = [({k: torch.full_like(v, value) for k, v in slicer.gather(old, m).items()}, m, w)
               for m, value, w in zip(masks, (3e38, 2e38), (30.0, 50.0))]
    agg = make_agg(old, slicer)
    for r in replies:
        agg.add(*r)
    held_before = agg.held()
    new = agg.finalize()
    assert finite(new)
    want = _exact(old, slicer, replies)
    for key in old:
        assert new[key].dtype == old[key].dtype
        assert torch.equal(new[key], want[key]), key
    a, b = (float(torch.tensor(v, dtype=dtype)) for v in (3e38, 2e38))
    both = torch.tensor((30 * a + 50 * b) / 80, dtype=dtype)  # where the two replies overlap
    assert bool((new["1.weight"] == both).any())
    after = agg.held()
    assert all(torch.equal(held_before[k].expand_as(old[k]), after[k].expand_as(old[k])) for k in old)
    # two replies of 3e38 on the same slice: their mean, 3e38 (the float32 sums of 30 and
    # 50 times 3e38 overflowed)
    full = slicer.gather(old, masks[0])
    agg = make_agg(old, slicer)
    agg.add({k: torch.full_like(v, 3e38) for k, v in full.items()}, masks[0], 30.0)
    agg.add({k: torch.full_like(v, 3e38) for k, v in full.items()}, masks[0], 50.0)
    new = agg.finalize()
    rows = masks[0].indices["1"]
    assert torch.equal(new["1.bias"][rows], torch.full((len(rows),), 3e38, dtype=dtype))


@pytest.mark.parametrize("big", [1e39, 3e38])
def test_weights_beyond_float32_are_summed_in_float64(make_agg, big):
    """A num-examples above float32's maximum (or two whose sum is) used to raise in the
    sums (torch refuses the alpha) or to make the denominators inf: now their mean."""
    old, slicer = _problem()
    masks = BernoulliSampler(0.6, seed=1).sample(slicer.groups, 1, 2)
    replies = [({k: torch.full_like(v, value) for k, v in slicer.gather(old, m).items()}, m, w)
               for m, value, w in zip(masks, (0.5, 0.25), (big, big if big < 1e39 else 1.0))]
    agg = make_agg(old, slicer)
    for r in replies:
        agg.add(*r)
    new = agg.finalize()
    want = _exact(old, slicer, replies)
    assert finite(new) and all(torch.equal(new[k], want[k]) for k in old)


@pytest.mark.parametrize("rule", [MaskedMedian, MaskedTrimmedMean])
def test_robust_rules_of_replies_near_the_float32_maximum_are_finite(rule):
    """The median and trimmed mean sort float32 values and reduce them in float64: finite
    replies near the maximum give a finite result (the trimmed mean's sum included)."""
    old, slicer = _problem()
    mask = BernoulliSampler(0.6, seed=1).sample(slicer.groups, 1, 1)[0]
    values = [float(torch.tensor(v)) for v in (3.4e38, 3.3e38, 3.2e38, 3.4e38)]  # as float32 holds them
    agg = rule(old, slicer, **({"trim_fraction": 0.0} if rule is MaskedTrimmedMean else {}))
    for value in values:
        agg.add({k: torch.full_like(v, value) for k, v in slicer.gather(old, mask).items()}, mask, 1.0)
    new = agg.finalize()
    # trim_fraction 0: the plain mean, whose float32 sum would overflow
    want = sum(values) / 4 if rule is MaskedTrimmedMean else (values[1] + values[0]) / 2
    rows = mask.indices["1"]
    assert finite(new)
    assert torch.equal(new["1.bias"][rows], torch.full((len(rows),), want))


# ---------------------------------------------------------------- through strategy.start

def test_a_reply_near_the_float32_maximum_never_makes_the_model_inf():
    """Defaults off, the rogue node replies 3.4e38 everywhere in round 1: the round's
    model is the finite weighted mean (it used to be inf, and was kept as the global
    model), and no round raises. That mean (1.1e38) is still garbage: the honest nodes'
    training from it comes back NaN and is rejected, so the model stays finite but does
    not recover; keeping such a reply out is the defences' job (max_ratio_to_median,
    the median: tests/test_poisoning.py)."""
    models, metrics, _ = run(rogue_app({1}, value=NEAR_MAX))
    assert all(finite(models[r]) for r in (1, 2, 3))
    assert float(models[1]["1.bias"].abs().max()) == pytest.approx(NEAR_MAX * 35 / 110, rel=1e-6)
    assert metrics[1]["num-replies"] == NODES and metrics[1]["model-kept"] == 0


def test_an_overweighted_reply_is_averaged_and_later_rounds_are_accepted():
    """Defaults off (no max_num_examples), the rogue node reports num-examples 1e39 in
    round 1 (float32 cannot hold it: the sums raised, or gave inf and NaN): the round's
    model is its honest reply, finite, and every later honest round is accepted."""
    models, metrics, result = run(rogue_app({1}, num_examples=1e39))
    assert all(finite(models[r]) for r in (1, 2, 3))
    for r in (1, 2, 3):
        assert metrics[r]["num-replies"] == NODES and metrics[r]["num-rejected"] == 0, (r, dict(metrics[r]))
        assert metrics[r]["model-kept"] == 0
    assert central_loss(result.arrays, NODES) < central_loss(initial_arrays(), NODES)


@pytest.mark.parametrize("optimizer", ["fedavgm-lr4", "fedadam"])
def test_a_server_step_that_is_not_finite_keeps_the_model(optimizer, caplog):
    """The rogue node replies 3.4e38 in round 1. FedAvgM with server lr 4 would step to
    4 x 1.1e38 (inf); Flower's FedAdam at its defaults would square the pseudo-gradient
    into an inf second moment (the model then never moves again). Either way round 1
    keeps the initial model and the optimizer state, logs one error line naming the
    round and the key, reports model-kept = 1, and rounds 2 and 3 are accepted."""
    if optimizer == "fedadam":
        strategy = SubnetFedAdam(factory, fraction_evaluate=0.0, min_available_nodes=NODES)
    else:
        strategy = SubnetFedAvg(factory, fraction_evaluate=0.0, min_available_nodes=NODES,
                                server_optimizer=MaskedFedAvgM(4.0, 0.0))
    models = {}
    with caplog.at_level(logging.ERROR):
        result = strategy.start(grid=InProcessGrid(rogue_app({1}, value=NEAR_MAX), NODES),
                                initial_arrays=initial_arrays(), num_rounds=3, train_config=train_config(),
                                evaluate_fn=lambda rnd, arrays: models.__setitem__(rnd, arrays_to_state(arrays)))
    metrics = result.train_metrics_clientapp
    init = arrays_to_state(initial_arrays())
    assert all(torch.equal(models[1][k], init[k]) for k in init)
    assert [metrics[r]["model-kept"] for r in (1, 2, 3)] == [1, 0, 0]
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "round 1" in errors[0] and "kept the current model" in errors[0], errors
    assert "'1.weight" in errors[0], errors  # the first key
    for r in (2, 3):
        assert metrics[r]["num-replies"] == NODES and metrics[r]["num-rejected"] == 0, (r, dict(metrics[r]))
        assert finite(models[r]) and not torch.equal(models[r]["1.weight"], models[r - 1]["1.weight"])
    state = strategy.server_optimizer.state_dict()  # FedAvgM without momentum has none
    assert all(bool(torch.isfinite(t.double()).all()) for t in state.values())
    assert bool(state) == (optimizer == "fedadam")
    assert math.isfinite(central_loss(result.arrays, NODES))


def test_a_batchnorm_recalibration_that_is_not_finite_keeps_the_model(caplog):
    """batchnorm='static': the server recomputes the running statistics of the new model
    on its calibration batches. With the rogue's 3.4e38 in round 1 the aggregate is
    finite (1.1e38) but its activations are not: round 1 keeps the initial model (one
    error line naming the BatchNorm recalibration), rounds 2 and 3 are accepted."""
    torch.manual_seed(0)
    init = ArrayRecord(bn_factory().state_dict())
    calibration = [torch.randn(16, D_IN, generator=torch.Generator().manual_seed(7))]
    strategy = SubnetFedAvg(bn_factory, fraction_evaluate=0.0, min_available_nodes=NODES, batchnorm="static",
                            calibration_batches=calibration)
    models = {}
    with caplog.at_level(logging.ERROR):
        result = strategy.start(grid=InProcessGrid(rogue_app({1}, value=NEAR_MAX, model=bn_factory), NODES),
                                initial_arrays=init, num_rounds=3, train_config=train_config(),
                                evaluate_fn=lambda rnd, arrays: models.__setitem__(rnd, arrays_to_state(arrays)))
    first = arrays_to_state(init)
    assert all(torch.equal(models[1][k], first[k]) for k in first)
    metrics = result.train_metrics_clientapp
    assert [metrics[r]["model-kept"] for r in (1, 2, 3)] == [1, 0, 0]
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "round 1" in errors[0] and "BatchNorm recalibration" in errors[0], errors
    for r in (2, 3):
        assert metrics[r]["num-replies"] == NODES and metrics[r]["num-rejected"] == 0, (r, dict(metrics[r]))
        assert finite(models[r]) and not torch.equal(models[r]["0.weight"], models[r - 1]["0.weight"])


def test_model_kept_is_in_the_rounds_metrics_row(tmp_path):
    """The harness's metrics row (metrics.json, metrics.csv) carries the strategy's
    model-kept of the round: 1 where the round's aggregate was refused, 0 before it."""
    import csv
    import json
    from types import SimpleNamespace

    from fl_subnet.experiments.config import RunConfig
    from fl_subnet.experiments.experiment import CentralEvaluation, factory_for
    from fl_subnet.experiments.results import RunRecorder

    cfg = RunConfig.from_mapping({"hidden": "8", "num-nodes": 2, "num-server-rounds": 3})
    strategy = SimpleNamespace(last_train_metrics={"num-replies": 2, "model-kept": 1}, deployed_state=lambda s: s)
    recorder = RunRecorder(tmp_path, cfg)
    evaluate = CentralEvaluation(cfg, strategy, recorder.add_row)
    arrays = ArrayRecord(factory_for(cfg)().state_dict())
    evaluate(0, arrays)
    evaluate(1, arrays)
    rows = json.loads((tmp_path / "metrics.json").read_text())
    assert [(r["server-round"], r["model-kept"]) for r in rows] == [(0, 0), (1, 1)]
    with open(tmp_path / "metrics.csv", newline="") as f:
        assert [row["model-kept"] for row in csv.DictReader(f)] == ["0", "1"]
