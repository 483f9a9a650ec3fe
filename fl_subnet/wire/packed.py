"""The packed compact slice: one raw array per dtype kind instead of one per tensor.

Flower's ``ArrayRecord`` sends every tensor as its own ``Array``: a 128-byte ``.npy``
header, the key, dtype and shape fields and their protobuf framing, about 200 bytes a
tensor, and a Python object per tensor on both sides. For a sub-model slice both sides
already know every tensor's key and compact shape (the node from its analysis and the
mask, the server from the global model and the mask), so a train message of a sub-model
sends the slice as one flat array per kind of dtype (``packed-float``, ``packed-int``,
``packed-bool``, ``packed-complex``): the tensors in sorted-key order, each flattened
row-major, as the values' little-endian bytes with no ``.npy`` header (the ``Array``'s
own ``dtype`` and ``shape`` fields describe them; ``stype`` is :data:`RAW_STYPE`). 57
tensors of a small ResNet then cost two ``Array`` entries instead of 57, and no header.

The layout (key, compact shape, kind, in packing order) is computed by both sides with
:func:`slice_layout`; :func:`pack_state` and :func:`unpack_state` check every size
against it and raise a ``ValueError`` naming the key otherwise. A reply may be packed
(fl-subnet's ClientApp packs when it was sent a packed slice) or one array per tensor,
as ``ArrayRecord(model.state_dict())`` writes it: the server reads both
(:func:`decode_slice`). A full-model message keeps Flower's own format
(one array per tensor, the record shared by every node, as Flower's FedAvg sends it).
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from flwr.app import Array, ArrayRecord

from .records import arrays_to_state

#: ArrayRecord key prefix of a packed slice: ``packed-float``, ``packed-int``, ...
PACKED_PREFIX = "packed-"
#: ``Array.stype`` of a packed array: the values' little-endian bytes, nothing else
#: (Flower's own ``numpy.ndarray`` stype prepends a 128-byte ``.npy`` header).
RAW_STYPE = "raw"

#: ``(key, compact shape, kind)`` per tensor, in packing order.
Layout = Sequence[tuple[str, tuple[int, ...], str]]


def kind_of(dtype: torch.dtype) -> str:
    """``"float"``, ``"int"`` (signed or unsigned), ``"bool"`` or ``"complex"``."""
    if dtype == torch.bool:
        return "bool"
    if dtype.is_complex:
        return "complex"
    return "float" if dtype.is_floating_point else "int"


def _np_kind(dtype: np.dtype) -> str | None:
    return {"f": "float", "i": "int", "u": "int", "b": "bool", "c": "complex"}.get(dtype.kind)


def slice_layout(slicer, mask, full: Mapping[str, tuple[Sequence[int], torch.dtype]],
                 flat=None) -> list[tuple[str, tuple[int, ...], str]]:
    """The packing order of ``mask``'s compact slice.

    Parameters
    ----------
    slicer : fl_subnet.core.slicing.Slicer
    mask : fl_subnet.core.masks.Mask
    full : Mapping[str, tuple[Sequence[int], torch.dtype]]
        Every key of the full ``state_dict`` → its full shape and dtype.
    flat : fl_subnet.core.flat.FlatMap, optional
        The model's flat map: the float tensors' compact shapes come from its pass over
        the mask (:meth:`~fl_subnet.core.flat.FlatMap.compact_shapes`).

    Returns
    -------
    list[tuple[str, tuple[int, ...], str]]
        ``(key, compact shape, kind)`` in sorted-key order, without the keys of
        skipped depth blocks.
    """
    skipped = slicer.skipped_keys(mask)
    keys = sorted(k for k in full if k not in skipped)
    # every key's, in the model's order: the mask's cached shapes for the full model
    full_shapes = {k: tuple(shape) for k, (shape, _) in full.items()}
    shapes = flat.compact_shapes(mask, full_shapes) if flat is not None else slicer.compact_shapes(mask, full_shapes)
    return [(k, shapes[k], kind_of(full[k][1])) for k in keys]


def gather_packed(slicer, state: Mapping[str, torch.Tensor], mask, layout: Layout, flat=None,
                  whole: torch.Tensor | None = None) -> ArrayRecord:
    """The packed compact slice of ``state`` under ``mask``: ``pack_state(slicer.gather(
    state, mask), layout)``, the float tensors gathered with one ``index_select`` at the
    mask's flat positions when a flat map is given.

    Parameters
    ----------
    slicer : fl_subnet.core.slicing.Slicer
    state : Mapping[str, torch.Tensor]
        The full ``state_dict``.
    mask : fl_subnet.core.masks.Mask
    layout : Layout
        :func:`slice_layout` of ``mask``.
    flat : fl_subnet.core.flat.FlatMap, optional
        Over ``state``'s float tensors (all of one dtype).
    whole : torch.Tensor, optional
        ``(flat.numel,)``: those tensors laid end to end (made here if not given).

    Raises
    ------
    ValueError
        If the mask is invalid, or the state does not match the layout.
    """
    if flat is None:
        return pack_state(slicer.gather(state, mask), layout)
    if whole is None:
        whole = flat.concat(state).detach()
    parts: dict[str, list[torch.Tensor]] = {"float": [whole.index_select(0, flat.kept(mask))]}
    for key, _, kind in layout:
        if kind != "float":
            t = slicer.gather_key(state[key], slicer.kept(mask, key, tuple(state[key].shape)))
            parts.setdefault(kind, []).append(t.reshape(-1))
    return pack_flat(parts, layout)


def is_packed(arrays: ArrayRecord) -> bool:
    """Whether ``arrays`` holds a packed slice (any ``packed-*`` key)."""
    return any(str(k).startswith(PACKED_PREFIX) for k in arrays)


def pack_state(state: Mapping[str, torch.Tensor], layout: Layout) -> ArrayRecord:
    """``state`` (a compact slice) as a packed ArrayRecord, one data copy.

    Tensors of one kind but different dtypes (float32 weights with a float64 buffer) are
    packed in their promoted dtype; the receiver casts them back to its model's.

    Raises
    ------
    ValueError
        Naming the key, if ``state`` lacks a key of ``layout``, has a key ``layout``
        lacks, or a tensor's shape or kind differs from the layout's.
    """
    if len(state) != len(layout):
        extra = sorted(set(state) - {k for k, _, _ in layout})
        missing = [k for k, _, _ in layout if k not in state]
        raise ValueError(f"compact state does not match the slice layout: missing {missing}, unexpected {extra}")
    by_kind: dict[str, list[torch.Tensor]] = {}
    for key, shape, kind in layout:
        t = state.get(key)
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"compact state is missing tensor '{key}'")
        if tuple(t.shape) != tuple(shape) or kind_of(t.dtype) != kind:
            raise ValueError(f"tensor '{key}' has shape {tuple(t.shape)} and dtype {t.dtype}, the slice layout "
                             f"says {tuple(shape)} ({kind})")
        by_kind.setdefault(kind, []).append(t.detach())
    return pack_flat({kind: [t.reshape(-1) for t in tensors] for kind, tensors in by_kind.items()}, layout)


def pack_flat(flat: Mapping[str, torch.Tensor | Sequence[torch.Tensor]], layout: Layout) -> ArrayRecord:
    """A packed ArrayRecord of flattened values: ``flat[kind]`` is the 1-D concatenation
    of the layout's tensors of that kind, or its 1-D parts in order (one data copy, into
    the record). Parts of one kind but different dtypes (float32 weights with a float64
    buffer) are packed in their promoted dtype; the receiver casts them back.

    Raises
    ------
    ValueError
        If a kind of the layout is missing, extra, not 1-D, or its length differs from
        the layout's total.
    """
    counts: dict[str, int] = {}
    for _, shape, kind in layout:
        counts[kind] = counts.get(kind, 0) + math.prod(shape)
    if set(flat) != set(counts):
        raise ValueError(f"packed kinds {sorted(flat)} differ from the slice layout's {sorted(counts)}")
    record = ArrayRecord()
    for kind, count in counts.items():
        value = flat[kind]
        parts = [value] if isinstance(value, torch.Tensor) else list(value)
        if not parts or any(t.dim() != 1 or kind_of(t.dtype) != kind for t in parts) \
                or sum(t.numel() for t in parts) != count:
            raise ValueError(f"packed {kind} values must be 1-D parts of {kind} dtypes, {count} values in all "
                             f"(the slice layout's); got shapes {[tuple(t.shape) for t in parts]}")
        dtype = functools.reduce(torch.promote_types, (t.dtype for t in parts))
        arrays = [t.detach().to(dtype).cpu().contiguous().numpy() for t in parts]
        record[PACKED_PREFIX + kind] = raw_array(arrays, count)
    return record


def raw_array(parts: np.ndarray | Sequence[np.ndarray], count: int | None = None) -> Array:
    """A Flower ``Array`` of :data:`RAW_STYPE`: the 1-D concatenation of ``parts`` (one
    dtype), ``count`` values in all, as little-endian bytes (one copy, into the Array).

    Raises
    ------
    ValueError
        If the parts are not 1-D of one dtype, or do not hold ``count`` values.
    """
    parts = [parts] if isinstance(parts, np.ndarray) else list(parts)
    dtype = parts[0].dtype
    if any(a.ndim != 1 or a.dtype != dtype for a in parts) or dtype.hasobject:
        raise ValueError(f"a raw array is made of 1-D parts of one plain dtype, got "
                         f"{[(a.shape, str(a.dtype)) for a in parts]}")
    n = sum(a.size for a in parts)
    if count is not None and n != count:
        raise ValueError(f"raw array: {n} values, expected {count}")
    little = dtype.newbyteorder("<")
    data = b"".join(memoryview(np.ascontiguousarray(a, dtype=little)).cast("B") for a in parts if a.size)
    return Array(dtype=little.name, shape=(n,), stype=RAW_STYPE, data=data)


def raw_values(array: Array, name: str = "array") -> np.ndarray:
    """The read-only 1-D values of a :data:`RAW_STYPE` array (a view of its bytes, native
    byte order on little-endian machines).

    Raises
    ------
    ValueError
        Naming ``name``, if the array is not of :data:`RAW_STYPE`, its ``dtype`` is not a
        plain numeric or bool dtype, its ``shape`` not 1-D, or its bytes not ``shape[0]``
        values.
    """
    if array.stype != RAW_STYPE:
        raise ValueError(f"array '{name}' must be raw values (stype '{RAW_STYPE}'), got stype {array.stype!r}")
    try:
        dtype = np.dtype(str(array.dtype)).newbyteorder("<")
    except (TypeError, ValueError):
        raise ValueError(f"array '{name}' has an unknown dtype {array.dtype!r}") from None
    if _np_kind(dtype) is None or dtype.hasobject:
        raise ValueError(f"array '{name}' must hold numbers or bools, got dtype {array.dtype!r}")
    shape = tuple(array.shape)
    if len(shape) != 1 or shape[0] * dtype.itemsize != len(array.data):
        raise ValueError(f"array '{name}' must be 1-D with shape[0] x {dtype.itemsize} bytes, got shape {shape} "
                         f"and {len(array.data)} bytes")
    values = np.frombuffer(array.data, dtype=dtype, count=shape[0])
    return values if values.dtype.isnative else values.astype(dtype.newbyteorder("="))


def unpack_state(arrays: ArrayRecord, layout: Layout, copy: bool = True) -> dict[str, torch.Tensor]:
    """The compact state of a packed ArrayRecord (inverse of :func:`pack_state`).

    Parameters
    ----------
    arrays : ArrayRecord
        ``packed-<kind>`` arrays only, one per kind the layout uses.
    layout : Layout
        From :func:`slice_layout` for the mask the slice was cut with.
    copy : bool
        ``False``: read-only tensors viewing the message's bytes (the server only reads
        them); ``True``: one copy per kind, the tensors are views into it (writable).

    Returns
    -------
    dict[str, torch.Tensor]
        ``key → tensor`` of the layout's shape, in the layout's order.

    Raises
    ------
    ValueError
        Naming the array key, if a kind is missing or extra, an array is not raw 1-D
        values of that kind (:func:`raw_values`), or its length differs from the
        layout's total.
    """
    wanted: dict[str, list[tuple[str, tuple[int, ...], int]]] = {}
    for key, shape, kind in layout:
        wanted.setdefault(kind, []).append((key, tuple(shape), math.prod(shape)))
    names = {PACKED_PREFIX + kind for kind in wanted}
    extra = sorted(str(k) for k in arrays if k not in names)
    if extra:
        raise ValueError(f"packed slice has unexpected array(s) {extra}; expected {sorted(names)}")
    flat: dict[str, torch.Tensor] = {}
    for kind, entries in wanted.items():
        name = PACKED_PREFIX + kind
        if name not in arrays:
            raise ValueError(f"packed slice is missing array '{name}'")
        view = raw_values(arrays[name], name)
        if _np_kind(view.dtype) != kind:
            raise ValueError(f"array '{name}' must hold {kind} values, got dtype {view.dtype}")
        count = sum(n for _, _, n in entries)
        if view.size != count:
            raise ValueError(f"array '{name}' holds {view.size} values, the slice layout {count}")
        if copy:
            flat[kind] = torch.from_numpy(view.copy())
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # read-only buffer: we only read
                flat[kind] = torch.from_numpy(view)
    views: dict[str, torch.Tensor] = {}
    for kind, entries in wanted.items():  # one split per kind (views), then each in its shape
        parts = torch.split(flat[kind], [n for _, _, n in entries])
        views.update((key, part.view(shape)) for (key, shape, _), part in zip(entries, parts))
    return {key: views[key] for key, _, _ in layout}


def decode_slice(arrays: ArrayRecord, layout, copy: bool = True) -> dict[str, torch.Tensor]:
    """A compact slice as a ``state_dict``, packed (:func:`unpack_state`) or one array
    per tensor (:func:`fl_subnet.wire.arrays_to_state`).

    Parameters
    ----------
    arrays : ArrayRecord
    layout : Layout or Callable[[], Layout]
        The slice's packing layout (:func:`slice_layout`), or a function computing it
        (called only for a packed record).
    copy : bool
        As in :func:`fl_subnet.wire.arrays_to_state`.

    Raises
    ------
    ValueError
        If the arrays cannot be decoded or do not match the layout.
    """
    if is_packed(arrays):
        return unpack_state(arrays, layout() if callable(layout) else layout, copy=copy)
    return arrays_to_state(arrays, copy=copy)


__all__ = ["PACKED_PREFIX", "RAW_STYPE", "Layout", "raw_array", "raw_values", "kind_of", "slice_layout", "is_packed", "pack_state", "pack_flat", "gather_packed", "unpack_state",
           "decode_slice"]
