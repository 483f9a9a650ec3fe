"""Even-coverage sampling: each round's sub-models cover every unit equally often.

FedEcover (ICDE 2025) draws the units of a round's clients *without replacement* across
clients, so that every unit is trained by as many clients as any other (up to one),
instead of Binomial(n, ξ) as with independent Bernoulli masks, where a unit may be held
by no client at all. Construction here: one random permutation ``π`` of the group's units
per round (seeded by run seed and server round); client slot ``i`` keeps the
``k = ⌈ξ·size⌉`` consecutive positions ``π[(i·k + j) mod size]``, ``j < k`` (a deal around
the circle). Each client then holds exactly ``k`` distinct units, and over ``n`` clients
each unit is held ``⌊n·k/size⌋`` or ``⌈n·k/size⌉`` times. The server step size of FedEcover
is the masked FedAvgM with momentum 0 (:class:`~fl_subnet.core.server_opt.MaskedFedAvgM`:
``W ← W + η·(A − W)`` on held entries).
"""

from __future__ import annotations

import torch

from .masks import Mask
from .holders import check_min_holders
from .samplers import MaskSampler, check_keep_prob, generator_for, prefix_size, top_up


class EvenCoverageSampler(MaskSampler):
    """Masks that split each group's units evenly over a round's client slots.

    Parameters
    ----------
    keep_prob : float
        ξ ∈ (0, 1]: every client keeps ``k = ⌈ξ·size⌉`` units of each group (at least 1).
    scale : bool
        Multiply kept units' output by 1/ξ (inverted dropout), as :class:`BernoulliSampler`.
    seed : int
        Run seed.
    min_holders : int
        k ≥ 1 (``min-holders``): units dealt to fewer than ``min(k, num_masks)`` slots are
        added to randomly chosen other slots (:func:`~fl_subnet.core.holders.top_up_holders`),
        at the same 1/ξ scale, as :class:`BernoulliSampler` does; such a slot then holds
        more than ``⌈ξ·size⌉`` units. 1 (default): the deal as is.

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
        gen = generator_for(self.seed, server_round, -3)  # one draw per round, shared by the slots
        perms = {g.name: torch.randperm(g.size, generator=gen) for g in groups}
        s = 1.0 / self.keep_prob if self.scale else 1.0
        masks = []
        for slot in range(num_masks):
            idx = {}
            for g in groups:
                k = prefix_size(g.size, self.keep_prob)
                pos = (slot * k + torch.arange(k)) % g.size
                idx[g.name] = torch.sort(perms[g.name][pos]).values
            masks.append(Mask(idx, {g.name: s for g in groups}))
        return top_up(self, masks, groups, server_round)
