"""docs/any-architecture.md and the unit_groups() docstring examples run as written; a
masking strategy refuses a model with no unit group to mask, naming what the analysis
found; a recurrent layer is refused naming what is unsupported; a model declaring its
groups with unit_groups() trains under the strategies that take declared groups."""

import doctest
import pathlib
import re

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord
from torch import nn
from torch.utils.data import TensorDataset

import fl_subnet.core.groups
import fl_subnet.core.spec
from fl_subnet import AnalysisError, Coupling, UnitGroup, analyze
from fl_subnet.clients import make_client_app
from fl_subnet.experiments.inprocess_grid import InProcessGrid
from fl_subnet.strategies import (IST, CoreAlternation, Dropout, FederatedDropout, FedRolex, FjORD, HeteroFL,
                                  MultiSampleDropout, RandomPath, SubnetFedAvg)

DOCS = pathlib.Path(__file__).resolve().parents[1] / "docs" / "any-architecture.md"

MASKING = {
    "IST": lambda m, **kw: IST(m, num_subnets=2, **kw),
    "FederatedDropout": lambda m, **kw: FederatedDropout(m, 0.5, **kw),
    "Dropout": lambda m, **kw: Dropout(m, 0.5, **kw),
    "MultiSampleDropout": lambda m, **kw: MultiSampleDropout(m, 0.5, 2, **kw),
    "HeteroFL": lambda m, **kw: HeteroFL(m, (0.5, 1.0), **kw),
    "FedRolex": lambda m, **kw: FedRolex(m, (0.5, 1.0), **kw),
    "FjORD": lambda m, **kw: FjORD(m, (0.6, 1.0), **kw),
    "CoreAlternation": lambda m, **kw: CoreAlternation(m, 0.5, 2, **kw),
}


class SoftmaxHidden(nn.Module):
    """A softmax over the hidden units: the analysis finds no group to mask."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(6, 8)
        self.fc2 = nn.Linear(8, 3)

    def forward(self, x):
        return self.fc2(torch.softmax(self.fc1(x), dim=-1))


class ResidualOnly(nn.Module):
    """Three residual branches ``x + Linear(x)``: depth blocks, but every unit sits on the
    residual stream (left full by default)."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(6, 8)
        self.blocks = nn.ModuleList([nn.Linear(8, 8) for _ in range(3)])
        self.out = nn.Linear(8, 3)

    def forward(self, x):
        x = self.inp(x)
        for block in self.blocks:
            x = x + block(x)
        return self.out(x)


class LSTMClassifier(nn.Module):
    """The docs' example: an LSTM and an MLP head whose hidden neurons are declared."""

    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(6, 32, batch_first=True)
        self.fc1 = nn.Linear(32, 64)
        self.fc2 = nn.Linear(64, 3)

    def forward(self, x):
        out, _ = self.lstm(x)
        return self.fc2(torch.relu(self.fc1(out[:, -1])))

    def unit_groups(self):
        fc1 = (Coupling("fc1.weight", 0), Coupling("fc1.bias", 0), Coupling("fc2.weight", 1))
        return [UnitGroup("fc1", 64, fc1, consumers=("fc2",), kind="neurons")]


class Recurrent(nn.Module):
    def __init__(self, layer: nn.Module):
        super().__init__()
        self.rnn = layer
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        out = self.rnn(x)
        return self.fc(out[0][:, -1])


# ----------------------------------------------------------------------------- docs
def test_docs_page_code_runs_as_written():
    blocks = re.findall(r"```python\n(.*?)```", DOCS.read_text(), re.S)
    assert len(blocks) >= 4
    namespace: dict = {}
    for i, block in enumerate(blocks):
        exec(compile(block, f"{DOCS.name} block {i}", "exec"), namespace)  # noqa: S102
    assert "unit_groups" in vars(namespace["LSTMClassifier"])


@pytest.mark.parametrize("obj", [fl_subnet.core.groups.UnitGroup, fl_subnet.core.spec.analyze],
                         ids=["UnitGroup", "analyze"])
def test_docstring_examples_run(obj):
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    tests = doctest.DocTestFinder().find(obj, globs={})
    assert sum(len(t.examples) for t in tests) >= 4
    for test in tests:
        runner.run(test)
    assert runner.summarize(verbose=False).failed == 0


# ----------------------------------------------------------------------------- nothing to mask
@pytest.mark.parametrize("name", sorted(MASKING))
def test_masking_strategy_refuses_a_model_with_nothing_to_mask(name):
    assert analyze(SoftmaxHidden, torch.zeros(2, 6)).groups == []
    with pytest.raises(ValueError) as err:
        MASKING[name](SoftmaxHidden)
    message = str(err.value)
    assert message.startswith(f"{name} masks unit groups, but the analysis of SoftmaxHidden found 0 unit groups")
    assert "'fc1' left full by default (normalized: 'torch.softmax'" in message  # the candidate and why
    assert "'fc2' can never be masked (output" in message
    assert "include=[...]" in message and "exclude=[...]" in message and "model.unit_groups()" in message
    assert "docs/any-architecture.md" in message


def test_residual_stream_is_named_with_include_and_depth_or_full_protocols_accept():
    with pytest.raises(ValueError, match=r"'inp' left full by default \(residual: .*mask it with include=\['inp'\]"):
        IST(ResidualOnly, num_subnets=2)
    SubnetFedAvg(SoftmaxHidden)  # masks nothing
    strategy = RandomPath(ResidualOnly, path_length=2)  # masks depth blocks, not unit groups
    assert strategy.spec.groups == [] and len(strategy.spec.blocks) == 3


def test_excluding_every_group_is_named():
    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1 = nn.Linear(6, 8)
            self.fc2 = nn.Linear(8, 3)

        def forward(self, x):
            return self.fc2(torch.relu(self.fc1(x)))

    with pytest.raises(ValueError, match=r"'fc1' left full by exclude=\['fc1'\]"):
        IST(Two, num_subnets=2, exclude=["fc1"])
    with pytest.raises(ValueError, match=r"LSTMClassifier.unit_groups\(\) declared the groups \['fc1'\], all left "
                                         r"full by exclude=\['fc1'\]"):
        IST(LSTMClassifier, num_subnets=2, exclude=["fc1"])


# ----------------------------------------------------------------------------- recurrent layers
@pytest.mark.parametrize("layer", [nn.LSTM(6, 8, batch_first=True), nn.GRU(6, 8, batch_first=True),
                                   nn.RNN(6, 8, batch_first=True)], ids=["LSTM", "GRU", "RNN"])
def test_recurrent_layer_is_refused_naming_what_is_unsupported(layer):
    with pytest.raises(AnalysisError) as err:
        analyze(Recurrent(layer), torch.zeros(2, 5, 6))
    message = str(err.value)
    cls = type(layer).__name__
    assert f"'rnn' (nn.{cls})" in message
    assert "nn.LSTM, nn.GRU, nn.RNN" in message and "hidden units are not a supported unit group" in message
    assert "model.unit_groups()" in message and "docs/any-architecture.md" in message
    assert "control flow" not in message


def test_declared_groups_train_under_the_strategies_that_take_them():
    def load(context):
        g = torch.Generator().manual_seed(int(context.node_config["partition-id"]))
        return TensorDataset(torch.randn(16, 5, 6, generator=g), torch.randint(0, 3, (16,), generator=g)), None

    cfg = ConfigRecord({"lr": 0.1, "local-steps": 2, "batch-size": 8, "loss": "cross-entropy", "seed": 0})
    for strategy in (IST(LSTMClassifier, num_subnets=2, fraction_evaluate=0.0),
                     HeteroFL(LSTMClassifier, (0.5, 1.0), fraction_evaluate=0.0, min_available_nodes=2)):
        torch.manual_seed(0)
        grid = InProcessGrid(make_client_app(LSTMClassifier, load), 2)
        init = LSTMClassifier().state_dict()
        result = strategy.start(grid=grid, initial_arrays=ArrayRecord(init), num_rounds=2, train_config=cfg)
        assert [result.train_metrics_clientapp[r]["num-replies"] for r in (1, 2)] == [2, 2]
        assert result.train_metrics_clientapp[1]["bytes-down"] < 2 * 4 * sum(t.numel() for t in init.values())
    with pytest.raises(ValueError, match="FjORD's per-batch widths need a traced model, but LSTMClassifier"):
        FjORD(LSTMClassifier, (0.6, 1.0))  # would fail at every node, every round

