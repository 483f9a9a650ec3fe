"""Any architecture: groups found by tracing, exact slicing, compact ≡ full with units removed,
agreement with torch-pruning's own pruning, clear failures before any round."""

import copy
import math

import pytest
import torch

from fl_subnet import AnalysisError, Mask, analyze
from fl_subnet.models import (CNNBN, MLP, FlowerCNN, HandAttentionTransformer, MHATransformer,
                              PreActResNet)

from models_extra import ResidualMLP, UnsupportedOnPath
from torch_pruning_ref import prune_with_torch_pruning

TOKENS = torch.randint(0, 16, (4, 8), generator=torch.Generator().manual_seed(0))
IMAGES = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))

# model factory, example input, the groups masked by default (named by hand)
CASES = {
    "mlp": (lambda: MLP(6, [10, 7], 3), torch.randn(4, 6), {"1": 10, "3": 7}),
    "flower-cnn": (FlowerCNN, IMAGES, {"conv1": 6, "conv2": 16, "fc1": 120, "fc2": 84}),
    "cnn-bn": (CNNBN, IMAGES, {"conv1": 16, "conv2": 16, "conv3": 32}),
    # residual streams (stem, shortcut) stay full; the conv inside each block is masked
    "preact-resnet": (PreActResNet, IMAGES, {"stages.0.0.conv1": 16, "stages.1.0.conv1": 32}),
    # heads: q/k/v rows and o_proj columns of each head together, named by q_proj
    "hand-attention": (HandAttentionTransformer, TOKENS, {
        "blocks.0.attn.q_proj": 4, "blocks.0.ffn.fc1": 64, "blocks.1.attn.q_proj": 4, "blocks.1.ffn.fc1": 64}),
    "mha": (MHATransformer, TOKENS, {
        "blocks.0.attn": 4, "blocks.0.ffn.fc1": 64, "blocks.1.attn": 4, "blocks.1.ffn.fc1": 64}),
}


def _random_mask(groups, seed, scale=2.0):
    gen = torch.Generator().manual_seed(seed)
    idx = {}
    for g in groups:
        keep = torch.nonzero(torch.rand(g.size, generator=gen) < 0.5).flatten()
        idx[g.name] = keep if keep.numel() else torch.tensor([0])
    return Mask(idx, {g.name: scale for g in groups})


@pytest.mark.parametrize("case", sorted(CASES))
def test_groups_found_are_the_expected_ones(case):
    factory, x, expected = CASES[case]
    spec = analyze(factory, x)  # also verifies compact ≡ reference on a random mask
    assert {g.name: g.size for g in spec.groups} == expected


@pytest.mark.parametrize("case", sorted(CASES))
def test_gather_scatter_round_trip_and_compact_forward(case):
    factory, x, _ = CASES[case]
    torch.manual_seed(1)
    model = factory().eval()
    spec = analyze(factory, x, verify=False)
    state = model.state_dict()
    for seed in range(3):
        mask = _random_mask(spec.groups, seed)
        compact = spec.gather(state, mask)
        assert sum(t.numel() for t in compact.values()) < sum(t.numel() for t in state.values())
        back = spec.scatter(compact, mask, {k: torch.zeros_like(v) for k, v in state.items()})
        again = spec.gather(back, mask)
        assert all(torch.equal(again[k], compact[k]) for k in compact)  # exact round trip
        built = spec.build(compact, mask)
        with torch.no_grad():
            out = built.eval()(x)
            ref = spec.reference(state, mask).eval()(x)
        assert (out - ref).abs().max() <= 1e-5 * max(1.0, float(ref.abs().max()))
        # a copy (e.g. a user's "best model" snapshot) replies with the same keys and values
        copied = copy.deepcopy(built).state_dict()
        assert copied.keys() == compact.keys()
        assert all(torch.equal(copied[k], compact[k]) for k in compact)
        with torch.no_grad():
            assert torch.equal(copy.deepcopy(built).eval()(x), out)


@pytest.mark.parametrize("case,module,drop", [
    ("flower-cnn", "conv2", [1, 3, 8]),
    ("cnn-bn", "conv1", [0, 5, 6]),
    ("preact-resnet", "stages.1.0.conv1", [2, 7, 30]),
    ("mlp", "1", [0, 4]),
])
def test_gather_matches_torch_pruning(case, module, drop):
    """torch-pruning's in-place pruning of the same units is an independent implementation."""
    factory, x, _ = CASES[case]
    torch.manual_seed(2)
    model = factory()
    pruned = prune_with_torch_pruning(model, x, module, drop)
    spec = analyze(factory, x, verify=False)
    g = next(g for g in spec.groups if g.name == module)
    keep = torch.tensor([i for i in range(g.size) if i not in drop])
    ours = spec.gather(model.state_dict(), Mask({module: keep}))
    assert set(ours) == set(pruned)
    for key in ours:
        assert ours[key].shape == pruned[key].shape, key
        assert torch.equal(ours[key], pruned[key]), key


def test_dropped_heads_equal_zeroed_output_projection_columns():
    """Independent of the builder: nn.MultiheadAttention with the dropped heads' out_proj
    columns zeroed computes what the compact heads-only model computes."""
    torch.manual_seed(3)
    model = MHATransformer().eval()
    spec = analyze(MHATransformer, TOKENS, verify=False)
    keep = torch.tensor([0, 2])
    mask = Mask({"blocks.1.attn": keep})
    zeroed = copy.deepcopy(model)
    attn = zeroed.blocks[1].attn
    d = attn.head_dim
    with torch.no_grad():
        for h in (1, 3):
            attn.out_proj.weight[:, h * d:(h + 1) * d] = 0
    compact = spec.build(spec.gather(model.state_dict(), mask), mask).eval()
    assert compact.get_submodule("blocks.1.attn").num_heads == 2
    with torch.no_grad():
        assert torch.allclose(compact(TOKENS), zeroed(TOKENS), atol=1e-5)


def test_residual_mlp_is_grouped_correctly():
    spec = analyze(ResidualMLP, torch.randn(3, 16))
    assert [g.name for g in spec.groups] == ["fc1"]  # the hidden layer inside the block
    assert "fc_in" in spec.excluded and "residual" in spec.excluded["fc_in"]  # the stream stays full


def test_unsupported_layer_on_masked_path_fails_naming_it():
    with pytest.raises(AnalysisError, match="group 'fc1'.*cumsum"):
        analyze(UnsupportedOnPath, torch.randn(2, 8))
    spec = analyze(UnsupportedOnPath, torch.randn(2, 8), exclude=["fc1"])
    assert spec.groups == []


def test_include_and_exclude_by_name():
    spec = analyze(PreActResNet, IMAGES, include=["stem"], exclude=["stages.0.0.conv1"], verify=False)
    assert [g.name for g in spec.groups] == ["stem", "stages.1.0.conv1"]
    with pytest.raises(ValueError, match="unknown"):
        analyze(PreActResNet, IMAGES, include=["nope"], verify=False)
    with pytest.raises(ValueError, match="cannot be masked.*output"):
        analyze(PreActResNet, IMAGES, include=["fc"], verify=False)


def test_wrong_rule_is_caught_at_analysis_time(monkeypatch):
    """Break the Conv2d rule on purpose (couple the wrong dim): analysis must refuse."""
    from fl_subnet.core.analysis import rules

    def bad_conv(p, node, m, x):
        out = rules._conv(p, node, m, x)
        p.couplings.pop()  # forget the bias coupling
        return out

    monkeypatch.setitem(rules.MODULE_RULES, torch.nn.Conv2d, bad_conv)
    with pytest.raises((AnalysisError, ValueError)):
        analyze(FlowerCNN, IMAGES)


def test_model_instance_is_accepted_and_analysis_is_cheap_for_resnet18():
    from fl_subnet.models import resnet18_shaped

    spec = analyze(resnet18_shaped, torch.randn(1, 3, 32, 32), verify=False)
    assert len(spec.groups) == 8  # conv1 of each of the 8 basic blocks
    assert math.isclose(sum(g.size for g in spec.groups), 2 * (64 + 128 + 256 + 512))
    inst = analyze(FlowerCNN(), IMAGES)
    assert [g.name for g in inst.groups] == list(CASES["flower-cnn"][2])
