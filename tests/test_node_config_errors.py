"""A node refuses a bad value from the server's message with an error naming its key,
before it allocates or trains: counts that are not integers, numbers that are not finite,
more local work than a node accepts, an output scale that would overflow, an example
input shape that is negative or enormous. The analysis cache a node keeps per input
shape is bounded."""

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord

from fl_subnet.clients import make_client_app
from fl_subnet.clients.train import TrainConfig, train_local
from fl_subnet.core import spec as spec_module
from fl_subnet.core.analysis import find_unit_groups
from fl_subnet.core.samplers import BernoulliSampler
from fl_subnet.experiments.inprocess_grid import InProcessGrid
from fl_subnet.models import MLP
from fl_subnet.strategies import FederatedDropout
from fl_subnet.wire import mask_from_config, mask_to_config
from fl_subnet.wire.masks import MAX_SCALE
from fl_subnet.wire.records import example_from_config

TRAIN_CONFIG = [  # (config, key named in the error)
    ({"lr": "abc"}, "'lr'"),
    ({"lr": float("nan")}, "'lr'"),
    ({"lr": float("inf")}, "'lr'"),
    ({"lr": True}, "'lr'"),
    ({"momentum": "fast"}, "'momentum'"),
    ({"weight-decay": [1]}, "'weight-decay'"),
    ({"local-steps": "x"}, "'local-steps'"),
    ({"local-steps": 2.5}, "'local-steps'"),
    ({"local-steps": 10**9}, "local-steps must be <= "),
    ({"local-epochs": 10**7, "local-steps": 0}, "local-epochs must be <= "),
    ({"local-steps": -1}, "local-steps must be >= 0"),
    ({"batch-size": "32x"}, "'batch-size'"),
    ({"seed": "x"}, "'seed'"),
    ({"loss": "hinge"}, "loss must be one of"),
]


@pytest.mark.parametrize("config, named", TRAIN_CONFIG, ids=[str(c) for c, _ in TRAIN_CONFIG])
def test_train_config_names_the_key(config, named):
    with pytest.raises(ValueError, match=named.replace("(", r"\(")):
        TrainConfig.from_config(config)


def test_train_config_accepts_what_a_config_record_carries():
    cfg = TrainConfig.from_config({"local-steps": 3.0, "lr": "0.5", "batch-size": 8, "seed": 7})
    assert (cfg.local_steps, cfg.lr, cfg.batch_size, cfg.seed) == (3, 0.5, 8, 7)
    assert TrainConfig.from_config({"local-steps": TrainConfig.MAX_LOCAL_STEPS}).local_steps == TrainConfig.MAX_LOCAL_STEPS


@pytest.mark.parametrize("shape", ["-1,3", "0,3", "", "1," * 9 + "1", "100000,100000,100000", "3,x"])
def test_example_shape_out_of_bounds_names_the_key(shape):
    with pytest.raises(ValueError, match="'example-shape'"):
        example_from_config({"example-shape": shape})


def test_example_shape_in_bounds():
    assert example_from_config({"example-shape": "1,1,8,8"}) == ((1, 1, 8, 8), "float32")


@pytest.mark.parametrize("scale", [1e300, MAX_SCALE * 1.5, float("inf"), -2.0, 0.0])
def test_a_scale_that_would_overflow_is_refused_naming_the_key(scale):
    groups = find_unit_groups(MLP(6, [8], 3))
    cfg = mask_to_config(BernoulliSampler(0.5, seed=1).sample(groups, 1, 1)[0], groups)
    with pytest.raises(ValueError, match="'scale'"):
        mask_from_config({**cfg, "scale": scale}, groups)
    per_unit = {**cfg, "scale": [0.0] * len(groups)}
    k = sum(int(v.numel()) for v in mask_from_config(cfg, groups).indices.values())
    with np.errstate(over="ignore"):  # 1e300 is inf in float32: refused as well
        per_unit["unit-scales"] = np.full(k, scale, dtype="<f4").tobytes()
    if scale > 0:  # 0 and negatives are refused as a list entry above; here per unit
        with pytest.raises(ValueError, match="per-unit scales must be in"):
            mask_from_config(per_unit, groups)
    assert mask_from_config({**cfg, "scale": MAX_SCALE}, groups).scale[groups[0].name] == MAX_SCALE


def test_the_analysis_cache_is_bounded():
    mlp = lambda: MLP(6, [8], 3)  # noqa: E731
    spec_module._CACHE.clear()
    for n in range(spec_module.MAX_CACHED_SPECS + 5):
        spec_module.cached_spec(mlp, (n + 1, 6), "float32")
    assert len(spec_module._CACHE) == spec_module.MAX_CACHED_SPECS
    # the most recently used entry survives a new one
    first = spec_module.cached_spec(mlp, (spec_module.MAX_CACHED_SPECS + 5, 6), "float32")
    spec_module.cached_spec(mlp, (99, 6), "float32")
    assert spec_module.cached_spec(mlp, (spec_module.MAX_CACHED_SPECS + 5, 6), "float32") is first


def _data(context):
    x = torch.randn(16, 6, generator=torch.Generator().manual_seed(0))
    return torch.utils.data.TensorDataset(x, torch.randint(0, 3, (16,))), None


def _train_messages():
    """A one-node in-process grid with fl-subnet's ClientApp, and federated dropout's
    train messages of round 1 for it."""
    factory = lambda: MLP(6, [8], 3)  # noqa: E731
    grid = InProcessGrid(make_client_app(factory, _data, train_local), 1)
    strategy = FederatedDropout(factory, 0.5, seed=0, fraction_evaluate=0.0, min_train_nodes=1,
                                 min_available_nodes=1)
    messages = list(strategy.configure_train(1, ArrayRecord(factory().state_dict()),
                                             ConfigRecord({"local-steps": 1, "lr": 0.1}), grid))
    assert messages
    return grid, messages


def test_the_client_app_replies_with_an_error_naming_server_round():
    """A message whose 'server-round' is not an integer: the node's error reply names it."""
    grid, messages = _train_messages()
    for m in messages:
        m.content["config"]["server-round"] = "x"
    replies = list(grid.send_and_receive(messages))
    assert replies and all(r.has_error() for r in replies)
    assert all("'server-round'" in r.error.reason for r in replies), [r.error.reason for r in replies]


def _declaring(shape: tuple[int, ...], payload: bytes = b"\0" * 16):
    """A Flower Array whose .npy header declares ``shape`` (float32) over ``payload``; its
    own ``shape`` field says 4 (Flower's wire format holds int32 dimensions)."""
    from flwr.app import Array
    from flwr.common.constant import SType

    from fl_subnet.wire.records import npy_header_bytes

    header, _ = npy_header_bytes(shape, "<f4")
    return Array(dtype="float32", shape=(4,), stype=SType.NUMPY, data=header + payload)


@pytest.mark.parametrize("copy", [True, False])
def test_an_array_declaring_10_gb_over_16_bytes_is_refused_without_allocating(copy):
    import tracemalloc

    from fl_subnet.wire import arrays_to_state

    record = ArrayRecord({"0.weight": _declaring((10**10 // 4,))})
    tracemalloc.start()
    try:
        with pytest.raises(ValueError, match=r"array '0.weight': its header declares shape \(2500000000,\)"):
            arrays_to_state(record, copy=copy)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 2**20, peak  # numpy reports its allocations to tracemalloc: nothing near 10 GB
    good = ArrayRecord({"w": _declaring((4,))})  # 16 bytes for 4 float32: decoded
    assert arrays_to_state(good, copy=copy)["w"].shape == (4,)


def test_the_client_app_refuses_a_model_array_declaring_10_gb_naming_it():
    grid, messages = _train_messages()
    for m in messages:
        arrays = m.content.array_records[next(iter(m.content.array_records))]
        key = next(iter(arrays))
        arrays[key] = _declaring((10**10 // 4,))
    replies = list(grid.send_and_receive(messages))
    assert replies and all(r.has_error() for r in replies)
    assert all(f"array '{key}'" in r.error.reason for r in replies), [r.error.reason for r in replies]
