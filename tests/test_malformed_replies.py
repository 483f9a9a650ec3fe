"""Malformed replies are rejected and logged; the round goes on; nothing else changes."""

import logging

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, Error, Message, MetricRecord, RecordDict  # noqa: F401
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import array_shapes, arrays

from fl_subnet.core.aggregate import MaskedAggregator
from fl_subnet.wire.packed import raw_array, raw_values
from fl_subnet.wire import arrays_to_state
from fl_subnet.strategies import FederatedDropout

from strategy_helpers import factory, grid, initial_arrays, train_config


def _round():
    """One configured and answered round of federated dropout on 4 nodes."""
    strategy = FederatedDropout(factory, 0.5, seed=2, fraction_evaluate=0.0,
                                min_available_nodes=4, min_train_nodes=4)
    g = grid(4)
    arrays = initial_arrays()
    replies = list(g.send_and_receive(list(strategy.configure_train(1, arrays, train_config(), g))))
    return strategy, arrays_to_state(arrays), replies


def _expected(strategy, old, replies):
    agg = MaskedAggregator(old, strategy.slicer, flat=strategy._flat)  # the same arithmetic
    for r in replies:
        agg.add(strategy.slice_state(r.content["arrays"], r.metadata.src_node_id), strategy._sent[r.metadata.src_node_id],
                r.content["metrics"]["num-examples"])
    return agg.finalize()


def _set_array(msg, key, value, strategy):
    """The reply re-sent as one array per tensor (as ``ArrayRecord(model.state_dict())``
    writes it) with ``key`` set to ``value`` (None: removed)."""
    state = strategy.slice_state(msg.content["arrays"], msg.metadata.src_node_id)
    arrays = ArrayRecord({k: Array(v.numpy()) for k, v in state.items()})
    if value is None:
        del arrays[key]
    else:
        arrays[key] = Array(value)
    msg.content = RecordDict({"arrays": arrays, "metrics": msg.content["metrics"]})


def _corrupt_arrays(fn):
    def apply(msg, strategy):
        state = strategy.slice_state(msg.content["arrays"], msg.metadata.src_node_id)
        key, value = fn(state)
        _set_array(msg, key, value, strategy)
        return key
    return apply


def _corrupt_packed(fn, what=None):
    """Replace the packed reply's arrays by ``fn(packed-float values)`` → {key: ndarray};
    the log line names ``what`` (default: the first new array's key)."""
    def apply(msg, strategy):
        assert set(msg.content["arrays"]) == {"packed-float"}  # fl-subnet's ClientApp packs its reply
        new = fn(raw_values(msg.content["arrays"]["packed-float"]))
        msg.content = RecordDict({"arrays": ArrayRecord({k: raw_array(v) if v.ndim == 1 else Array(v)
                                                         for k, v in new.items()}),
                                  "metrics": msg.content["metrics"]})
        return what or next(iter(new))
    return apply


def _unknown_node(msg, strategy):
    del strategy._sent[msg.metadata.src_node_id]
    return "unknown node"


def _metrics(value):
    def apply(msg, strategy):
        msg.content = RecordDict({"arrays": msg.content["arrays"], "metrics": MetricRecord(value)})
        return "num-examples"
    return apply


CORRUPTIONS = {
    "missing-key": _corrupt_arrays(lambda s: ("1.bias", None)),
    "extra-key": _corrupt_arrays(lambda s: ("bogus", np.zeros(3, np.float32))),
    "wrong-shape": _corrupt_arrays(lambda s: ("1.weight", np.zeros((2, 2), np.float32))),
    "wrong-dtype": _corrupt_arrays(lambda s: ("3.bias", s["3.bias"].double().numpy())),
    "nan": _corrupt_arrays(lambda s: ("1.weight", np.full(tuple(s["1.weight"].shape), np.nan, np.float32))),
    "inf": _corrupt_arrays(lambda s: ("3.weight", np.full(tuple(s["3.weight"].shape), np.inf, np.float32))),
    "packed-short": _corrupt_packed(lambda v: {"packed-float": v[:-1]}),
    "packed-long": _corrupt_packed(lambda v: {"packed-float": np.append(v, np.float32(0))}),
    "packed-int": _corrupt_packed(lambda v: {"packed-float": v.astype(np.int64)}),
    "packed-2d": _corrupt_packed(lambda v: {"packed-float": v.reshape(1, -1)}),
    "packed-extra-array": _corrupt_packed(lambda v: {"packed-int": np.zeros(1, np.int64), "packed-float": v}),
    "packed-nan": _corrupt_packed(lambda v: {"packed-float": np.full_like(v, np.nan)}, "'1.weight' contains NaN"),
    "no-num-examples": _metrics({"train-loss": 1.0}),
    "zero-num-examples": _metrics({"num-examples": 0}),
    "unknown-node": _unknown_node,
}


@pytest.mark.parametrize("kind", sorted(CORRUPTIONS))
def test_malformed_reply_is_rejected_and_logged(kind, caplog):
    strategy, old, replies = _round()
    bad = replies[1]
    node = bad.metadata.src_node_id
    with caplog.at_level(logging.WARNING):
        what = CORRUPTIONS[kind](bad, strategy)
        new_arrays, metrics = strategy.aggregate_train(1, replies)
    good = [r for r in replies if r is not bad]
    want = _expected(strategy, old, good)
    new = arrays_to_state(new_arrays)
    for key in old:
        assert torch.equal(new[key], want[key]), key
    assert metrics["num-rejected"] == 1 and metrics["num-replies"] == 3
    lines = [r.getMessage() for r in caplog.records if f"node {node}" in r.getMessage()]
    assert len(lines) == 1 and what in lines[0], caplog.text


def test_error_replies_and_no_valid_reply_keep_the_model(caplog):
    strategy, old, replies = _round()
    errored = Message(Error(code=0, reason="client crashed"), reply_to=replies[0])
    for r in replies[1:]:  # the others come from nodes the strategy never asked
        del strategy._sent[r.metadata.src_node_id]
    with caplog.at_level(logging.WARNING):
        arrays, metrics = strategy.aggregate_train(1, [errored] + replies[1:])
    assert arrays is None  # Flower keeps the current model
    assert metrics["num-replies"] == 0 and metrics["num-rejected"] == 4
    assert "no valid reply" in caplog.text


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(key=st.sampled_from(["1.weight", "1.bias", "3.weight", "3.bias"]),
       value=arrays(st.sampled_from([np.float32, np.float64, np.float16]),
                    array_shapes(min_dims=0, max_dims=3, max_side=20),
                    elements=st.floats(allow_nan=True, allow_infinity=True, width=16))
       | arrays(np.int64, array_shapes(min_dims=0, max_dims=3, max_side=20)))
def test_fuzzed_reply_never_raises(key, value):
    strategy, old, replies = _round()
    _set_array(replies[0], key, value, strategy)
    new_arrays, metrics = strategy.aggregate_train(1, replies)
    new = arrays_to_state(new_arrays)
    held = [r for r in replies if r is not replies[0]]
    if metrics["num-rejected"] == 0:  # the fuzzed value happened to be a valid slice
        held = replies
    want = _expected(strategy, old, held)
    for k in old:
        assert torch.equal(new[k], want[k]), k


def test_a_reply_made_by_the_superlink_names_the_node_it_was_sent_to(caplog):
    """An error reply Flower's SuperLink writes for a lost node carries the SuperLink's
    id as its source: the log names the node the message was sent to instead."""
    strategy, old, replies = _round()
    lost = replies[2]
    node = lost.metadata.src_node_id
    errored = Message(Error(code=0, reason="node lost"), reply_to=strategy._out[node])  # the message sent to it
    errored.metadata.__dict__["_src_node_id"] = 1  # as a SuperLink-made reply
    assert errored.metadata.src_node_id == 1
    with caplog.at_level(logging.WARNING):
        _, metrics = strategy.aggregate_train(1, replies[:2] + [errored] + replies[3:])
    assert metrics["num-rejected"] == 1 and metrics["num-replies"] == 3
    assert f"rejected reply from node {node}: error reply" in caplog.text and "from node 1:" not in caplog.text
