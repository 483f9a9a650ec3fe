"""One index over the concatenated floating-point tensors of a model: the positions a
mask keeps, computed with a fixed number of vector operations whatever the number of
tensors.

A small model of many tensors (a ResNet: 48 float tensors of 43.6k parameters) spends
its server round in per-tensor Python calls: gather, pack, check, scatter-add, 57 times
a node. :class:`FlatMap` tabulates once, for every entry of the float tensors laid end
to end (sorted keys, each row-major), which unit of which group each of its dims
belongs to; a mask's kept entries are then a look-up of its unit bits, an ``any`` per
position and one ``index_select`` and ``and`` per coupled dim, with no loop over tensors. The kept positions are in ascending order, which is the order of
the compact slice (each tensor row-major, tensors in sorted-key order: the packed
``packed-float`` array of :mod:`fl_subnet.wire.packed`).

Semantics are those of :func:`fl_subnet.core.groups.dim_keep` (a position of a coupled
dim is kept if no group lists it, or if a kept unit lists it) and of
:meth:`Slicer.gather` (an entry is kept if its position along every coupled dim is
kept; keys of skipped depth blocks hold nothing).
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping, Sequence

import torch

from .masks import Mask
from .slicing import Slicer


#: A model takes the flat path when its float tensors average fewer entries than this
#: (per-tensor calls then cost more than the data) and hold at most :data:`MAX_NUMEL`.
MEAN_NUMEL = 1 << 16
MAX_NUMEL = 1 << 22
#: A mask's kept positions are cached on the mask (for its message and its reply) up
#: to this many entries in the model (4 MB of int32 a mask).
CACHE_NUMEL = 1 << 20


def worth_it(shapes: Mapping[str, Sequence[int]]) -> bool:
    """Whether a model of these float tensors (key → shape) should take the flat path:
    many small tensors (mean below :data:`MEAN_NUMEL` entries), at most
    :data:`MAX_NUMEL` entries in all."""
    total = sum(math.prod(s) for s in shapes.values())
    return bool(shapes) and total <= MAX_NUMEL and total < MEAN_NUMEL * len(shapes)


def flat_map_of(slicer: Slicer, full: Mapping[str, tuple[Sequence[int], torch.dtype]],
                previous: FlatMap | None = None) -> FlatMap | None:
    """The :class:`FlatMap` of a model's float tensors when the flat path pays
    (:func:`worth_it`) and they share one dtype, else None.

    Parameters
    ----------
    slicer : Slicer
    full : Mapping[str, tuple[Sequence[int], torch.dtype]]
        Every ``state_dict`` key → its full shape and dtype.
    previous : FlatMap, optional
        Returned as is when it maps the same tensors (built once per model).
    """
    shapes = {k: tuple(int(n) for n in shape) for k, (shape, dtype) in full.items() if dtype.is_floating_point}
    if not worth_it(shapes) or len({dtype for _, dtype in full.values() if dtype.is_floating_point}) != 1:
        return None
    if previous is not None and previous.slicer is slicer and previous.shapes == shapes:
        return previous
    return FlatMap(slicer, shapes)


class FlatMap:
    """Kept-entry positions of masks over a model's float tensors laid end to end.

    Parameters
    ----------
    slicer : Slicer
        The model's coupling table.
    shapes : Mapping[str, Sequence[int]]
        The float tensors: key → full shape. They are laid end to end in sorted-key
        order (:attr:`keys`, :attr:`offsets`).

    Attributes
    ----------
    keys : list[str]
        Sorted keys.
    offsets : dict[str, int]
        Key → position of its first entry in the concatenation.
    numel : int
        Total entries ``N``.

    Notes
    -----
    Memory: ``K`` int32 columns of ``N`` (``K`` the most coupled dims of a tensor, 2 for
    linear and conv weights) plus one row per position of every coupled dim: ``8·N``
    bytes for most models (349 KB for the 43.6k-parameter ResNet).
    """

    def __init__(self, slicer: Slicer, shapes: Mapping[str, Sequence[int]]) -> None:
        self.slicer = slicer
        self.keys = sorted(shapes)
        self.shapes = {k: tuple(int(s) for s in shapes[k]) for k in self.keys}
        self.offsets: dict[str, int] = {}
        offset = 0
        for k in self.keys:
            self.offsets[k] = offset
            offset += math.prod(self.shapes[k])
        self.numel = offset
        self._group_offset: dict[str, int] = {}
        units = 0
        for g in slicer.groups:
            self._group_offset[g.name] = units
            units += g.size
        self._false, self._true = units, units + 1  # unit slots that are never / always kept
        self._num_units = units + 2
        # dim-position table: one row per (key, coupled dim, position), its listing units;
        # each (key, dim) is a segment of rows (its kept count is the dim's compact size)
        rows: list[torch.Tensor] = []
        base: dict[tuple[str, int], int] = {}
        self._segments: dict[str, list[tuple[int, int]]] = {}  # key → [(dim, segment)]
        bounds: list[tuple[int, int]] = []
        count = 0
        for k in self.keys:
            for d, entries in sorted(slicer.coupled.get(k, {}).items()):
                table = self._dim_table(self.shapes[k][d], entries)
                base[(k, d)] = count
                self._segments.setdefault(k, []).append((d, len(bounds)))
                bounds.append((count, count + table.shape[0]))
                rows.append(table)
                count += table.shape[0]
        self._bounds = torch.tensor(bounds, dtype=torch.int64).view(-1, 2)
        rows.append(torch.tensor([[self._true]], dtype=torch.int32))  # the always-kept row
        self._always = count
        width = max(t.shape[1] for t in rows)
        self._positions = torch.cat([torch.nn.functional.pad(t, (0, width - t.shape[1]), value=self._false)
                                     for t in rows])
        # entry table: for every entry, its row of the dim-position table along each coupled dim
        # (one contiguous column per coupled dim: index_select is 3x faster than a 2-D gather)
        k_max = max([len(slicer.coupled.get(k, {})) for k in self.keys] + [1])
        self._entries = [torch.full((self.numel,), self._always, dtype=torch.int32) for _ in range(k_max)]
        for k in self.keys:
            shape, start = self.shapes[k], self.offsets[k]
            n = math.prod(shape)
            for col, d in enumerate(sorted(slicer.coupled.get(k, {}))):
                view = [1] * len(shape)
                view[d] = -1
                coord = torch.arange(shape[d], dtype=torch.int32).view(view).expand(shape).reshape(-1)
                self._entries[col][start:start + n] = coord + base[(k, d)]

    def _dim_table(self, length: int, entries) -> torch.Tensor:
        """``(length, M)`` unit slots listing each position (padded with the never-kept
        slot; an unlisted position holds the always-kept slot)."""
        pos_parts, unit_parts = [], []
        for g, units, pos in entries:
            size = self.slicer.by_name[g].size
            start = self._group_offset[g]
            if units is None:
                n = min(size, length)
                pos_parts.append(torch.arange(n))
                unit_parts.append(torch.arange(n) + start)
            else:
                pos_parts.append(pos.to(torch.int64))
                unit_parts.append(units.to(torch.int64) + start)
        pos = torch.cat(pos_parts) if pos_parts else torch.zeros(0, dtype=torch.int64)
        unit = torch.cat(unit_parts) if unit_parts else torch.zeros(0, dtype=torch.int64)
        order = torch.argsort(pos, stable=True)
        pos, unit = pos[order], unit[order]
        counts = torch.bincount(pos, minlength=length)
        width = max(int(counts.max()) if counts.numel() else 0, 1)
        table = torch.full((length, width), self._false, dtype=torch.int32)
        table[counts == 0, 0] = self._true
        if pos.numel():
            first = torch.cumsum(counts, 0) - counts  # index of each position's first pair
            rank = torch.arange(pos.numel()) - first[pos]
            table[pos, rank] = unit.to(torch.int32)
        return table

    def kept(self, mask: Mask) -> torch.Tensor:
        """Positions in the concatenation of the entries ``mask`` keeps, ascending.

        Returns
        -------
        torch.Tensor
            int32 (int64 from 2**31 entries) ``(n,)``, ``n`` the float entries of the
            compact slice: the concatenation of every kept key's compact tensor,
            row-major, equals the concatenated full tensors at these positions. Cached
            on the mask (until its indices change) for models of at most
            :data:`CACHE_NUMEL` entries: do not modify.

        Raises
        ------
        ValueError
            If the mask is invalid for the slicer's groups.
        """
        return self._compute(mask)[0]

    def compact_shapes(self, mask: Mask, shapes: Mapping[str, Sequence[int]]) -> dict[str, tuple[int, ...]]:
        """:meth:`Slicer.compact_shapes` of ``shapes`` (key → full shape), the float keys'
        from the mask's kept positions along each coupled dim (one cumulative sum, no
        per-tensor calls), the others from the slicer; cached on the mask with the
        slicer's own (a new dict each call).

        Raises
        ------
        ValueError
            If the mask is invalid for the slicer's groups.
        """
        self.slicer.validate(mask)
        plan = self.slicer.plan(mask)
        memo = tuple((k, tuple(s)) for k, s in shapes.items())
        hit = plan.shapes.get(memo)
        if hit is None:
            ours = {} if plan.full else self._compute(mask)[1]
            rest = {k: s for k, s in shapes.items() if k not in ours or self.shapes[k] != tuple(s)}
            theirs = self.slicer.compact_shapes(mask, rest) if rest else {}
            hit = plan.shapes[memo] = {k: theirs[k] if k in rest else ours[k] for k in shapes}
        return dict(hit)

    def _compute(self, mask: Mask) -> tuple[torch.Tensor, dict[str, tuple[int, ...]]]:
        """(kept positions, compact shapes of the float keys) of ``mask``, cached on it."""
        self.slicer.validate(mask)
        plan = self.slicer.plan(mask)
        if plan.flat is not None and plan.flat[0] is self:
            return plan.flat[1:]
        keep_units = self.slicer.keep_units(mask)
        unit_keep = torch.zeros(self._num_units, dtype=torch.bool)
        unit_keep[self._true] = True
        for g in self.slicer.groups:
            start = self._group_offset[g.name]
            unit_keep[start:start + g.size] = keep_units[g.name]
        position_keep = unit_keep[self._positions].any(dim=1)
        cumulative = torch.zeros(position_keep.numel() + 1, dtype=torch.int64)
        torch.cumsum(position_keep, 0, out=cumulative[1:])
        sizes = (cumulative[self._bounds[:, 1]] - cumulative[self._bounds[:, 0]]).tolist()
        shapes = {}
        for k, shape in self.shapes.items():
            new = list(shape)
            for d, i in self._segments.get(k, ()):
                new[d] = sizes[i]
            shapes[k] = tuple(new)
        entry_keep = position_keep.index_select(0, self._entries[0])
        for column in self._entries[1:]:
            entry_keep &= position_keep.index_select(0, column)
        for key in self.slicer.skipped_keys(mask):
            if key in self.offsets:
                start = self.offsets[key]
                entry_keep[start:start + math.prod(self.shapes[key])] = False
        kept = entry_keep.nonzero().view(-1)
        if self.numel < 2**31:
            kept = kept.to(torch.int32)
        if self.numel <= CACHE_NUMEL:
            plan.flat = (self, kept, shapes)
        return kept, shapes

    def matches(self, state: Mapping[str, torch.Tensor]) -> bool:
        """Whether this map lays out exactly ``state``'s float tensors (same keys and
        shapes) and they share one dtype."""
        floats = {k: v for k, v in state.items() if v.is_floating_point()}
        return self.keys == sorted(floats) and all(self.shapes[k] == tuple(v.shape) for k, v in floats.items()) \
            and len({v.dtype for v in floats.values()}) == 1

    def concat(self, tensors: Mapping[str, torch.Tensor], keys: Collection[str] | None = None) -> torch.Tensor:
        """The tensors of ``keys`` (default :attr:`keys`; of others, those among
        :attr:`keys`), flattened and laid end to end in this map's order: ``(Σ numel,)``
        (float32 and empty for no key)."""
        keys = self.keys if keys is None else [k for k in self.keys if k in keys]
        parts = [tensors[k].reshape(-1) for k in keys]
        return parts[0] if len(parts) == 1 else torch.cat(parts) if parts else torch.zeros(0)

    def split(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """A full-length ``(N,)`` vector as views of every key's full shape."""
        return {k: flat[self.offsets[k]:self.offsets[k] + math.prod(s)].view(s) for k, s in self.shapes.items()}


__all__ = ["FlatMap", "flat_map_of", "worth_it", "MEAN_NUMEL", "MAX_NUMEL", "CACHE_NUMEL"]
