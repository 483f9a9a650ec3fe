"""Masks ⇄ ConfigRecord values: the kept units of every masked group as bits, their
output scales, the skipped depth blocks (docs/design.md, "Wire contract").

A mask travels as one ``mask`` entry of bits (``size/8`` bytes a group) plus its scales, all
plain Python types as Flower's ConfigRecord requires (:func:`mask_to_config`)."""

from __future__ import annotations

import functools
import zlib
from collections.abc import Mapping, Sequence

import numpy as np
import torch

from fl_subnet.core.groups import UnitGroup
from fl_subnet.core.masks import Mask

from .records import MASK_KEY, SCALE_BEFORE_NORM_KEY, SCALE_KEY, SKIP_KEY, UNIT_SCALES_KEY

#: ConfigRecord key of the kept depth blocks' branch scales (``Mask.block_scale``):
#: ``"name=factor,..."`` (absent = none).
BLOCK_SCALE_KEY = "block-scale"

#: Largest output scale a mask may carry (inverted dropout's 1/ξ for ξ >= 1e-6): a larger
#: factor overflows float32 activations instead of training.
MAX_SCALE = 1e6


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
    ``block-scale`` (str, only if any factor is not 1)
        The kept depth blocks' branch scales (``Mask.block_scale``), sorted by block:
        ``"name=factor,..."``, each factor as Python's ``repr`` of the float (it
        round-trips exactly).

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
        scale has the wrong length or a value that is not finite and > 0; naming
        ``block-scale`` for a block factor outside ``(0, MAX_SCALE]`` or on a skipped
        block.
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
    factors = {}
    for name, v in sorted(mask.block_scale.items()):
        value = float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else float("nan")
        if not 0 < value <= MAX_SCALE or name in mask.skip or not name or "," in name or "=" in name:
            raise ValueError(f"'{BLOCK_SCALE_KEY}' of block {name!r} must be a number in (0, {MAX_SCALE:g}] on a "
                             f"kept block, got {v!r}")
        if value != 1.0:
            factors[name] = value
    if factors:
        out[BLOCK_SCALE_KEY] = ",".join(f"{name}={value!r}" for name, value in factors.items())
    if mask.scale_before_norm:
        out[SCALE_BEFORE_NORM_KEY] = True
    return out


def has_mask(config: Mapping[str, object]) -> bool:
    """Whether a train config carries a mask (``mask``, ``skip`` or ``block-scale``);
    without one the node trains the full model."""
    return MASK_KEY in config or SKIP_KEY in config or BLOCK_SCALE_KEY in config


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
        length or with a value not finite and > 0; ``skip`` not a string;
        ``block-scale`` not a string of ``name=factor`` entries with each factor in
        ``(0, MAX_SCALE]``, a block named twice, or a skipped block.
    """
    skip = config.get(SKIP_KEY, "")
    if not isinstance(skip, str):
        raise ValueError(f"config key '{SKIP_KEY}' must be a comma-separated string of depth blocks, got {skip!r}")
    skipped = frozenset(s for s in skip.split(",") if s)
    before_norm = config.get(SCALE_BEFORE_NORM_KEY, False)
    if not isinstance(before_norm, bool):
        raise ValueError(f"config key '{SCALE_BEFORE_NORM_KEY}' must be a bool, got {before_norm!r}")
    blocks = _block_scales_from_config(config, skipped)
    raw = config.get(MASK_KEY)
    if raw is None:
        return Mask({}, {}, skipped, before_norm, blocks)
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
    return Mask(idx, _scales_from_config(config, written, idx), skipped, before_norm, blocks)


def _block_scales_from_config(config: Mapping[str, object], skipped: frozenset[str]) -> dict[str, float]:
    """``Mask.block_scale`` from ``block-scale`` (see :func:`mask_to_config`); ``{}`` if absent."""
    raw = config.get(BLOCK_SCALE_KEY)
    if raw is None:
        return {}
    what = (f"config key '{BLOCK_SCALE_KEY}' must be comma-separated name=factor entries, each factor a number "
            f"in (0, {MAX_SCALE:g}] on a kept block")
    if not isinstance(raw, str) or not raw:
        raise ValueError(f"{what}, got {raw!r}")
    out: dict[str, float] = {}
    for entry in raw.split(","):
        name, sep, value = entry.partition("=")
        try:
            factor = float(value)
        except ValueError:
            factor = float("nan")
        if not sep or not name or name in out or name in skipped or not 0 < factor <= MAX_SCALE:
            raise ValueError(f"{what}, got {entry[:80]!r}")
        out[name] = factor
    return out


def _scales_from_config(config: Mapping[str, object], written: Sequence[UnitGroup],
                        idx: Mapping[str, torch.Tensor]) -> dict[str, float | torch.Tensor]:
    """The written groups' scales from ``scale`` and ``unit-scales`` (see :func:`mask_to_config`)."""
    s = config.get(SCALE_KEY, 1.0)
    values = list(s) if isinstance(s, (list, tuple)) else None
    if values is None:
        if not _positive(s):
            raise ValueError(f"config key '{SCALE_KEY}' must be a number in (0, {MAX_SCALE:g}] or a list of one "
                             f"per masked group, got {s!r}")
        values = [float(s)] * len(written)
    elif len(values) != len(written) or not all(v == 0 or _positive(v) for v in values):
        raise ValueError(f"config key '{SCALE_KEY}' must list {len(written)} numbers in (0, {MAX_SCALE:g}] (0 "
                         f"marks per-unit scales), got {s!r}")
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
    return not isinstance(v, bool) and isinstance(v, (int, float)) and 0 < v <= MAX_SCALE


def _check_unit_scales(what: str, v: torch.Tensor) -> torch.Tensor:
    """``v`` if every per-unit scale is finite and > 0 (a unit that contributes nothing is
    left out of the mask instead), else ``ValueError`` naming ``what``."""
    bad = ~(torch.isfinite(v) & (v > 0) & (v <= MAX_SCALE))
    if bool(bad.any()):
        i = int(torch.nonzero(bad)[0])
        raise ValueError(f"{what}: per-unit scales must be in (0, {MAX_SCALE:g}], got {float(v[i])!r} at kept unit {i}")
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
    if not 0 < value <= MAX_SCALE:
        raise ValueError(f"{what} must be a number in (0, {MAX_SCALE:g}], got {value!r}")
    return value
