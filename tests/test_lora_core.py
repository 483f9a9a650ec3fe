"""LoRA ranks as unit groups (fl_subnet.core.lora) and the frozen base (fl_subnet.core.frozen),
with real peft and transformers models built from tiny configs (random weights, nothing
downloaded): the groups found, the aggregate against Flower's FedAvg rule and a plain-numpy
holder mean, the compact adapter merged against the slice of the full adapter merged, and
the base fingerprint."""

from __future__ import annotations

import copy
import pathlib
import re

import numpy as np
import pytest
import torch
from torch import nn

from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
from peft.tuners.lora import LoraLayer
from transformers import BertConfig, BertModel, LlamaConfig, LlamaModel

from fl_subnet import AnalysisError, Mask, analyze
from fl_subnet.core.aggregate import MaskedAggregator
from fl_subnet.core.flat import FlatMap
from fl_subnet.core.frozen import base_fingerprint, check_base, frozen_keys, trainable_keys, trainable_state
from fl_subnet.core.samplers import NestedPrefixSampler
from fl_subnet.models.transformer import HandAttentionTransformer

# transformers 5.23 warns about an attribute peft 0.21 reads; not ours to fix
pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")

RANK, ALPHA = 8, 16


def bert():
    return BertModel(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                intermediate_size=32, max_position_embeddings=16))


def llama():
    return LlamaModel(LlamaConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                  num_key_value_heads=2, intermediate_size=32, max_position_embeddings=16))


BASES = {  # base builder, LoRA target modules, adapted modules per model
    "bert": (bert, ["query", "value"], 4),
    "llama": (llama, ["q_proj", "v_proj"], 4),
    "fl_subnet-transformer": (HandAttentionTransformer, ["q_proj", "v_proj", "fc1"], 6),
}


def peft_factory(base: str = "bert", *, rslora: bool = False, seed: int = 0):
    """A factory of one peft model: base and adapters drawn from ``seed`` (``lora_B``
    random too, not peft's zeros, so that every rank contributes)."""
    build, targets, _ = BASES[base]

    def factory():
        torch.manual_seed(seed)
        config = LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=targets, init_lora_weights=False,
                            use_rslora=rslora)
        return get_peft_model(build(), config)
    return factory


def trained(model: nn.Module, seed: int) -> nn.Module:
    """A copy of ``model`` whose adapter tensors moved by a random step (a node's training)."""
    out = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in out.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=gen))
    return out


def adapted_paths(model: nn.Module) -> list[str]:
    return [path for path, m in model.named_modules() if isinstance(m, LoraLayer)]


def aggregator(state, spec, kind):
    flat = FlatMap(spec.slicer, {k: tuple(v.shape) for k, v in state.items()}) if kind == "flat" else None
    return MaskedAggregator(state, spec.slicer, flat=flat)


# ------------------------------------------------------------------------------ (1) groups
@pytest.mark.parametrize("base", ["bert", "fl_subnet-transformer"])
def test_one_rank_group_per_adapted_module(base):
    factory = peft_factory(base)
    spec = analyze(factory)
    model = factory()
    paths = adapted_paths(model)
    assert len(paths) == BASES[base][2]
    assert spec.lora and spec.declared and spec.graph is None and not spec.pinned
    assert [g.name for g in spec.groups] == [f"{p}.lora_A.default" for p in paths]
    assert spec.all_groups == spec.groups
    state = model.state_dict()
    for g, path in zip(spec.groups, paths):
        assert g.size == RANK and g.kind == "ranks" and g.consumers == (f"{path}.lora_B.default",)
        assert [(c.key, c.dim, c.units, c.positions) for c in g.couplings] == [
            (f"{path}.lora_A.default.weight", 0, None, None), (f"{path}.lora_B.default.weight", 1, None, None)]
        assert state[f"{path}.lora_A.default.weight"].shape[0] == RANK
        assert state[f"{path}.lora_B.default.weight"].shape[1] == RANK
    coupled = {c.key for g in spec.groups for c in g.couplings}
    assert coupled == set(trainable_keys(model))             # only adapters are cut; the base never
    assert not coupled & set(frozen_keys(model))


# ------------------------------------------------------------- (2) one rank for all = FedAvg
@pytest.mark.parametrize("kind", ["per-tensor", "flat"])
def test_full_rank_on_every_node_equals_fedavg_of_peft_state_dicts(kind):
    factory = peft_factory("bert")
    spec = analyze(factory)
    server = factory()
    nodes = [trained(server, seed) for seed in (1, 2, 3)]
    weights = [3, 1, 5]
    masks = NestedPrefixSampler().sample(spec.groups, 1, len(nodes), [1.0] * len(nodes))
    agg = aggregator(trainable_state(server), spec, kind)
    for node, mask, n in zip(nodes, masks, weights):
        reply = spec.gather(trainable_state(node), mask)
        assert set(reply) == set(trainable_keys(server))       # the adapters only
        agg.add(reply, mask, n)
    result = agg.finalize()
    missing, unexpected = server.load_state_dict(result, strict=False)
    assert not unexpected and set(missing) == set(frozen_keys(server))

    # Flower's FedAvg rule, sum(n_i x_i) / sum(n_i), in numpy over peft's adapter state dicts
    states = [{k: v.numpy() for k, v in get_peft_model_state_dict(node).items()} for node in nodes]
    got = get_peft_model_state_dict(server)
    assert set(got) == set(states[0]) and len(got) == 2 * BASES["bert"][2]
    for key, value in got.items():
        ref = sum(n * s[key].astype(np.float64) for n, s in zip(weights, states)) / sum(weights)
        assert np.abs(value.numpy() - ref).max() <= 1e-6, key


# --------------------------------------------------------------------- (3) nested ranks
def holder_mean(old: np.ndarray, replies, dim: int) -> np.ndarray:
    """Plain-numpy per-entry weighted mean over the nodes holding each rank (a prefix of
    ``k`` ranks along ``dim``); ranks nobody holds keep ``old``."""
    num, den = np.zeros(old.shape), np.zeros(old.shape)
    for value, k, n in replies:
        index = (slice(None),) * dim + (slice(0, k),)
        num[index] += n * value.astype(np.float64)
        den[index] += n
    return np.where(den > 0, num / np.maximum(den, 1), old)


@pytest.mark.parametrize("kind", ["per-tensor", "flat"])
@pytest.mark.parametrize("capacities", [(0.25, 0.5, 1.0), (0.25, 0.5, 0.5)])
def test_nested_ranks_holder_mean_equals_numpy_reference(kind, capacities):
    factory = peft_factory("fl_subnet-transformer")
    spec = analyze(factory)
    server = factory()
    old = trainable_state(server)
    masks = NestedPrefixSampler().sample(spec.groups, 1, len(capacities), list(capacities))
    ranks = [int(RANK * c) for c in capacities]
    weights = [2, 3, 7]
    agg = aggregator(old, spec, kind)
    sent = []
    for seed, (mask, k, n) in enumerate(zip(masks, ranks, weights)):
        node = spec.build(spec.gather(server.state_dict(), mask), mask)  # the node's compact model
        reply = trainable_state(trained(node, seed))
        for path in adapted_paths(server):
            assert reply[f"{path}.lora_A.default.weight"].shape[0] == k
            assert reply[f"{path}.lora_B.default.weight"].shape[1] == k
        agg.add(reply, mask, n)
        sent.append((reply, k, n))
    result = agg.finalize()
    for key, value in result.items():
        dim = 0 if ".lora_A." in key else 1
        ref = holder_mean(old[key].numpy(), [(r[key].numpy(), k, n) for r, k, n in sent], dim)
        assert np.abs(value.numpy() - ref).max() <= 1e-6, key
    if max(capacities) < 1:  # ranks 4..7: no holder, unchanged
        key = next(k for k in result if ".lora_A." in k)
        assert torch.equal(result[key][4:], old[key][4:])


def test_nested_ranks_hand_computed():
    # ranks 0-1 held by all three nodes (weights 1, 1, 2; values 1, 2, 4):  (1 + 2 + 8) / 4 = 2.75
    # ranks 2-3 by the last two:                                             (2 + 8) / 3 = 10/3
    # ranks 4-7 by the last one only:                                        4
    factory = peft_factory("fl_subnet-transformer")
    spec = analyze(factory)
    old = trainable_state(factory())
    masks = NestedPrefixSampler().sample(spec.groups, 1, 3, [0.25, 0.5, 1.0])
    agg = MaskedAggregator(old, spec.slicer)
    for mask, value, n in zip(masks, (1.0, 2.0, 4.0), (1, 1, 2)):
        compact = spec.gather(old, mask)
        agg.add({k: torch.full_like(v, value if ".lora_A." in k else -value) for k, v in compact.items()}, mask, n)
    result = agg.finalize()
    per_rank = torch.tensor([2.75, 2.75, 10 / 3, 10 / 3, 4.0, 4.0, 4.0, 4.0])
    for key, value in result.items():
        if ".lora_A." in key:
            assert torch.allclose(value, per_rank[:, None].expand_as(value), atol=1e-6), key
        else:
            assert torch.allclose(value, -per_rank[None, :].expand_as(value), atol=1e-6), key


# ------------------------------------------------------------------------------- (4) merge
@pytest.mark.parametrize("base, rslora", [("bert", False), ("bert", True), ("llama", False)])
def test_compact_adapter_merged_equals_slice_of_full_adapter_merged(base, rslora):
    kept = 3
    factory = peft_factory(base, rslora=rslora)
    spec = analyze(factory)
    full = factory().eval()
    mask = NestedPrefixSampler().sample(spec.groups, 1, 1, [kept / RANK])[0]
    compact = spec.build(spec.gather(full.state_dict(), mask), mask).eval()

    scale = ALPHA / (RANK ** 0.5 if rslora else RANK)  # the full adapter's, on every node
    for path in adapted_paths(full):
        layer = compact.get_submodule(path)
        assert layer.r["default"] == kept and layer.scaling["default"] == pytest.approx(scale)
        assert layer.lora_alpha["default"] == pytest.approx(scale * (kept ** 0.5 if rslora else kept))
        assert tuple(layer.lora_A["default"].weight.shape) == (kept, layer.in_features)
        assert tuple(layer.lora_B["default"].weight.shape) == (layer.out_features, kept)

    sliced = copy.deepcopy(full)  # the full adapter with ranks kept.. zeroed
    with torch.no_grad():
        for path in adapted_paths(sliced):
            layer = sliced.get_submodule(path)
            layer.lora_A["default"].weight[kept:] = 0
            layer.lora_B["default"].weight[:, kept:] = 0
    tokens = torch.randint(0, 50, (2, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(compact(tokens).last_hidden_state, sliced(tokens).last_hidden_state, atol=1e-5)

    merged, reference = compact.merge_and_unload().state_dict(), sliced.merge_and_unload().state_dict()
    assert set(merged) == set(reference) and not any("lora" in k for k in merged)
    assert max(float((merged[k] - v).abs().max()) for k, v in reference.items()) <= 1e-6
    before = full.get_base_model().state_dict()  # the merge changed every adapted weight
    adapted = [k for k in reference if k.endswith(".weight") and k.split(".")[-2] in BASES[base][1]]
    assert adapted and all(not torch.equal(reference[k], before[k.replace(".weight", ".base_layer.weight")])
                           for k in adapted)


def test_heterofl_scaler_leaves_rank_groups_at_alpha_over_r_max():
    # HeteroFL's 1/r scaler (scale=True) is not applied to rank groups unless rank_scale=True
    spec = analyze(peft_factory("bert"))
    mask = NestedPrefixSampler(scale=True).sample(spec.groups, 1, 1, [4 / RANK])[0]
    assert set(mask.scale.values()) == {1.0}
    mask = NestedPrefixSampler(scale=True, rank_scale=True).sample(spec.groups, 1, 1, [4 / RANK])[0]
    assert set(mask.scale.values()) == {RANK / 4}


def test_heterofl_scaler_gives_alpha_over_kept_rank_in_the_forward():
    # NestedPrefixSampler(scale=True, rank_scale=True) multiplies the kept ranks by
    # 1/capacity = r/r_k at lora_B's input: the forward of the full adapter sliced to r_k ranks
    # with the scale alpha/r_k
    kept = 4
    factory = peft_factory("bert")
    spec = analyze(factory)
    full = factory().eval()
    mask = NestedPrefixSampler(scale=True, rank_scale=True).sample(spec.groups, 1, 1, [kept / RANK])[0]
    compact = spec.build(spec.gather(full.state_dict(), mask), mask).eval()
    reference = copy.deepcopy(full)
    with torch.no_grad():
        for path in adapted_paths(reference):
            layer = reference.get_submodule(path)
            layer.lora_A["default"].weight[kept:] = 0
            layer.lora_B["default"].weight[:, kept:] = 0
            layer.scaling["default"] = ALPHA / kept
        tokens = torch.randint(0, 50, (2, 6), generator=torch.Generator().manual_seed(1))
        assert torch.allclose(compact(tokens).last_hidden_state, reference(tokens).last_hidden_state, atol=1e-5)


# -------------------------------------------------------------------- (5) base fingerprint
def test_base_fingerprint():
    a, b = peft_factory("bert")(), peft_factory("bert")()
    assert base_fingerprint(a) == base_fingerprint(b)
    assert base_fingerprint(a) == base_fingerprint(trained(a, seed=1))    # adapters do not count
    key = next(k for k in frozen_keys(b) if k.endswith("query.base_layer.weight"))
    with torch.no_grad():
        b.state_dict()[key].view(-1)[:1].view(torch.uint8)[0] ^= 1       # one bit of one frozen byte
    assert base_fingerprint(a) != base_fingerprint(b)
    check_base(base_fingerprint(a), base_fingerprint(a))
    with pytest.raises(ValueError, match="holds another frozen base model"):
        check_base(base_fingerprint(a), base_fingerprint(b), who="node 3")
    assert base_fingerprint(a) != base_fingerprint(peft_factory("bert", seed=1)())   # other base weights
    assert base_fingerprint(a) != base_fingerprint(peft_factory("bert")().double())  # other dtype


# ------------------------------------------------------------- (6) models fx cannot trace
class Branchy(nn.Module):
    """A data-dependent branch: torch.fx cannot trace it."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(6, 16)
        self.fc2 = nn.Linear(16, 3)

    def forward(self, x):
        h = torch.relu(self.fc1(x))
        if h.sum() > 0:
            h = 2 * h
        return self.fc2(h)


def test_untraceable_models_still_get_their_rank_groups():
    with pytest.raises(AnalysisError):
        analyze(Branchy, torch.zeros(2, 6))
    wrapped = get_peft_model(Branchy(), LoraConfig(r=4, target_modules=["fc1", "fc2"]))
    spec = analyze(wrapped)
    assert [(g.name, g.size) for g in spec.groups] == [
        ("base_model.model.fc1.lora_A.default", 4), ("base_model.model.fc2.lora_A.default", 4)]

    factory = peft_factory("bert")
    with pytest.raises(Exception):
        torch.fx.symbolic_trace(factory())
    assert len(analyze(factory).groups) == BASES["bert"][2]
    mask = Mask({g.name: torch.tensor([1, 3]) for g in spec.groups})       # any subset of ranks
    small = spec.build(spec.gather(wrapped.state_dict(), mask), mask)
    assert small.base_model.model.fc1.lora_A["default"].weight.shape == (2, 6)
    with torch.no_grad():                   # it computes the full model with ranks 0 and 2 removed
        for layer in (wrapped.base_model.model.fc1, wrapped.base_model.model.fc2):
            layer.lora_B["default"].weight.normal_()
            layer.lora_B["default"].weight[:, [0, 2]] = 0
        small.load_state_dict(spec.gather(wrapped.state_dict(), mask))
        x = torch.randn(5, 6)
        assert torch.allclose(small(x), wrapped(x), atol=1e-6)


# ------------------------------------------------------------------------- docs/lora.md
def test_docs_lora_code_runs_as_written():
    docs = pathlib.Path(__file__).resolve().parents[1] / "docs" / "lora.md"
    blocks = re.findall(r"```python\n(.*?)```", docs.read_text(), re.S)
    assert blocks
    namespace: dict = {}
    for i, block in enumerate(blocks):
        exec(compile(block, f"{docs.name} block {i}", "exec"), namespace)  # noqa: S102
