"""HeteroFL's label split (fl_subnet.core.label_split): the server's aggregation against a
plain-numpy port of HeteroFL's ``Federation.combine`` (official code, src/fed.py), the
node's masked loss against a hand computation, the option off leaving everything
unchanged, malformed labels refused naming the key, and a short run through
``strategy.start`` and Flower's serde in which every reply is accepted and the loss falls."""

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from torch.utils.data import TensorDataset

from fl_subnet import analyze
from fl_subnet.clients import TrainConfig, make_client_app, partition_reply, receive, train_local
from fl_subnet.clients.train import loss_fn
from fl_subnet.core.aggregate import MaskedAggregator
from fl_subnet.core.flat import FlatMap
from fl_subnet.core.label_split import check_labels, mask_logits, output_layer, row_restriction
from fl_subnet.core.samplers import NestedPrefixSampler
from fl_subnet.experiments.config import RunConfig
from fl_subnet.experiments.inprocess_grid import InProcessGrid
from fl_subnet.models import MLP, FlowerCNN
from fl_subnet.strategies import FedRolex, FjORD, HeteroFL, HeteroFLDynamic
from fl_subnet.wire import arrays_to_state

D_IN, HIDDEN, CLASSES = 6, [10, 7], 5


def factory():
    return MLP(D_IN, HIDDEN, CLASSES)


SPEC = analyze(factory, torch.zeros(1, D_IN), verify=False)
OUT = output_layer(SPEC)


# --------------------------------------------------------------- the reference, in numpy
def reference_split_model(capacity: float) -> dict[str, tuple[np.ndarray, ...]]:
    """HeteroFL's ``split_model`` ('fix' split) for the MLP: the first ⌈r·size⌉ units of
    every hidden layer, every input feature and every class."""
    k1, k2 = (int(np.ceil(capacity * h)) for h in HIDDEN)
    a = np.arange
    return {"1.weight": (a(k1), a(D_IN)), "1.bias": (a(k1),), "3.weight": (a(k2), a(k1)), "3.bias": (a(k2),),
            "5.weight": (a(CLASSES), a(k2)), "5.bias": (a(CLASSES),)}


def reference_combine(global_parameters, local_parameters, param_idx, label_split):
    """HeteroFL's ``Federation.combine`` (src/fed.py, the ``conv`` branch), line for line in
    numpy: the output layer's rows enter the sum and the count only for the node's labels."""
    out = {}
    output_weight_name = [k for k in global_parameters if "weight" in k][-1]
    output_bias_name = [k for k in global_parameters if "bias" in k][-1]
    for k, v in global_parameters.items():
        v = v.copy()
        parameter_type = k.split(".")[-1]
        count = np.zeros(v.shape)
        tmp_v = np.zeros(v.shape)
        for m in range(len(local_parameters)):
            idx = list(param_idx[m][k])
            local = local_parameters[m][k]
            if parameter_type == "weight" and v.ndim > 1:
                if k == output_weight_name:
                    idx[0] = idx[0][label_split[m]]
                    local = local[label_split[m]]
                tmp_v[np.ix_(*idx)] += local
                count[np.ix_(*idx)] += 1
            else:
                idx = idx[0]
                if k == output_bias_name:
                    idx = idx[label_split[m]]
                    local = local[label_split[m]]
                tmp_v[idx] += local
                count[idx] += 1
        held = count > 0
        tmp_v[held] = tmp_v[held] / count[held]
        v[held] = tmp_v[held]
        out[k] = v
    return out


def _round(capacities, labels, seed=0, flat=False, rows=True):
    """(fl-subnet's aggregate, the reference's) of random float64 replies of nodes with
    these capacities and label sets (None: every label)."""
    rng = np.random.default_rng(seed)
    state = {k: torch.from_numpy(rng.normal(size=tuple(v.shape))) for k, v in factory().state_dict().items()}
    masks = NestedPrefixSampler(scale=True).sample(SPEC.groups, 1, len(capacities), capacities=capacities)
    fmap = FlatMap(SPEC.slicer, {k: tuple(v.shape) for k, v in state.items()}) if flat else None
    agg = MaskedAggregator(state, SPEC.slicer, precision="float64", flat=fmap)
    locals_, idx = [], []
    for mask, r, held in zip(masks, capacities, labels):
        ref_idx = reference_split_model(r)
        compact = {k: torch.from_numpy(rng.normal(size=tuple(len(i) for i in ref_idx[k]))) for k in state}
        gathered = SPEC.gather(state, mask)
        assert {k: tuple(t.shape) for k, t in gathered.items()} == {k: tuple(t.shape) for k, t in compact.items()}
        agg.add(compact, mask, 1.0, rows=row_restriction(OUT, held or ()) if rows else None)
        locals_.append({k: t.numpy() for k, t in compact.items()})
        idx.append(ref_idx)
    split = [np.array(held if held else range(CLASSES)) for held in labels]
    ref = reference_combine({k: v.numpy() for k, v in state.items()}, locals_, idx, split)
    return agg.finalize(), ref, agg


# ------------------------------------------------------------------------------ (a)
@pytest.mark.parametrize("flat", [False, True])
@pytest.mark.parametrize("capacities,labels", [
    ((0.3, 0.6, 1.0), ([0, 1], [1, 2, 3], [4])),
    ((0.5, 1.0), ([2], None)),  # a node that reports none holds every label
    ((1.0, 0.25, 0.5), ([0, 3], [0, 3], [1])),  # label 2 and 4: no holder, the rows keep W_k
])
def test_aggregate_equals_heterofl_combine(capacities, labels, flat):
    ours, ref, _ = _round(capacities, labels, seed=len(capacities), flat=flat)
    assert OUT == ("5.weight", "5.bias", CLASSES)
    for k, want in ref.items():
        np.testing.assert_allclose(ours[k].numpy(), want, rtol=0, atol=1e-12, err_msg=k)


def test_the_rows_are_averaged_over_their_holders_by_hand():
    """Bias of the output layer, replies of value 1, 4 and 10 holding labels {0, 1}, {1, 2}
    and all: row 0 → (1+10)/2, row 1 → 5, row 2 → 7, rows 3, 4 → 10."""
    state = {k: torch.zeros_like(v, dtype=torch.float64) for k, v in factory().state_dict().items()}
    masks = NestedPrefixSampler().sample(SPEC.groups, 1, 3, capacities=[0.3, 0.5, 1.0])
    agg = MaskedAggregator(state, SPEC.slicer)
    for mask, value, held in zip(masks, (1.0, 4.0, 10.0), ([0, 1], [1, 2], None)):
        compact = {k: torch.full_like(v, value) for k, v in SPEC.gather(state, mask).items()}
        agg.add(compact, mask, 1.0, rows=row_restriction(OUT, held or ()))
    assert agg.finalize()["5.bias"].tolist() == [5.5, 5.0, 7.0, 10.0, 10.0]
    assert agg.held()["5.bias"].all()


def test_output_layer_of_a_cnn_and_by_name():
    cnn = analyze(FlowerCNN, torch.zeros(1, 1, 8, 8), verify=False)
    assert output_layer(cnn) == ("fc3.weight", "fc3.bias", 10)
    assert output_layer(SPEC, "3") == ("3.weight", "3.bias", 7)
    with pytest.raises(ValueError, match="label-split"):
        output_layer(SPEC, "nope")


# ------------------------------------------------------------------------------ (b)
def test_masked_loss_equals_hand_computation():
    """Logits (1, 2, 3), labels {0, 2}, target 2: the reference sets logit 1 to 0, so the
    loss is log(e + 1 + e³) - 3 and the masked logit gets no gradient."""
    logits = torch.tensor([[1.0, 2.0, 3.0]], dtype=torch.float64, requires_grad=True)
    loss = loss_fn("cross-entropy", logits, torch.tensor([2]), (0, 2))
    assert float(loss.detach()) == pytest.approx(math.log(math.e + 1 + math.e ** 3) - 3, abs=1e-12)
    loss.backward()
    p = np.array([math.e, 1.0, math.e ** 3]) / (math.e + 1 + math.e ** 3)
    np.testing.assert_allclose(logits.grad.numpy()[0], [p[0], 0.0, p[2] - 1], atol=1e-12)
    assert torch.equal(mask_logits(logits, ()), logits)  # no labels: untouched
    assert float(loss_fn("cross-entropy", logits.detach(), torch.tensor([2]))) == pytest.approx(
        math.log(math.e + math.e ** 2 + math.e ** 3) - 3, abs=1e-12)


def test_local_training_leaves_the_rows_of_absent_labels():
    """With labels {1, 3} a node's SGD moves only rows 1 and 3 of the classifier (the masked
    logits have no gradient), and its loss is the masked cross-entropy."""
    torch.manual_seed(0)
    model = factory()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(12, D_IN)
    y = torch.tensor([1, 3] * 6)
    cfg = TrainConfig.from_config({"local-steps": 3, "lr": 0.5, "batch-size": 0, "labels": [3, 1]})
    assert cfg.labels == (1, 3)
    with torch.no_grad():
        first = float(F.cross_entropy(mask_logits(model(x), [1, 3]), y))
    n, loss = train_local(model, TensorDataset(x, y), cfg, seed=0)
    after = model.state_dict()
    assert n == 12 and loss < first + 1e-9
    for row in (0, 2, 4):
        assert torch.equal(after["5.weight"][row], before["5.weight"][row])
        assert after["5.bias"][row] == before["5.bias"][row]
    assert not torch.equal(after["5.weight"][1], before["5.weight"][1])


# ------------------------------------------------------------------------------ (c)
@pytest.mark.parametrize("flat", [False, True])
def test_option_off_leaves_the_aggregate_unchanged(flat):
    capacities, labels = (0.3, 0.6, 1.0), ([0, 1], [1, 2, 3], [4])
    off, _, agg_off = _round(capacities, labels, seed=3, flat=flat, rows=False)
    plain_state = {k: v for k, v in agg_off.state.items()}
    # the same replies, added without the keyword at all
    plain = MaskedAggregator(plain_state, SPEC.slicer, precision="float64", flat=agg_off.flat)
    every = MaskedAggregator(plain_state, SPEC.slicer, precision="float64", flat=agg_off.flat)
    for compact, mask in zip(agg_off._pending, agg_off._masks):
        plain.add(compact, mask, 1.0)
        every.add(compact, mask, 1.0, rows=row_restriction(OUT, range(CLASSES)))  # every label: no restriction
    for k in off:
        assert torch.equal(plain.finalize()[k], off[k]) and torch.equal(every.finalize()[k], off[k]), k
    on, _, _ = _round(capacities, labels, seed=3, flat=flat)
    assert not torch.equal(on["5.bias"], off["5.bias"])


def test_option_off_sends_no_labels_and_restricts_nothing():
    strategy = HeteroFL(factory, capacity_tiers=(0.5, 1.0))
    strategy._labels[7] = (1, 2)
    assert not strategy.label_split and strategy.reply_rows(7) is None
    assert "labels" not in strategy.node_config(7, None)
    on = HeteroFL(factory, capacity_tiers=(0.5, 1.0), label_split=True)
    on._labels[7] = (1, 2)
    assert on.order_by_partition and on.node_config(7, None) == {"labels": [1, 2]}
    assert {k: v.tolist() for k, v in on.reply_rows(7).items()} == {"5.weight": [1, 2], "5.bias": [1, 2]}
    assert on.reply_rows(8) is None  # reported none: every row
    assert on.settings()["label split"] == "on (output layer 5.weight, 5 classes)"
    assert "label split" not in strategy.settings()


# ------------------------------------------------------------------------------ (d)
@pytest.mark.parametrize("bad", [[], [1, 1], [-1], ["a"], [1.5], [True], "0,1", 3])
def test_bad_labels_are_refused_naming_the_key(bad):
    with pytest.raises(ValueError, match="labels"):
        check_labels(bad)
    with pytest.raises(ValueError, match="labels"):
        TrainConfig.from_config({"labels": bad})


def test_bad_labels_everywhere_name_the_key():
    with pytest.raises(ValueError, match=r"labels must hold labels in \[0, 3\)"):
        mask_logits(torch.zeros(2, 3), [0, 3])
    with pytest.raises(ValueError, match="labels"):
        TrainConfig.from_config({"labels": [0], "loss": "mse"})
    with pytest.raises(ValueError, match="label-split"):
        RunConfig(strategy="fjord", label_split=True)
    with pytest.raises(ValueError, match="label-split"):
        RunConfig(strategy="heterofl", label_split="yes")
    with pytest.raises(ValueError, match="label-split"):
        RunConfig(strategy="heterofl", label_split=True, aggregation="median")
    assert RunConfig(strategy="heterofl-dynamic", label_split=True, aggregation="mean").label_split
    with pytest.raises(ValueError, match="label-split needs aggregation .mean.*set aggregation"):
        RunConfig(strategy="heterofl", label_split=True)  # the default, centered-clip
    with pytest.raises(ValueError, match="label-split"):
        FjORD(factory, capacity_tiers=(1.0,), label_split=True)
    with pytest.raises(ValueError, match="label-split"):
        FedRolex(factory, label_split=True, aggregation="median")
    state = {k: torch.zeros_like(v) for k, v in factory().state_dict().items()}
    agg = MaskedAggregator(state, SPEC.slicer)
    compact = SPEC.gather(state, NestedPrefixSampler().sample(SPEC.groups, 1, 1, capacities=[1.0])[0])
    mask = NestedPrefixSampler().sample(SPEC.groups, 1, 1, capacities=[1.0])[0]
    for rows in ({"5.bias": torch.tensor([5])}, {"nope": torch.tensor([0])}, {"5.bias": torch.tensor([0.5])}):
        with pytest.raises(ValueError, match="rows"):
            agg.add(compact, mask, 1.0, rows=rows)
    assert agg.num_replies == 0
    InProcessGrid(make_client_app(factory, _data), 1)  # Flower's run identity, for Message
    context = Context(run_id=1, node_id=5, node_config={"partition-id": 0}, state=RecordDict(), run_config={})
    query = Message(RecordDict(), dst_node_id=5, message_type="query")
    with pytest.raises(ValueError, match="labels"):
        partition_reply(query, context, labels=[2, 2])
    assert dict(partition_reply(query, context, labels=[2, 0]).content["metrics"]) == {
        "partition-id": 0, "labels": [0, 2]}
    msg = RecordDict({"arrays": ArrayRecord(factory().state_dict()), "config": ConfigRecord({"labels": [-2]})})
    with pytest.raises(ValueError, match="labels"):
        receive(msg, factory)
    msg["config"]["labels"] = [4, 0]
    assert receive(msg, factory).labels == (0, 4)


def test_a_node_reporting_malformed_labels_counts_as_holding_all(caplog):
    app = make_client_app(factory, _data, labels=lambda c: [0, 1] if c.node_config["partition-id"] else [0])
    strategy = HeteroFL(factory, capacity_tiers=(1.0,), label_split=True, min_available_nodes=2)
    strategy.label_classes = 1  # so that node 1's label 1 is out of range
    grid = InProcessGrid(app, 2)
    nodes = strategy.order_nodes(grid, sorted(grid.get_node_ids()))
    assert strategy.node_labels == {nodes[0]: (0,)}
    assert "refused its reported labels" in caplog.text and "labels must hold labels in [0, 1)" in caplog.text


# ------------------------------------------------------------------------------ (e)
NODE_LABELS = ([0, 1], [1, 2, 3], [3, 4], [0, 2, 4])


def _data(context):
    """Node i holds the examples of NODE_LABELS[i] only (pathological label skew)."""
    pid = int(context.node_config["partition-id"])
    g = torch.Generator().manual_seed(200 + pid)
    labels = torch.tensor(NODE_LABELS[pid % len(NODE_LABELS)])
    y = labels[torch.randint(len(labels), (40,), generator=g)]
    x = torch.randn(40, D_IN, generator=g) * 0.5
    x[torch.arange(40), y] += 2.0  # class c: feature c is large
    return TensorDataset(x, y), None


def _central_loss(arrays):
    model = factory()
    model.load_state_dict(arrays_to_state(arrays))
    parts = [_data(SimpleNamespace(node_config={"partition-id": i}))[0].tensors for i in range(4)]
    x, y = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
    with torch.no_grad():
        return float(F.cross_entropy(model(x), y))


def _labels_of(context):
    return torch.unique(_data(context)[0].tensors[1]).tolist()


def _train_config():
    return ConfigRecord({"local-steps": 5, "lr": 0.2, "batch-size": 10, "loss": "cross-entropy", "seed": 0})


@pytest.mark.parametrize("cls", [HeteroFL, HeteroFLDynamic, FedRolex])
def test_a_short_run_accepts_every_reply_and_the_loss_falls(cls):
    torch.manual_seed(0)
    init = ArrayRecord(factory().state_dict())
    strategy = cls(factory, capacity_tiers=(0.5, 1.0), label_split=True, fraction_evaluate=0.0,
                   min_available_nodes=4)
    grid = InProcessGrid(make_client_app(factory, _data, labels=_labels_of), 4)
    result = strategy.start(grid=grid, initial_arrays=init, num_rounds=4, train_config=_train_config())
    rounds = result.train_metrics_clientapp
    assert [rounds[r]["num-replies"] for r in sorted(rounds)] == [4] * 4
    assert all(rounds[r]["num-rejected"] == 0 for r in rounds)
    by_partition = {strategy._rank[n]: labels for n, labels in strategy.node_labels.items()}
    assert by_partition == {i: tuple(lab) for i, lab in enumerate(NODE_LABELS)}
    assert _central_loss(result.arrays) < 0.8 * _central_loss(init)


def test_one_round_averages_each_class_row_over_its_holders():
    """Through the strategy and Flower's serde: the new output bias of class c is the mean of
    the replies of the nodes whose partition holds c (count mean, HeteroFL)."""
    torch.manual_seed(1)
    init = ArrayRecord(factory().state_dict())
    strategy = HeteroFL(factory, capacity_tiers=(0.5, 1.0), label_split=True, fraction_evaluate=0.0,
                        min_available_nodes=4)
    grid = InProcessGrid(make_client_app(factory, _data, labels=_labels_of), 4)
    messages = list(strategy.configure_train(1, init, _train_config(), grid))
    sent = {m.metadata.dst_node_id: m.content["config"]["labels"] for m in messages}
    assert sorted(map(tuple, sent.values())) == sorted(map(tuple, NODE_LABELS))
    replies = list(grid.send_and_receive(messages))
    got = {r.metadata.src_node_id: strategy.slice_state(r.content["arrays"], r.metadata.src_node_id)
           for r in replies}
    arrays, metrics = strategy.aggregate_train(1, replies)
    assert metrics["num-replies"] == 4 and metrics["num-rejected"] == 0
    new = arrays_to_state(arrays)["5.bias"]
    for c in range(CLASSES):
        holders = [got[n]["5.bias"][c] for n, labels in sent.items() if c in labels]
        assert float(new[c]) == pytest.approx(float(torch.stack(holders).mean()), abs=1e-6), c
