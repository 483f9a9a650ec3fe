"""Wire formats: masks ⇄ ConfigRecord values, states ⇄ ArrayRecord.

A mask travels as one packed bitmask per group (``size/8`` bytes: 1M units ≈ 125 kB)
plus its scale, all plain Python types as Flower's ConfigRecord requires (DESIGN.md §6).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
from flwr.app import ArrayRecord

from .groups import UnitGroup
from .masks import Mask

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


def arrays_to_state(arrays: ArrayRecord) -> dict[str, torch.Tensor]:
    """An ArrayRecord as a ``state_dict`` of CPU tensors (0-dim arrays included)."""
    return {k: torch.from_numpy(np.array(a.numpy(), copy=True)) for k, a in arrays.items()}
