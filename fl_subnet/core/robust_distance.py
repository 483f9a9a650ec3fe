"""Masked robust rules built on distances between whole updates: the geometric median
(smoothed Weiszfeld) and Multi-Krum, and the cosine of an update to a robust centre
(direction screening).

Like :mod:`fl_subnet.core.robust_direction`, the rules work on UPDATES
``Δ_i = W_i − W_k[slice_i]`` over the entries ``S_i`` reply ``i`` holds (float64), and
are unweighted, as in their papers and the reference code (a reply's ``num-examples`` is
its own claim):

* :class:`MaskedGeometricMedian` (``aggregation = "geometric-median"``): RFA, Pillutla,
  Kakade & Harchaoui, "Robust Aggregation for Federated Learning", IEEE Trans. Signal
  Processing 70, 2022, Algorithm 3 (smoothed Weiszfeld); ported from
  ``smoothed_weiszfeld`` of epfml/byzantine-robust-noniid-optimizer
  (``codes/aggregator/rfa.py``), whose experiments use ``RFA(T=8)`` with ``nu=0.1``.
* :class:`MaskedMultiKrum` (``aggregation = "multi-krum"``): Blanchard, El Mhamdi,
  Guerraoui & Stainer, "Machine Learning with Adversaries: Byzantine Tolerant Gradient
  Descent", NeurIPS 2017, §4 (Krum's score, and Multi-Krum: the mean of the m best);
  ported from ``multi_krum`` / ``_compute_scores`` of the same repository
  (``codes/aggregator/krum.py``), with two documented differences (see the class).
* :func:`update_cosines`: each update's cosine to a centre over the entries it holds, for
  the strategy's direction screening (``min-cosine``) against the geometric median of the
  round's updates; the cosine test of FLTrust (Cao, Fang, Liu & Gong, NDSS 2021, §4),
  with the robust centre in place of a server-side root-data update.

Pure torch; no Flower import.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence

import torch

from .robust_direction import Point, WholeUpdateRule, holder_sums
from .slicing import Slicer

log = logging.getLogger(__name__)

#: Default iterations T of the smoothed Weiszfeld algorithm (the reference's experiments:
#: ``utils._get_aggregator``: ``RFA(T=8)``).
WEISZFELD_ITERATIONS = 8
#: Default smoothing ν (the reference's ``RFA.__init__`` default ``nu=0.1``).
WEISZFELD_SMOOTHING = 0.1
#: Entries of the float64 blocks :func:`krum_scores` builds the Gram matrix from (n rows of
#: ⌊KRUM_CHUNK / n⌋ entries: 128 MiB).
KRUM_CHUNK = 1 << 24
#: ``krum-rogues`` value meaning "as many as Multi-Krum tolerates": ⌊(n − 3) / 2⌋.
KRUM_ROGUES_AUTO = -1


def check_weiszfeld_iterations(value: object) -> int:
    """``weiszfeld-iterations`` as an int; ``ValueError`` naming the key unless ≥ 1."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"weiszfeld-iterations must be an integer >= 1, got {value!r}")
    return int(value)


def check_weiszfeld_smoothing(value: object) -> float:
    """``weiszfeld-smoothing`` as a float; ``ValueError`` naming the key unless finite and > 0."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) \
            or not (math.isfinite(value) and value > 0):
        raise ValueError(f"weiszfeld-smoothing must be a finite number > 0, got {value!r}")
    return float(value)


def check_krum_rogues(value: object) -> int:
    """``krum-rogues`` as an int; ``ValueError`` naming the key unless an integer ≥ 0 or
    :data:`KRUM_ROGUES_AUTO` (-1)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < KRUM_ROGUES_AUTO:
        raise ValueError(f"krum-rogues must be an integer >= 0, or -1 (as many as Multi-Krum tolerates), "
                         f"got {value!r}")
    return int(value)


def _distances(points: Sequence[Point], z: Mapping[str, torch.Tensor]) -> list[float]:
    """``‖Δ_i − z‖_{S_i}``: each point's Euclidean distance to ``z`` over the entries it holds."""
    return [math.sqrt(sum(float((d - z[key][idx]).square().sum()) for key, (idx, d) in p.items()))
            for p in points]


def geometric_median(points: Sequence[Point], numels: Mapping[str, int],
                     iterations: int = WEISZFELD_ITERATIONS, smoothing: float = WEISZFELD_SMOOTHING
                     ) -> tuple[dict[str, torch.Tensor], list[float]]:
    """Masked smoothed Weiszfeld (Pillutla et al. 2022, Algorithm 3, uniform weights).

    Starting from ``z = 0`` (the reference's ``torch.zeros_like(inputs[0])``),
    ``iterations`` times::

        β_i = (1/n) / max(ν, ‖Δ_i − z‖_{S_i})
        z[e] = Σ_{i holds e} β_i Δ_i[e] / Σ_{i holds e} β_i        (every held entry e)

    the distance of a point taken over the entries ``S_i`` it holds (all its keys
    together). With every point holding every entry this is the reference line for line:
    ``z = Σ w β / Σ β``. Entries no point holds stay 0.

    Parameters
    ----------
    points : Sequence[Point]
        The updates (see :data:`~fl_subnet.core.robust_direction.Point`).
    numels : Mapping[str, int]
        Key → number of entries ``N_k`` of the full tensor; every key of a point is here.
    iterations : int
        T ≥ 1 (``weiszfeld-iterations``).
    smoothing : float
        ν > 0 (``weiszfeld-smoothing``), in the updates' units: points closer than ν to
        ``z`` weigh as if at ν.

    Returns
    -------
    (z, distances) : tuple[dict[str, torch.Tensor], list[float]]
        ``z``: key → float64 of shape ``(N_k,)``; each point's distance to the ``z`` of
        the last iteration's start.

    Raises
    ------
    ValueError
        If ``iterations`` or ``smoothing`` is invalid (naming the key).
    """
    iterations = check_weiszfeld_iterations(iterations)
    smoothing = check_weiszfeld_smoothing(smoothing)
    z = {key: torch.zeros(n, dtype=torch.float64) for key, n in numels.items()}
    dist: list[float] = []
    alpha = 1.0 / max(len(points), 1)
    for _ in range(iterations):
        dist = _distances(points, z)
        betas = [alpha / max(d, smoothing) for d in dist]
        num = {key: torch.zeros(n, dtype=torch.float64) for key, n in numels.items()}
        den = {key: torch.zeros(n, dtype=torch.float64) for key, n in numels.items()}
        for p, beta in zip(points, betas):
            for key, (idx, d) in p.items():
                num[key].index_add_(0, idx, d * beta)
                den[key].index_add_(0, idx, torch.full((idx.numel(),), beta, dtype=torch.float64))
        z = {key: torch.where(den[key] > 0, num[key] / den[key].clamp(min=1e-300), z[key]) for key in z}
    return z, dist


def update_cosines(points: Sequence[Point], center: Mapping[str, torch.Tensor]) -> list[float]:
    """Each point's cosine to ``center`` over the entries it holds.

    ``cos_i = ⟨Δ_i, c[S_i]⟩ / (‖Δ_i‖ ‖c[S_i]‖)``, all keys of the point together; 1.0
    where either norm is 0 (a reply that did not move, or a centre that did not move on
    its entries: nothing to judge).

    Parameters
    ----------
    points : Sequence[Point]
        The updates.
    center : Mapping[str, torch.Tensor]
        Key → float64 of shape ``(N_k,)`` (e.g. :func:`geometric_median`'s ``z``).

    Returns
    -------
    list[float]
        One cosine in [-1, 1] per point.
    """
    out = []
    for p in points:
        dot = nd = nc = 0.0
        for key, (idx, d) in p.items():
            c = center[key][idx]
            dot += float(d @ c)
            nd += float(d @ d)
            nc += float(c @ c)
        out.append(1.0 if nd == 0.0 or nc == 0.0 else max(-1.0, min(1.0, dot / math.sqrt(nd * nc))))
    return out


def krum_rogues(num: int, rogues: int = KRUM_ROGUES_AUTO) -> int:
    """The f Multi-Krum uses with ``num`` replies: ``rogues``, or ⌊(n − 3) / 2⌋ for
    :data:`KRUM_ROGUES_AUTO`, lowered to that largest value Krum tolerates (its
    condition ``n > 2f + 2``, Blanchard et al. 2017, Proposition 1); 0 for n < 3."""
    most = max(0, (num - 3) // 2)
    f = most if rogues == KRUM_ROGUES_AUTO else min(check_krum_rogues(rogues), most)
    if rogues != KRUM_ROGUES_AUTO and rogues > most:
        log.warning("multi-krum: %d replies tolerate at most %d rogue(s) (n > 2f + 2); krum-rogues %d lowered to %d",
                    num, most, rogues, f)
    return f


def krum_scores(points: Sequence[Point], numels: Mapping[str, int], rogues: int) -> list[float]:
    """Krum's score of every point (Blanchard et al. 2017, §4), masked.

    ``score_i = Σ_{j ∈ N_i} ‖Δ_i − Δ_j‖²`` over the ``n − f − 2`` points ``N_i`` closest to
    ``i`` (none for ``n − f − 2 ≤ 0``: every score is 0), where an update is 0 on the
    entries its reply does not hold (the node did not move them): with every point
    holding every entry, the paper's score. The distances are computed per key as
    ``‖a‖² + ‖b‖² − 2⟨a, b⟩`` from the Gram matrix of the updates, built from ``n × w``
    float64 blocks of ``w = ⌊KRUM_CHUNK / n⌋`` entries (``O(n² N)`` time, at most
    :data:`KRUM_CHUNK` × 8 bytes for a block).

    Parameters
    ----------
    points : Sequence[Point]
        The updates.
    numels : Mapping[str, int]
        Key → ``N_k``.
    rogues : int
        f ≥ 0, as returned by :func:`krum_rogues`.

    Returns
    -------
    list[float]
        One score per point.
    """
    n = len(points)
    gram = torch.zeros(n, n, dtype=torch.float64)
    width = max(1, KRUM_CHUNK // max(n, 1))
    for key, numel in numels.items():
        rows = [i for i, p in enumerate(points) if key in p]
        for start in range(0, numel if rows else 0, width):
            stop = min(numel, start + width)
            x = torch.zeros(n, stop - start, dtype=torch.float64)
            for i in rows:
                idx, d = points[i][key]
                inside = (idx >= start) & (idx < stop)
                x[i, idx[inside] - start] = d[inside]
            gram += x @ x.T
    norms = gram.diagonal()
    sq = (norms[:, None] + norms[None, :] - 2 * gram).clamp(min=0.0)
    k = n - rogues - 2
    if k <= 0:
        return [0.0] * n
    scores = []
    for i in range(n):
        others = torch.cat([sq[i, :i], sq[i, i + 1:]])
        scores.append(float(others.sort().values[:k].sum()))
    return scores


def multi_krum(scores: Sequence[float], m: int) -> list[int]:
    """The indices of the ``m`` lowest scores, lowest first (ties: lower index first, as
    the reference's stable ``sorted``)."""
    return sorted(range(len(scores)), key=lambda i: scores[i])[:m]


def _holder_mean(points: Sequence[Point], numels: Mapping[str, int]) -> dict[str, torch.Tensor]:
    """Each entry's plain mean over the points that hold it (0 where none does)."""
    out = {}
    for key, n in numels.items():
        total, cnt = holder_sums(points, key, n)
        out[key] = total / cnt.clamp(min=1.0)
    return out


class MaskedGeometricMedian(WholeUpdateRule):
    """The geometric median of the replies' updates (``aggregation = "geometric-median"``).

    ``v`` = :func:`geometric_median` of the updates ``Δ_i`` over the entries each reply
    holds (smoothed Weiszfeld, uniform weights); every entry some reply held becomes
    ``W_{k+1}[e] = W_k[e] + v[e]``, an entry nobody held keeps ``W_k[e]``; integer tensors
    take the max over holders. A minority of replies, however far, moves ``v`` by a
    bounded amount (breakdown point 1/2, Pillutla et al. 2022, §3).

    Source: Pillutla, Kakade & Harchaoui, IEEE TSP 2022, Algorithm 3 (RFA); reference
    ``smoothed_weiszfeld`` (``codes/aggregator/rfa.py`` of
    epfml/byzantine-robust-noniid-optimizer): uniform ``alphas`` and ``z`` from 0, as
    there.

    Parameters
    ----------
    global_state : Mapping[str, torch.Tensor]
        ``W_k``; not modified.
    slicer : Slicer
        Coupling table of the model's unit groups.
    iterations : int
        T ≥ 1 (``weiszfeld-iterations``).
    smoothing : float
        ν > 0 (``weiszfeld-smoothing``).

    Raises
    ------
    ValueError
        If ``iterations`` or ``smoothing`` is invalid (naming the key); from
        ``add``/``check`` as :class:`~fl_subnet.core.aggregate.MaskedAggregator`.
    """

    def __init__(self, global_state: Mapping[str, torch.Tensor], slicer: Slicer,
                 iterations: int = WEISZFELD_ITERATIONS, smoothing: float = WEISZFELD_SMOOTHING) -> None:
        self.iterations = check_weiszfeld_iterations(iterations)
        self.smoothing = check_weiszfeld_smoothing(smoothing)
        super().__init__(global_state, slicer)

    def _aggregate(self, points: list[Point]) -> dict[str, torch.Tensor]:
        z, dist = geometric_median(points, self._numels(), self.iterations, self.smoothing)
        log.debug("geometric median: %d point(s), distances %s", len(points), [f"{d:.3g}" for d in dist])
        return z


class MaskedMultiKrum(WholeUpdateRule):
    """Multi-Krum over the replies' updates (``aggregation = "multi-krum"``).

    With ``n`` replies and ``f`` = :func:`krum_rogues` (``krum-rogues``), every reply gets
    :func:`krum_scores` (an update is 0 where its reply holds nothing), the ``m = n − f``
    lowest are selected (:func:`multi_krum`), and ``v[e]`` is the plain mean of the
    selected updates over the selected replies that hold ``e``: ``W_{k+1}[e] = W_k[e] +
    v[e]``. An entry only unselected replies held keeps ``W_k[e]`` (and is not in
    :meth:`held`); integer tensors take the max over all holders.

    Source: Blanchard et al., NeurIPS 2017, §4 (score) and its Multi-Krum variant (mean
    of the m best, m = n − f as in El Mhamdi, Guerraoui & Rouault, "The Hidden
    Vulnerability of Distributed Learning in Byzantium", ICML 2018); reference
    ``multi_krum`` (``codes/aggregator/krum.py`` of
    epfml/byzantine-robust-noniid-optimizer). Two differences from the reference, both
    to follow the paper: its ``_compute_scores`` squares the already squared distances
    (a sum of ``‖·‖⁴``; the paper sums ``‖·‖²``), and its ``Krum.__call__`` returns the
    SUM of the m selected inputs (its experiments use m = 1, where sum and mean agree);
    here the mean.

    Parameters
    ----------
    global_state : Mapping[str, torch.Tensor]
        ``W_k``; not modified.
    slicer : Slicer
        Coupling table of the model's unit groups.
    rogues : int
        f ≥ 0, or -1 (default): as many as the round's replies tolerate, ⌊(n − 3)/2⌋.

    Attributes
    ----------
    selected : list[int] or None
        After :meth:`finalize`: the indices (in the order replies were added) of the
        selected replies, lowest score first.

    Raises
    ------
    ValueError
        If ``rogues`` is invalid (naming ``krum-rogues``); from ``add``/``check`` as
        :class:`~fl_subnet.core.aggregate.MaskedAggregator`.
    """

    def __init__(self, global_state: Mapping[str, torch.Tensor], slicer: Slicer,
                 rogues: int = KRUM_ROGUES_AUTO) -> None:
        self.rogues = check_krum_rogues(rogues)
        super().__init__(global_state, slicer)
        self.selected: list[int] | None = None

    def _aggregate(self, points: list[Point]) -> dict[str, torch.Tensor]:
        numels = self._numels()
        f = krum_rogues(len(points), self.rogues)
        scores = krum_scores(points, numels, f)
        self.selected = self._used = multi_krum(scores, len(points) - f)
        left = sorted(set(range(len(points))) - set(self.selected))
        log.debug("multi-krum: %d point(s), f = %d, left out %s (scores %s)", len(points), f, left,
                  [f"{s:.3g}" for s in scores])
        return _holder_mean([points[i] for i in self.selected], numels)


__all__ = ["KRUM_ROGUES_AUTO", "MaskedGeometricMedian", "MaskedMultiKrum", "WEISZFELD_ITERATIONS",
           "WEISZFELD_SMOOTHING", "check_krum_rogues", "check_weiszfeld_iterations", "check_weiszfeld_smoothing",
           "geometric_median", "krum_rogues", "krum_scores", "multi_krum", "update_cosines"]
