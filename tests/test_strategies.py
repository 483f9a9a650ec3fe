"""Strategies through the in-process Grid: FedAvg equivalence, IST slices, determinism, bytes."""

import random

import pytest
import torch
from flwr.serverapp.strategy import FedAvg

from fl_subnet.wire import arrays_to_state, mask_from_config
from fl_subnet.strategies import IST, Dropout, FederatedDropout, MultiSampleDropout, SubnetFedAvg
from fl_subnet.models import MLP

from strategy_helpers import factory, grid, initial_arrays, train_config


def _start(strategy, num_nodes=4, rounds=3, **kw):
    return strategy.start(grid=grid(num_nodes), initial_arrays=initial_arrays(), num_rounds=rounds,
                          train_config=train_config(**kw))


def test_full_mask_equals_flower_fedavg():
    random.seed(0)  # Flower's FedAvg samples with the global `random`
    n = 4
    ours = _start(SubnetFedAvg(factory, min_available_nodes=n, min_train_nodes=n, fraction_evaluate=0.0))
    flower = _start(FedAvg(min_available_nodes=n, min_train_nodes=n, fraction_evaluate=0.0))
    a, b = arrays_to_state(ours.arrays), arrays_to_state(flower.arrays)
    start = arrays_to_state(initial_arrays())
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-6), key
        assert not torch.allclose(a[key], start[key])  # training happened
    # and its train metrics carry Flower's weighted train-loss plus ours
    m = ours.train_metrics_clientapp[3]
    assert m["num-replies"] == n and m["coverage"] == 1.0 and m["bytes-up"] > 0
    assert m["train-loss"] == pytest.approx(flower.train_metrics_clientapp[3]["train-loss"], rel=1e-6)


def test_ist_sends_each_node_its_partition_and_reassembles():
    p = 4
    strategy = IST(factory, p, local_steps=2, seed=3, fraction_evaluate=0.0)
    g = grid(p)
    arrays = initial_arrays()
    state = arrays_to_state(arrays)
    messages = list(strategy.configure_train(1, arrays, train_config(), g))
    assert len(messages) == p
    units = torch.zeros(HIDDEN := factory()[1].out_features, dtype=torch.int64)
    for msg in messages:
        mask = mask_from_config(msg.content["config"], strategy.spec.all_groups)
        rows = mask.indices["1"]
        units[rows] += 1
        sent = strategy.slice_state(msg.content["arrays"], msg.metadata.dst_node_id)
        assert sent["1.weight"].shape == (len(rows), 8)
        assert sent["3.weight"].shape == (3, len(rows))
        assert torch.equal(sent["1.weight"], state["1.weight"][rows])
        assert torch.equal(sent["3.weight"], state["3.weight"][:, rows])
    assert torch.equal(units, torch.ones(HIDDEN, dtype=torch.int64))  # a partition
    replies = list(g.send_and_receive(messages))
    new_arrays, metrics = strategy.aggregate_train(1, replies)
    new = arrays_to_state(new_arrays)
    for reply in replies:
        mask = strategy._sent[reply.metadata.src_node_id]
        rows = mask.indices["1"]
        trained = strategy.slice_state(reply.content["arrays"], reply.metadata.src_node_id)
        # every hidden unit equals its one holder's trained copy, bit for bit
        assert torch.equal(new["1.weight"][rows], trained["1.weight"])
        assert torch.equal(new["1.bias"][rows], trained["1.bias"])
        assert torch.equal(new["3.weight"][:, rows], trained["3.weight"])
    assert metrics["coverage"] == 1.0 and metrics["num-rejected"] == 0


@pytest.mark.parametrize("make", [
    lambda: IST(factory, 2, local_steps=2, seed=5, fraction_evaluate=0.0),
    lambda: FederatedDropout(factory, 0.5, local_steps=2, seed=5, fraction_evaluate=0.0,
                             fraction_train=0.5, min_train_nodes=2),
    lambda: MultiSampleDropout(factory, 0.6, 3, loss_average=True, seed=5, fraction_evaluate=0.0),
    lambda: Dropout(factory, 0.7, seed=5, fraction_evaluate=0.0),
])
def test_same_seed_same_masks_and_model(make):
    runs = []
    for _ in range(2):
        strategy = make()
        sent = []
        original = strategy.configure_train

        def spy(*args, _orig=original, _sent=sent, **kw):
            msgs = list(_orig(*args, **kw))
            _sent.append([bytes(m.content["config"]["mask"]) for m in msgs])
            return msgs

        strategy.configure_train = spy
        result = strategy.start(grid=grid(4), initial_arrays=initial_arrays(), num_rounds=3,
                                train_config=train_config())
        runs.append((sent, arrays_to_state(result.arrays)))
    (masks_a, model_a), (masks_b, model_b) = runs
    assert masks_a == masks_b and len(masks_a) == 3
    assert len({m for rnd in masks_a for m in rnd}) > 1  # masks do vary
    for key in model_a:
        assert torch.equal(model_a[key], model_b[key]), key


def test_ist_bytes_per_node_at_most_27_percent_of_fedavg():
    big = lambda: MLP(64, [256], 10)  # noqa: E731 — a 2-layer MLP
    torch.manual_seed(0)
    from flwr.app import ArrayRecord
    arrays = ArrayRecord(big().state_dict())
    g = grid(4)
    fedavg = SubnetFedAvg(big, min_available_nodes=4, min_train_nodes=4)
    ist = IST(big, 4)
    full_msgs = list(fedavg.configure_train(1, arrays, train_config(), g))
    ist_msgs = list(ist.configure_train(1, arrays, train_config(), g))
    per_node_full = fedavg._bytes_down / len(full_msgs)
    per_node_ist = ist._bytes_down / len(ist_msgs)
    assert per_node_ist <= 0.27 * per_node_full, (per_node_ist, per_node_full)


def test_strategy_config_errors_name_the_key():
    with pytest.raises(ValueError, match="keep-prob"):
        FederatedDropout(factory, 1.5)
    with pytest.raises(ValueError, match="num-subnets"):
        IST(factory, 0)
    with pytest.raises(ValueError, match="ist-scaling"):
        IST(factory, 2, scaling="huge")
    with pytest.raises(ValueError, match="num-subnets"):
        MultiSampleDropout(factory, 0.5, 0)


def test_federated_evaluation_sends_full_model_and_aggregates():
    n = 3
    strategy = SubnetFedAvg(factory, min_available_nodes=n, min_train_nodes=n, min_evaluate_nodes=n,
                            fraction_evaluate=1.0)
    result = _start(strategy, num_nodes=n, rounds=2)
    ev = result.evaluate_metrics_clientapp[2]
    # each node evaluates the full global model on its first 8 examples; recompute it here
    from fl_subnet.clients import evaluate_model
    from strategy_helpers import load_data
    from flwr.app import Context, RecordDict

    model = factory()
    model.load_state_dict(arrays_to_state(result.arrays))
    accs = []
    for pid in range(n):
        ctx = Context(run_id=1, node_id=1, node_config={"partition-id": pid}, state=RecordDict(), run_config={})
        accs.append(evaluate_model(model, load_data(ctx)[1], "cross-entropy")["eval-acc"])
    assert ev["eval-acc"] == pytest.approx(sum(accs) / n)  # 8 examples each: a plain mean


def test_ist_with_one_subnetwork_trains_on_one_node():
    """p = 1 is one full-width sub-network: one node is enough (Flower's default minimum
    of 2 training nodes no longer applies), and the round trains it."""
    strategy = IST(factory, 1, local_steps=2, fraction_evaluate=0.0)
    assert strategy.min_train_nodes == 1 and strategy.min_available_nodes == 1
    result = strategy.start(grid=grid(1), initial_arrays=initial_arrays(), num_rounds=2,
                            train_config=train_config())
    new, start = arrays_to_state(result.arrays), arrays_to_state(initial_arrays())
    assert any(not torch.equal(new[k], start[k]) for k in start)
    assert IST(factory, 3).min_train_nodes == 3 and IST(factory, 2, min_train_nodes=5).min_train_nodes == 5
