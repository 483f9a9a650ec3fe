"""Reading a client's train reply: its compact arrays, its weight, its size in bytes."""

from __future__ import annotations

import math

import torch
from flwr.app import ArrayRecord, ConfigRecord, RecordDict

from fl_subnet.wire.packed import decode_slice
from fl_subnet.wire.records import FJORD_BN_RECORD
from fl_subnet.exceptions import ReplyError  # noqa: F401  (re-exported: raised here)


def payload_bytes(arrays: ArrayRecord, config: ConfigRecord | None = None) -> int:
    """Serialized size in bytes of the arrays plus the config's bytes/str values.

    Counts ``len(Array.data)`` of each array (NumPy ``.npy`` payload, as sent) and
    the raw bytes of ``bytes``/``str`` config values (the masks); scalars count 8, a
    list 8 an element.
    """
    total = sum(len(a.data) for a in arrays.values())
    for value in (config or {}).values():
        total += len(value) if isinstance(value, (bytes, str)) else 8 * len(value) if isinstance(value, list) else 8
    return total


def parse_reply(content: RecordDict, weighted_by_key: str, layout=None) -> tuple[dict[str, torch.Tensor], float, int]:
    """The compact state, the weight and the arrays' size (bytes) of a train reply
    (FjORD's per-width statistics, ArrayRecord ``fjord-bn``, are counted in the size and
    read by the strategy).

    ``layout``: the node's slice layout, or a function computing it
    (:func:`fl_subnet.wire.packed.slice_layout`), to read a packed reply; a reply of one
    array per tensor needs none.

    Raises
    ------
    ReplyError
        If the reply does not hold exactly one ArrayRecord besides ``fjord-bn`` and one
        MetricRecord, the
        weight ``weighted_by_key`` is missing or not a finite number > 0, or an array
        cannot be decoded.
    """
    arrays = [a for k, a in content.array_records.items() if k != FJORD_BN_RECORD]
    metrics = list(content.metric_records.values())
    if len(arrays) != 1:
        raise ReplyError(f"expected one ArrayRecord (besides '{FJORD_BN_RECORD}'), got {len(arrays)}")
    if len(metrics) != 1:
        raise ReplyError(f"expected one MetricRecord, got {len(metrics)}")
    weight = metrics[0].get(weighted_by_key)
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not (
        math.isfinite(weight) and weight > 0
    ):
        raise ReplyError(f"metric '{weighted_by_key}' must be a finite number > 0, got {weight!r}")
    try:
        state = decode_slice(arrays[0], layout, copy=False)  # read-only views: we only read
    except Exception as err:  # noqa: BLE001 — undecodable payload
        raise ReplyError(f"arrays cannot be decoded: {err}") from err
    extra = content.array_records.get(FJORD_BN_RECORD) if FJORD_BN_RECORD in content.array_records else None
    return state, float(weight), payload_bytes(arrays[0]) + (payload_bytes(extra) if extra is not None else 0)
