"""Gather and scatter: cut the compact slice of a state for a mask, and put it back."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

from .groups import UnitGroup, couplings_by_key, dim_keep
from .masks import Mask


class Slicer:
    """Precomputed coupling table for one architecture's unit groups.

    Parameters
    ----------
    groups : Sequence[UnitGroup]
        The model's unit groups (every group a mask may name).
    blocks : Mapping[str, Sequence[str]]
        Depth block name → the state keys only its branch uses (see
        :class:`~fl_subnet.core.analysis.depth.DepthBlock`).
    """

    def __init__(self, groups: Sequence[UnitGroup], blocks: Mapping[str, Sequence[str]] | None = None) -> None:
        self.groups = list(groups)
        self.by_name = {g.name: g for g in self.groups}
        self.coupled = couplings_by_key(self.groups)
        self.blocks = {name: tuple(keys) for name, keys in (blocks or {}).items()}

    def skipped_keys(self, mask: Mask) -> set[str]:
        """State keys of the depth blocks ``mask`` skips (not in its compact slice).

        Raises
        ------
        ValueError
            If the mask skips a block this model does not have.
        """
        unknown = sorted(set(mask.skip) - set(self.blocks))
        if unknown:
            raise ValueError(f"mask skips unknown depth block(s) {unknown}; blocks: {sorted(self.blocks)}")
        return {k for name in mask.skip for k in self.blocks[name]}

    def keep_units(self, mask: Mask) -> dict[str, torch.Tensor]:
        """Group name → boolean keep vector ``(size,)``."""
        out = {}
        for g in self.groups:
            v = torch.zeros(g.size, dtype=torch.bool)
            v[mask.kept(g)] = True
            out[g.name] = v
        return out

    def kept(self, mask: Mask, key: str, shape: Sequence[int],
             keep_units: dict[str, torch.Tensor] | None = None) -> list[tuple[int, torch.Tensor]]:
        """``(dim, kept positions)`` for every coupled dim of ``key`` (empty if shared).

        Positions are sorted int64; an identity coupling returns the mask's indices.
        """
        dims = self.coupled.get(key)
        if not dims:
            return []
        out = []
        for d, entries in sorted(dims.items()):
            if len(entries) == 1 and entries[0][1] is None and self.by_name[entries[0][0]].size == shape[d]:
                out.append((d, mask.kept(self.by_name[entries[0][0]])))
                continue
            if keep_units is None:
                keep_units = self.keep_units(mask)
            out.append((d, torch.nonzero(dim_keep(int(shape[d]), entries, keep_units)).flatten()))
        return out

    def compact_shape(self, key: str, shape: Sequence[int], mask: Mask) -> tuple[int, ...]:
        """Shape of ``key``'s compact slice under ``mask``."""
        out = list(shape)
        for d, idx in self.kept(mask, key, shape):
            out[d] = int(idx.numel())
        return tuple(out)

    def gather(self, state: Mapping[str, torch.Tensor], mask: Mask) -> dict[str, torch.Tensor]:
        """The compact slice: every tensor restricted to the kept units.

        Parameters
        ----------
        state : Mapping[str, torch.Tensor]
            Full ``state_dict``.
        mask : Mask
            Validated against the groups first.

        Returns
        -------
        dict[str, torch.Tensor]
            Same keys but those of skipped depth blocks; tensor ``key`` has shape
            ``compact_shape(key, ...)``. New memory (never a view of ``state``).

        Raises
        ------
        ValueError
            If the mask is invalid (see :meth:`Mask.validate`) or a coupled key is
            missing from ``state``.
        """
        mask.validate(self.groups)
        missing = [k for k in self.coupled if k not in state]
        if missing:
            raise ValueError(f"state is missing coupled tensor(s) {missing}")
        keep_units = self.keep_units(mask) if any(
            e[1] is not None for dims in self.coupled.values() for es in dims.values() for e in es) else None
        out = {}
        skipped = self.skipped_keys(mask)
        for key, t in state.items():
            if key in skipped:
                continue
            kept = self.kept(mask, key, t.shape, keep_units)
            if not kept:
                out[key] = t.detach().clone()
                continue
            for d, idx in kept:
                t = t.index_select(d, idx)
            out[key] = t.detach()
        return out

    def scatter(self, compact: Mapping[str, torch.Tensor], mask: Mask,
                into: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Write a compact slice back into (a copy of) the full state ``into``.

        Returns
        -------
        dict[str, torch.Tensor]
            ``into`` with every entry the mask kept replaced by its compact value; the
            inverse of :meth:`gather` on those entries.
        """
        out = {}
        skipped = self.skipped_keys(mask)
        for key, full in into.items():
            new = full.detach().clone()
            if key in skipped:
                out[key] = new
                continue
            flat = self.flat_index(key, full.shape, mask)
            new.view(-1)[flat.long()] = compact[key].reshape(-1).to(full.dtype)
            out[key] = new
        return out

    def flat_index(self, key: str, shape: Sequence[int], mask: Mask,
                   keep_units: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """Positions in the flattened full tensor of each compact entry (row-major).

        Returns
        -------
        torch.Tensor
            int32 (int64 for tensors of 2**31 entries or more), shape
            ``(prod(compact_shape),)``: ``full.view(-1)[flat] == compact.view(-1)``.
        """
        return flat_positions(self.kept(mask, key, shape, keep_units), shape)


def flat_positions(kept: list[tuple[int, torch.Tensor]], shape: Sequence[int]) -> torch.Tensor:
    """Row-major positions in the flattened full tensor of each compact entry, given the
    kept positions of each sliced dim (see :meth:`Slicer.kept`)."""
    dtype = torch.int32 if math.prod(shape) < 2**31 else torch.int64
    by_dim = dict(kept)
    flat = torch.zeros((), dtype=dtype)
    stride = 1
    for d in range(len(shape) - 1, -1, -1):
        pos = by_dim.get(d)
        pos = torch.arange(int(shape[d]), dtype=dtype) if pos is None else pos.to(dtype)
        view = [1] * (len(shape) - d)
        view[0] = -1
        flat = (pos * stride).view(view) + flat
        stride *= int(shape[d])
    return flat.reshape(-1)
