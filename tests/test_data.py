"""Datasets and federated partitions (fl_subnet.experiments.data, fl_subnet.experiments.partition); offline, fast."""

from collections import Counter

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from fl_subnet.experiments.data import (
    load_centralized_test,
    load_dataset_by_name,
    load_partition,
    make_loader,
    to_tensors,
)
from fl_subnet.experiments.partition import partition

datasets.disable_progress_bars()


@pytest.fixture(scope="module")
def digits():
    return load_dataset_by_name("digits")


@pytest.fixture(scope="module")
def digits_train(digits):
    """Digits train split with a ``uid`` column (row index) to check disjointness/coverage."""
    train = digits["train"]
    return train.add_column("uid", list(range(len(train))))


def uids(parts):
    return [u for p in parts for u in p["uid"]]


def mean_max_class_share(parts, key="label"):
    """Mean over partitions of the largest class fraction: 1/num_classes (balanced) .. 1."""
    return float(np.mean([max(Counter(p[key]).values()) / len(p) for p in parts]))


def test_digits_sizes_range_and_content(digits):
    from sklearn.datasets import load_digits

    tr, te = digits["train"], digits["test"]
    assert len(tr) + len(te) == 1797 and (len(tr), len(te)) == (1437, 360)
    x_tr, y_tr = to_tensors(tr)
    x_te, y_te = to_tensors(te)
    assert x_tr.shape == (1437, 64) and x_te.shape == (360, 64)
    assert x_tr.dtype == torch.float32 and y_tr.dtype == torch.int64 and y_tr.shape == (1437,)
    x = torch.cat([x_tr, x_te])
    assert x.min() == 0.0 and x.max() == 1.0
    # the rows are exactly sklearn's images / 16 (same multiset), labels kept with them
    ref = load_digits()
    ref_rows = Counter((r / 16).astype(np.float32).tobytes() + bytes([t]) for r, t in zip(ref.data, ref.target))
    got = torch.cat([y_tr, y_te]).numpy()
    assert Counter(r.tobytes() + bytes([int(t)]) for r, t in zip(x.numpy(), got)) == ref_rows
    # stratified: per-class counts in test are within 1 of 20 %
    ref_counts, te_counts = Counter(ref.target.tolist()), Counter(y_te.tolist())
    assert all(abs(te_counts[c] - 0.2 * ref_counts[c]) <= 1 for c in range(10))
    # fixed seed: a second load is identical
    again = load_dataset_by_name("digits")
    assert torch.equal(to_tensors(again["test"])[0], x_te)


def test_iid_partitions_disjoint_cover_and_balanced(digits_train):
    parts = partition(digits_train, 10, "iid", seed=0)
    ids = uids(parts)
    assert len(ids) == len(set(ids)) == len(digits_train)
    assert set(ids) == set(range(len(digits_train)))
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1
    # shuffled before sharding: not contiguous blocks of the train split
    assert sorted(parts[0]["uid"]) != list(range(sizes[0]))
    # same seed, same split; another seed, another split
    assert uids(partition(digits_train, 10, "iid", seed=0)) == ids
    assert uids(partition(digits_train, 10, "iid", seed=1)) != ids


def test_dirichlet_small_alpha_more_skewed_than_iid(digits_train):
    iid = partition(digits_train, 10, "iid", seed=0)
    dirichlet = partition(digits_train, 10, "dirichlet", alpha=0.1, seed=0)
    ids = uids(dirichlet)
    assert len(ids) == len(set(ids)) == len(digits_train)
    skew_iid, skew_dir = mean_max_class_share(iid), mean_max_class_share(dirichlet)
    assert skew_iid < 0.2  # ~ 0.1 (balanced 10 classes) plus sampling noise
    assert skew_dir > skew_iid + 0.2
    assert min(len(p) for p in dirichlet) >= 2  # min_partition_size
    # larger alpha: less skew than small alpha
    assert mean_max_class_share(partition(digits_train, 10, "dirichlet", alpha=100.0, seed=0)) < skew_dir
    assert uids(partition(digits_train, 10, "dirichlet", alpha=0.1, seed=0)) == ids


def test_pathological_two_classes_per_partition(digits_train):
    parts = partition(digits_train, 10, "pathological", classes_per_partition=2, seed=0)
    assert all(len(set(p["label"])) <= 2 for p in parts)
    ids = uids(parts)
    assert len(ids) == len(set(ids))
    # first-deterministic assignment: 10 partitions >= 10 classes, every class is used
    assert len(ids) == len(digits_train)
    one = partition(digits_train, 5, "pathological", classes_per_partition=1, seed=0)
    assert all(len(set(p["label"])) == 1 for p in one)


def test_synthetic_regression_unit_norm_and_reproducible():
    dd = load_dataset_by_name("synthetic-regression", n=200, d=7, n_test=50, seed=3)
    x, y = to_tensors(dd["train"])
    assert x.shape == (200, 7) and y.shape == (200, 1) and y.dtype == torch.float32
    assert torch.allclose(x.norm(dim=1), torch.ones(200), atol=1e-5)
    assert (x.norm(dim=1) - 1).abs().max() <= 1e-5
    assert y.std() > 0.05 and y.abs().max() < 10  # non-trivial, bounded teacher output
    assert to_tensors(dd["test"])[0].shape == (50, 7)
    same = load_dataset_by_name("synthetic-regression", n=200, d=7, n_test=50, seed=3)
    assert torch.equal(to_tensors(same["train"])[0], x) and torch.equal(to_tensors(same["train"])[1], y)
    other = load_dataset_by_name("synthetic-regression", n=200, d=7, n_test=50, seed=4)
    assert not torch.equal(to_tensors(other["train"])[0], x)
    # no labels: only IID applies
    assert sum(len(p) for p in partition(dd["train"], 4, "iid")) == 200
    for scheme in ("dirichlet", "pathological"):
        with pytest.raises(ValueError, match="partitioning"):
            partition(dd["train"], 4, scheme)
    with pytest.raises(ValueError, match="partitioning"):
        partition(dd["train"], 4, "dirichlet", label_key="y")  # float target is no label


def _stand_in(mode, size, image_key, n_train=30, n_test=10, seed=0):
    """A tiny DatasetDict shaped like the hub's (PIL images + ClassLabel), random pixels."""
    rng = np.random.default_rng(seed)
    shape = (size, size) if mode == "L" else (size, size, 3)

    def split(n):
        arrs = [rng.integers(0, 256, shape, dtype=np.uint8) for _ in range(n)]
        arrs[0][:] = 255  # pin the range: one white and one black image
        arrs[1][:] = 0
        feats = datasets.Features({image_key: datasets.Image(), "label": datasets.ClassLabel(num_classes=10)})
        imgs = [Image.fromarray(a, mode=mode) for a in arrs]
        return datasets.Dataset.from_dict({image_key: imgs, "label": [i % 10 for i in range(n)]}, features=feats), arrs

    (tr, arrs), (te, _) = split(n_train), split(n_test)
    return datasets.DatasetDict(train=tr, test=te), arrs


def test_mnist_like_conversion():
    source, arrs = _stand_in("L", 28, "image")
    dd = load_dataset_by_name("mnist", source=source)
    assert set(dd) == {"train", "test"} and dd["train"].column_names == ["label", "x"]
    x, y = to_tensors(dd["train"])
    assert x.shape == (30, 784) and x.dtype == torch.float32 and y.tolist() == [i % 10 for i in range(30)]
    assert x.min() == 0.0 and x.max() == 1.0
    assert torch.allclose(x[5], torch.from_numpy(arrs[5].reshape(-1) / 255.0).float())
    assert to_tensors(dd["test"])[0].shape == (10, 784)
    parts = partition(dd["train"], 3, "pathological", classes_per_partition=2, seed=0)
    assert all(len(set(p["label"])) <= 2 for p in parts)


def test_cifar_like_conversion_channel_first_and_from_disk(tmp_path):
    source, arrs = _stand_in("RGB", 32, "img")
    source.save_to_disk(str(tmp_path / "cifar"))
    dd = load_dataset_by_name("cifar10", path=str(tmp_path / "cifar"))
    x, y = to_tensors(dd["train"])
    assert x.shape == (30, 3072) and y.dtype == torch.int64
    assert 0.0 == x.min() and x.max() == 1.0
    chw = torch.from_numpy(arrs[7].transpose(2, 0, 1) / 255.0).float()
    assert torch.allclose(x[7].view(3, 32, 32), chw)
    # the conv models of the run config read it as (N, 3, 32, 32) images
    from fl_subnet.experiments.config import RunConfig
    from fl_subnet.experiments.experiment import as_model_input, factory_for

    for model in ("cnn", "cnn-bn", "resnet"):
        cfg = RunConfig(dataset="cifar10", model=model)
        images = as_model_input(cfg, x)
        assert images.shape == (30, 3, 32, 32) and torch.equal(images[7], chw)
        assert factory_for(cfg)()(images[:2]).shape == (2, 10)
    # a grey stand-in under the fashion-mnist name: converted to 'L', 784 features
    fm = load_dataset_by_name("fashion-mnist", source=_stand_in("L", 28, "image")[0])
    assert to_tensors(fm["test"])[0].shape == (10, 784)


def test_bad_arguments_name_the_key(digits_train):
    with pytest.raises(ValueError, match="partitioning"):
        partition(digits_train, 4, "shards")
    for alpha in (0, -1.0, float("nan"), float("inf"), "abc"):
        with pytest.raises(ValueError, match="dirichlet-alpha"):
            partition(digits_train, 4, "dirichlet", alpha=alpha)
    for k in (0, 11, 1.5):
        with pytest.raises(ValueError, match="classes-per-partition"):
            partition(digits_train, 4, "pathological", classes_per_partition=k)
    for n in (0, -2, 2.0, len(digits_train) + 1):
        with pytest.raises(ValueError, match="num-partitions"):
            partition(digits_train, n, "iid")
    with pytest.raises(ValueError, match="dirichlet-alpha"):  # no draw meets min size
        partition(digits_train, 200, "dirichlet", alpha=1e-3, min_partition_size=5)
    with pytest.raises(ValueError, match="dataset"):
        load_dataset_by_name("imagenet")
    with pytest.raises(ValueError, match="partition-id"):
        load_partition("digits", 5, 5)
    with pytest.raises(ValueError, match="batch-size"):
        make_loader(torch.zeros(3, 2), torch.zeros(3), 0, True, 0)
    with pytest.raises(ValueError, match="num-partitions"):
        load_partition("digits", 0, 0)


def test_load_partition_local_split_and_central_test():
    k = 5
    train_rows, test_rows = Counter(), Counter()
    for pid in range(k):
        tx, ty, vx, vy = load_partition("digits", pid, k, "dirichlet", 0.5, 0)
        n = len(tx) + len(vx)
        assert len(vx) == round(0.2 * n) and tx.shape[1] == vx.shape[1] == 64
        assert tx.dtype == torch.float32 and ty.dtype == vy.dtype == torch.int64
        train_rows.update(r.tobytes() for r in tx.numpy())
        test_rows.update(r.tobytes() for r in vx.numpy())
    full_train, _ = to_tensors(load_dataset_by_name("digits")["train"])
    assert train_rows + test_rows == Counter(r.tobytes() for r in full_train.numpy())
    cx, cy = load_centralized_test("digits")
    assert cx.shape == (360, 64) and cy.shape == (360,)
    # cached, but fresh tensors: mutating one result does not change the next
    a = load_partition("digits", 0, k, "dirichlet", 0.5, 0)[0]
    a.zero_()
    assert load_partition("digits", 0, k, "dirichlet", 0.5, 0)[0].abs().sum() > 0


def test_to_tensors_empty_and_seeded_loader(digits):
    x, y = to_tensors(digits["test"].select([]))
    assert x.shape == (0, 64) and y.shape == (0,)
    x, y = to_tensors(digits["test"])
    order = lambda seed: torch.cat([yb for _, yb in make_loader(x, y, 64, True, seed)])  # noqa: E731
    assert torch.equal(order(1), order(1)) and not torch.equal(order(1), order(2))
    batches = list(make_loader(x, y, 64, False))
    assert [len(b[0]) for b in batches] == [64] * 5 + [40] and torch.equal(batches[0][1], y[:64])


def test_regression_bad_sizes_name_the_key():
    with pytest.raises(ValueError, match="num-samples"):
        load_dataset_by_name("synthetic-regression", n=0)
    with pytest.raises(ValueError, match="input-dim"):
        load_dataset_by_name("synthetic-regression", d=2.5)
