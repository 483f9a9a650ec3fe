"""Gather: cut the compact slice of a state for a mask, and index helpers for scatter."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

from .groups import UnitGroup, couplings_by_key
from .masks import Mask


class Slicer:
    """Precomputed coupling table for one architecture's unit groups.

    Parameters
    ----------
    groups : Sequence[UnitGroup]
        The model's unit groups.
    """

    def __init__(self, groups: Sequence[UnitGroup]) -> None:
        self.groups = list(groups)
        self.by_name = {g.name: g for g in self.groups}
        self.coupled = couplings_by_key(self.groups)

    def kept(self, mask: Mask, key: str) -> list[tuple[int, torch.Tensor]]:
        """``(dim, kept positions)`` for every coupled dim of ``key`` (empty if shared)."""
        return [(d, mask.kept(self.by_name[g])) for d, g in self.coupled.get(key, [])]

    def compact_shape(self, key: str, shape: Sequence[int], mask: Mask) -> tuple[int, ...]:
        """Shape of ``key``'s compact slice under ``mask``."""
        out = list(shape)
        for d, idx in self.kept(mask, key):
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
            Same keys; tensor ``key`` has shape ``compact_shape(key, ...)``. New memory
            (never a view of ``state``).

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
        out = {}
        for key, t in state.items():
            kept = self.kept(mask, key)
            if not kept:
                out[key] = t.detach().clone()
                continue
            for d, idx in kept:
                t = t.index_select(d, idx)
            out[key] = t.detach()
        return out

    def flat_index(self, key: str, shape: Sequence[int], mask: Mask) -> torch.Tensor:
        """Positions in the flattened full tensor of each compact entry (row-major).

        Returns
        -------
        torch.Tensor
            int32 (int64 for tensors of 2**31 entries or more), shape
            ``(prod(compact_shape),)``: ``full.view(-1)[flat] == compact.view(-1)``.
        """
        dtype = torch.int32 if math.prod(shape) < 2**31 else torch.int64
        kept = dict(self.kept(mask, key))
        flat = torch.zeros((), dtype=dtype)
        stride = 1
        for d in range(len(shape) - 1, -1, -1):
            pos = kept.get(d)
            pos = torch.arange(int(shape[d]), dtype=dtype) if pos is None else pos.to(dtype)
            view = [1] * (len(shape) - d)
            view[0] = -1
            flat = (pos * stride).view(view) + flat
            stride *= int(shape[d])
        return flat.reshape(-1)
