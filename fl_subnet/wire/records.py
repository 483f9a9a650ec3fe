"""Record keys, states ⇄ ArrayRecord (Flower's ``.npy`` bytes, one array per tensor), the
example input's shape, the FjORD widths, and :func:`read_train`.

A sub-model's slice travels packed, one array per dtype kind (:mod:`fl_subnet.wire.packed`);
a full model as Flower sends it, one array per tensor; a mask as ConfigRecord values
(:mod:`fl_subnet.wire.masks`).
"""

from __future__ import annotations

import functools
import io
import math
import warnings
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from flwr.app import Array, ArrayRecord
from flwr.common.constant import SType


MASK_KEY = "mask"  # the kept units of every masked group (mask_to_config)
SCALE_KEY = "scale"  # their output scales: one float, or one per masked group
UNIT_SCALES_KEY = "unit-scales"  # per-unit scales, float32, of the groups whose scale is 0
SCALE_BEFORE_NORM_KEY = "scale-before-norm"  # bool: Mask.scale_before_norm; absent = False
SKIP_KEY = "skip"  # comma-separated depth blocks the sub-model leaves out; absent = none
EXAMPLE_SHAPE = "example-shape"
#: Bounds on the example input a node accepts (it analyses on the ``meta`` device, but a
#: shape is still checked before use): dims and elements.
MAX_EXAMPLE_DIMS, MAX_EXAMPLE_NUMEL = 8, 2**31
EXAMPLE_DTYPE = "example-dtype"
METRICS_KEY = "metrics"
BATCHNORM_KEY = "batchnorm"  # BatchNorm policy (fl_subnet.core.batchnorm), absent = "averaged"
FJORD_WIDTHS = "fjord-widths"  # FjORD: comma-separated widths the node samples per batch; absent = off
FJORD_DISTILL = "fjord-distill"  # FjORD+KD: bool, self-distillation from p_max per batch; absent = off
#: HeteroFL's label split: the labels a node holds (list of ints), in its train config (the node
#: masks the other logits) and in its reply to the node query; absent = every label
LABELS_KEY = "labels"
#: FjORD's per-width BatchNorm statistics: the name of a second ArrayRecord in a train
#: message and its reply, one array per width and buffer, keyed ``"<width>/<buffer key>"``
#: (:func:`width_stats_to_record`); absent = statistics shared by all widths
FJORD_BN_RECORD = "fjord-bn"
#: A frozen base (docs/lora.md): the SHA-256 hex digest of the base every node must hold
#: (:func:`fl_subnet.core.frozen.base_fingerprint`), in every train and evaluate config of a
#: model with frozen parameters; its arrays then hold only the trainable tensors. Absent =
#: every tensor travels
BASE_FINGERPRINT = "base-fingerprint"


def example_to_config(example) -> dict[str, str]:
    """``{"example-shape": "1,1,8,8", "example-dtype": "float32"}`` of the first input
    tensor (empty for ``None``): a node analyses its model on a meta tensor of that shape."""
    if example is None:
        return {}
    t = example[0] if isinstance(example, tuple) else example
    return {EXAMPLE_SHAPE: ",".join(str(int(s)) for s in t.shape), EXAMPLE_DTYPE: str(t.dtype).removeprefix("torch.")}


def example_from_config(config: Mapping[str, object]) -> tuple[tuple[int, ...] | None, str | None]:
    """``(shape, dtype)`` sent by :func:`example_to_config`, or ``(None, None)``.

    Raises
    ------
    ValueError
        Naming the key, if the shape is not comma-separated ints or the dtype unknown.
    """
    raw = config.get(EXAMPLE_SHAPE)
    if raw is None:
        return None, None
    try:
        shape = tuple(int(s) for s in str(raw).split(","))
    except ValueError:
        raise ValueError(f"config key '{EXAMPLE_SHAPE}' must be comma-separated ints, got {raw!r}") from None
    if not 1 <= len(shape) <= MAX_EXAMPLE_DIMS or any(s < 1 for s in shape) or math.prod(shape) > MAX_EXAMPLE_NUMEL:
        raise ValueError(f"config key '{EXAMPLE_SHAPE}' must be 1 to {MAX_EXAMPLE_DIMS} sizes >= 1 with at most "
                         f"{MAX_EXAMPLE_NUMEL} elements in all, got {str(raw)[:80]!r}")
    dtype = str(config.get(EXAMPLE_DTYPE, "float32"))
    if not isinstance(getattr(torch, dtype, None), torch.dtype):
        raise ValueError(f"config key '{EXAMPLE_DTYPE}' names no torch dtype: {dtype!r}")
    return shape, dtype


def widths_to_config(widths: Sequence[float]) -> str:
    """FjORD's allowed widths as the ``fjord-widths`` value, e.g. ``"0.2,0.4"`` (``repr``
    of each float, so they round-trip exactly)."""
    return ",".join(repr(float(w)) for w in widths)


def widths_from_config(config: Mapping[str, object]) -> tuple[float, ...]:
    """FjORD's allowed widths (sorted, unique) from ``fjord-widths``; ``()`` when absent.

    Raises
    ------
    ValueError
        Naming ``fjord-widths``, unless it is a non-empty comma-separated string of
        numbers in (0, 1].
    """
    raw = config.get(FJORD_WIDTHS)
    if raw is None:
        return ()
    try:
        if not isinstance(raw, str):
            raise ValueError
        widths = [float(w) for w in raw.split(",")]
    except ValueError:
        raise ValueError(f"config key '{FJORD_WIDTHS}' must be comma-separated numbers in (0, 1], "
                         f"got {raw!r}") from None
    if not all(0 < w <= 1 for w in widths):
        raise ValueError(f"config key '{FJORD_WIDTHS}' must hold widths in (0, 1], got {raw!r}")
    return tuple(sorted(set(widths)))


def read_train(content) -> tuple[str, ArrayRecord, Mapping[str, object]]:
    """``(arrays key, ArrayRecord, config)`` of a train/evaluate message, whatever the
    records are called (FjORD's per-width statistics, ArrayRecord ``fjord-bn``, aside).

    Raises
    ------
    ValueError
        If the message does not hold exactly one ArrayRecord besides ``fjord-bn``, or
        more than one ConfigRecord.
    """
    arrays = [(k, a) for k, a in content.array_records.items() if k != FJORD_BN_RECORD]
    configs = list(content.config_records.values())
    if len(arrays) != 1:
        raise ValueError(f"expected one ArrayRecord in the message (besides '{FJORD_BN_RECORD}'), got {len(arrays)}")
    if len(configs) > 1:
        raise ValueError(f"expected at most one ConfigRecord in the message, got {len(configs)}")
    return arrays[0][0], arrays[0][1], (configs[0] if configs else {})


def state_to_arrays(state: Mapping[str, torch.Tensor]) -> ArrayRecord:
    """A ``state_dict`` (full or compact) as a Flower ArrayRecord.

    Byte-identical to ``ArrayRecord(state)`` (Flower's ``np.save`` of each tensor), with
    one copy of each tensor's bytes instead of three (:func:`tensor_to_array`).
    """
    return ArrayRecord({k: tensor_to_array(v) for k, v in state.items()})


def pop_to_arrays(state: dict[str, torch.Tensor]) -> ArrayRecord:
    """:func:`state_to_arrays`, emptying ``state`` as it goes.

    Each tensor leaves ``state`` as soon as its bytes are copied into its ``Array``, so
    where nothing else refers to the tensors, the state and the record together hold
    one model plus one tensor, not two models (the server's new global model: 414 MB
    instead of 828 MB for a 103.5M-parameter float32 model). ``state`` is empty after.
    """
    return ArrayRecord({k: tensor_to_array(state.pop(k)) for k in list(state)})


def tensor_to_array(t: torch.Tensor) -> Array:
    """A tensor as a Flower ``Array``: the ``.npy`` bytes ``np.save`` writes (the same
    header, cached per shape and dtype), built with a single copy of the data."""
    a = t.detach().cpu().contiguous().numpy()
    if a.dtype.hasobject or not a.flags.c_contiguous:  # not reached for tensors; Flower's path
        return Array(a)
    header, name = npy_header_bytes(a.shape, a.dtype.str)
    return Array(dtype=name, shape=a.shape, stype=SType.NUMPY,
                 data=b"".join((header, memoryview(a).cast("B"))) if a.size else header)


@functools.lru_cache(maxsize=4096)
def npy_header_bytes(shape: tuple[int, ...], dtype: str) -> tuple[bytes, str]:
    """The ``.npy`` header ``np.save`` writes for a C-ordered array (format 1.0 when it
    fits, else 2.0, as ``np.save`` chooses), and the dtype's name (``str(dtype)``)."""
    buf = io.BytesIO()
    like = np.lib.stride_tricks.as_strided(np.zeros(1, dtype=dtype), shape=shape, strides=(0,) * len(shape))
    header = np.lib.format.header_data_from_array_1_0(like)
    header["fortran_order"] = False
    try:
        np.lib.format.write_array_header_1_0(buf, header)
    except ValueError:  # header too long for format 1.0
        buf = io.BytesIO()
        np.lib.format.write_array_header_2_0(buf, header)
    return buf.getvalue(), str(np.dtype(dtype))


@functools.lru_cache(maxsize=4096)
def _npy_header(head: bytes) -> tuple[tuple[int, ...], np.dtype, int] | None:
    """(shape, dtype, data offset) of a C-ordered native ``.npy`` header, else None."""
    fp = io.BytesIO(head)
    try:
        version = np.lib.format.read_magic(fp)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(fp)
        elif version == (2, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(fp)
        else:
            return None
    except (ValueError, OSError, SyntaxError):
        return None
    if fortran or dtype.hasobject or not dtype.isnative:
        return None
    return tuple(shape), dtype, fp.tell()


def npy_view(array: Array, key: str = "?") -> np.ndarray | None:
    """A read-only view of a C-ordered, native-endian ``.npy`` payload, else None (another
    layout, decoded by ``Array.numpy``).

    Raises
    ------
    ValueError
        Naming ``key``, if the header declares more or fewer bytes than the payload
        carries (checked before anything is allocated from the declared shape: a header
        declaring 10 GB over 16 bytes is refused, not allocated).
    """
    data = array.data
    if len(data) < 12 or data[:6] != b"\x93NUMPY":
        return None
    hlen = int.from_bytes(data[8:10], "little") + 10 if data[6] == 1 else int.from_bytes(data[8:12], "little") + 12
    parsed = _npy_header(bytes(data[:hlen]))
    if parsed is None:
        return None
    shape, dtype, offset = parsed
    count = math.prod(shape)
    if offset + count * dtype.itemsize != len(data):
        raise ValueError(f"array '{key}': its header declares shape {shape} of {dtype} ({count * dtype.itemsize} "
                         f"bytes) but it carries {len(data) - offset} bytes")
    return np.frombuffer(data, dtype=dtype, count=count, offset=offset).reshape(shape)


def arrays_to_state(arrays: ArrayRecord, copy: bool = True) -> dict[str, torch.Tensor]:
    """An ArrayRecord as a ``state_dict`` of CPU tensors (0-dim arrays included).

    Parameters
    ----------
    arrays : ArrayRecord
        NumPy-serialized arrays, as Flower sends them.
    copy : bool
        ``False`` returns read-only tensors that share the message's bytes (no copy;
        for the server's aggregation, which only reads them). Never write to them.

    Raises
    ------
    ValueError
        If an array cannot be decoded, or its header declares another size than its
        payload (naming the key; nothing is allocated from the declared shape).
    """
    out = {}
    for key, a in arrays.items():
        view = npy_view(a, key)  # a declared size that is not the payload's is refused here
        if view is None:
            out[key] = torch.from_numpy(a.numpy())  # np.load returns a fresh array
            continue
        if copy:
            out[key] = torch.from_numpy(view.copy())
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # read-only buffer: we only read
            out[key] = torch.from_numpy(view)
    return out



def width_stats_to_record(stats: Mapping[float, Mapping[str, torch.Tensor]]) -> ArrayRecord:
    """FjORD's per-width statistics as the ``fjord-bn`` ArrayRecord: one array per width
    ``w`` and buffer ``key``, named ``f"{w!r}/{key}"`` (the width's ``repr``, so it
    round-trips exactly)."""
    return ArrayRecord({f"{float(w)!r}/{key}": tensor_to_array(t)
                        for w in sorted(stats) for key, t in stats[w].items()})


def width_stats_from_record(record: ArrayRecord) -> dict[float, dict[str, torch.Tensor]]:
    """The ``fjord-bn`` ArrayRecord as ``{width: {buffer key: tensor}}`` (copies).

    Raises
    ------
    ValueError
        Naming ``fjord-bn`` and the array, if a name is not ``"<width>/<key>"`` with a
        width in (0, 1], or an array cannot be decoded.
    """
    out: dict[float, dict[str, torch.Tensor]] = {}
    for name, array in record.items():
        head, sep, key = name.partition("/")
        try:
            width = float(head)
        except ValueError:
            width = math.nan
        if not sep or not key or not (0 < width <= 1):
            raise ValueError(f"'{FJORD_BN_RECORD}' array {name[:80]!r}: expected '<width in (0, 1]>/<buffer key>'")
        try:
            out.setdefault(width, {})[key] = arrays_to_state(ArrayRecord({key: array}))[key]
        except Exception as err:  # noqa: BLE001
            raise ValueError(f"'{FJORD_BN_RECORD}' array {name[:80]!r} cannot be decoded: {err}") from err
    return out
