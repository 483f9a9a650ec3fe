"""The partition cache (fl_subnet.experiments.data, "Partition cache"): a node's tensors are
computed once by flwr-datasets' partitioners and kept as a safetensors file, so that a train
message, a fresh process under a SuperNode, imports neither Hugging Face ``datasets`` nor
``flwr_datasets`` (nor seaborn / matplotlib, which flwr_datasets' package import pulls in)
once the file is there. Damaged files are recomputed, keys are complete, the folder setting
is honoured."""

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fl_subnet.experiments import data, partition_cache
from fl_subnet.experiments.data import (
    load_centralized_test,
    load_centralized_train,
    load_dataset_by_name,
    load_partition,
    to_tensors,
)
from fl_subnet.experiments.partition_cache import CACHE_ENV, partition_cache_dir
from fl_subnet.experiments.partition import partition


def key_of(kind: str, name: str, data_kw: tuple, **fields) -> str:
    """The cache key the data module uses for these arguments."""
    return partition_cache.cache_key(kind, name, data.data_key(name, data_kw), data._SOURCES, **fields)

ROOT = Path(__file__).resolve().parents[1]
#: Imported by the computation only (flwr_datasets' package import pulls in seaborn and matplotlib).
LAZY = ("datasets", "flwr_datasets", "seaborn", "matplotlib")


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    """A fresh cache folder per test, and no per-process copies left from other tests."""
    folder = tmp_path / "cache"
    monkeypatch.setenv(CACHE_ENV, str(folder))
    data._cached_partition_tensors.cache_clear()
    yield folder
    data._cached_partition_tensors.cache_clear()


def _files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.safetensors")) if folder.is_dir() else []


def _fresh(name, pid, k, scheme, seed, data_kw, *, alpha=0.5, classes_per_partition=2, test_fraction=0.2,
           data_seed=None):
    """``load_partition``'s tensors computed here, by flwr-datasets and ``datasets`` (the
    computation of fl-subnet before the cache), with no cache involved; ``data_seed``
    defaults to ``seed``."""
    train = load_dataset_by_name(name, seed=seed if data_seed is None else data_seed, **data_kw)["train"]
    part = partition(train, k, scheme, alpha=alpha, classes_per_partition=classes_per_partition, seed=seed)[pid]
    n = len(part)
    n_test = min(max(1, round(test_fraction * n)), n - 1) if test_fraction > 0 and n >= 2 else 0
    perm = np.random.default_rng([seed, pid]).permutation(n)
    return (*to_tensors(part.select(np.sort(perm[n_test:]))), *to_tensors(part.select(np.sort(perm[:n_test]))))


def _assert_same(got, want):
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert g.dtype == w.dtype and g.shape == w.shape and torch.equal(g, w)


def _no_computing(monkeypatch):
    """From here on, computing a partition or a split fails the test: tensors must come from files."""
    def fail(*args, **kwargs):
        raise AssertionError("computed although the cache file is there")

    monkeypatch.setattr(data, "_partition_tensors", fail)
    monkeypatch.setattr(data, "_cached_dataset", fail)
    data._cached_partition_tensors.cache_clear()


# ---------------------------------------------------------------- (a) cached tensors = flwr-datasets'
@pytest.mark.parametrize("name, scheme, k, kw, data_kw", [
    ("digits", "iid", 7, {}, {}),
    ("digits", "dirichlet", 10, {"alpha": 0.5}, {}),
    ("digits", "dirichlet", 20, {"alpha": 0.05}, {}),  # flwr-datasets draws again before it succeeds
    ("digits", "pathological", 10, {"classes_per_partition": 2}, {}),
    ("digits", "pathological", 4, {"classes_per_partition": 2}, {}),  # some classes held by no partition
    ("synthetic-regression", "iid", 5, {}, {"n": 300, "d": 12}),
    ("synthetic-sequence", "dirichlet", 5, {"alpha": 0.5}, {"n": 300, "seq_len": 12}),
])
def test_cached_tensors_are_flwr_datasets_tensors(cache, monkeypatch, name, scheme, k, kw, data_kw):
    cases = [(0, 0.2), (3, 0.2), (1, 0.0)]  # 0.0: an empty local test set
    args = {"alpha": kw.get("alpha", 0.5), "classes_per_partition": kw.get("classes_per_partition", 2)}
    want = {c: _fresh(name, c[0], k, scheme, 2, data_kw, test_fraction=c[1], **args) for c in cases}
    for pid, test_fraction in cases:  # cold: computed and written
        got = load_partition(name, pid, k, scheme, args["alpha"], 2, classes_per_partition=args["classes_per_partition"],
                             data_seed=2, test_fraction=test_fraction, **data_kw)
        _assert_same(got, want[(pid, test_fraction)])
    assert len(_files(cache)) == len(cases)
    splits = load_dataset_by_name(name, seed=2, **data_kw)
    central = {split: to_tensors(splits[split]) for split in ("train", "test")}
    _assert_same(load_centralized_train(name, data_seed=2, **data_kw), central["train"])
    _assert_same(load_centralized_test(name, data_seed=2, **data_kw), central["test"])
    assert len(_files(cache)) == len(cases) + 2

    _no_computing(monkeypatch)  # warm: read from the files only
    for pid, test_fraction in cases:
        got = load_partition(name, pid, k, scheme, args["alpha"], 2, classes_per_partition=args["classes_per_partition"],
                             data_seed=2, test_fraction=test_fraction, **data_kw)
        _assert_same(got, want[(pid, test_fraction)])
    _assert_same(load_centralized_train(name, data_seed=2, **data_kw), central["train"])
    _assert_same(load_centralized_test(name, data_seed=2, **data_kw), central["test"])
    assert len(_files(cache)) == len(cases) + 2


def test_errors_are_raised_and_nothing_is_written(cache):
    with pytest.raises(ValueError, match="dirichlet-alpha"):
        load_partition("digits", 0, 4, "dirichlet", alpha=-1.0)
    with pytest.raises(ValueError, match="partitioning"):
        load_partition("synthetic-regression", 0, 4, "pathological", n=100, d=4)
    with pytest.raises(ValueError, match="dataset"):
        load_partition("no-such-set", 0, 4)
    with pytest.raises(TypeError, match="unhashable"):  # a DatasetDict has no key but its repr
        load_centralized_test("digits", source=load_dataset_by_name("digits"))
    assert _files(cache) == []


# ---------------------------------------------------------------- (b) a train message, fresh process
CHILD = """
import json, sys
from pathlib import Path

from flwr.app import Context, RecordDict
from flwr.common.serde import message_from_proto, message_to_proto
from flwr.proto.message_pb2 import Message as ProtoMessage

import fl_subnet.app.client_app as client_app

config, watch = json.loads(sys.argv[2]), json.loads(sys.argv[3])
context = Context(run_id=1, node_id=1001, node_config={"partition-id": 0, "num-partitions": config["num-nodes"]},
                  state=RecordDict(), run_config=config)
reply = client_app.app(message_from_proto(ProtoMessage.FromString(Path(sys.argv[1]).read_bytes())), context)
assert not reply.has_error(), reply.error.reason
message_to_proto(reply).SerializeToString()
print(json.dumps({"loaded": [m for m in watch if m in sys.modules],
                  "num-examples": reply.content["metrics"]["num-examples"]}))
"""


def _train_message(config: dict) -> bytes:
    """The wire bytes of the strategy's round-1 train message to the first node."""
    from flwr.app import ArrayRecord, ConfigRecord
    from flwr.common.serde import message_to_proto

    import fl_subnet.app.client_app
    from fl_subnet.experiments.config import RunConfig
    from fl_subnet.experiments.experiment import example_input, factory_for
    from fl_subnet.experiments.inprocess_grid import InProcessGrid
    from fl_subnet.strategies import build_strategy

    cfg = RunConfig.from_mapping(config)
    factory = factory_for(cfg)
    torch.manual_seed(cfg.seed)
    grid = InProcessGrid(fl_subnet.app.client_app.app, cfg.num_nodes, run_config=dict(config))
    strategy = build_strategy(cfg, factory, example_input=example_input(cfg))
    messages = strategy.configure_train(1, ArrayRecord(factory().state_dict()), ConfigRecord(cfg.train_config()), grid)
    message = {m.metadata.dst_node_id: m for m in messages}[grid.get_node_ids()[0]]
    message.metadata.__dict__["_message_id"] = f"{1:064x}"
    return message_to_proto(message).SerializeToString()


def _child(wire: Path, config: dict, watch: tuple[str, ...], folder: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", CACHE_ENV: str(folder)}
    done = subprocess.run([sys.executable, "-c", CHILD, str(wire), json.dumps(config), json.dumps(watch)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300, check=False, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("dataset", ["digits", "synthetic-regression"])
def test_train_message_with_a_warm_cache_imports_no_hugging_face(tmp_path, cache, dataset):
    config = {"dataset": dataset, "model": "mlp", "hidden": "32,16", "num-nodes": 4, "strategy": "ist",
              "num-subnets": 2, "partitioning": "dirichlet" if dataset == "digits" else "iid", "local-steps": 2,
              "num-samples": 200, "input-dim": 8, "fraction-evaluate": 0.0, "num-server-rounds": 1}
    wire = tmp_path / "train.bin"
    wire.write_bytes(_train_message(config))
    watch = (*LAZY, "sklearn", "scipy")  # digits: scikit-learn loads and splits it, and imports scipy
    assert _files(cache) == []
    cold = _child(wire, config, watch, cache)  # computes the partition (flwr-datasets) and writes it
    assert "flwr_datasets" in cold["loaded"] and len(_files(cache)) == 1
    warm = _child(wire, config, watch, cache)
    assert warm["num-examples"] == cold["num-examples"] > 0
    assert warm["loaded"] == [], f"a {dataset} train message with a warm cache imported {warm['loaded']}"
    assert len(_files(cache)) == 1


# ---------------------------------------------------------------- (c) damaged files, keys
def _damage(path: Path, how: str) -> None:
    raw = path.read_bytes()
    size = int.from_bytes(raw[:8], "little")
    if how == "truncated":
        path.write_bytes(raw[: len(raw) - 100])
    elif how == "flipped":  # one bit of the tensor data: the header still parses
        pos = 8 + size + (len(raw) - 8 - size) // 2
        path.write_bytes(raw[:pos] + bytes([raw[pos] ^ 1]) + raw[pos + 1:])
    elif how == "garbage":
        path.write_bytes(b"not a safetensors file")
    elif how == "empty":
        path.write_bytes(b"")
    elif how == "shape":  # a consistent safetensors file whose train targets lost a row
        from safetensors.torch import load, save

        header = json.loads(raw[8:8 + size])
        tensors = load(raw)
        tensors["train_y"] = tensors["train_y"][1:].clone()
        path.write_bytes(save(tensors, metadata=header["__metadata__"]))
    else:
        raise AssertionError(how)


@pytest.mark.parametrize("how", ["truncated", "flipped", "garbage", "empty", "shape"])
def test_a_damaged_cache_file_is_logged_and_recomputed(cache, caplog, how):
    want = _fresh("digits", 2, 5, "dirichlet", 0, {})
    _assert_same(load_partition("digits", 2, 5, "dirichlet", 0.5, 0), want)
    [path] = _files(cache)
    _damage(path, how)
    data._cached_partition_tensors.cache_clear()
    with caplog.at_level(logging.WARNING, logger="fl_subnet.experiments.data"):
        _assert_same(load_partition("digits", 2, 5, "dirichlet", 0.5, 0), want)
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and str(path) in warnings[0] and "recomputing" in warnings[0], warnings
    assert _files(cache) == [path]  # rewritten in place, whole again
    caplog.clear()
    data._cached_partition_tensors.cache_clear()
    with caplog.at_level(logging.WARNING, logger="fl_subnet.experiments.data"):
        _assert_same(load_partition("digits", 2, 5, "dirichlet", 0.5, 0), want)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_a_file_of_another_key_is_not_used(cache, caplog):
    load_partition("digits", 0, 5, "iid", seed=0)
    load_partition("digits", 1, 5, "iid", seed=0)
    first, second = (p for p in _files(cache))
    first.write_bytes(second.read_bytes())  # a valid file, under another key's name
    data._cached_partition_tensors.cache_clear()
    with caplog.at_level(logging.WARNING, logger="fl_subnet.experiments.data"):
        for pid in (0, 1):
            _assert_same(load_partition("digits", pid, 5, "iid", seed=0), _fresh("digits", pid, 5, "iid", 0, {}))
    assert sum("another key" in r.getMessage() for r in caplog.records) == 1


def test_the_key_holds_what_determines_the_tensors(cache):
    load_partition("digits", 0, 5, "dirichlet", 0.5, seed=0)
    assert len(_files(cache)) == 1
    load_partition("digits", 0, 5, "dirichlet", 0.5, seed=0)  # the same key: the same file
    data._cached_partition_tensors.cache_clear()
    load_partition("digits", 0, 5, "dirichlet", 0.5, seed=0, classes_per_partition=3)  # not read by dirichlet
    assert len(_files(cache)) == 1
    other_seed = load_partition("digits", 0, 5, "dirichlet", 0.5, seed=1)
    assert len(_files(cache)) == 2
    _assert_same(other_seed, _fresh("digits", 0, 5, "dirichlet", 1, {}, data_seed=0))
    for change in ({"alpha": 0.3}, {"data_seed": 1}, {"test_fraction": 0.1}, {"num_partitions": 6},
                   {"partition_id": 1}, {"scheme": "iid"}):
        args = {"partition_id": 0, "num_partitions": 5, "scheme": "dirichlet", "alpha": 0.5, "seed": 0, **change}
        load_partition("digits", **args)
    assert len(_files(cache)) == 8
    n = len(_files(cache))
    load_partition("synthetic-regression", 0, 5, n=100, d=4)
    load_partition("synthetic-regression", 0, 5, n=100, d=5)
    assert len(_files(cache)) == n + 2
    key = key_of("partition", "digits", (("seed", 0),), seed=0)
    assert json.loads(key)["format"] == partition_cache.CACHE_FORMAT
    assert {"numpy", "datasets", "flwr-datasets", "scikit-learn", "source"} <= set(json.loads(key)["code"])


def test_a_path_data_set_is_keyed_by_its_files(tmp_path, cache):
    folder = tmp_path / "saved"
    folder.mkdir()
    (folder / "a.arrow").write_bytes(b"1234")
    first = key_of("split", "mnist", (("path", str(folder)), ("seed", 0)), split="train")
    assert key_of("split", "mnist", (("path", str(folder)), ("seed", 0)), split="train") == first
    (folder / "a.arrow").write_bytes(b"12345")
    assert key_of("split", "mnist", (("path", str(folder)), ("seed", 0)), split="train") != first


def test_an_unwritable_cache_folder_falls_back_to_computing(tmp_path, monkeypatch, caplog):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.setenv(CACHE_ENV, str(blocker / "cache"))  # mkdir fails (not a directory)
    with caplog.at_level(logging.WARNING, logger="fl_subnet.experiments.data"):
        _assert_same(load_partition("digits", 1, 5, "pathological", seed=0),
                     _fresh("digits", 1, 5, "pathological", 0, {}))
        _assert_same(load_centralized_test("digits"), to_tensors(load_dataset_by_name("digits")["test"]))
    assert sum("cannot write" in r.getMessage() for r in caplog.records) == 2
    assert blocker.read_text() == "not a folder"


# ---------------------------------------------------------------- (d) the folder setting
def test_the_cache_folder_setting(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv(CACHE_ENV)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert partition_cache_dir() == tmp_path / "home" / ".cache" / "fl-subnet" / "partitions"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/ignored")  # the XDG specification: absolute paths only
    assert partition_cache_dir() == tmp_path / "home" / ".cache" / "fl-subnet" / "partitions"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert partition_cache_dir() == tmp_path / "xdg" / "fl-subnet" / "partitions"
    load_partition("digits", 0, 3, "iid")
    assert len(_files(tmp_path / "xdg" / "fl-subnet" / "partitions")) == 1
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "mine"))
    assert partition_cache_dir() == tmp_path / "mine"
    data._cached_partition_tensors.cache_clear()
    load_partition("digits", 0, 3, "iid")
    assert len(_files(tmp_path / "mine")) == 1
    for off in ("off", "OFF"):
        monkeypatch.setenv(CACHE_ENV, off)
        assert partition_cache_dir() is None
    data._cached_partition_tensors.cache_clear()
    _assert_same(load_partition("digits", 1, 3, "iid"), _fresh("digits", 1, 3, "iid", 0, {}))
    assert len(_files(tmp_path / "mine")) == 1 and len(_files(tmp_path / "xdg" / "fl-subnet" / "partitions")) == 1
    assert not (tmp_path / "home").exists()
