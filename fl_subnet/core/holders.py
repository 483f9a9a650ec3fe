"""Redundancy for masked protocols: at least ``k`` holders for every unit of a round.

The robust aggregation rules (coordinate-wise median, trimmed mean, centered clipping;
:mod:`fl_subnet.core.robust`, :mod:`fl_subnet.core.robust_direction`) compare the values
the holders of an entry sent; a unit with one holder gives them nothing to compare.
Run-config key ``min-holders`` (strategy argument ``min_holders``) asks for ``k`` holders:

* IST (:class:`~fl_subnet.core.samplers.PartitionSampler`): node slot ``i`` trains part
  ``i mod p``, so ``n`` nodes give every part ``⌊n/p⌋`` or ``⌈n/p⌉`` holders, and ``k``
  holders need ``n ≥ k·p`` nodes a round (the strategy asks for that many);
* federated dropout (:class:`~fl_subnet.core.samplers.BernoulliSampler`,
  :class:`~fl_subnet.core.coverage.EvenCoverageSampler`): after the round's masks are
  drawn, :func:`top_up_holders` adds every unit with fewer than ``min(k, n)`` holders to
  the masks of randomly chosen nodes that do not hold it yet.

``k = 1`` (the default) changes nothing: the masks are those drawn without the option
(so a Bernoulli mask may still leave a unit with no holder in a round).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence

import numpy as np
import torch

from .groups import UnitGroup
from .masks import Mask

log = logging.getLogger(__name__)

#: ``generator_for`` slot of a round's top-up draw (-1: IST partition, -2: node sample,
#: -3: even coverage / HeteroFL-dynamic capacities, -5: bucketing).
TOP_UP_SLOT = -6


def check_min_holders(value: object, key: str = "min-holders") -> int:
    """``value`` as an int; ``ValueError`` naming ``key`` unless an integer ≥ 1.

    Raises
    ------
    ValueError
        If ``value`` is not an integer (a bool, a float, a string) or is below 1.
    """
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{key} must be an integer >= 1, got {value!r}")
    return int(value)


def holder_counts(masks: Sequence[Mask], groups: Sequence[UnitGroup]) -> dict[str, torch.Tensor]:
    """Number of masks that keep each unit: group name → int64 tensor of shape ``(size,)``."""
    counts = {}
    for g in groups:
        c = torch.zeros(g.size, dtype=torch.int64)
        for m in masks:
            c[m.kept(g)] += 1
        counts[g.name] = c
    return counts


def top_up_holders(masks: Sequence[Mask], groups: Sequence[UnitGroup], min_holders: int,
                   gen: torch.Generator) -> list[Mask]:
    """Masks in which every unit of every group is held by at least ``min(min_holders, len(masks))``.

    For each unit with ``h`` holders below that target ``t``, ``t - h`` of the masks that do
    not keep it are chosen uniformly at random (one uniform key per mask and short unit,
    drawn from ``gen``, the smallest keys win) and the unit is added to them. Masks that
    gain nothing are returned as they are (the same objects); the others are copies with
    the added units in their sorted indices and the same per-group scale, so an added unit
    is trained at the scale of the mask's other units (``1/ξ`` for inverted dropout).

    Parameters
    ----------
    masks : Sequence[Mask]
        The round's masks, one per node slot.
    groups : Sequence[UnitGroup]
        The unit groups the masks cover.
    min_holders : int
        k ≥ 1; 1 returns ``masks`` unchanged when every unit has a holder.
    gen : torch.Generator
        The round's top-up generator (``generator_for(seed, server_round, TOP_UP_SLOT)``):
        the additions depend only on it and on ``masks``.

    Returns
    -------
    list[Mask]
        One mask per input mask, in the same order.

    Raises
    ------
    ValueError
        If ``min_holders`` is not an integer ≥ 1 (naming ``min-holders``), or a mask that
        needs a unit added has per-unit scales (a 1-D tensor) for that group: the added
        unit would have no scale of its own.
    """
    k = check_min_holders(min_holders)
    out = list(masks)
    n = len(out)
    target = min(k, n)
    if target == 0:
        return out
    added: dict[int, dict[str, torch.Tensor]] = {}
    for g in groups:
        held = torch.zeros(n, g.size, dtype=torch.bool)
        for i, m in enumerate(out):
            held[i, m.kept(g)] = True
        short = torch.nonzero(held.sum(0) < target).flatten()
        if short.numel() == 0:
            continue
        sub = held[:, short]
        keys = torch.rand(n, short.numel(), generator=gen)
        keys[sub] = 2.0  # holders after every non-holder (keys are in [0, 1))
        rank = torch.empty_like(keys, dtype=torch.int64)
        rank.scatter_(0, torch.argsort(keys, dim=0), torch.arange(n).unsqueeze(1).expand(n, short.numel()))
        deficit = target - sub.sum(0)
        add = (rank < deficit) & ~sub  # the `deficit` non-holders with the smallest keys
        for i in torch.nonzero(add.any(1)).flatten().tolist():
            added.setdefault(i, {})[g.name] = short[add[i]]
    for i, extra in added.items():
        m = out[i]
        indices = dict(m.indices)
        for g in groups:
            if g.name not in extra:
                continue
            s = m.scale.get(g.name)
            if isinstance(s, torch.Tensor) and s.dim() == 1:
                raise ValueError(f"min-holders cannot add units to group '{g.name}' of a mask with per-unit scales")
            indices[g.name] = torch.sort(torch.cat([m.kept(g), extra[g.name]])).values
        out[i] = dataclasses.replace(m, indices=indices)
    if added:
        log.debug("min-holders %d: added units to %d of %d masks", k, len(added), n)
    return out


__all__ = ["TOP_UP_SLOT", "check_min_holders", "holder_counts", "top_up_holders"]
