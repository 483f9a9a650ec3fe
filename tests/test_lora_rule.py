"""The product-space rule (``aggregation = "product-space"``, fl_subnet/core/lora_rule.py) on a
real peft model with nested ranks: every adapter equals a plain-numpy dense-SVD reference of
FlexLoRA's rule over the nodes' compact factors, a full-rank single node keeps its product,
every other trainable tensor is the holder mean, and a model without LoRA ranks is refused."""

import numpy as np
import pytest
import torch
from test_lora_core import peft_factory, trained
from test_lora_svd import numpy_reference

from fl_subnet import analyze
from fl_subnet.core.aggregate import MaskedAggregator
from fl_subnet.core.frozen import trainable_state
from fl_subnet.core.lora_rule import MaskedProductSpace, rank_pairs
from fl_subnet.core.rules import make_rule
from fl_subnet.core.samplers import NestedPrefixSampler
from fl_subnet.models import MLP

pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")


def _nodes(capacities, weights):
    factory = peft_factory("bert")
    spec = analyze(factory)
    server = factory()
    state = trainable_state(server)
    masks = NestedPrefixSampler().sample(spec.groups, 1, len(capacities), list(capacities))
    replies = [spec.gather(trainable_state(trained(server, 10 + i)), m) for i, m in enumerate(masks)]
    return spec, state, masks, replies


@pytest.mark.parametrize("capacities,weights", [((0.25, 0.5, 1.0), (3.0, 1.0, 5.0)), ((0.5, 0.5), (1.0, 1.0)),
                                                ((0.25, 0.25, 0.25), (2.0, 1.0, 1.0))])
def test_every_adapter_equals_the_numpy_dense_svd_of_the_nodes_compact_factors(capacities, weights):
    spec, state, masks, replies = _nodes(capacities, weights)
    agg = make_rule("product-space", state, spec.slicer)
    for reply, mask, w in zip(replies, masks, weights):
        agg.add(reply, mask, w)
    out = agg.finalize()
    pairs = rank_pairs(spec.slicer)
    assert len(pairs) == len(spec.groups) == 4
    for name, (a, b) in pairs.items():
        factors = [(r[b], r[a]) for r in replies]
        assert [f[1].shape[0] for f in factors] == [max(1, round(c * 8)) for c in capacities]
        rb, ra, _ = numpy_reference(factors, weights, state[a].shape[0])
        np.testing.assert_allclose(out[b].numpy(), rb, rtol=0, atol=1e-5)
        np.testing.assert_allclose(out[a].numpy(), ra, rtol=0, atol=1e-5)
        assert out[a].dtype == state[a].dtype and out[a].shape == state[a].shape
        assert bool(agg.held()[a].all()) and bool(agg.held()[b].all())


def test_a_single_full_rank_node_keeps_its_product():
    spec, state, masks, replies = _nodes((1.0,), (4.0,))
    agg = MaskedProductSpace(state, spec.slicer)
    agg.add(replies[0], masks[0], 4.0)
    out = agg.finalize()
    for a, b in rank_pairs(spec.slicer).values():
        want = replies[0][b].double() @ replies[0][a].double()
        torch.testing.assert_close(out[b].double() @ out[a].double(), want, rtol=0, atol=1e-5)


def test_other_trainable_tensors_take_the_holder_mean():
    """A trainable tensor outside the rank groups (here a bias made trainable) is the
    weighted mean, as the mean rule computes it."""
    spec, state, masks, replies = _nodes((0.5, 1.0), (1.0, 3.0))
    assert all("lora" in k for k in state)  # peft's BERT trains only adapters: add a tensor
    extra = "extra.bias"
    state = dict(state, **{extra: torch.zeros(3)})
    replies = [dict(r, **{extra: torch.full((3,), float(i + 1))}) for i, r in enumerate(replies)]
    agg = MaskedProductSpace(state, spec.slicer)
    mean = MaskedAggregator(state, spec.slicer)
    for r, m, w in zip(replies, masks, (1.0, 3.0)):
        agg.add(r, m, w)
        mean.add(r, m, w)
    assert torch.equal(agg.finalize()[extra], mean.finalize()[extra])
    assert float(agg.finalize()[extra][0]) == pytest.approx((1 * 1 + 3 * 2) / 4)


def test_no_reply_keeps_the_adapters():
    spec, state, _, _ = _nodes((1.0,), (1.0,))
    out = MaskedProductSpace(state, spec.slicer).finalize()
    assert all(torch.equal(out[k], state[k]) for k in state)


def test_a_model_without_lora_ranks_is_refused_naming_the_rule():
    spec = analyze(lambda: MLP(4, [8], 2))
    with pytest.raises(ValueError, match="product-space"):
        make_rule("product-space", {}, spec.slicer)
    from fl_subnet.strategies import SubnetFedAvg
    with pytest.raises(ValueError, match="product-space"):
        SubnetFedAvg(lambda: MLP(4, [8], 2), aggregation="product-space")


def test_a_rank_budget_is_a_capacity_that_keeps_exactly_that_many_ranks():
    """rank_capacity(r_k) = r_k / r_max, and the nested-prefix sampler at that capacity keeps
    exactly r_k ranks of every group, also where r_k / r_max is not exact in binary."""
    from fl_subnet.core.groups import Coupling, UnitGroup
    from fl_subnet.core.lora import rank_capacity
    from fl_subnet.core.samplers import prefix_size

    spec = analyze(peft_factory("bert"))  # r = 8
    for rank in range(1, 9):
        c = rank_capacity(rank, spec.groups)
        masks = NestedPrefixSampler().sample(spec.groups, 1, 1, [c])
        assert all(masks[0].kept(g).tolist() == list(range(rank)) for g in spec.groups), rank
    twelve = [UnitGroup("m.lora_A.default", 12, (Coupling("m.lora_A.default.weight", 0),
                                                 Coupling("m.lora_B.default.weight", 1)), kind="ranks")]
    assert [prefix_size(12, rank_capacity(r, twelve)) for r in range(1, 13)] == list(range(1, 13))
    for bad in (0, 9, 2.5, True):
        with pytest.raises(ValueError, match=r"rank must be an integer in \[1, 8\]"):
            rank_capacity(bad, spec.groups)
    with pytest.raises(ValueError, match="rank groups"):
        rank_capacity(2, analyze(lambda: MLP(4, [8], 2)).groups)


def test_product_space_through_strategy_start_matches_the_reference_and_learns():
    """HeteroFL's rank tiers 2 / 4 / 8 of r = 8 with aggregation="product-space" on the
    in-process grid (Flower serde both ways): every reply accepted, each round's adapters
    are the numpy dense-SVD reference of the nodes' replies (equal weights: HeteroFL is
    unweighted), and the loss on the nodes' data falls."""
    from test_lora_strategy import (FACTORY, NUM_NODES, Capture, central_loss, full_arrays, heterofl, load_data,
                                    peft_state_of, train_config)

    from fl_subnet.clients import make_client_app
    from fl_subnet.experiments.inprocess_grid import InProcessGrid

    capture = Capture()
    strategy = heterofl(aggregation="product-space")
    grid = InProcessGrid(make_client_app(FACTORY, load_data, train_fn=capture), NUM_NODES)
    models = {}

    def evaluate_fn(server_round, arrays):
        models[server_round] = peft_state_of(arrays)

    initial, rounds = full_arrays(), 2
    result = strategy.start(grid=grid, initial_arrays=initial, num_rounds=rounds,
                            train_config=train_config(lr=0.2), evaluate_fn=evaluate_fn)
    for r in range(1, rounds + 1):
        m = result.train_metrics_clientapp[r]
        assert m["num-replies"] == NUM_NODES and m["num-rejected"] == 0 and m["model-kept"] == 0, (r, dict(m))
    last = capture.replies[-NUM_NODES:]  # the last round's replies: (peft state, num-examples, rank)
    a_keys = [k for k in models[rounds] if ".lora_A." in k]
    assert a_keys
    for a in a_keys:
        b = a.replace(".lora_A.", ".lora_B.")
        factors = [(torch.from_numpy(s[b]), torch.from_numpy(s[a])) for s, _, _ in last]
        rb, ra, _ = numpy_reference(factors, [1.0] * len(last), models[rounds][a].shape[0])
        np.testing.assert_allclose(models[rounds][b], rb, rtol=0, atol=1e-5)
        np.testing.assert_allclose(models[rounds][a], ra, rtol=0, atol=1e-5)
    assert central_loss(result.arrays) < central_loss(initial)
