"""Masks: which units of each group a sub-model keeps, and the scale of their output."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import torch

from .groups import UnitGroup


@dataclass(frozen=True)
class Mask:
    """Kept units per unit group plus a per-group output scale.

    Attributes
    ----------
    indices : dict[str, torch.Tensor]
        Group name → sorted, unique ``int64`` positions kept, shape ``(k_g,)``. A group
        that is absent is kept whole.
    scale : dict[str, float | torch.Tensor]
        Group name → factor applied to the kept units' output (``1/ξ`` for inverted
        dropout, docs/design.md, "Exact semantics"): one float for the group, or a 1-D
        tensor of shape ``(k_g,)`` with one factor per kept unit (in the order of
        ``indices``); absent means 1.
    skip : frozenset[str]
        Depth blocks (skippable residual branches, :attr:`SubnetSpec.blocks`) the
        sub-model leaves out: their tensors are not sent and the branch becomes the
        identity.
    block_scale : dict[str, float]
        Depth block name → factor on its residual branch's output while the sub-model
        runs: a kept block ``y = x + f(x)`` computes ``y = x + s·f(x)`` (RaPTr-style
        path scaling, :class:`~fl_subnet.core.paths.RandomPathSampler`); absent means 1.
        Only kept blocks (not in ``skip``) may carry one.
    scale_before_norm : bool
        Where a BatchNorm follows the units' layer, the scale belongs before that norm
        (HeteroFL's and FedRolex's ``Scaler``: ``conv -> scaler -> norm``), so batch
        statistics cancel it while training. False (inverted dropout: federated and
        multi-sample dropout, IST): the scale acts where the units are mixed, after the
        norm and activation, as a dropout layer there would.
    """

    indices: dict[str, torch.Tensor]
    scale: dict[str, float] = field(default_factory=dict)
    skip: frozenset[str] = frozenset()
    scale_before_norm: bool = False
    block_scale: dict[str, float] = field(default_factory=dict)
    # Per-slicer index maps (:meth:`Slicer.plan`), keyed by the slicer; each entry is
    # checked against the mask's current indices before use. Not part of equality.
    _plans: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def kept(self, group: UnitGroup) -> torch.Tensor:
        """Kept positions of ``group``, shape ``(k,)`` int64 (all if absent)."""
        idx = self.indices.get(group.name)
        return torch.arange(group.size) if idx is None else idx

    def signature(self) -> tuple:
        """What the mask's cached index maps depend on: identity, in-place version and
        size of every index tensor, the scales and the skipped blocks (a changed mask
        gets new maps)."""
        return (tuple((n, id(t), getattr(t, "_version", None), getattr(t, "numel", lambda: None)())
                      for n, t in self.indices.items()),
                tuple((n, (id(s), s._version) if isinstance(s, torch.Tensor) else s) for n, s in self.scale.items()),
                self.skip)

    def scale_of(self, group: UnitGroup) -> float | torch.Tensor:
        """The group's scale: a float, or the ``(k_g,)`` tensor of per-unit scales."""
        s = self.scale.get(group.name, 1.0)
        return s if isinstance(s, torch.Tensor) and s.dim() == 1 else float(s)

    def validate(self, groups: Iterable[UnitGroup]) -> None:
        """Check the mask against ``groups``.

        Raises
        ------
        ValueError
            Naming the group when it is unknown, its indices are not a sorted unique
            1-D int64 tensor within ``[0, size)``, or its scale is not finite and > 0;
            naming the block when a ``block_scale`` is not finite and > 0 or belongs to
            a skipped block.
        """
        by_name = {g.name: g for g in groups}
        for name in set(self.indices) | set(self.scale):
            if name not in by_name:
                raise ValueError(f"mask names unknown unit group '{name}'")
        for name, idx in self.indices.items():
            size = by_name[name].size
            if not isinstance(idx, torch.Tensor) or idx.dtype != torch.int64 or idx.dim() != 1:
                raise ValueError(f"mask['{name}'] must be a 1-D int64 tensor")
            if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= size):
                raise ValueError(
                    f"mask['{name}'] has an index out of range [0, {size}): "
                    f"min {int(idx.min())}, max {int(idx.max())}"
                )
            if idx.numel() > 1 and not bool((idx[1:] > idx[:-1]).all()):
                raise ValueError(f"mask['{name}'] indices must be sorted and unique")
        for name, s in self.scale.items():
            if isinstance(s, torch.Tensor) and s.dim() == 1:
                k = len(self.kept(by_name[name]))
                if s.numel() != k or not s.is_floating_point():
                    raise ValueError(f"mask scale['{name}'] must be a float tensor of shape ({k},) (one per kept "
                                     f"unit), got {s.dtype} {tuple(s.shape)}")
                if not bool(torch.isfinite(s).all() & (s > 0).all()):
                    raise ValueError(f"mask scale['{name}'] must be finite and > 0 for every unit")
                continue
            if not (float(s) > 0 and float(s) < float("inf")):
                raise ValueError(f"mask scale['{name}'] must be finite and > 0, got {s}")
        for name, s in self.block_scale.items():
            if name in self.skip:
                raise ValueError(f"mask block_scale['{name}']: the block is skipped, only a kept block has a scale")
            if isinstance(s, bool) or not isinstance(s, (int, float)) or not 0 < float(s) < float("inf"):
                raise ValueError(f"mask block_scale['{name}'] must be a finite number > 0, got {s!r}")

    def coverage(self, groups: Iterable[UnitGroup]) -> float:
        """Fraction of all units (over every group) that this mask keeps."""
        return coverage([self], groups)


def coverage(masks: Iterable[Mask], groups: Iterable[UnitGroup]) -> float:
    """Fraction of all units (over every group) kept by at least one of ``masks``.

    1.0 for a model without unit groups (nothing can be left out).
    """
    groups, masks = list(groups), list(masks)
    total = sum(g.size for g in groups)
    if total == 0:
        return 1.0
    held = 0
    for g in groups:
        seen = torch.zeros(g.size, dtype=torch.bool)
        for m in masks:
            seen[m.kept(g)] = True
        held += int(seen.sum())
    return held / total


def full_mask(groups: Iterable[UnitGroup]) -> Mask:
    """The mask that keeps every unit with scale 1 (FedAvg)."""
    return Mask({g.name: torch.arange(g.size) for g in groups})
