"""Depth groups: skippable residual branches found by the analysis, a skipped branch
equals the model with that branch replaced by the identity (written by hand here),
its tensors leave the slice, and the aggregation averages each tensor over the nodes
that held it."""

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord
from torch import nn
from torch.utils.data import TensorDataset

from fl_subnet import Mask, analyze
from fl_subnet.clients import make_client_app
from fl_subnet.core.aggregate import MaskedAggregator
from fl_subnet.core.masks import full_mask
from fl_subnet.core.samplers import FullSampler
from fl_subnet.experiments.inprocess_grid import InProcessGrid
from fl_subnet.models import CNNBN, FlowerCNN, HandAttentionTransformer, MHATransformer, PreActResNet
from fl_subnet.strategies.base import SubnetStrategy
from fl_subnet.wire import arrays_to_state, mask_from_config, mask_to_config

from models_extra import ResidualMLP

IMAGES = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(0))
TOKENS = torch.randint(0, 16, (3, 8), generator=torch.Generator().manual_seed(0))


def resnet():
    return PreActResNet(widths=(16, 32), blocks_per_stage=2)


CASES = {  # factory, example input, the depth blocks (named by hand)
    "resnet": (resnet, IMAGES, ["stages.0.0", "stages.0.1", "stages.1.1"]),  # stages.1.0 has a conv shortcut
    "mha": (MHATransformer, TOKENS, ["blocks.0.attn", "blocks.0.ffn", "blocks.1.attn", "blocks.1.ffn"]),
    "hand": (HandAttentionTransformer, TOKENS, ["blocks.0.attn", "blocks.0.ffn", "blocks.1.attn", "blocks.1.ffn"]),
    "residual-mlp": (ResidualMLP, torch.randn(3, 16), ["fc1"]),
    "cnn": (FlowerCNN, IMAGES, []),
    "cnn-bn": (CNNBN, IMAGES, []),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_depth_blocks_found(case):
    factory, x, expected = CASES[case]
    assert [b.name for b in analyze(factory, x).blocks] == expected


class _ZeroAttention(nn.Module):
    def forward(self, q, k, v, **kw):
        return torch.zeros_like(q), None


def _by_hand(case, model, block):
    """The model with ``block``'s branch replaced by the identity (x + 0 = x), by hand."""
    if case == "resnet":
        stage, idx = map(int, block.split(".")[1:])
        model.stages[stage][idx] = nn.Identity()
    elif case == "mha":
        b, part = block.split(".")[1:]
        blk = model.blocks[int(b)]
        if part == "attn":
            blk.attn = _ZeroAttention()
        else:
            blk.ffn = _Zero()
    return model


class _Zero(nn.Module):
    def forward(self, x):
        return torch.zeros_like(x)


@pytest.mark.parametrize("case,block", [("resnet", "stages.0.1"), ("resnet", "stages.1.1"),
                                        ("mha", "blocks.0.attn"), ("mha", "blocks.1.ffn")])
def test_skipped_block_equals_the_model_without_that_branch(case, block):
    factory, x, _ = CASES[case]
    torch.manual_seed(0)
    model = factory().eval()
    spec = analyze(factory, x, verify=False)
    state = model.state_dict()
    mask = Mask({}, skip=frozenset({block}))
    compact = spec.gather(state, mask)
    dropped = set(state) - set(compact)
    assert dropped and all(k.startswith(block.rsplit(".", 1)[0] if case == "mha" else block) for k in dropped)
    assert dropped == {k for b in spec.blocks if b.name == block for k in b.keys}
    with torch.no_grad():
        out = spec.build(compact, mask).eval()(x)
        ref = _by_hand(case, model, block)(x)
    assert torch.allclose(out, ref, atol=1e-6)


def test_skip_combines_with_a_width_mask():
    factory, x, _ = CASES["mha"]
    torch.manual_seed(0)
    model = factory().eval()
    spec = analyze(factory, x, verify=False)
    idx = {g.name: torch.arange(0, g.size, 2) for g in spec.groups}
    mask = Mask(idx, skip=frozenset({"blocks.0.ffn"}))
    compact = spec.gather(model.state_dict(), mask)
    assert "blocks.0.ffn.fc1.weight" not in compact and compact["blocks.1.ffn.fc1.weight"].shape == (32, 32)
    with torch.no_grad():
        out = spec.build(compact, mask).eval()(x)
        ref = spec.reference(model.state_dict(), mask).eval()(x)
    assert torch.allclose(out, ref, atol=1e-5)


def test_aggregation_averages_each_tensor_over_its_holders():
    spec = analyze(ResidualMLP, torch.randn(3, 16), verify=False)
    state = ResidualMLP().state_dict()
    every = full_mask(spec.all_groups)
    skipping = Mask(dict(every.indices), skip=frozenset({"fc1"}))
    a = {k: torch.full_like(v, 1.0) for k, v in spec.gather(state, skipping).items()}
    b = {k: torch.full_like(v, 5.0) for k, v in spec.gather(state, every).items()}
    agg = MaskedAggregator(state, spec.slicer)
    agg.add(a, skipping, weight=1.0)
    agg.add(b, every, weight=3.0)
    out = agg.finalize()
    for k in state:
        want = 5.0 if k.startswith(("fc1.", "fc2.")) else (1.0 + 3 * 5.0) / 4  # hand-computed
        assert torch.allclose(out[k], torch.full_like(state[k], want)), k
    nobody = MaskedAggregator(state, spec.slicer, untouched="zero")
    nobody.add(a, skipping)
    kept = nobody.finalize()
    assert all(torch.equal(kept[k], state[k]) for k in ("fc1.weight", "fc2.bias"))  # not trained: unchanged
    with pytest.raises(ValueError, match="missing"):
        MaskedAggregator(state, spec.slicer).add(a, every)  # a full mask's reply needs fc1


def test_skip_travels_on_the_wire_and_unknown_blocks_are_named():
    spec = analyze(resnet, IMAGES, verify=False)
    mask = Mask({}, skip=frozenset({"stages.0.1", "stages.1.1"}))
    back = mask_from_config(mask_to_config(mask, spec.groups), spec.groups)
    assert back.skip == mask.skip
    with pytest.raises(ValueError, match="unknown depth block.*stages.1.0"):
        spec.gather(resnet().state_dict(), Mask({}, skip=frozenset({"stages.1.0"})))


class _SkipFirstSlot(FullSampler):
    def sample(self, groups, server_round, num_masks):
        masks = super().sample(groups, server_round, num_masks)
        masks[0] = Mask(masks[0].indices, skip=frozenset({"stages.0.1"}))
        return masks


def test_a_node_trains_a_shallower_model_in_a_round():
    def load_data(context):
        g = torch.Generator().manual_seed(int(context.node_config["partition-id"]))
        x = torch.randn(16, 1, 8, 8, generator=g)
        return TensorDataset(x, (x.mean((1, 2, 3)) > 0).long()), None

    torch.manual_seed(0)
    init = resnet().state_dict()
    strategy = SubnetStrategy(resnet, _SkipFirstSlot(), example_input=IMAGES[:1], fraction_evaluate=0.0,
                              min_available_nodes=2)
    grid = InProcessGrid(make_client_app(resnet, load_data), 2)
    cfg = ConfigRecord({"local-steps": 1, "lr": 0.05, "batch-size": 8, "loss": "cross-entropy", "seed": 1})
    result = strategy.start(grid=grid, initial_arrays=ArrayRecord(init), num_rounds=1, train_config=cfg)
    m = result.train_metrics_clientapp[1]
    assert m["num-replies"] == 2 and m["num-rejected"] == 0
    block_bytes = sum(4 * v.numel() for k, v in init.items() if k.startswith("stages.0.1.") and v.is_floating_point())
    full_bytes = sum(v.numel() * v.element_size() for v in init.values())
    assert m["bytes-up"] < 2 * full_bytes + 2 * 128 * len(init) - block_bytes  # one node sent less
    new = arrays_to_state(result.arrays)
    assert not torch.equal(new["stages.0.1.conv1.weight"], init["stages.0.1.conv1.weight"])  # the other trained it
