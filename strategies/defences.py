"""The reply defences of a round, as one object: norm screening and the weight cap.

Every defence is off by default; with all of them off the aggregation is exactly Flower's
FedAvg rule on the held entries, and with them on, a round in which nothing is screened or
capped is bit-identical to one without them (docs/reliability.md, "Rogue nodes").
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from fl_subnet.core.robust import SCREEN_MODES, cap_weight, screen_update

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Defences:
    """Bounds every reply must meet before the aggregation rule folds it in.

    Parameters
    ----------
    max_update_ratio : float, optional
        Screen every reply: its update norm ``‖W_c − W_k[slice]‖ / ‖W_k[slice]‖``
        (:func:`fl_subnet.core.robust.update_ratio`) above this bound is rejected or
        clipped (``screen``).
    max_ratio_to_median : float, optional
        Screen replies whose ratio exceeds this many times the round's median ratio. A
        round with fewer than :attr:`MIN_REPLIES_FOR_MEDIAN` parsed replies (a median of
        one or two does not tell a scaled update from an honest one) takes the median
        over its ratios together with the accepted ratios of earlier rounds (the latest
        :attr:`HISTORY`), so runs of one or two nodes per round (dropout, IST with p = 2)
        are screened from their second round; only a first round that has too few is not.
    screen : {"reject", "clip"}
        What screening does to a reply over the bound: drop it, or scale its update down
        to the bound (norm clipping, Sun et al. 2019, §4).
    max_num_examples : float, optional
        Cap on a reply's self-reported ``num-examples`` weight (e.g. the largest
        partition size the operator knows): one node cannot buy unbounded weight.
    min_cosine : float, optional
        Direction screening: a reply whose update's cosine to the round's robust centre
        (the geometric median of the parsed replies' updates,
        :func:`fl_subnet.core.robust_distance.geometric_median`), over the entries it
        holds, is below this bound in [-1, 1] is rejected
        (:func:`fl_subnet.core.robust_distance.update_cosines`; FLTrust's cosine test,
        Cao et al., NDSS 2021, §4, against the robust centre instead of a server update).
        Needs at least :attr:`MIN_REPLIES_FOR_MEDIAN` replies in the round: a centre of
        one or two does not tell the rogue from the honest.

    Raises
    ------
    ValueError
        If a bound is not a finite number > 0, or ``screen`` is not one of
        :data:`~fl_subnet.core.robust.SCREEN_MODES` (the message names the key).
    """

    max_update_ratio: float | None = None
    max_ratio_to_median: float | None = None
    screen: str = "reject"
    max_num_examples: float | None = None
    min_cosine: float | None = None

    #: Ratios needed for ``max_ratio_to_median`` to act.
    MIN_REPLIES_FOR_MEDIAN = 3
    #: Accepted ratios of earlier rounds that complete a round with too few replies.
    HISTORY = 32

    def __post_init__(self) -> None:
        if self.screen not in SCREEN_MODES:
            raise ValueError(f"screen must be one of {SCREEN_MODES}, got {self.screen!r}")
        for key in ("max_update_ratio", "max_ratio_to_median"):
            if getattr(self, key) is not None:
                screen_update({}, {}, getattr(self, key), self.screen)  # ValueError naming max_ratio
        cap_weight(1.0, self.max_num_examples)  # ValueError naming cap
        if self.min_cosine is not None and (isinstance(self.min_cosine, bool)
                                            or not isinstance(self.min_cosine, (int, float))
                                            or not -1.0 <= self.min_cosine <= 1.0):
            raise ValueError(f"min-cosine must be a number in [-1, 1], got {self.min_cosine!r}")

    @property
    def screening(self) -> bool:
        """Whether replies are screened (their update ratio is needed)."""
        return self.max_update_ratio is not None or self.max_ratio_to_median is not None

    def median_pool(self, ratios: Sequence[float], history: Sequence[float] = ()) -> list[float]:
        """The ratios the median bound is taken over: the round's when it has at least
        :attr:`MIN_REPLIES_FOR_MEDIAN`, else the round's with the latest :attr:`HISTORY`
        accepted ratios of earlier rounds (empty when even those are too few)."""
        pool = list(ratios) if len(ratios) >= self.MIN_REPLIES_FOR_MEDIAN else \
            list(history)[-self.HISTORY:] + list(ratios)
        return pool if len(pool) >= self.MIN_REPLIES_FOR_MEDIAN else []

    def bound(self, ratios: Sequence[float], history: Sequence[float] = ()) -> float | None:
        """The round's bound on the update ratio, given every parsed reply's ratio and the
        accepted ratios of earlier rounds: ``max_update_ratio``, lowered to
        ``max_ratio_to_median`` × the median of :meth:`median_pool`; ``None`` when
        nothing bounds it."""
        bound = self.max_update_ratio
        pool = self.median_pool(ratios, history) if self.max_ratio_to_median is not None else []
        if pool:
            median = float(torch.tensor(pool, dtype=torch.float64).median())
            bound = min(bound if bound is not None else float("inf"), self.max_ratio_to_median * median)
        return bound

    def apply(self, compact: Mapping[str, torch.Tensor], base: Mapping[str, torch.Tensor] | None, ratio: float,
              bound: float | None) -> tuple[Mapping[str, torch.Tensor], bool]:
        """A reply under the round's ``bound``: unchanged, or clipped (``(state, True)``).

        Raises
        ------
        ValueError
            If it is over the bound and ``screen`` is ``reject``.
        """
        if bound is None or ratio <= bound:
            return compact, False
        compact, _, clipped = screen_update(compact, base, bound, self.screen)
        return compact, clipped

    def weight(self, weight: float) -> float:
        """A reply's weight under ``max_num_examples``."""
        return cap_weight(weight, self.max_num_examples)

    def __bool__(self) -> bool:
        return self.screening or self.max_num_examples is not None or self.min_cosine is not None


NO_DEFENCES = Defences()
