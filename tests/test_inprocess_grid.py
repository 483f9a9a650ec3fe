"""InProcessGrid runs Flower's own strategies end to end, synchronously, in-process."""

import random

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode
from flwr.serverapp.strategy import FedAvg

from fl_subnet.experiments.inprocess_grid import InProcessGrid

NUM_NODES = 3
INITIAL = [np.arange(6, dtype=np.float64).reshape(2, 3), np.array([-1.0, 0.5])]


def make_app(failing_partition: int | None = None) -> ClientApp:
    """Train adds ``partition-id + 1`` to every array, counts calls in context.state."""
    app = ClientApp()

    @app.train()
    def train(msg: Message, context) -> Message:
        pid = context.node_config["partition-id"]
        msg.content["seen-by"] = ConfigRecord({"pid": pid})  # must not leak to others
        calls = context.state.get("counter", ConfigRecord({"train": 0}))
        calls["train"] += 1
        context.state["counter"] = calls
        if pid == failing_partition:  # after touching state: it must be rolled back
            raise RuntimeError(f"partition {pid} is broken")
        arrays = msg.content["arrays"].to_numpy_ndarrays()
        reply = RecordDict(
            {
                "arrays": ArrayRecord([a + (pid + 1) for a in arrays]),
                "metrics": MetricRecord(
                    {"num-examples": pid + 1, "train-calls": calls["train"]}
                ),
            }
        )
        return Message(reply, reply_to=msg)

    @app.evaluate()
    def evaluate(msg: Message, context) -> Message:
        pid = context.node_config["partition-id"]
        loss = float(sum(a.sum() for a in msg.content["arrays"].to_numpy_ndarrays()))
        metrics = MetricRecord({"num-examples": pid + 1, "eval-loss": loss})
        return Message(RecordDict({"metrics": metrics}), reply_to=msg)

    return app


def fedavg() -> FedAvg:
    return FedAvg(
        fraction_train=1.0,
        fraction_evaluate=1.0,
        min_train_nodes=NUM_NODES,
        min_evaluate_nodes=NUM_NODES,
        min_available_nodes=NUM_NODES,
    )


def hand_fedavg(arrays, weights, rounds):
    """Each node returns ``a + w``; FedAvg averages weighted by ``w``."""
    for _ in range(rounds):
        arrays = [sum(w * (a + w) for w in weights) / sum(weights) for a in arrays]
    return arrays


def test_fedavg_two_rounds_matches_hand_computation():
    random.seed(0)
    grid = InProcessGrid(make_app(), NUM_NODES)
    result = fedavg().start(
        grid=grid, initial_arrays=ArrayRecord(INITIAL), num_rounds=2
    )
    expected = hand_fedavg(INITIAL, weights=[1, 2, 3], rounds=2)
    got = result.arrays.to_numpy_ndarrays()
    assert len(got) == len(expected)
    for g, e in zip(got, expected, strict=True):
        np.testing.assert_allclose(g, e, rtol=0, atol=1e-12)
    # x + 14/6 per round: a sanity check of the hand computation itself.
    np.testing.assert_allclose(expected[1], INITIAL[1] + 2 * 14 / 6)
    # Evaluate ran each round, on the aggregated arrays of that round.
    assert set(result.evaluate_metrics_clientapp) == {1, 2}
    loss2 = sum(float(a.sum()) for a in expected)
    assert result.evaluate_metrics_clientapp[2]["eval-loss"] == pytest.approx(loss2)


def test_context_state_persists_across_rounds_per_node():
    random.seed(1)
    grid = InProcessGrid(make_app(), NUM_NODES)
    result = fedavg().start(
        grid=grid, initial_arrays=ArrayRecord(INITIAL), num_rounds=3
    )
    for rnd in (1, 2, 3):  # every node reports train-calls == rnd in round rnd
        assert result.train_metrics_clientapp[rnd]["train-calls"] == pytest.approx(rnd)
    assert list(grid.get_node_ids()) == [1001, 1002, 1003]
    for i, node_id in enumerate(grid.get_node_ids()):
        context = grid.get_context(node_id)
        assert context.node_id == node_id
        assert context.node_config == {"partition-id": i, "num-partitions": NUM_NODES}
        assert context.state["counter"]["train"] == 3


def test_raising_clientapp_gives_error_reply_and_fedavg_uses_the_rest():
    random.seed(2)
    grid = InProcessGrid(make_app(failing_partition=1), NUM_NODES)
    content = RecordDict({"arrays": ArrayRecord(INITIAL), "config": ConfigRecord()})
    msgs = [Message(content, node_id, "train") for node_id in grid.get_node_ids()]
    replies = list(grid.send_and_receive(msgs, timeout=1.0))
    assert [r.metadata.src_node_id for r in replies] == [1001, 1002, 1003]
    assert [r.has_error() for r in replies] == [False, True, False]
    bad = replies[1]
    assert bad.error.code == ErrorCode.CLIENT_APP_RAISED_EXCEPTION
    assert "partition 1 is broken" in bad.error.reason
    assert bad.metadata.reply_to_message_id == msgs[1].metadata.message_id
    # The failed call did not commit its context changes; the others did.
    assert "counter" not in grid.get_context(1002).state
    assert grid.get_context(1001).state["counter"]["train"] == 1
    # The content shared by all three messages was not touched by any node.
    assert list(content) == ["arrays", "config"]

    result = fedavg().start(
        grid=grid, initial_arrays=ArrayRecord(INITIAL), num_rounds=2
    )
    expected = hand_fedavg(INITIAL, weights=[1, 3], rounds=2)
    for g, e in zip(result.arrays.to_numpy_ndarrays(), expected, strict=True):
        np.testing.assert_allclose(g, e, rtol=0, atol=1e-12)


def test_custom_ids_configs_and_bad_messages():
    grid = InProcessGrid(
        make_app(),
        2,
        node_configs=[{"partition-id": 5}, {"partition-id": 7}],
        run_config={"lr": 0.1},
        node_ids=[7, 9],
    )
    assert list(grid.get_node_ids()) == [7, 9]
    assert grid.get_context(9).run_config == {"lr": 0.1}
    content = RecordDict({"arrays": ArrayRecord(INITIAL)})
    (reply,) = grid.send_and_receive([Message(content, 9, "train")])
    assert reply.metadata.src_node_id == 9
    assert reply.content["metrics"]["num-examples"] == 8
    assert grid.pull_messages(["nope"]) == []
    with pytest.raises(ValueError, match="Unknown dst_node_id"):
        grid.push_messages([Message(content, 1001, "train")])
    with pytest.raises(ValueError, match="node_ids"):
        InProcessGrid(make_app(), 2, node_ids=[1, 2])


def test_invalid_replies_become_error_replies_and_messages_can_be_resent():
    app = ClientApp()

    @app.query()
    def query(msg: Message, context) -> Message:
        if context.node_config["partition-id"] == 0:
            return "not a message"  # type: ignore[return-value]
        return Message(RecordDict(), context.node_id, "query")  # not reply_to=msg

    grid = InProcessGrid(app, 2)
    msgs = [Message(RecordDict(), node_id, "query") for node_id in grid.get_node_ids()]
    for _ in range(2):  # the same Message objects, pushed twice
        replies = list(grid.send_and_receive(msgs))
        assert [r.metadata.src_node_id for r in replies] == [1001, 1002]
        assert all(r.has_error() for r in replies)
        assert "returned a str" in replies[0].error.reason
        assert "reply_to" in replies[1].error.reason
