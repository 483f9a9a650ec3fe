"""BatchNorm policies: static BatchNorm (HeteroFL) leaves the nodes' running statistics
untouched and the server's recomputed statistics are the full model's, computed here
independently from the BatchNorm inputs; bad settings are clear errors."""

import copy

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, RecordDict
from torch import nn
from torch.utils.data import TensorDataset

from fl_subnet.clients import make_client_app, receive
from fl_subnet.core.batchnorm import recompute_bn_stats
from fl_subnet.experiments.inprocess_grid import InProcessGrid
from fl_subnet.models import CNNBN
from fl_subnet.strategies import FederatedDropout
from fl_subnet.wire import arrays_to_state

EXAMPLE = torch.zeros(1, 1, 8, 8)
CALIBRATION = torch.randn(40, 1, 8, 8, generator=torch.Generator().manual_seed(5))


def bn_input_stats(model: nn.Module, x: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per BatchNorm layer: mean and unbiased variance over (N, H, W) of its input in a
    train-mode forward pass of ``x`` (each layer normalised by the batch's statistics)."""
    model = copy.deepcopy(model)
    stats, hooks = {}, []
    for name, m in model.named_modules():
        if isinstance(m, nn.BatchNorm2d):
            def hook(mod, args, name=name):
                a = args[0].detach().transpose(0, 1).reshape(args[0].shape[1], -1)
                stats[name] = (a.mean(1), a.var(1, unbiased=True))
            hooks.append(m.register_forward_pre_hook(hook))
    with torch.no_grad():
        model.train()(x)  # a copy: its running statistics may change
    for h in hooks:
        h.remove()
    return stats


def test_recompute_bn_stats_equals_the_statistics_of_the_bn_inputs():
    torch.manual_seed(0)
    model = CNNBN()
    params = {k: v.clone() for k, v in model.named_parameters()}
    momenta = [m.momentum for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    model.eval()
    recompute_bn_stats(model, [CALIBRATION])  # one batch: exactly the batch statistics
    # expected after: layer i's input depends on layers < i, whose stats are now final
    expected = bn_input_stats(model, CALIBRATION)
    for name, (mean, var) in expected.items():
        bn = model.get_submodule(name)
        assert torch.allclose(bn.running_mean, mean, atol=1e-5), name
        assert torch.allclose(bn.running_var, var, rtol=1e-4, atol=1e-5), name
    assert all(torch.equal(params[k], v) for k, v in model.named_parameters())
    assert not model.training  # mode restored
    assert [m.momentum for m in model.modules() if isinstance(m, nn.BatchNorm2d)] == momenta


def test_static_node_leaves_running_statistics_as_sent():
    torch.manual_seed(0)
    strategy = FederatedDropout(CNNBN, 0.5, example_input=EXAMPLE, batchnorm="static",
                                calibration_batches=[CALIBRATION], fraction_evaluate=0.0,
                                order_by_partition=False, min_available_nodes=1, min_train_nodes=1)
    state = CNNBN().state_dict()
    for k in state:
        if "running" in k:
            state[k] = torch.rand_like(state[k]) + 0.5
    InProcessGrid(make_client_app(CNNBN, lambda c: (None, None)), 1)  # sets Flower's run identity
    (msg,) = strategy.configure_train(1, ArrayRecord(state), ConfigRecord({}), _FakeGrid([7]))
    got = receive(msg, CNNBN)
    before = {k: v.clone() for k, v in got.model.state_dict().items()}
    out = got.model.train()(CALIBRATION)
    out.sum().backward()  # a training forward pass
    after = got.model.state_dict()
    for k in before:
        if "running" in k or "num_batches" in k:
            assert torch.equal(before[k], after[k]), k
    # and the forward normalised by the batch statistics: each channel ~ zero mean
    a = got.model.bn1(got.model.conv1(CALIBRATION))
    assert a.mean((0, 2, 3)).abs().max() < 1e-4 + got.model.bn1.bias.abs().max()


def test_static_strategy_round_gives_the_full_models_statistics():
    def load_data(context):
        g = torch.Generator().manual_seed(int(context.node_config["partition-id"]))
        x = torch.randn(24, 1, 8, 8, generator=g)
        return TensorDataset(x, (x.mean((1, 2, 3)) > 0).long()), None

    torch.manual_seed(0)
    init = ArrayRecord(CNNBN().state_dict())
    strategy = FederatedDropout(CNNBN, 0.5, example_input=EXAMPLE, batchnorm="static", seed=1,
                                calibration_batches=[CALIBRATION], fraction_evaluate=0.0, min_available_nodes=2)
    grid = InProcessGrid(make_client_app(CNNBN, load_data), 2)
    cfg = ConfigRecord({"local-steps": 2, "lr": 0.05, "batch-size": 8, "loss": "cross-entropy", "seed": 1})
    result = strategy.start(grid=grid, initial_arrays=init, num_rounds=1, train_config=cfg)
    model = CNNBN()
    model.load_state_dict(arrays_to_state(result.arrays))
    for name, (mean, var) in bn_input_stats(model, CALIBRATION).items():
        bn = model.get_submodule(name)
        assert torch.allclose(bn.running_mean, mean, atol=1e-5), name
        assert torch.allclose(bn.running_var, var, rtol=1e-4, atol=1e-5), name


def test_bad_settings_are_clear_errors():
    with pytest.raises(ValueError, match="batchnorm must be one of"):
        FederatedDropout(CNNBN, 0.5, example_input=EXAMPLE, batchnorm="frozen")
    with pytest.raises(ValueError, match="calibration_batches"):
        FederatedDropout(CNNBN, 0.5, example_input=EXAMPLE, batchnorm="static")
    with pytest.raises(TypeError, match="not a model instance"):
        receive(RecordDict({"arrays": ArrayRecord(CNNBN().state_dict())}), CNNBN())
    with pytest.raises(TypeError, match="pass Net, not Net()"):
        make_client_app(CNNBN(), lambda context: (None, None))


class _FakeGrid:
    """Just the node ids (the strategy is told not to query the nodes)."""

    def __init__(self, nodes):
        self.nodes = nodes

    def get_node_ids(self):
        return list(self.nodes)
