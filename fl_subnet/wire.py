"""The wire contract of both sides: record keys, masks ⇄ ConfigRecord values, states ⇄
ArrayRecord, the example input's shape.

The strategy may name its records as it likes (Flower's ``arrayrecord_key`` and
``configrecord_key``); a node reads the one ArrayRecord and the one ConfigRecord of a
train message whatever their names (:func:`read_train`) and replies under the same
ArrayRecord key. A mask travels as one ``mask`` entry of bits (``size/8`` bytes a group:
1M units ≈ 125 kB) plus its scales, all plain Python types as Flower's ConfigRecord
requires (:func:`mask_to_config`; docs/design.md, "Wire contract").
A sub-model's slice travels packed, one array per dtype kind (:mod:`fl_subnet.packed`);
a full model as Flower sends it, one array per tensor.
"""

from __future__ import annotations

import functools
import io
import math
import warnings
import zlib
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from flwr.app import Array, ArrayRecord
from flwr.common.constant import SType

from .core.groups import UnitGroup
from .core.masks import Mask

MASK_KEY = "mask"  # the kept units of every masked group (mask_to_config)
SCALE_KEY = "scale"  # their output scales: one float, or one per masked group
UNIT_SCALES_KEY = "unit-scales"  # per-unit scales, float32, of the groups whose scale is 0
SKIP_KEY = "skip"  # comma-separated depth blocks the sub-model leaves out; absent = none
EXAMPLE_SHAPE = "example-shape"
EXAMPLE_DTYPE = "example-dtype"
METRICS_KEY = "metrics"
BATCHNORM_KEY = "batchnorm"  # BatchNorm policy (fl_subnet.core.batchnorm), absent = "averaged"
FJORD_WIDTHS = "fjord-widths"  # FjORD: comma-separated widths the node samples per batch; absent = off


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
    records are called.

    Raises
    ------
    ValueError
        If the message does not hold exactly one ArrayRecord, or more than one ConfigRecord.
    """
    arrays = list(content.array_records.items())
    configs = list(content.config_records.values())
    if len(arrays) != 1:
        raise ValueError(f"expected one ArrayRecord in the message, got {len(arrays)}")
    if len(configs) > 1:
        raise ValueError(f"expected at most one ConfigRecord in the message, got {len(configs)}")
    return arrays[0][0], arrays[0][1], (configs[0] if configs else {})


def groups_fingerprint(groups: Sequence[UnitGroup]) -> bytes:
    """4 bytes (CRC-32, little-endian) of the groups' names and sizes in order: both
    sides must index the same group list for a mask's bits to mean the same units."""
    return _fingerprint(tuple((g.name, int(g.size)) for g in groups))


@functools.lru_cache(maxsize=64)
def _fingerprint(names_sizes: tuple[tuple[str, int], ...]) -> bytes:
    text = "\n".join(f"{n}:{s}" for n, s in names_sizes).encode()
    return zlib.crc32(text).to_bytes(4, "little")


def mask_to_config(mask: Mask, groups: Sequence[UnitGroup],
                   masked: Sequence[UnitGroup] = ()) -> dict[str, bytes | float | list[float]]:
    """Encode ``mask`` as at most four ConfigRecord entries (docs/design.md, "Wire contract").

    ``mask`` (bytes)
        The 4-byte :func:`groups_fingerprint` of ``groups``; a bit per group of
        ``groups`` (``ceil(G/8)`` bytes, little bit order) marking the groups written;
        then, per written group in order, its kept units as ``ceil(size/8)`` bytes of
        bits (little bit order). A group not written is kept whole.
    ``scale`` (float or list[float], absent = 1)
        One float when every written group has the same scalar scale, else one value
        per written group, ``0.0`` marking a group with per-unit scales.
    ``unit-scales`` (bytes, only with a ``0.0`` in ``scale``)
        The per-unit scales of the marked groups, in order: ``k_g`` little-endian
        float32 each (one per kept unit, in index order).
    ``skip`` (str, only if any)
        The skipped depth blocks, comma-separated.

    Parameters
    ----------
    mask : Mask
    groups : Sequence[UnitGroup]
        Every group a mask may name, in the model's order (:attr:`SubnetSpec.all_groups`);
        the node decodes with its own analysis' list.
    masked : Sequence[UnitGroup]
        Groups written even when the mask keeps them whole (the strategy's masked
        groups; FjORD gates exactly the written groups). Groups the mask names are
        always written.

    Raises
    ------
    ValueError
        Naming the group, if the mask names a group not in ``groups``, or a per-unit
        scale has the wrong length or a value that is not finite and > 0.
    """
    names = {g.name for g in masked} | set(mask.indices) | set(mask.scale)
    unknown = names - {g.name for g in groups}
    if unknown:
        raise ValueError(f"mask names unit group(s) {sorted(unknown)} the model does not have")
    present = np.array([g.name in names for g in groups], dtype=bool)
    parts = [groups_fingerprint(groups), np.packbits(present, bitorder="little").tobytes()]
    scales: list[float | bytes] = []
    for g, on in zip(groups, present):
        if not on:
            continue
        kept = mask.kept(g)
        bits = np.zeros(g.size, dtype=bool)
        bits[kept.numpy()] = True
        parts.append(np.packbits(bits, bitorder="little").tobytes())
        scales.append(_scale_value(g.name, mask.scale.get(g.name, 1.0), int(kept.numel())))
    out: dict[str, bytes | float | list[float]] = {MASK_KEY: b"".join(parts)}
    units = [s for s in scales if isinstance(s, bytes)]
    if units:
        out[SCALE_KEY] = [0.0 if isinstance(s, bytes) else s for s in scales]
        out[UNIT_SCALES_KEY] = b"".join(units)
    elif scales and len(set(scales)) == 1:
        if scales[0] != 1.0:
            out[SCALE_KEY] = scales[0]
    elif scales:
        out[SCALE_KEY] = scales
    if mask.skip:
        out[SKIP_KEY] = ",".join(sorted(mask.skip))
    return out


def has_mask(config: Mapping[str, object]) -> bool:
    """Whether a train config carries a mask (``mask`` or ``skip``); without one the
    node trains the full model."""
    return MASK_KEY in config or SKIP_KEY in config


def mask_from_config(config: Mapping[str, object], groups: Sequence[UnitGroup]) -> Mask:
    """Decode what :func:`mask_to_config` wrote; without a ``mask`` entry every group is
    kept whole.

    Returns
    -------
    Mask
        ``indices`` and ``scale`` (a float, or a ``(k_g,)`` float32 tensor) for the
        written groups, and the skipped blocks.

    Raises
    ------
    ValueError
        Naming the key: ``mask`` not bytes, of another model's groups (fingerprint),
        of the wrong length or with bits set beyond a size; ``scale`` not a finite
        number > 0 nor a list of one per written group; ``unit-scales`` of the wrong
        length or with a value not finite and > 0; ``skip`` not a string.
    """
    skip = config.get(SKIP_KEY, "")
    if not isinstance(skip, str):
        raise ValueError(f"config key '{SKIP_KEY}' must be a comma-separated string of depth blocks, got {skip!r}")
    skipped = frozenset(s for s in skip.split(",") if s)
    raw = config.get(MASK_KEY)
    if raw is None:
        return Mask({}, {}, skipped)
    if not isinstance(raw, bytes):
        raise ValueError(f"config key '{MASK_KEY}' must hold the mask's bytes, got {type(raw).__name__}")
    head = 4 + (len(groups) + 7) // 8
    if len(raw) < head:
        raise ValueError(f"config key '{MASK_KEY}' has {len(raw)} bytes, fewer than its {head}-byte header")
    if raw[:4] != groups_fingerprint(groups):
        raise ValueError(f"config key '{MASK_KEY}' was written for other unit groups (fingerprint "
                         f"{raw[:4].hex()}, this model's {groups_fingerprint(groups).hex()}): the server and the "
                         "node must analyse the same architecture")
    present = np.unpackbits(np.frombuffer(raw, dtype=np.uint8, count=head - 4, offset=4), bitorder="little")
    if present[len(groups):].any():
        raise ValueError(f"config key '{MASK_KEY}' marks groups beyond the model's {len(groups)}")
    written = [g for g, on in zip(groups, present) if on]
    want = head + sum((g.size + 7) // 8 for g in written)
    if len(raw) != want:
        raise ValueError(f"config key '{MASK_KEY}' has {len(raw)} bytes, expected {want} for its "
                         f"{len(written)} groups")
    idx, offset = {}, head
    for g in written:
        n = (g.size + 7) // 8
        bits = np.unpackbits(np.frombuffer(raw, dtype=np.uint8, count=n, offset=offset), bitorder="little")
        offset += n
        if bits[g.size:].any():
            raise ValueError(f"config key '{MASK_KEY}' sets bits beyond the size {g.size} of group '{g.name}'")
        idx[g.name] = torch.from_numpy(np.flatnonzero(bits[: g.size]).astype(np.int64))
    return Mask(idx, _scales_from_config(config, written, idx), skipped)


def _scales_from_config(config: Mapping[str, object], written: Sequence[UnitGroup],
                        idx: Mapping[str, torch.Tensor]) -> dict[str, float | torch.Tensor]:
    """The written groups' scales from ``scale`` and ``unit-scales`` (see :func:`mask_to_config`)."""
    s = config.get(SCALE_KEY, 1.0)
    values = list(s) if isinstance(s, (list, tuple)) else None
    if values is None:
        if not _positive(s):
            raise ValueError(f"config key '{SCALE_KEY}' must be a finite number > 0 or a list of one per masked "
                             f"group, got {s!r}")
        values = [float(s)] * len(written)
    elif len(values) != len(written) or not all(v == 0 or _positive(v) for v in values):
        raise ValueError(f"config key '{SCALE_KEY}' must list {len(written)} finite numbers > 0 (0 marks per-unit "
                         f"scales), got {s!r}")
    units = config.get(UNIT_SCALES_KEY)
    need = sum(int(idx[g.name].numel()) for g, v in zip(written, values) if v == 0)
    have = len(units) if isinstance(units, bytes) else None
    if (units is not None or need) and have != 4 * need:
        raise ValueError(f"config key '{UNIT_SCALES_KEY}' has {have} bytes, expected {4 * need} (one float32 per "
                         f"kept unit of the groups whose '{SCALE_KEY}' is 0)")
    flat = torch.from_numpy(np.frombuffer(units, dtype="<f4").astype(np.float32)) if need else None
    scale, offset = {}, 0
    for g, v in zip(written, values):
        if v != 0:
            scale[g.name] = float(v)
            continue
        k = int(idx[g.name].numel())
        scale[g.name] = _check_unit_scales(f"config key '{UNIT_SCALES_KEY}' (group '{g.name}')", flat[offset:offset + k])
        offset += k
    return scale


def _positive(v) -> bool:
    return not isinstance(v, bool) and isinstance(v, (int, float)) and v > 0 and math.isfinite(v)


def _check_unit_scales(what: str, v: torch.Tensor) -> torch.Tensor:
    """``v`` if every per-unit scale is finite and > 0 (a unit that contributes nothing is
    left out of the mask instead), else ``ValueError`` naming ``what``."""
    bad = ~(torch.isfinite(v) & (v > 0))
    if bool(bad.any()):
        i = int(torch.nonzero(bad)[0])
        raise ValueError(f"{what}: per-unit scales must be finite and > 0, got {float(v[i])!r} at kept unit {i}")
    return v


def _scale_value(group: str, s, k: int) -> float | bytes:
    """A group's mask scale for the wire: a float, or float32 bytes for a 1-D tensor."""
    what = f"the mask scale of group '{group}'"
    if isinstance(s, torch.Tensor) and s.dim() > 0:
        if s.dim() != 1 or s.numel() != k:
            raise ValueError(f"{what}: a per-unit scale must have shape ({k},) (one per kept "
                             f"unit), got {tuple(s.shape)}")
        v = _check_unit_scales(what, s.detach().cpu().to(torch.float32))
        return v.numpy().astype("<f4").tobytes()
    value = float(s)
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(f"{what} must be a finite number > 0, got {value!r}")
    return value


def state_to_arrays(state: Mapping[str, torch.Tensor]) -> ArrayRecord:
    """A ``state_dict`` (full or compact) as a Flower ArrayRecord.

    Byte-identical to ``ArrayRecord(state)`` (Flower's ``np.save`` of each tensor), with
    one copy of each tensor's bytes instead of three (:func:`tensor_to_array`).
    """
    return ArrayRecord({k: tensor_to_array(v) for k, v in state.items()})


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


def npy_view(array: Array) -> np.ndarray | None:
    """A read-only view of a C-ordered, native-endian ``.npy`` payload, else None."""
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
        return None
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
        If an array cannot be decoded.
    """
    out = {}
    for key, a in arrays.items():
        view = None if copy else npy_view(a)
        if view is None:
            out[key] = torch.from_numpy(a.numpy())  # np.load returns a fresh array
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # read-only buffer: we only read
            out[key] = torch.from_numpy(view)
    return out

