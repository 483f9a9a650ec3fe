"""The packed compact slice (fl_subnet.wire.packed): exact bytes, round trips, errors, and a
round whose replies come packed or one array per tensor aggregating to the same model."""

from __future__ import annotations


import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from fl_subnet.clients import make_client_app, receive
from fl_subnet.experiments.inprocess_grid import InProcessGrid
from fl_subnet.models import FlowerCNN
from fl_subnet.wire.packed import decode_slice, is_packed, kind_of, pack_state, raw_array, slice_layout, unpack_state
from fl_subnet.strategies import FederatedDropout
from fl_subnet.wire import state_to_arrays

from strategy_helpers import factory, load_data, train_config


def _mixed_state():
    g = torch.Generator().manual_seed(0)
    return {"b.weight": torch.randn(3, 4, generator=g), "a.bias": torch.randn(5, generator=g),
            "c.stat": torch.randn(2, generator=g, dtype=torch.float64),
            "d.count": torch.tensor(7), "e.flag": torch.tensor([True, False])}


def _layout(state):
    return [(k, tuple(state[k].shape), kind_of(state[k].dtype)) for k in sorted(state)]


def test_packed_bytes_are_one_raw_array_per_kind_of_the_sorted_flat_tensors():
    state = _mixed_state()
    record = pack_state(state, _layout(state))
    assert sorted(record) == ["packed-bool", "packed-float", "packed-int"]
    # independent: numpy's little-endian bytes of the concatenation in sorted-key order,
    # float32 and float64 promoted to float64; no header, the Array's fields say the rest
    for name, keys, dtype in [("packed-float", ["a.bias", "b.weight", "c.stat"], "<f8"),
                              ("packed-int", ["d.count"], "<i8"), ("packed-bool", ["e.flag"], "|b1")]:
        values = np.concatenate([state[k].numpy().astype(dtype).reshape(-1) for k in keys])
        assert record[name].data == values.tobytes(), name
        assert len(record[name].data) == sum(state[k].numel() for k in keys) * np.dtype(dtype).itemsize
        assert (record[name].stype, record[name].dtype, tuple(record[name].shape)) == \
            ("raw", np.dtype(dtype).name, (values.size,))


def test_round_trip_keeps_values_and_shapes_and_views_without_copy():
    state = _mixed_state()
    layout = _layout(state)
    record = pack_state(state, layout)
    for copy in (True, False):
        back = unpack_state(record, layout, copy=copy)
        assert list(back) == sorted(state)
        for k, t in state.items():
            assert back[k].shape == t.shape and kind_of(back[k].dtype) == kind_of(t.dtype)
            assert torch.equal(back[k].to(t.dtype), t), k
    # copy=False: views of the message's own bytes (the server's path), no copy
    views = [unpack_state(record, layout, copy=False)["b.weight"] for _ in range(2)]
    assert views[0].data_ptr() == views[1].data_ptr()
    copies = [unpack_state(record, layout, copy=True)["b.weight"] for _ in range(2)]
    assert copies[0].data_ptr() != copies[1].data_ptr() != views[0].data_ptr()


@pytest.mark.parametrize("change,match", [
    (lambda s: s.pop("a.bias"), r"missing \['a.bias'\]"),
    (lambda s: s.update({"z": torch.zeros(1)}), r"unexpected \['z'\]"),
    (lambda s: s.update({"b.weight": torch.zeros(4, 3)}), r"'b.weight' has shape \(4, 3\)"),
    (lambda s: s.update({"d.count": torch.tensor(1.5)}), r"'d.count' .* says \(\) \(int\)"),
])
def test_pack_refuses_a_state_that_is_not_the_layouts(change, match):
    state = _mixed_state()
    layout = _layout(state)
    change(state)
    with pytest.raises(ValueError, match=match):
        pack_state(state, layout)


@pytest.mark.parametrize("change,match", [
    (lambda r: r.pop("packed-int"), "missing array 'packed-int'"),
    (lambda r: r.__setitem__("packed-x", raw_array(np.zeros(1))), r"unexpected array\(s\) \['packed-x'\]"),
    (lambda r: r.__setitem__("packed-float", raw_array(np.zeros(20))), "holds 20 values, the slice layout 19"),
    (lambda r: r.__setitem__("packed-float", Array(np.zeros(19))), "'packed-float' must be raw values"),
    (lambda r: r.__setitem__("packed-float", Array(dtype="float64", shape=(1, 19), stype="raw", data=bytes(152))),
     "'packed-float' must be 1-D"),
    (lambda r: r.__setitem__("packed-float", Array(dtype="float64", shape=(19,), stype="raw", data=bytes(151))),
     "'packed-float' must be 1-D with shape\\[0\\] x 8 bytes"),
    (lambda r: r.__setitem__("packed-float", Array(dtype="O", shape=(19,), stype="raw", data=bytes(152))),
     "'packed-float' must hold numbers"),
    (lambda r: r.__setitem__("packed-float", Array(dtype="no-such", shape=(19,), stype="raw", data=bytes(152))),
     "'packed-float' has an unknown dtype"),
    (lambda r: r.__setitem__("packed-int", raw_array(np.zeros(1, np.float32))), "'packed-int' must hold int values"),
])
def test_unpack_refuses_arrays_that_do_not_match_and_names_them(change, match):
    state = _mixed_state()
    layout = _layout(state)
    record = pack_state(state, layout)
    change(record)
    with pytest.raises(ValueError, match=match):
        unpack_state(record, layout)


def test_layout_is_the_slicers_compact_shapes_in_sorted_order():
    strategy = FederatedDropout(FlowerCNN, 0.5, seed=1, example_input=torch.zeros(1, 1, 8, 8))
    full = {k: (tuple(t.shape), t.dtype) for k, t in FlowerCNN().state_dict().items()}
    mask = strategy.sampler.sample(strategy.groups, 1, 1)[0]
    layout = slice_layout(strategy.slicer, mask, full)
    assert [k for k, _, _ in layout] == sorted(full)
    state = strategy.slicer.gather(FlowerCNN().state_dict(), mask)
    assert {k: s for k, s, _ in layout} == {k: tuple(t.shape) for k, t in state.items()}


def _round(reply_format):
    """One federated-dropout round, 3 nodes, fl-subnet's ClientApp; its replies re-sent
    in ``reply_format`` ("packed" as the ClientApp sends them, or "per-tensor")."""
    strategy = FederatedDropout(factory, 0.5, seed=3, fraction_evaluate=0.0, min_available_nodes=3,
                                min_train_nodes=3)
    grid = InProcessGrid(make_client_app(factory, load_data), 3)
    torch.manual_seed(0)
    init = ArrayRecord(factory().state_dict())
    messages = list(strategy.configure_train(1, init, train_config(), grid))
    replies = list(grid.send_and_receive(messages))
    if reply_format == "per-tensor":  # as a user's ArrayRecord(model.state_dict()) writes it
        replies = [Message(RecordDict({"arrays": ArrayRecord(
            strategy.slice_state(r.content["arrays"], r.metadata.src_node_id)),
            "metrics": r.content["metrics"]}), reply_to=m) for r, m in zip(replies, messages)]
    return strategy, messages, replies, strategy.aggregate_train(1, replies)


def test_a_round_sends_packed_slices_and_reads_packed_or_per_tensor_replies_alike():
    strategy, messages, replies, (packed_new, packed_metrics) = _round("packed")
    full = {k: t for k, t in factory().state_dict().items()}
    for msg in messages:
        arrays = msg.content["arrays"]
        assert is_packed(arrays) and list(arrays) == ["packed-float"]
        sent = strategy.slice_state(arrays, msg.metadata.dst_node_id)
        # the node decodes the same tensors (its own analysis of the model, no strategy)
        node = receive(msg, factory).model.state_dict()
        assert all(torch.equal(node[k], sent[k]) for k in sent)
        assert len(arrays["packed-float"].data) == 4 * sum(t.numel() for t in sent.values())  # no header
        assert sum(t.numel() for t in sent.values()) < sum(t.numel() for t in full.values())
    assert all(is_packed(r.content["arrays"]) for r in replies)  # fl-subnet's ClientApp replies packed
    assert packed_metrics["bytes-up"] == sum(len(r.content["arrays"]["packed-float"].data) for r in replies)
    _, _, tensor_replies, (tensor_new, tensor_metrics) = _round("per-tensor")
    assert not any(is_packed(r.content["arrays"]) for r in tensor_replies)
    assert packed_metrics["num-replies"] == tensor_metrics["num-replies"] == 3
    assert tensor_metrics["bytes-up"] > packed_metrics["bytes-up"]  # a header and fields per tensor
    a, b = decode_slice(packed_new, None), decode_slice(tensor_new, None)
    assert all(torch.equal(a[k], b[k]) for k in a)  # bit for bit the same model


def test_a_full_mask_keeps_flowers_record_shared_by_every_node():
    strategy = FederatedDropout(factory, 1.0, fraction_evaluate=0.0, min_available_nodes=2, min_train_nodes=2)
    grid = InProcessGrid(make_client_app(factory, load_data), 2)
    init = state_to_arrays(factory().state_dict())
    messages = list(strategy.configure_train(1, init, train_config(), grid))
    assert all(m.content["arrays"] is init for m in messages) and not is_packed(init)
    replies = list(grid.send_and_receive(messages))
    assert not any(is_packed(r.content["arrays"]) for r in replies)  # replied as received
    _, metrics = strategy.aggregate_train(1, replies)
    assert metrics["num-replies"] == 2


def test_gather_packed_over_a_flat_map_sends_the_bytes_of_pack_state():
    """The server's flat gather (one index_select over the float tensors end to end)
    and the per-tensor gather + pack give byte-identical messages: a ResNet with
    BatchNorm counters (an int kind) and a skipped block."""
    from fl_subnet.core.flat import FlatMap
    from fl_subnet.core.masks import Mask
    from fl_subnet.core.spec import analyze
    from fl_subnet.models import PreActResNet
    from fl_subnet.wire.packed import gather_packed

    torch.manual_seed(0)
    model = PreActResNet(1, 10, (8, 12), 2)
    spec = analyze(model, torch.zeros(2, 1, 8, 8), verify=False)
    state = model.state_dict()
    meta = {k: (tuple(v.shape), v.dtype) for k, v in state.items()}
    flat = FlatMap(spec.slicer, {k: s for k, (s, d) in meta.items() if d.is_floating_point})
    gen = torch.Generator().manual_seed(1)
    for skip in (frozenset(), frozenset([spec.blocks[0].name])):
        mask = Mask({g.name: torch.randperm(g.size, generator=gen)[:max(1, g.size // 3)].sort().values
                     for g in spec.groups}, skip=skip)
        layout = slice_layout(spec.slicer, mask, meta)
        want = pack_state(spec.slicer.gather(state, mask), layout)
        got = gather_packed(spec.slicer, state, mask, layout, flat)
        assert sorted(got) == sorted(want) == ["packed-float", "packed-int"]
        for name in want:
            assert got[name].data == want[name].data, name
