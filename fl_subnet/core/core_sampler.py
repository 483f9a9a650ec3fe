"""Core-subnetwork alternation: rounds alternate between one fixed core and the full model.

The core is the nested prefix of width ``core_fraction`` of every unit group (the first
``⌈f·size⌉`` units, :func:`~fl_subnet.core.samplers.prefix_size`): the same sub-model a
HeteroFL node of capacity ``f`` trains, so after training it splits off as a capacity
tier (:func:`fl_subnet.tiers.extract_submodel` with ``capacity=f``) and runs alone.
A prefix rather than a seeded random subset keeps the core a plain slice of leading
rows/columns, which any tool can cut without the mask.
"""

from __future__ import annotations

from .masks import Mask, full_mask
from .samplers import MaskSampler, NestedPrefixSampler, check_keep_prob


def check_period(period: int, key: str = "core-period") -> int:
    """Return ``period`` as int; ``ValueError`` naming ``key`` unless an int ≥ 2."""
    if isinstance(period, bool) or not isinstance(period, int) or period < 2:
        raise ValueError(f"{key} must be an integer >= 2 (period - 1 core rounds, then one full round), "
                         f"got {period!r}")
    return int(period)


class CoreAlternationSampler(MaskSampler):
    """Every node gets the same core mask in core rounds and the full model otherwise.

    Server round ``k`` (numbered from 1) is a *core round* iff ``k mod period != 0``:
    with ``period = 2`` rounds 1, 3, 5, … train the core and rounds 2, 4, … the full
    model; with ``period = p``, ``p − 1`` core rounds precede each full round. The
    schedule depends on the round number only (no randomness), so a resumed run keeps it.

    Parameters
    ----------
    core_fraction : float
        ``f`` in (0, 1]: every group's core is its first ``⌈f·size⌉`` units.
    period : int
        ``p ≥ 2``, the length of one core…full cycle in rounds.
    scale : bool
        Multiply the core's kept outputs by ``1/f`` in core rounds (HeteroFL's scaler).
        Default False: the core then trains exactly the function it computes once split
        off (:func:`fl_subnet.tiers.extract_submodel` with ``scale=False``).
    seed : int
        Unused (the schedule is deterministic); kept for the sampler interface.

    Raises
    ------
    ValueError
        Naming ``core-fraction`` outside (0, 1] or ``core-period`` not an integer ≥ 2.
    """

    def __init__(self, core_fraction: float = 0.5, period: int = 2, scale: bool = False, seed: int = 0) -> None:
        super().__init__(seed)
        self.core_fraction = check_keep_prob(core_fraction, "core-fraction")
        self.period = check_period(period)
        self.scale = bool(scale)

    def is_core_round(self, server_round: int) -> bool:
        """Whether round ``server_round`` trains the core (``server_round mod period != 0``)."""
        return int(server_round) % self.period != 0

    def core_mask(self, groups) -> Mask:
        """The fixed core: the first ``⌈f·size⌉`` units of every group."""
        return NestedPrefixSampler(1.0, scale=self.scale).sample(groups, 0, 1, capacities=[self.core_fraction])[0]

    def sample(self, groups, server_round, num_masks):
        mask = self.core_mask(groups) if self.is_core_round(server_round) else full_mask(groups)
        return [mask for _ in range(num_masks)]
