"""Layer allocation for heterogeneous LoRA (fl_subnet/core/lora_layers.py and
strategies/layer_allocation.py; Fed-HeLLo, Zhang et al., IEEE TNNLS 2025): the
allocation patterns against hand-computed cases, the sampler's masks (allocated adapters
whole, the others 0 ranks), a node's compact model against the full model with the other
adapters' ``lora_B`` zeroed, and a run through ``strategy.start`` with Flower's serde
(InProcessGrid), real peft adapters on fl-subnet's own transformer (random weights,
nothing downloaded)."""

from __future__ import annotations

import copy
import math
from fractions import Fraction

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord
from peft import LoraConfig, get_peft_model

from fl_subnet import analyze
from fl_subnet.clients import make_client_app
from fl_subnet.core.frozen import trainable_keys
from fl_subnet.core.groups import UnitGroup
from fl_subnet.core.lora_layers import (ALLOCATIONS, GEOMETRIC, LayerAllocationSampler, allocate_layers,
                                        collective_counts, draw_layers, geometric_layers, layer_budget, layer_name,
                                        lora_layers, rgd_probabilities)
from fl_subnet.core.samplers import generator_for
from fl_subnet.models import MLP
from fl_subnet.models.transformer import HandAttentionTransformer
from fl_subnet.wire import mask_from_config
from fl_subnet.wire.packed import is_packed, slice_layout, unpack_state

from test_lora_core import peft_factory
from test_lora_strategy import Capture, InspectingGrid, central_loss, load_data, peft_state_of, train_config

pytestmark = [
    # transformers 5.23 warns about an attribute peft 0.21 reads; not ours to fix
    pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning"),
    # get_peft_model_state_dict (the Capture helper) on a node's compact model: its
    # non-allocated adapters are 0-rank on purpose, not unsharded ZeRO-3 / FSDP tensors
    pytest.mark.filterwarnings("ignore:Adapter 'default'.*invalid shape"),
]

RANK, ALPHA, DEPTH = 8, 16, 4
TARGETS = ["q_proj", "v_proj", "fc1"]
TIERS = (0.25, 0.5, 1.0)  # 1, 2 and 4 of the 4 layers


def deep_factory():
    """fl-subnet's transformer with 4 blocks as the frozen base, rank-8 LoRA on q_proj,
    v_proj and fc1 of every block (12 adapters, 4 layers), everything drawn from seed 0
    (``lora_B`` random too, so that every adapter contributes)."""
    torch.manual_seed(0)
    base = HandAttentionTransformer(vocab_size=16, seq_len=8, dim=32, num_heads=4, ffn=64, depth=DEPTH)
    return get_peft_model(base, LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=TARGETS,
                                           init_lora_weights=False))


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def spec():
    return analyze(deep_factory)


def block_of(key: str) -> int:
    """The block index of an adapter key (``...blocks.<i>.attn.q_proj.lora_A...``), read
    from the key itself, independently of fl_subnet.core.lora_layers."""
    return int(key.split("blocks.")[1].split(".")[0])


# ----------------------------------------------------------- the patterns, by hand
# Fed-HeLLo's released setting: L = 12 layers, three equal client groups of budgets 6, 9 and 12.
BY_HAND_12 = {
    "triangle": ({6: [0, 1, 2, 3, 4, 5], 9: [0, 1, 2, 3, 4, 5, 6, 7, 8]},
                 [3, 3, 3, 3, 3, 3, 2, 2, 2, 1, 1, 1]),
    "inverted-triangle": ({6: [6, 7, 8, 9, 10, 11], 9: [3, 4, 5, 6, 7, 8, 9, 10, 11]},
                          [1, 1, 1, 2, 2, 2, 3, 3, 3, 3, 3, 3]),
    "bottleneck": ({6: [0, 1, 2, 9, 10, 11], 9: [0, 1, 2, 3, 4, 8, 9, 10, 11]},
                   [3, 3, 3, 2, 2, 1, 1, 1, 2, 3, 3, 3]),
    # the authors' per-group lists (config/experiments/cifar100_vit_lora/6_6_6/*.yaml)
    "uniform": ({6: [0, 2, 4, 6, 8, 10], 9: [0, 1, 2, 4, 5, 6, 8, 9, 10]},
                [3, 2, 3, 1, 3, 2, 3, 1, 3, 2, 3, 1]),
}


@pytest.mark.parametrize("pattern", GEOMETRIC)
def test_gd_hla_patterns_match_the_hand_computed_allocations_and_shapes(pattern):
    lists, counts = BY_HAND_12[pattern]
    for budget, layers in lists.items():
        assert geometric_layers(pattern, budget, 12) == layers, budget
    assert geometric_layers(pattern, 12, 12) == list(range(12))          # a full budget trains every layer
    assert collective_counts(pattern, [6, 9, 12], 12).tolist() == counts  # the pattern's shape


def test_gd_hla_on_an_odd_depth_by_hand():
    L = 5
    assert [geometric_layers("triangle", n, L) for n in (1, 2)] == [[0], [0, 1]]
    assert [geometric_layers("inverted-triangle", n, L) for n in (1, 2)] == [[4], [3, 4]]
    # the input side gets the odd layer: ⌈n/2⌉ first, ⌊n/2⌋ last
    assert [geometric_layers("bottleneck", n, L) for n in (1, 2, 3, 4)] == [[0], [0, 4], [0, 1, 4], [0, 1, 3, 4]]
    # ⌊i·L/n⌋
    assert [geometric_layers("uniform", n, L) for n in (1, 2, 3, 4)] == [[0], [0, 2], [0, 1, 3], [0, 1, 2, 3]]


def test_rgd_bottleneck_probabilities_are_the_authors_layer_prob():
    # config/experiments/cifar100_vit_lora/depthffm_fim/*-6_9_12-bone_*.yaml of TNI-playground/Fed_HeLLo
    layer_prob = ["1/9", "1/9", "1/9", "2/27", "2/27", "1/27", "1/27", "1/27", "2/27", "1/9", "1/9", "1/9"]
    p = rgd_probabilities("bottleneck", [6, 9, 12], 12)
    assert p.dtype == torch.float64 and abs(float(p.sum()) - 1) < 1e-12
    assert [Fraction(float(x)).limit_denominator(100) for x in p] == [Fraction(x) for x in layer_prob]


def test_layer_budget_is_the_ceiling_of_capacity_times_depth():
    assert [layer_budget(c, 12) for c in (0.01, 0.25, 0.3, 0.5, 0.75, 1.0)] == [1, 3, 4, 6, 9, 12]
    assert [layer_budget(c, DEPTH) for c in TIERS] == [1, 2, 4]


@pytest.mark.parametrize("call, name", [
    (lambda: layer_budget(0.0, 4), "capacity"),
    (lambda: layer_budget(1.5, 4), "capacity"),
    (lambda: layer_budget(0.5, 0), "num_layers"),
    (lambda: geometric_layers("diamond", 2, 4), "pattern"),
    (lambda: geometric_layers("triangle", 0, 4), "budget"),
    (lambda: geometric_layers("triangle", 5, 4), "budget"),
    (lambda: allocate_layers("pyramid", 2, 4), "allocation"),
    (lambda: allocate_layers("random", 2, 4), "generator"),
    (lambda: draw_layers(torch.zeros(4), 2, torch.Generator()), "probabilities"),
    (lambda: collective_counts("uniform", [], 4), "budgets"),
    (lambda: LayerAllocationSampler("pyramid"), "allocation"),
    (lambda: LayerAllocationSampler("uniform", ranks="half"), "ranks"),
])
def test_bad_arguments_raise_a_value_error_naming_them(call, name):
    with pytest.raises(ValueError, match=name):
        call()


def test_rgd_draws_follow_the_pattern_probabilities():
    p = rgd_probabilities("bottleneck", [6, 9, 12], 12)
    gen = torch.Generator().manual_seed(0)
    draws = 2700
    freq = np.bincount([draw_layers(p, 1, gen)[0] for _ in range(draws)], minlength=12) / draws
    assert np.abs(freq - p.numpy()).max() < 0.03, (freq, p)       # 5 standard errors at most
    for n in (3, 6, 12):
        layers = allocate_layers("rgd-bottleneck", n, 12, generator=gen, reference_budgets=[6, 9, 12])
        assert len(layers) == n == len(set(layers)) and layers == sorted(layers) and 0 <= layers[0] <= layers[-1] < 12
    # a budget above every reference budget: the layers of non-zero probability, then uniform others
    tri = rgd_probabilities("triangle", [1], 4)                   # only layer 0 has a probability
    for _ in range(20):
        got = draw_layers(tri, 3, gen)
        assert len(got) == 3 and 0 in got


def test_random_allocation_is_uniform_over_the_layers():
    gen = torch.Generator().manual_seed(1)
    draws = 2000
    counts = np.zeros(6)
    for _ in range(draws):
        layers = allocate_layers("random", 3, 6, generator=gen)
        assert len(set(layers)) == 3
        counts[layers] += 1
    assert np.abs(counts / draws - 0.5).max() < 0.06


# --------------------------------------------------------------------- the layers
def ranks(name: str) -> UnitGroup:
    return UnitGroup(name, 4, (), kind="ranks")


def test_layers_are_parsed_from_the_module_paths():
    assert layer_name("base_model.model.encoder.layer.3.attention.self.query.lora_A.default") == \
        "base_model.model.encoder.layer.3"
    assert layer_name("base_model.model.model.layers.11.self_attn.q_proj.lora_A.default") == \
        "base_model.model.model.layers.11"
    assert layer_name("base_model.model.transformer.h.0.attn.c_attn.lora_A.default") == \
        "base_model.model.transformer.h.0"
    assert layer_name("h.2.mlp.lora_A.x") == "h.2"
    assert layer_name("model.hidden.3.lora_A.x") == "model.hidden.3.lora_A.x"   # not a layer container
    groups = [ranks("pooler.dense.lora_A.default"),
              ranks("encoder.block.0.q.lora_A.default"), ranks("encoder.block.0.v.lora_A.default"),
              ranks("encoder.block.1.q.lora_A.default"),
              ranks("decoder.block.0.q.lora_A.default"),                      # another stack: another layer
              ranks("classifier.lora_A.default"),
              UnitGroup("head", 3, (), kind="neurons")]                       # not a rank group: ignored
    layers = lora_layers(groups)
    assert layers.names == ("pooler.dense.lora_A.default", "encoder.block.0", "encoder.block.1", "decoder.block.0",
                            "classifier.lora_A.default")
    assert layers.groups[1] == ("encoder.block.0.q.lora_A.default", "encoder.block.0.v.lora_A.default")
    assert len(layers) == 5 and layers.layer_of("decoder.block.0.q.lora_A.default") == 3
    with pytest.raises(ValueError, match="groups"):
        lora_layers([UnitGroup("fc1", 8, (), kind="neurons")])


@pytest.mark.parametrize("base, depth", [("bert", 2), ("llama", 2)])
def test_layers_of_transformers_models_are_their_blocks(base, depth):
    layers = lora_layers(analyze(peft_factory(base)).groups)
    assert len(layers) == depth and all(len(g) == 2 for g in layers.groups)   # query and value of each layer
    assert layers.names[0].endswith(("encoder.layer.0", "layers.0"))


# --------------------------------------------------------------------- the masks
@pytest.mark.parametrize("allocation", GEOMETRIC)
def test_sampler_masks_keep_allocated_adapters_whole_and_others_at_zero_ranks(spec, allocation):
    masks = LayerAllocationSampler(allocation).sample(spec.groups, 1, 3, capacities=list(TIERS))
    assert len(masks) == 3
    for mask, capacity in zip(masks, TIERS):
        mask.validate(spec.groups)
        allocated = set(geometric_layers(allocation, layer_budget(capacity, DEPTH), DEPTH))
        assert set(mask.indices) == {g.name for g in spec.groups} and not mask.scale
        for g in spec.groups:
            kept = mask.indices[g.name]
            assert kept.dtype == torch.int64
            if block_of(g.name) in allocated:
                assert torch.equal(kept, torch.arange(RANK)), (g.name, kept)
            else:
                assert kept.numel() == 0, (g.name, kept)


def test_nested_ranks_keep_the_first_ceil_c_r_ranks_of_the_allocated_adapters(spec):
    masks = LayerAllocationSampler("bottleneck", ranks="nested").sample(spec.groups, 1, 3, capacities=list(TIERS))
    for mask, capacity in zip(masks, TIERS):
        allocated = set(geometric_layers("bottleneck", layer_budget(capacity, DEPTH), DEPTH))
        for g in spec.groups:
            expected = math.ceil(capacity * RANK) if block_of(g.name) in allocated else 0
            assert torch.equal(mask.indices[g.name], torch.arange(expected)), g.name


@pytest.mark.parametrize("allocation", ["random", "rgd-bottleneck", "rgd-triangle"])
def test_randomized_masks_come_from_the_seed_round_and_slot(spec, allocation):
    sampler = LayerAllocationSampler(allocation, seed=3, reference_capacities=TIERS)
    caps = [0.5, 0.5, 0.25, 0.75]
    first = sampler.sample(spec.groups, 2, 4, capacities=caps)
    again = LayerAllocationSampler(allocation, seed=3, reference_capacities=TIERS).sample(spec.groups, 2, 4,
                                                                                        capacities=caps)
    assert all(a.indices.keys() == b.indices.keys() and all(torch.equal(a.indices[k], b.indices[k]) for k in a.indices)
               for a, b in zip(first, again))
    reference = [layer_budget(c, DEPTH) for c in TIERS]
    for slot, (mask, c) in enumerate(zip(first, caps)):
        layers = allocate_layers(allocation, layer_budget(c, DEPTH), DEPTH, generator=generator_for(3, 2, slot),
                                 reference_budgets=reference)
        assert {block_of(g.name) for g in spec.groups if mask.indices[g.name].numel()} == set(layers)
    rounds = {tuple(tuple(sampler.allocations(spec.groups, r, caps)[i]) for i in range(4)) for r in range(1, 9)}
    assert len(rounds) > 1                                                 # redrawn every round


def test_a_node_without_capacity_gets_the_default(spec):
    (mask,) = LayerAllocationSampler("triangle", 0.5).sample(spec.groups, 1, 1)
    assert {block_of(g.name) for g in spec.groups if mask.indices[g.name].numel()} == {0, 1}


# ------------------------------------- the compact model = full model, other B zeroed
@pytest.mark.parametrize("allocation, ranks_mode", [*((a, "full") for a in ALLOCATIONS), ("bottleneck", "nested")])
def test_compact_model_equals_the_full_model_with_the_other_adapters_b_zeroed(spec, allocation, ranks_mode):
    sampler = LayerAllocationSampler(allocation, ranks=ranks_mode, seed=1, reference_capacities=TIERS)
    full = deep_factory().eval()
    state = full.state_dict()
    x = torch.randint(0, 16, (6, 8), generator=torch.Generator().manual_seed(0))
    masks = sampler.sample(spec.groups, 1, 3, capacities=list(TIERS))
    allocations = sampler.allocations(spec.groups, 1, list(TIERS))
    for mask, layers, capacity in zip(masks, allocations, TIERS):
        node = spec.build(spec.gather(state, mask), mask).eval()
        reference = copy.deepcopy(full)
        keep = math.ceil(capacity * RANK) if ranks_mode == "nested" else RANK
        with torch.no_grad():
            for name, p in reference.named_parameters():
                if ".lora_B." in name:
                    p[:, 0 if block_of(name) not in layers else keep:] = 0
        for name, module in node.named_modules():
            if name.endswith(("q_proj", "v_proj", "fc1")) and hasattr(module, "lora_A"):
                r = module.lora_A["default"].weight.shape[0]
                assert r == module.r["default"] == (keep if block_of(name) in layers else 0), name
                assert module.scaling["default"] == ALPHA / RANK           # the full adapter's scale
        with torch.no_grad():
            out, ref = node(x), reference(x)
        assert torch.allclose(out, ref, atol=1e-6), (allocation, layers, float((out - ref).abs().max()))
        if allocation == "bottleneck":                                     # merged into the base: the same weights
            merged, want = node.merge_and_unload().state_dict(), reference.merge_and_unload().state_dict()
            assert all(torch.allclose(merged[k], v, atol=1e-6) for k, v in want.items())


# ------------------------------------------------------------- end to end, with serde
def layer_allocation(allocation="bottleneck", **kw):
    from fl_subnet.strategies.layer_allocation import LayerAllocation

    kw.setdefault("fraction_evaluate", 0.0)
    return LayerAllocation(deep_factory, TIERS, allocation=allocation, fraction_train=1.0,
                           min_available_nodes=len(TIERS), min_train_nodes=len(TIERS), **kw)


def held_blocks(peft_state: dict[str, np.ndarray]) -> tuple[int, ...]:
    return tuple(sorted({block_of(k) for k, v in peft_state.items() if v.size}))


def check_messages(grid: InspectingGrid, spec) -> int:
    """Every train message and reply holds exactly the allocated adapters of its mask: a
    packed slice decodes to 0-size tensors for the others, and its bytes are the float32
    bytes of the allocated adapters, nothing more (a node allocated every layer gets the
    global adapters as Flower sends them). Returns the messages checked."""
    model = deep_factory()
    meta = {k: (tuple(v.shape), v.dtype) for k, v in model.state_dict().items() if k in set(trainable_keys(model))}
    masks = {i: mask_from_config(next(iter(m.content.config_records.values())), spec.all_groups)
             for i, m in grid.down}
    assert not any(r.has_error() for r in grid.up)
    seen = 0
    for msg, mask in [(m, masks[i]) for i, m in grid.down] + [
            (r, masks[r.metadata.reply_to_message_id]) for r in grid.up]:
        (record,) = msg.content.array_records.values()
        allocated = {c.key for g in spec.groups if mask.indices[g.name].numel() for c in g.couplings}
        if spec.slicer.is_full(mask):  # every layer: Flower's own format, one array per tensor
            assert allocated == set(meta) and set(record) == set(meta)
            assert all(tuple(record[k].shape) == meta[k][0] for k in meta)
        else:                          # a slice: packed, the allocated adapters' float32 bytes only
            assert is_packed(record)
            state = unpack_state(record, slice_layout(spec.slicer, mask, meta))
            assert {k for k, v in state.items() if v.numel()} == allocated
            assert sum(len(a.data) for a in record.values()) == 4 * sum(math.prod(meta[k][0]) for k in allocated)
        seen += 1
    return seen


def test_one_round_each_adapter_is_the_mean_over_the_nodes_that_trained_it(spec):
    capture = Capture(deep_factory)
    strategy = layer_allocation()
    grid = InspectingGrid(make_client_app(deep_factory, load_data, train_fn=capture), len(TIERS))
    initial = ArrayRecord(deep_factory().state_dict())
    result = strategy.start(grid=grid, initial_arrays=initial, num_rounds=1, train_config=train_config())

    m = result.train_metrics_clientapp[1]
    assert m["num-replies"] == 3 and m["num-rejected"] == 0 and m["model-kept"] == 0, m
    # bottleneck over 4 layers: budgets 1, 2, 4 train {0}, {0, 3}, {0, 1, 2, 3}
    assert sorted(held_blocks(s) for s, _, _ in capture.replies) == [(0,), (0, 1, 2, 3), (0, 3)]
    assert sorted(held_blocks(s) for s in capture.received) == [(0,), (0, 1, 2, 3), (0, 3)]
    assert check_messages(grid, strategy.spec) == 2 * 3
    # the aggregate, by hand: each adapter the plain mean over its holders (unweighted, as
    # Fed-HeLLo's average_lora_depthfl), the initial value where no node held it
    got, start = peft_state_of(result.arrays, deep_factory), peft_state_of(initial, deep_factory)
    assert set(got) == set(start) and len(got) == 2 * len(TARGETS) * DEPTH
    holders = {0: 3, 1: 1, 2: 1, 3: 2}
    for key, value in got.items():
        held = [s[key].astype(np.float64) for s, _, _ in capture.replies if s[key].size]
        assert len(held) == holders[block_of(key)], key
        assert np.abs(value - sum(held) / len(held)).max() <= 1e-6, key
        assert not np.allclose(value, start[key]), key                          # every layer trained


def test_rgd_allocation_runs_end_to_end_and_the_loss_falls():
    capture = Capture(deep_factory)
    strategy = layer_allocation("rgd-bottleneck", seed=5)
    grid = InspectingGrid(make_client_app(deep_factory, load_data, train_fn=capture), len(TIERS))
    initial = ArrayRecord(deep_factory().state_dict())
    rounds = 4
    result = strategy.start(grid=grid, initial_arrays=initial, num_rounds=rounds, train_config=train_config(lr=0.2))
    for r in range(1, rounds + 1):
        m = result.train_metrics_clientapp[r]
        assert m["num-replies"] == 3 and m["num-rejected"] == 0 and m["model-kept"] == 0, (r, m)
    assert check_messages(grid, strategy.spec) == 2 * 3 * rounds
    per_round = [tuple(sorted(held_blocks(s) for s, _, _ in capture.replies[i:i + 3]))
                 for i in range(0, len(capture.replies), 3)]
    assert all(sorted(map(len, alloc)) == [1, 2, 4] for alloc in per_round)    # the budgets, every round
    assert len(set(per_round)) > 1                                              # redrawn across rounds
    before, after = central_loss(initial, deep_factory), central_loss(result.arrays, deep_factory)
    assert after < before - 0.01, (before, after)


def test_a_model_without_lora_rank_groups_is_refused():
    from fl_subnet.strategies.layer_allocation import LayerAllocation

    with pytest.raises(ValueError, match="no LoRA rank group"):
        LayerAllocation(lambda: MLP(8, [16], 3), TIERS)
    with pytest.raises(ValueError, match="allocation"):
        LayerAllocation(deep_factory, TIERS, allocation="pyramid")


def test_layer_allocation_is_a_library_class_not_a_run_config_protocol():
    import fl_subnet.strategies as strategies
    from fl_subnet.strategies.heterofl import CapacityStrategy
    from fl_subnet.strategies.layer_allocation import LayerAllocation

    assert issubclass(LayerAllocation, CapacityStrategy)
    assert LayerAllocation not in {p.cls for p in strategies.PROTOCOLS.values()}
    assert "LayerAllocation" not in strategies.__all__
