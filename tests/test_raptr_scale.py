"""RaPTr-style output scaling of a random path's kept blocks (``path-scale = "raptr"``).

On a path of L of B depth blocks (first and last always kept), each kept middle block
``y = x + f(x)`` trains as ``y = x + s·f(x)`` with ``s = (B − 2)/(L − 2)``, the inverse of
a middle block's keep probability; the first and last block stay at 1. Checked here: the
factor per round and its unbiasedness over paths, the compact forward and backward of a
ResNet and of a transformer path against plain-torch ports with the factor applied by
hand, the factor's trip over the wire (Flower's ConfigRecord) and the refusal of
malformed values naming the key, and a short end-to-end run whose replies are accepted
and whose loss falls.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from flwr.app import ArrayRecord, ConfigRecord, MessageType
from torch.utils.data import TensorDataset

from fl_subnet import Mask, analyze
from fl_subnet.clients import make_client_app
from fl_subnet.core.paths import RandomPathSampler, progressive_schedule
from fl_subnet.core.slicing import torch_threads
from fl_subnet.experiments.config import RunConfig
from fl_subnet.experiments.experiment import example_input, factory_for
from fl_subnet.experiments.inprocess_grid import InProcessGrid
from fl_subnet.models import MHATransformer, PreActResNet
from fl_subnet.strategies import RandomPath, build_strategy
from fl_subnet.wire import arrays_to_state
from fl_subnet.wire.masks import BLOCK_SCALE_KEY, MAX_SCALE, mask_from_config, mask_to_config

IMAGES = torch.randn(6, 1, 8, 8, generator=torch.Generator().manual_seed(1))


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Tiny models: a second intra-op thread only adds contention on a busy machine."""
    with torch_threads(1):
        yield


def resnet5():
    """B = 5 depth blocks: stages.0.{0,1,2} (8 channels), stages.1.{1,2} (16 channels);
    stages.1.0 has a conv shortcut (stride 2) and is not a depth block."""
    return PreActResNet(1, 10, widths=(8, 16), blocks_per_stage=3)


SPEC = analyze(resnet5, IMAGES[:1], verify=False)
BLOCKS = [b.name for b in SPEC.blocks]


def resnet_by_hand(model: PreActResNet, x: torch.Tensor, skip, scale) -> torch.Tensor:
    """PreActResNet.forward written out: a skipped block is the identity, a kept one with
    an identity shortcut is ``h + s·f(h)`` with ``f = conv2 ∘ relu ∘ bn2 ∘ conv1 ∘ relu ∘ bn1``."""
    h = model.stem(x)
    for i, stage in enumerate(model.stages):
        for j, blk in enumerate(stage):
            name = f"stages.{i}.{j}"
            if name in skip:
                continue
            if blk.has_shortcut:  # not a depth block: as the model computes it
                h = blk(h)
                continue
            f = blk.conv2(F.relu(blk.bn2(blk.conv1(F.relu(blk.bn1(h))))))
            h = h + scale.get(name, 1.0) * f
    h = F.relu(model.bn(h))
    return model.fc(torch.flatten(model.gap(h), 1))


def transformer_by_hand(model: MHATransformer, tokens: torch.Tensor, skip, scale) -> torch.Tensor:
    """MHATransformer.forward written out, each branch ``blocks.i.attn`` / ``blocks.i.ffn``
    skipped or scaled by hand."""
    x = model.embed(tokens) + model.pos
    for i, blk in enumerate(model.blocks):
        if f"blocks.{i}.attn" not in skip:
            h = blk.ln1(x)
            x = x + scale.get(f"blocks.{i}.attn", 1.0) * blk.attn(h, h, h, need_weights=False)[0]
        if f"blocks.{i}.ffn" not in skip:
            x = x + scale.get(f"blocks.{i}.ffn", 1.0) * blk.ffn(blk.ln2(x))
    return model.head(model.ln(x).mean(1))


# ---------------------------------------------------------------- the factor

def test_factor_is_b_minus_2_over_l_minus_2_on_the_kept_middle_blocks_only():
    sampler = RandomPathSampler(schedule=((1, 2), (2, 3), (3, 4), (4, 5)), blocks=BLOCKS, scale="raptr")
    want = {1: None, 2: 3 / 1, 3: 3 / 2, 4: None}  # B = 5: L = 2 draws nothing, L = 5 is the full model
    for rnd, factor in want.items():
        for mask in sampler.sample(SPEC.groups, rnd, 4):
            kept = [b for b in BLOCKS if b not in mask.skip]
            assert len(kept) == sampler.length(rnd)
            if factor is None:
                assert mask.block_scale == {}
            else:
                assert mask.block_scale == {b: factor for b in kept[1:-1]}  # not the first nor the last
                assert BLOCKS[0] not in mask.block_scale and BLOCKS[-1] not in mask.block_scale
    plain = RandomPathSampler(3, blocks=BLOCKS)  # the default: no factor, as before
    assert all(m.block_scale == {} for m in plain.sample(SPEC.groups, 1, 5))
    assert [m.skip for m in plain.sample(SPEC.groups, 1, 5)] == \
           [m.skip for m in RandomPathSampler(3, blocks=BLOCKS, scale="raptr").sample(SPEC.groups, 1, 5)]


def test_expected_residual_weight_of_every_block_is_one():
    """Over paths, E[ζ_i·s_i] = 1 for every block: the middle ones by the factor, the ends
    because they are always kept at 1 (B = 7, L = 4: q = 2/5, s = 5/2)."""
    names = [f"b{i}" for i in range(7)]
    sampler = RandomPathSampler(4, blocks=names, scale="raptr", seed=0)
    draws = [m for r in range(1, 1001) for m in sampler.sample([], r, 4)]
    weight = torch.tensor([[0.0 if b in m.skip else m.block_scale.get(b, 1.0) for b in names] for m in draws],
                          dtype=torch.float64)
    assert set(weight[:, 1:-1].unique().tolist()) == {0.0, 2.5}
    assert torch.equal(weight[:, [0, -1]], torch.ones(len(draws), 2, dtype=torch.float64))
    q = 2 / 5
    tol = 5 * 2.5 * math.sqrt(q * (1 - q) / len(draws))
    torch.testing.assert_close(weight.mean(0), torch.ones(7, dtype=torch.float64), atol=tol, rtol=0)


# ---------------------------------------------------------------- the compact forward

@pytest.mark.parametrize("length,rnd", [(3, 1), (3, 2), (4, 1), (4, 5)])
def test_compact_resnet_path_equals_the_scaled_blocks_by_hand(length, rnd):
    torch.manual_seed(0)
    model = resnet5()
    with torch.no_grad():  # non-trivial BatchNorm statistics and affine parameters
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5), m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5), m.bias.uniform_(-0.2, 0.2)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    (mask,) = RandomPathSampler(length, blocks=BLOCKS, scale="raptr", seed=3).sample(SPEC.groups, rnd, 1)
    assert mask.block_scale and set(mask.block_scale.values()) == {3 / (length - 2)}
    compact = SPEC.build(SPEC.gather(state, mask), mask)
    assert set(compact.state_dict()) == set(state) - {k for b in mask.skip for k in state if k.startswith(b + ".")}
    x, y = IMAGES, torch.arange(6) % 10
    for train in (False, True):  # running statistics, then batch statistics: the factor acts in both
        compact.train(train), model.train(train)
        with torch.no_grad():
            want = resnet_by_hand(model, x, mask.skip, mask.block_scale)
            torch.testing.assert_close(compact(x), want, atol=1e-5, rtol=1e-5)
            if not train:  # and it is not the unscaled path: the factor changes the output
                assert not torch.allclose(want, resnet_by_hand(model, x, mask.skip, {}), atol=1e-3)
    # the gradients of a training step equal those of the hand-scaled forward
    model.load_state_dict(state)
    compact, model = SPEC.build(SPEC.gather(state, mask), mask).train(), model.train()
    F.cross_entropy(compact(x), y).backward()
    F.cross_entropy(resnet_by_hand(model, x, mask.skip, mask.block_scale), y).backward()
    ref = dict(model.named_parameters())
    for name, p in compact.named_parameters():
        torch.testing.assert_close(p.grad, ref[name].grad, atol=1e-5, rtol=1e-4, msg=name)


def test_compact_transformer_path_equals_the_scaled_branches_by_hand():
    """Six branches (attention and FFN of 3 blocks), L = 4: two middle branches ×2,
    including consecutive skipped branches (an add whose identity operand was skipped)."""
    def factory():
        return MHATransformer(16, 8, dim=16, num_heads=2, ffn=32, depth=3, num_classes=3)

    tokens = torch.randint(0, 16, (5, 8), generator=torch.Generator().manual_seed(0))
    spec = analyze(factory, tokens[:1], verify=False)
    names = [b.name for b in spec.blocks]
    assert names == [f"blocks.{i}.{p}" for i in range(3) for p in ("attn", "ffn")]
    torch.manual_seed(0)
    model = factory().eval()
    sampler = RandomPathSampler(4, blocks=names, scale="raptr", seed=1)
    masks = [m for r in range(1, 6) for m in sampler.sample(spec.groups, r, 3)]
    assert any({"blocks.1.attn", "blocks.1.ffn"} <= m.skip for m in masks)  # consecutive skips are covered
    for mask in masks:
        assert set(mask.block_scale.values()) == {2.0} and len(mask.block_scale) == 2
        compact = spec.build(spec.gather(model.state_dict(), mask), mask).eval()
        with torch.no_grad():
            torch.testing.assert_close(compact(tokens), transformer_by_hand(model, tokens, mask.skip, mask.block_scale),
                                       atol=1e-5, rtol=1e-5)


def test_reference_applies_the_factor_and_bad_block_scales_are_refused():
    torch.manual_seed(0)
    state = resnet5().state_dict()
    mask = Mask({}, skip=frozenset({"stages.0.1"}), block_scale={"stages.0.2": 1.5})
    x = IMAGES[:2]
    with torch.no_grad():
        torch.testing.assert_close(SPEC.reference(state, mask).eval()(x),
                                   SPEC.build(SPEC.gather(state, mask), mask).eval()(x), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="not a depth block"):
        SPEC.build(SPEC.gather(state, Mask({})), Mask({}, block_scale={"fc": 2.0}))
    with pytest.raises(ValueError, match="skipped"):
        Mask({}, skip=frozenset({"stages.0.1"}), block_scale={"stages.0.1": 2.0}).validate(SPEC.groups)
    with pytest.raises(ValueError, match="finite number > 0"):
        Mask({}, block_scale={"stages.0.1": float("inf")}).validate(SPEC.groups)


# ---------------------------------------------------------------- the wire

def test_block_scale_round_trips_exactly_through_a_config_record():
    names = [f"blocks.{i}" for i in range(7)]
    sampler = RandomPathSampler(5, blocks=names, scale="raptr", seed=2)  # s = 5/3: not a short decimal
    for mask in sampler.sample(SPEC.groups, 1, 3):
        record = ConfigRecord(mask_to_config(mask, SPEC.all_groups))  # Flower's own type checks
        assert isinstance(record[BLOCK_SCALE_KEY], str)
        back = mask_from_config(dict(record), SPEC.all_groups)
        assert back.skip == mask.skip and back.block_scale == mask.block_scale == \
               {b: 5 / 3 for b in names[1:-1] if b not in mask.skip}
    plain = Mask({}, skip=frozenset({"b"}))
    assert BLOCK_SCALE_KEY not in mask_to_config(plain, SPEC.all_groups)  # absent = none
    assert BLOCK_SCALE_KEY not in mask_to_config(Mask({}, block_scale={"a": 1.0}), SPEC.all_groups)
    assert mask_from_config({"skip": "b"}, SPEC.all_groups).block_scale == {}


@pytest.mark.parametrize("value", [
    "stages.0.1=0", "stages.0.1=-1.5", "stages.0.1=nan", "stages.0.1=inf", f"stages.0.1={2 * MAX_SCALE}",
    "stages.0.1=", "stages.0.1", "=2.0", "stages.0.1=2,stages.0.1=2", "stages.0.2=x", "", 2.0, b"stages.0.1=2",
    "stages.0.3=2.0",  # a skipped block
])
def test_a_malformed_block_scale_is_refused_naming_the_key(value):
    with pytest.raises(ValueError, match=f"config key '{BLOCK_SCALE_KEY}'"):
        mask_from_config({"skip": "stages.0.3", BLOCK_SCALE_KEY: value}, SPEC.all_groups)


@pytest.mark.parametrize("factor", [0.0, -1.0, float("nan"), float("inf"), 2 * MAX_SCALE])
def test_the_server_refuses_to_encode_a_bad_factor(factor):
    with pytest.raises(ValueError, match=BLOCK_SCALE_KEY):
        mask_to_config(Mask({}, block_scale={"stages.0.1": factor}), SPEC.all_groups)


@pytest.mark.parametrize("kwargs", [dict(path_length=3, scale="RaPTr"), dict(path_length=3, scale=None),
                                    dict(mode="partition", scale="raptr")])
def test_bad_path_scale_arguments_name_the_key(kwargs):
    with pytest.raises(ValueError, match="path-scale"):
        RandomPathSampler(**kwargs)


def test_run_config_key():
    with pytest.raises(ValueError, match="path-scale"):
        RunConfig(strategy="random-path", model="resnet", blocks_per_stage=3, path_scale="sqrt")
    assert RunConfig().path_scale == "none"
    cfg = RunConfig(strategy="random-path", model="resnet", blocks_per_stage=3, path_length="0.6,1.0",
                    num_server_rounds=2, path_scale="raptr")
    strategy = build_strategy(cfg, factory_for(cfg), example_input=example_input(cfg))
    assert isinstance(strategy, RandomPath) and strategy.sampler.scale == "raptr"
    assert strategy.sampler.block_factor(1) == 3.0 and strategy.sampler.block_factor(2) == 1.0  # L = 3, then 5 of 5


# ---------------------------------------------------------------- end to end

CLASSES = 3


def resnet4():
    """One stage of 4 identity-shortcut blocks: B = 4."""
    return PreActResNet(1, CLASSES, widths=(6,), blocks_per_stage=4)


def load_images(context):
    pid = int(context.node_config["partition-id"])
    g = torch.Generator().manual_seed(200 + pid)
    n = 16 + 4 * pid
    y = torch.randint(0, CLASSES, (n,), generator=g)
    x = 0.6 * torch.randn(n, 1, 8, 8, generator=g) + 0.5 * (y.float() - 1.0).view(n, 1, 1, 1)
    return TensorDataset(x, y), TensorDataset(x[:8], y[:8])


class RecordingGrid(InProcessGrid):
    """The in-process grid (Flower serde on every message), keeping the train configs sent."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.train_configs = []

    def push_messages(self, messages):
        messages = list(messages)
        self.train_configs += [dict(m.content["config"]) for m in messages
                               if m.metadata.message_type == MessageType.TRAIN]
        return super().push_messages(messages)


def test_end_to_end_raptr_paths_are_accepted_and_learn():
    nodes, rounds = 3, 4
    torch.manual_seed(0)
    strategy = RandomPath(resnet4, schedule=progressive_schedule([0.75, 1.0], rounds), scale="raptr",
                          example_input=torch.zeros(1, 1, 8, 8), fraction_evaluate=0.0, min_available_nodes=nodes,
                          min_train_nodes=nodes, seed=1)
    torch.manual_seed(0)
    init = resnet4().state_dict()
    grid = RecordingGrid(make_client_app(resnet4, load_images), nodes)
    result = strategy.start(grid=grid, initial_arrays=ArrayRecord(init), num_rounds=rounds,
                            train_config=ConfigRecord({"local-steps": 3, "lr": 0.1, "batch-size": 8,
                                                       "loss": "cross-entropy", "seed": 1}))
    for rnd in range(1, rounds + 1):
        m = result.train_metrics_clientapp[rnd]
        assert m["num-replies"] == nodes and m["num-rejected"] == 0, (rnd, dict(m))
    # rounds 1-2: L = 3 of 4, the one kept middle block ×2 on the wire; rounds 3-4: the full model
    scaled = [c for c in grid.train_configs if BLOCK_SCALE_KEY in c]
    assert len(scaled) == 2 * nodes and len(grid.train_configs) == rounds * nodes
    for c in scaled:
        (entry,) = c[BLOCK_SCALE_KEY].split(",")
        name, factor = entry.split("=")
        assert float(factor) == 2.0 and name in ("stages.0.1", "stages.0.2") and name not in c["skip"]

    def central_loss(state):
        model = resnet4()
        model.load_state_dict(state)
        model.eval()
        parts = [load_images(type("C", (), {"node_config": {"partition-id": i}}))[0].tensors for i in range(nodes)]
        x, y = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
        with torch.no_grad():
            return float(F.cross_entropy(model(x), y))

    before, after = central_loss(init), central_loss(arrays_to_state(result.arrays))
    assert math.isfinite(after) and after < before - 0.05, (before, after)
