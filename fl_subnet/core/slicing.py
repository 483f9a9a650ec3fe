"""Gather and scatter: cut the compact slice of a state for a mask, and put it back."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping, Sequence

import torch

from .groups import UnitGroup, couplings_by_key, dim_keep
from .masks import Mask


#: torch intra-op threads for the server's gathers and scatters (None: leave torch's
#: setting). They are many memory-bound copies, which gain little from intra-op threads
#: and lose much when the cores are shared (the threads wait for each other); the
#: aggregator runs tensors on threads of its own instead.
SERVER_THREADS: int | None = 1


@contextlib.contextmanager
def torch_threads(n: int | None = -1) -> Iterator[None]:
    """Run the block with ``n`` torch intra-op threads, restored after (default:
    :data:`SERVER_THREADS`; ``None``: unchanged). Nested uses cost nothing."""
    n = SERVER_THREADS if n == -1 else n
    old = torch.get_num_threads()
    if n is None or n == old:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


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
        # (key, dim) couplings with equal content share one canonical id, so that a mask's
        # kept positions are computed once per distinct coupling (BatchNorm's weight,
        # bias and running stats of the same channels, ...)
        self._canon: dict[int, int] = {}
        seen: dict[tuple, int] = {}
        for dims in self.coupled.values():
            for entries in dims.values():
                sig = tuple((g, None if u is None else tuple(u.tolist()), None if p is None else tuple(p.tolist()))
                            for g, u, p in entries)
                self._canon[id(entries)] = seen.setdefault(sig, len(seen))
        self._aranges: dict[int, torch.Tensor] = {}

    def plan(self, mask: Mask) -> _Plan:
        """The mask's cached index maps for this slicer (built on first use, rebuilt if
        the mask's indices, scales or skipped blocks changed since)."""
        sig = mask.signature()
        hit = mask._plans.get(self)
        if hit is not None and hit.signature == sig:
            return hit
        plan = mask._plans[self] = _Plan(sig, mask)
        return plan

    def validate(self, mask: Mask) -> None:
        """:meth:`Mask.validate` against this slicer's groups, once per mask (cached)."""
        plan = self.plan(mask)
        if not plan.validated:
            mask.validate(self.groups)
            plan.validated = True
            plan.full = not mask.skip and all(int(mask.kept(g).numel()) == g.size for g in self.groups)

    def is_full(self, mask: Mask) -> bool:
        """Whether ``mask`` keeps every unit of every group and skips no block (its
        compact slice is the full state).

        Raises
        ------
        ValueError
            If the mask is invalid (:meth:`validate`).
        """
        self.validate(mask)
        return bool(self.plan(mask).full)

    def skipped_keys(self, mask: Mask) -> set[str]:
        """State keys of the depth blocks ``mask`` skips (not in its compact slice).

        Raises
        ------
        ValueError
            If the mask skips a block this model does not have.
        """
        if not mask.skip:
            return set()
        unknown = sorted(set(mask.skip) - set(self.blocks))
        if unknown:
            raise ValueError(f"mask skips unknown depth block(s) {unknown}; blocks: {sorted(self.blocks)}")
        return {k for name in mask.skip for k in self.blocks[name]}

    def keep_units(self, mask: Mask) -> dict[str, torch.Tensor]:
        """Group name → boolean keep vector ``(size,)`` (cached per mask: do not modify)."""
        plan = self.plan(mask)
        if plan.keep_units is None:
            plan.keep_units = self._keep_units(mask)
        return dict(plan.keep_units)

    def _keep_units(self, mask: Mask) -> dict[str, torch.Tensor]:
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
        Cached per mask and shape when ``keep_units`` is not given.
        """
        dims = self.coupled.get(key)
        if not dims:
            return []
        if keep_units is None:
            return list(self._kept_cached(self.plan(mask), mask, key, shape))
        return self._kept(mask, dims, shape, keep_units, None)

    def kept_all(self, mask: Mask, shapes: Mapping[str, Sequence[int]]) -> dict[str, list[tuple[int, torch.Tensor]]]:
        """:meth:`kept` of every coupled key of ``shapes`` (key → full shape), cached per mask."""
        plan = self.plan(mask)
        return {k: list(self._kept_cached(plan, mask, k, shape)) for k, shape in shapes.items() if k in self.coupled}

    def compact_shapes(self, mask: Mask, shapes: Mapping[str, Sequence[int]]) -> dict[str, tuple[int, ...]]:
        """:meth:`compact_shape` of every key of ``shapes`` (key → full shape); cached
        per mask and ``shapes`` (a new dict each call)."""
        plan = self.plan(mask)
        memo = tuple((k, tuple(s)) for k, s in shapes.items())
        hit = plan.shapes.get(memo)
        if hit is not None:
            return dict(hit)
        out = {}
        for key, shape in shapes.items():
            new = list(shape)
            if key in self.coupled:
                for d, idx in self._kept_cached(plan, mask, key, shape):
                    new[d] = int(idx.numel())
            out[key] = tuple(new)
        plan.shapes[memo] = out
        return dict(out)

    def _kept_cached(self, plan: _Plan, mask: Mask, key: str, shape: Sequence[int]) -> list[tuple[int, torch.Tensor]]:
        cache_key = (key, tuple(shape))
        hit = plan.kept.get(cache_key)
        if hit is None:
            dims = self.coupled.get(key)
            if not dims:
                hit = []
            elif plan.full:  # validated and keeping everything: every position of every dim
                hit = [(d, self._arange(int(shape[d]))) for d in sorted(dims)]
            else:
                hit = self._kept(mask, dims, shape, None, plan)
            plan.kept[cache_key] = hit
        return hit

    def _arange(self, n: int) -> torch.Tensor:
        t = self._aranges.get(n)
        if t is None:
            t = self._aranges[n] = torch.arange(n)
        return t

    def _kept(self, mask, dims, shape, keep_units, plan) -> list[tuple[int, torch.Tensor]]:
        out = []
        for d, entries in sorted(dims.items()):
            if len(entries) == 1 and entries[0][1] is None and self.by_name[entries[0][0]].size == shape[d]:
                out.append((d, mask.kept(self.by_name[entries[0][0]])))
                continue
            memo = (int(shape[d]), self._canon.get(id(entries))) if plan is not None else None
            pos = plan.dims.get(memo) if memo is not None and memo[1] is not None else None
            if pos is None:
                if keep_units is None:
                    keep_units = self.keep_units(mask)
                pos = torch.nonzero(dim_keep(int(shape[d]), entries, keep_units)).flatten()
                if memo is not None and memo[1] is not None:
                    plan.dims[memo] = pos
            out.append((d, pos))
        return out

    def compact_shape(self, key: str, shape: Sequence[int], mask: Mask) -> tuple[int, ...]:
        """Shape of ``key``'s compact slice under ``mask``."""
        return self.compact_shapes(mask, {key: shape})[key]

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
        self.validate(mask)
        missing = [k for k in self.coupled if k not in state]
        if missing:
            raise ValueError(f"state is missing coupled tensor(s) {missing}")
        with torch_threads():
            if self.is_full(mask):
                return {key: t.detach().clone() for key, t in state.items()}
            out = {}
            skipped = self.skipped_keys(mask)
            plan = self.plan(mask)
            for key, t in state.items():
                if key in skipped:
                    continue
                out[key] = self.gather_key(t, self._kept_cached(plan, mask, key, t.shape))
            return out

    @staticmethod
    def gather_key(t: torch.Tensor, kept: list[tuple[int, torch.Tensor]]) -> torch.Tensor:
        """One tensor's compact slice, in new memory: one ``index_select`` per cut dim,
        uncut dims skipped."""
        t = t.detach()
        cut = [(d, idx) for d, idx in kept if int(idx.numel()) != t.shape[d]]
        if not cut:
            return t.clone()
        for d, idx in cut:
            t = t.index_select(d, idx)
        return t

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


def flat_positions(kept: list[tuple[int, torch.Tensor]], shape: Sequence[int],
                   dtype: torch.dtype | None = None) -> torch.Tensor:
    """Row-major positions in the flattened full tensor of each compact entry, given the
    kept positions of each sliced dim (see :meth:`Slicer.kept`); int32 unless the tensor
    has 2**31 entries or more, or ``dtype`` says otherwise."""
    if dtype is None:
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


class _Plan:
    """One mask's index maps for one slicer (:meth:`Slicer.plan`): small per-unit
    tensors (per-entry maps hold as much as the slice: only a small model's
    :class:`~fl_subnet.core.flat.FlatMap` positions are kept, in ``flat``)."""

    __slots__ = ("signature", "refs", "validated", "full", "keep_units", "kept", "dims", "flat", "shapes")

    def __init__(self, signature: tuple, mask: Mask) -> None:
        self.signature = signature
        # hold the tensors the signature names, so that their ids stay theirs
        self.refs = (tuple(mask.indices.values()), tuple(mask.scale.values()))
        self.validated = False
        self.full: bool | None = None
        self.keep_units: dict[str, torch.Tensor] | None = None
        self.kept: dict[tuple, list[tuple[int, torch.Tensor]]] = {}
        self.dims: dict[tuple, torch.Tensor] = {}  # (length, canonical coupling) → kept positions
        self.flat: tuple | None = None  # (FlatMap, its kept positions)
        self.shapes: dict[tuple, dict[str, tuple[int, ...]]] = {}  # compact_shapes, per full shapes
