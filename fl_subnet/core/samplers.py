"""Mask samplers: full (FedAvg), Bernoulli (dropout family), partition (IST), and the
capacity-aware nested prefixes (HeteroFL) and rolling windows (FedRolex).

Every mask comes from a ``torch.Generator`` seeded by (run seed, server round, client
slot) only (docs/design.md, "Exact semantics"): never the global ``random``/``numpy`` state, never node ids.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import numpy as np
import torch

from .groups import UnitGroup
from .holders import TOP_UP_SLOT, check_min_holders, top_up_holders
from .masks import Mask

log = logging.getLogger(__name__)

PARTITION_MODES = ("equal", "iid")


def generator_for(seed: int, server_round: int, slot: int) -> torch.Generator:
    """A CPU generator determined by ``(seed, server_round, slot)`` alone."""
    # slots < 0 are round-level draws (-1: IST partition, -2: node sample; holders.TOP_UP_SLOT)
    entropy = [int(v) % 2**64 for v in (seed, server_round, slot)]
    state = np.random.SeedSequence(entropy).generate_state(2)
    return torch.Generator(device="cpu").manual_seed(int(state[0]) << 32 | int(state[1]))


def check_keep_prob(keep_prob: float, key: str = "keep-prob") -> float:
    """Return ``keep_prob`` as float; ``ValueError`` naming ``key`` unless in (0, 1]."""
    try:
        xi = float(keep_prob)
    except (TypeError, ValueError):
        raise ValueError(f"{key} must be a number in (0, 1], got {keep_prob!r}") from None
    if not 0.0 < xi <= 1.0:
        raise ValueError(f"{key} must be in (0, 1], got {keep_prob!r}")
    return xi


def check_num_subnets(num_subnets: int, key: str = "num-subnets") -> int:
    """Return ``num_subnets`` as int; ``ValueError`` naming ``key`` unless an int ≥ 1."""
    if isinstance(num_subnets, bool) or not isinstance(num_subnets, (int, np.integer)) or num_subnets < 1:
        raise ValueError(f"{key} must be an integer >= 1, got {num_subnets!r}")
    return int(num_subnets)


class MaskSampler:
    """Base class: ``sample(groups, server_round, num_masks)`` → one mask per slot."""

    def __init__(self, seed: int = 0) -> None:
        self.seed = int(seed)

    def sample(self, groups: Sequence[UnitGroup], server_round: int, num_masks: int) -> list[Mask]:
        raise NotImplementedError


class FullSampler(MaskSampler):
    """Every client keeps every unit (FedAvg, McMahan et al. 2017)."""

    def sample(self, groups, server_round, num_masks):
        return [Mask({g.name: torch.arange(g.size) for g in groups}) for _ in range(num_masks)]


class BernoulliSampler(MaskSampler):
    """Each unit kept independently with keep probability ξ, per client.

    Dropout (Srivastava et al. 2014) and its federated and multi-sample versions
    (Liao & Kyrillidis 2022, §3; Caldas et al. 2018; Inoue 2019).

    Parameters
    ----------
    keep_prob : float
        ξ ∈ (0, 1].
    scale : bool
        Multiply kept units' output by 1/ξ (inverted dropout) when True.
    seed : int
        Run seed.
    min_holders : int
        k ≥ 1 (``min-holders``): after the round's masks are drawn, every unit held by
        fewer than ``min(k, num_masks)`` masks is added to randomly chosen masks that do not
        hold it (:func:`~fl_subnet.core.holders.top_up_holders`, drawn from
        ``generator_for(seed, server_round, TOP_UP_SLOT)``), at the same 1/ξ scale as the
        mask's other units. 1 (default): the masks as drawn, bit for bit (a unit may have
        no holder).

    Raises
    ------
    ValueError
        If ``keep_prob`` is outside (0, 1] (naming ``keep-prob``) or ``min_holders`` is not
        an integer ≥ 1 (naming ``min-holders``).
    """

    def __init__(self, keep_prob: float, scale: bool = True, seed: int = 0, min_holders: int = 1) -> None:
        super().__init__(seed)
        self.keep_prob = check_keep_prob(keep_prob)
        self.scale = bool(scale)
        self.min_holders = check_min_holders(min_holders)

    def sample(self, groups, server_round, num_masks):
        masks = []
        for slot in range(num_masks):
            gen = generator_for(self.seed, server_round, slot)
            idx = {g.name: torch.nonzero(torch.rand(g.size, generator=gen) < self.keep_prob).flatten()
                   for g in groups}
            s = 1.0 / self.keep_prob if self.scale else 1.0
            masks.append(Mask(idx, {g.name: s for g in groups}))
        return top_up(self, masks, groups, server_round)


def top_up(sampler: MaskSampler, masks: list[Mask], groups: Sequence[UnitGroup], server_round: int) -> list[Mask]:
    """``masks`` with every unit held at least ``min(sampler.min_holders, len(masks))`` times
    (:func:`~fl_subnet.core.holders.top_up_holders`); ``masks`` itself when ``min_holders`` is 1."""
    k = getattr(sampler, "min_holders", 1)
    if k <= 1:
        return masks
    if len(masks) < k and not getattr(sampler, "_warned_few", False):
        sampler._warned_few = True
        log.warning("min-holders %d: round %d has only %d nodes, so every unit gets %d holders", k,
                    server_round, len(masks), len(masks))
    return top_up_holders(masks, groups, k, generator_for(sampler.seed, server_round, TOP_UP_SLOT))


class PartitionSampler(MaskSampler):
    """Disjoint random partition of each group's units into ``p`` parts (IST).

    Independent Subnetwork Training (Yuan et al., VLDB 2022); Liao & Kyrillidis 2022,
    §3 (categorical masks). Slot ``i`` receives part ``i mod p`` of one partition drawn
    per server round, so ``p`` clients together hold every unit exactly once.

    Parameters
    ----------
    num_subnets : int
        p ≥ 1.
    mode : {"equal", "iid"}
        ``equal``: shuffle, then ``p`` blocks whose sizes differ by at most one;
        ``iid``: each unit picks its part uniformly (the paper's code).
    scale : float
        Output scale of kept units: 1 (IST's original code) or ``p`` (= 1/ξ).
    min_holders : int
        k ≥ 1 (``min-holders``): every part is meant for at least ``k`` slots, which slot
        ``i`` → part ``i mod p`` gives with ``num_masks ≥ k·p``. With fewer masks
        :meth:`sample` logs a warning (once) and deals them as always: each part then
        has ``⌊num_masks/p⌋`` or ``⌈num_masks/p⌉`` holders, the most possible. The masks
        never depend on ``k``. The IST strategy asks for ``k·p`` nodes a round and
        refuses fewer at construction.

    The slots of one part get one and the same :class:`Mask` object.

    Raises
    ------
    ValueError
        If ``num_subnets`` < 1, ``mode`` is unknown, ``scale`` ≤ 0 or ``min_holders`` is not
        an integer ≥ 1 (naming ``min-holders``).
    """

    def __init__(self, num_subnets: int, mode: str = "equal", scale: float = 1.0, seed: int = 0,
                 min_holders: int = 1):
        super().__init__(seed)
        self.num_subnets = check_num_subnets(num_subnets)
        self.min_holders = check_min_holders(min_holders)
        if mode not in PARTITION_MODES:
            raise ValueError(f"partition-mode must be one of {PARTITION_MODES}, got {mode!r}")
        if not float(scale) > 0:
            raise ValueError(f"scale must be > 0, got {scale!r}")
        self.mode = mode
        self.scale = float(scale)

    def parts(self, group: UnitGroup, gen: torch.Generator) -> torch.Tensor:
        """Part id of each unit, shape ``(size,)`` int64 in ``[0, p)``."""
        p = self.num_subnets
        if self.mode == "iid":
            return torch.randint(0, p, (group.size,), generator=gen)
        part = torch.empty(group.size, dtype=torch.int64)
        part[torch.randperm(group.size, generator=gen)] = torch.arange(group.size) * p // max(group.size, 1)
        return part

    def sample(self, groups, server_round, num_masks):
        need = self.min_holders * self.num_subnets
        if self.min_holders > 1 and num_masks < need and not getattr(self, "_warned_few", False):
            self._warned_few = True
            log.warning("min-holders %d with num-subnets %d needs %d nodes a round; round %d has %d: each part "
                        "gets %d or %d holders", self.min_holders, self.num_subnets, need, server_round, num_masks,
                        num_masks // self.num_subnets, -(-num_masks // self.num_subnets))
        gen = generator_for(self.seed, server_round, -1)
        parts = {g.name: self.parts(g, gen) for g in groups}
        # the slots of one part share its Mask (masks are read-only): what is computed
        # per mask (index maps, compact shapes, the server's slice) is computed once per part
        per_part = [Mask({g.name: torch.nonzero(parts[g.name] == part).flatten() for g in groups},
                         {g.name: self.scale for g in groups})
                    for part in range(min(self.num_subnets, num_masks))]
        return [per_part[slot % self.num_subnets] for slot in range(num_masks)]


def prefix_size(size: int, capacity: float) -> int:
    """Units a sub-model of width ``capacity`` keeps of a group of ``size``: ``⌈capacity·size⌉``,
    at least 1 (HeteroFL's ``int(np.ceil(rate * size))``)."""
    return max(1, min(size, math.ceil(float(capacity) * size - 1e-9)))


class CapacitySampler(MaskSampler):
    """Base of the width-heterogeneous samplers: one mask per slot from that node's capacity.

    ``sample(groups, server_round, num_masks, capacities)`` takes one capacity
    ``r ∈ (0, 1]`` per slot (the share of every group's units the node can train);
    a missing one (``None``) is ``default_capacity``.

    Parameters
    ----------
    default_capacity : float
        Capacity of a node that declared none.
    scale : bool
        Multiply kept units' output by ``1/r`` while training (HeteroFL's "scaler").
    seed : int
        Run seed (unused by deterministic windows).
    rank_scale : bool
        Apply that scaler to LoRA rank groups too (kind ``"ranks"``). Default False: a
        node's adapter keeps the full adapter's scale ``lora_alpha / r_max`` whatever ranks
        it keeps, so that its compact adapter is a slice of the global one (docs/lora.md,
        "The scale of a node's adapter"); True gives ``lora_alpha / r_k`` in effect
        (``r_max / r_k`` = ``1/r`` when ``r·r_max`` is whole).

    Raises
    ------
    ValueError
        If a capacity is outside (0, 1] (naming ``capacity``).
    """

    node_aware = True

    def __init__(self, default_capacity: float = 1.0, scale: bool = False, seed: int = 0, *,
                 rank_scale: bool = False) -> None:
        super().__init__(seed)
        self.default_capacity = check_keep_prob(default_capacity, "capacity")
        self.scale = bool(scale)
        self.rank_scale = bool(rank_scale)

    def capacities(self, num_masks: int, capacities: Sequence[float | None] | None) -> list[float]:
        caps = list(capacities) if capacities is not None else [None] * num_masks
        if len(caps) != num_masks:
            raise ValueError(f"got {len(caps)} capacities for {num_masks} masks")
        return [self.default_capacity if c is None else check_keep_prob(c, "capacity") for c in caps]

    def window(self, group: UnitGroup, server_round: int, k: int) -> torch.Tensor:
        """The ``k`` units of ``group`` a node keeps in ``server_round``: sorted int64
        ``(k,)``, a function of the arguments only (no random draw)."""
        raise NotImplementedError

    def sample(self, groups, server_round, num_masks, capacities=None):
        """One mask per slot from its capacity; slots of equal capacity share one
        :class:`Mask` object (masks are read-only; :meth:`window` is a function of its
        arguments), so what is computed per mask is computed once per capacity."""
        caps = self.capacities(num_masks, capacities)
        by_capacity: dict[float, Mask] = {}
        for r in caps:
            if r not in by_capacity:
                idx = {g.name: self.window(g, server_round, prefix_size(g.size, r)) for g in groups}
                scales = {g.name: (1.0 / r if self.scale and (self.rank_scale or g.kind != "ranks") else 1.0)
                          for g in groups}
                # the reference's Scaler sits before the norm
                by_capacity[r] = Mask(idx, scales, scale_before_norm=True)
        return [by_capacity[r] for r in caps]


class NestedPrefixSampler(CapacitySampler):
    """The first ``⌈r·size⌉`` units of every group for a node of capacity ``r``.

    HeteroFL (Diao et al., ICLR 2021, §3.1): a fixed sub-model per capacity level, the
    smaller ones nested in the larger (``scale=True``: the 1/r scaler of §3.2).
    """

    def window(self, group, server_round, k):
        return torch.arange(k)


class RollingWindowSampler(CapacitySampler):
    """A window of ``k = ⌈r·size⌉`` units that rolls by one unit per server round.

    FedRolex (Alam et al., NeurIPS 2022, Eq. 3): the sub-model of round ``t`` keeps units
    ``(t + j) mod size`` for ``j < k`` (``roll(arange(size), -t)[:k]``, sorted), so over
    ``size`` consecutive rounds every unit is trained exactly ``k`` times.
    """

    def window(self, group, server_round, k):
        return torch.sort((torch.arange(k) + int(server_round)) % group.size).values
