"""Wire formats: masks ⇄ ConfigRecord values, states ⇄ ArrayRecord.

A mask travels as one packed bitmask per group (``size/8`` bytes: 1M units ≈ 125 kB)
plus its scale, all plain Python types as Flower's ConfigRecord requires (DESIGN.md §6).
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

from .core.groups import UnitGroup
from .core.masks import Mask

MASK_PREFIX = "mask."
SCALE_PREFIX = "scale."


def mask_to_config(mask: Mask, groups: Sequence[UnitGroup]) -> dict[str, bytes | float]:
    """Encode ``mask`` as ``{"mask.<group>": bitmask bytes, "scale.<group>": float}``."""
    out: dict[str, bytes | float] = {}
    for g in groups:
        bits = np.zeros(g.size, dtype=bool)
        bits[mask.kept(g).numpy()] = True
        out[MASK_PREFIX + g.name] = np.packbits(bits, bitorder="little").tobytes()
        out[SCALE_PREFIX + g.name] = float(mask.scale_of(g))
    return out


def mask_from_config(config: Mapping[str, object], groups: Sequence[UnitGroup]) -> Mask:
    """Decode what :func:`mask_to_config` wrote.

    Raises
    ------
    ValueError
        Naming the key, if a group's bitmask is missing, not bytes, or of the wrong
        length, or a scale is not a positive number.
    """
    idx, scale = {}, {}
    for g in groups:
        key = MASK_PREFIX + g.name
        raw = config.get(key)
        if not isinstance(raw, bytes):
            raise ValueError(f"config key '{key}' must hold the group's bitmask bytes")
        if len(raw) != (g.size + 7) // 8:
            raise ValueError(f"config key '{key}' has {len(raw)} bytes, expected {(g.size + 7) // 8}")
        bits = np.unpackbits(np.frombuffer(raw, dtype=np.uint8), bitorder="little")
        if bits[g.size:].any():
            raise ValueError(f"config key '{key}' sets bits beyond the group size {g.size}")
        idx[g.name] = torch.from_numpy(np.flatnonzero(bits[: g.size]).astype(np.int64))
        s = config.get(SCALE_PREFIX + g.name, 1.0)
        if isinstance(s, bool) or not isinstance(s, (int, float)) or not s > 0:
            raise ValueError(f"config key '{SCALE_PREFIX + g.name}' must be a number > 0, got {s!r}")
        scale[g.name] = float(s)
    return Mask(idx, scale)


def state_to_arrays(state: Mapping[str, torch.Tensor]) -> ArrayRecord:
    """A ``state_dict`` (full or compact) as a Flower ArrayRecord."""
    return ArrayRecord({k: v.detach().cpu().contiguous() for k, v in state.items()})


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


def _npy_view(array: Array) -> np.ndarray | None:
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
        view = None if copy else _npy_view(a)
        if view is None:
            out[key] = torch.from_numpy(a.numpy())  # np.load returns a fresh array
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # read-only buffer: we only read
            out[key] = torch.from_numpy(view)
    return out
