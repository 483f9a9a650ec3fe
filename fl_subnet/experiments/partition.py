"""Federated partitions of a local ``datasets.Dataset`` via flwr-datasets partitioners.

Every partitioner from ``flwr_datasets.partitioner`` also works without the Hugging
Face hub: assign a local dataset with ``partitioner.dataset = ds`` (allowed once per
partitioner) and call ``load_partition(i)``. That is all this module does, plus
argument checks whose ``ValueError`` names the configuration key (``partitioning``,
``num-partitions``, ``dirichlet-alpha``, ``classes-per-partition``).

``datasets`` and ``flwr_datasets`` (whose package import pulls in seaborn, matplotlib and
scipy) are imported when :func:`partition` runs, not with this module: a ClientApp whose
partition is already in the partition cache (:mod:`fl_subnet.experiments.data`) imports
neither.

Quirks of flwr-datasets 0.6.1 handled here:

* ``IidPartitioner`` does not shuffle: partition ``i`` is the ``i``-th contiguous
  shard. On label-sorted data that is anything but IID, so the dataset is shuffled with
  ``seed`` first.
* ``DirichletPartitioner`` re-draws up to 10 times while a partition is smaller than
  ``min_partition_size`` (emitting a ``UserWarning`` per retry) and then raises; the
  warnings are routed to :mod:`logging` and the final error names ``dirichlet-alpha``.
  It accepts Python ``int``/``float`` alpha only (a ``numpy.int64`` is refused), hence
  the cast to ``float``.
* ``PathologicalPartitioner``'s default ``class_assignment_mode="random"`` can leave
  classes unused; ``"first-deterministic"`` (the mode of Li et al. 2022,
  arXiv:2102.02079) uses every class whenever ``num_partitions >= num_classes``.
"""

from __future__ import annotations

import logging
import math
import warnings
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import datasets

logger = logging.getLogger(__name__)

SCHEMES = ("iid", "dirichlet", "pathological")


def check_num_partitions(num_partitions: int, num_rows: int | None = None) -> int:
    """Return ``num_partitions`` as int; ``ValueError`` naming ``num-partitions`` unless in [1, num_rows]."""
    if isinstance(num_partitions, bool) or not isinstance(num_partitions, int) or num_partitions < 1:
        raise ValueError(f"num-partitions must be an integer >= 1, got {num_partitions!r}")
    if num_rows is not None and num_partitions > num_rows:
        raise ValueError(f"num-partitions must be <= the number of samples ({num_rows}), got {num_partitions}")
    return num_partitions


def check_scheme(scheme: str) -> str:
    """Return ``scheme``; ``ValueError`` naming ``partitioning`` unless one of :data:`SCHEMES`."""
    if scheme not in SCHEMES:
        raise ValueError(f"partitioning must be one of {SCHEMES}, got {scheme!r}")
    return scheme


def check_alpha(alpha: float) -> float:
    """Return ``alpha`` as float; ``ValueError`` naming ``dirichlet-alpha`` unless finite and > 0."""
    try:
        a = float(alpha)
    except (TypeError, ValueError):
        raise ValueError(f"dirichlet-alpha must be a finite number > 0, got {alpha!r}") from None
    if not (math.isfinite(a) and a > 0.0):
        raise ValueError(f"dirichlet-alpha must be a finite number > 0, got {alpha!r}")
    return a


def _label_classes(dataset: datasets.Dataset, label_key: str, scheme: str) -> int:
    """Number of distinct labels; ``ValueError`` naming ``partitioning`` if there is no usable label column."""
    import datasets

    feature = dataset.features.get(label_key)
    is_int = isinstance(feature, datasets.Value) and (feature.dtype.startswith(("int", "uint")) or feature.dtype == "string")
    if not (isinstance(feature, datasets.ClassLabel) or is_int):
        raise ValueError(
            f"partitioning={scheme!r} needs an integer/class label column {label_key!r} "
            f"(columns: {dataset.column_names}); for unlabelled or regression data only "
            f"partitioning='iid' applies"
        )
    return len(dataset.unique(label_key))


def partition(
    dataset: datasets.Dataset,
    num_partitions: int,
    scheme: str,
    *,
    alpha: float = 0.5,
    classes_per_partition: int = 2,
    label_key: str = "label",
    seed: int = 0,
    min_partition_size: int = 2,
) -> list[datasets.Dataset]:
    """Split ``dataset`` into ``num_partitions`` disjoint client datasets.

    Parameters
    ----------
    dataset : datasets.Dataset
        Local dataset with N rows (any columns; ``label_key`` needed unless ``"iid"``).
    num_partitions : int
        Number of clients K, 1 <= K <= N.
    scheme : {"iid", "dirichlet", "pathological"}
        ``"iid"``: seeded shuffle, then K contiguous shards of size N//K or N//K + 1
        (``IidPartitioner``). ``"dirichlet"``: per class, shares over clients drawn from
        Dir(alpha) (``DirichletPartitioner``, Yurochkin et al. 2019, arXiv:1905.12022);
        smaller alpha means more label skew. ``"pathological"``: each client holds
        exactly ``classes_per_partition`` classes, each class split evenly among the
        clients holding it (``PathologicalPartitioner``, first-deterministic mode).
    alpha : float, default 0.5
        Dirichlet concentration (> 0); used by ``"dirichlet"`` only.
    classes_per_partition : int, default 2
        Classes per client, 1 <= k <= number of classes; ``"pathological"`` only.
    label_key : str, default "label"
        Integer label column driving the non-IID schemes.
    seed : int, default 0
        Seeds the shuffle / Dirichlet draws / class assignment; same seed, same split.
    min_partition_size : int, default 2
        ``"dirichlet"`` only: redraw (at most 10 times) while a client has fewer rows.

    Returns
    -------
    list of datasets.Dataset
        K partitions; together they hold every row of ``dataset`` exactly once (for
        ``"pathological"``, classes no client was assigned are dropped, with a log line).

    Raises
    ------
    ValueError
        Naming ``partitioning`` (unknown scheme, or a non-IID scheme without an integer
        label column, e.g. regression data), ``num-partitions`` (not in [1, N]),
        ``dirichlet-alpha`` (not finite > 0, or no draw met ``min_partition_size``) or
        ``classes-per-partition`` (not in [1, num_classes]).
    """
    from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner, PathologicalPartitioner

    check_scheme(scheme)
    check_num_partitions(num_partitions, len(dataset))
    seed = int(seed)
    if scheme == "iid":
        partitioner = IidPartitioner(num_partitions)
        partitioner.dataset = dataset.shuffle(seed=seed)
    elif scheme == "dirichlet":
        a = check_alpha(alpha)
        _label_classes(dataset, label_key, scheme)
        partitioner = DirichletPartitioner(
            num_partitions, partition_by=label_key, alpha=a, min_partition_size=int(min_partition_size), seed=seed
        )
        partitioner.dataset = dataset
    else:
        num_classes = _label_classes(dataset, label_key, scheme)
        k = classes_per_partition
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= num_classes:
            raise ValueError(f"classes-per-partition must be an integer in [1, {num_classes}], got {k!r}")
        partitioner = PathologicalPartitioner(
            num_partitions,
            partition_by=label_key,
            num_classes_per_partition=k,
            class_assignment_mode="first-deterministic",
            seed=seed,
        )
        partitioner.dataset = dataset
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            parts = [partitioner.load_partition(i) for i in range(num_partitions)]
        except ValueError as err:
            if scheme == "dirichlet":
                raise ValueError(
                    f"dirichlet-alpha={alpha!r}: no Dirichlet draw gave every one of {num_partitions} "
                    f"partitions >= {min_partition_size} samples; raise dirichlet-alpha or lower "
                    f"num-partitions ({err})"
                ) from err
            raise ValueError(
                f"num-partitions={num_partitions} / classes-per-partition={classes_per_partition}: {err}"
            ) from err
    for w in caught:
        logger.info("flwr-datasets (%s): %s", scheme, w.message)
    logger.debug("%s partitioning into %d: sizes %s", scheme, num_partitions, [len(p) for p in parts])
    return parts
