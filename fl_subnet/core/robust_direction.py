"""Masked robust rules that look at a reply's direction and size together: centered
clipping and bucketing.

The coordinate-wise rules of :mod:`fl_subnet.core.robust` look at one entry at a time.
When sub-models overlap little, an entry has one or two holders, and a rogue reply that
points the wrong way (the negated mean of the honest updates, a scaled sign flip) but whose
norm passes the norm screening is folded in as it is. The rules here clip a reply's whole
update, all its held entries together:

* :class:`MaskedCenteredClip` (``aggregation = "centered-clip"``): centered clipping,
  Karimireddy, He & Jaggi, "Learning from History for Byzantine Robust Optimization",
  ICML 2021, Algorithm 2; ported from ``Clipping.__call__`` of the authors' repository
  epfml/byzantine-robust-noniid-optimizer (``codes/aggregator/clipping.py``).
* :class:`MaskedBucketing` (``aggregation = "bucketing"``): Karimireddy, He & Jaggi,
  "Byzantine-Robust Learning on Heterogeneous Datasets via Bucketing", ICLR 2022,
  Algorithm 1, with centered clipping as the base rule; ported from
  ``bucketing_wrapper`` of the same repository (``utils.py``).

Both work on UPDATES ``Δ_i = W_i − W_k[slice_i]`` over the entries ``S_i`` reply ``i``
holds, in float64. Everything is unweighted, as in the papers and the reference code (a
reply's ``num-examples`` is its own claim). Pure torch; no Flower import.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence

import torch

from .aggregate import MaskedAggregator
from .flat import FlatMap
from .robust import _RobustAggregator
from .samplers import generator_for
from .masks import Mask
from .slicing import Slicer

log = logging.getLogger(__name__)

#: Default iterations L of centered clipping: the reference's experiments
#: (``utils._get_aggregator``: ``Clipping(tau=tau, n_iter=3)``).
CLIP_ITERATIONS = 3
#: Default bucket size s (the reference's experiments: ``--bucketing 2``).
BUCKET_SIZE = 2
#: :func:`~fl_subnet.core.samplers.generator_for` slot of the round's bucket shuffle
#: (-1: IST partition, -2: node sample, -3: capacity draw / even coverage).
BUCKET_SLOT = -5

#: One reply (or bucket) as key → ``(index, delta)``: ``index`` int64 of shape ``(n,)``,
#: the flat positions in the full tensor of the entries it holds (unique); ``delta``
#: float64 of shape ``(n,)``, its update ``W − W_k`` at those positions.
Point = dict[str, tuple[torch.Tensor, torch.Tensor]]

#: The one key of a :data:`Point` over a model's float tensors laid end to end
#: (:meth:`WholeUpdateRule.use_flat`).
WHOLE = "<whole>"


def check_clip_radius(value: object) -> float:
    """``clip-radius`` as a float; ``ValueError`` naming the key unless finite and ≥ 0
    (0: the round's data-driven radius, see :func:`centered_clip`)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) \
            or not (math.isfinite(value) and value >= 0):
        raise ValueError(f"clip-radius must be a finite number >= 0 (0: the median distance), got {value!r}")
    return float(value)


def check_clip_iterations(value: object) -> int:
    """``clip-iterations`` as an int; ``ValueError`` naming the key unless an integer ≥ 1."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"clip-iterations must be an integer >= 1, got {value!r}")
    return int(value)


def check_bucket_size(value: object) -> int:
    """``bucket-size`` as an int; ``ValueError`` naming the key unless an integer ≥ 1."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"bucket-size must be an integer >= 1, got {value!r}")
    return int(value)


def _median(values: Sequence[float]) -> float:
    """The median; the mean of the two middle values for an even count (as numpy)."""
    s = sorted(values)
    h = len(s)
    return s[(h - 1) // 2] if h % 2 else (s[h // 2 - 1] + s[h // 2]) / 2


def centered_clip(points: Sequence[Point], numels: Mapping[str, int],
                  center: Mapping[str, torch.Tensor] | None = None, radius: float = 0.0,
                  iterations: int = CLIP_ITERATIONS) -> tuple[dict[str, torch.Tensor], float, int]:
    """Masked centered clipping (Karimireddy et al., ICML 2021, Algorithm 2).

    Starting from ``v_0 = center`` (0 where not given), ``iterations`` times, for every
    entry ``e`` held by ``h_e ≥ 1`` points::

        v[e] ← v[e] + (1 / h_e) Σ_{i holds e} (Δ_i[e] − v[e]) · min(1, τ / ‖Δ_i − v‖_{S_i})

    where ``‖Δ_i − v‖_{S_i}`` is the Euclidean distance over the entries ``S_i`` point ``i``
    holds (all its keys together), every point's step computed from the same ``v`` (the
    reference's ``sum(self.clip(v - self.momentum) for v in inputs) / len(inputs) +
    self.momentum``). With every point holding every entry this is the reference line for
    line. Entries no point holds keep ``v_0``.

    Parameters
    ----------
    points : Sequence[Point]
        The updates (see :data:`Point`).
    numels : Mapping[str, int]
        Key → number of entries ``N_k`` of the full tensor; every key of a point is here.
    center : Mapping[str, torch.Tensor], optional
        ``v_0``: key → tensor of ``N_k`` elements (any shape); a missing key starts at 0.
    radius : float
        τ ≥ 0. 0: the data-driven radius, the median over the points of their distance
        ``‖Δ_i − v_0‖_{S_i}`` to the start (so about half the points are clipped in the
        first iteration; with ``v_0 = 0`` the median of the update norms). Fixed for the
        iterations, as in the paper.
    iterations : int
        L ≥ 1.

    Returns
    -------
    (v, radius, clipped) : tuple[dict[str, torch.Tensor], float, int]
        ``v``: key → float64 of shape ``(N_k,)``; the radius used; how many points were
        clipped in the first iteration.

    Raises
    ------
    ValueError
        If ``radius`` or ``iterations`` is invalid (naming ``clip-radius`` /
        ``clip-iterations``), or a center tensor has the wrong number of elements.
    """
    radius = check_clip_radius(radius)
    iterations = check_clip_iterations(iterations)
    v, count = {}, {}
    for key, n in numels.items():
        start = None if center is None else center.get(key)
        if start is not None and start.numel() != n:
            raise ValueError(f"center '{key}' has {start.numel()} elements, expected {n}")
        v[key] = torch.zeros(n, dtype=torch.float64) if start is None else \
            start.detach().reshape(-1).to(device="cpu", dtype=torch.float64).clone()
        count[key] = torch.zeros(n, dtype=torch.float64)
    for p in points:
        for key, (idx, _) in p.items():
            count[key].index_add_(0, idx, torch.ones(idx.numel(), dtype=torch.float64))

    def diffs_and_norm(p: Point) -> tuple[dict[str, torch.Tensor], float]:
        diffs = {key: d - v[key][idx] for key, (idx, d) in p.items()}
        return diffs, math.sqrt(sum(float(x.square().sum()) for x in diffs.values()))

    if radius == 0.0 and points:
        radius = _median([diffs_and_norm(p)[1] for p in points])
    clipped = 0
    for it in range(iterations):
        acc = {key: torch.zeros_like(t) for key, t in v.items()}
        for p in points:
            diffs, norm = diffs_and_norm(p)
            scale = 1.0 if norm <= radius else radius / norm  # min(1, τ/‖·‖); norm > τ ≥ 0 here
            clipped += it == 0 and scale < 1.0
            for key, (idx, _) in p.items():
                acc[key].index_add_(0, idx, diffs[key] * scale)
        for key in v:
            v[key] = acc[key] / count[key].clamp(min=1.0) + v[key]
    return v, radius, clipped


def update_point(state: Mapping[str, torch.Tensor], slicer: Slicer, compact: Mapping[str, torch.Tensor],
                 mask: Mask) -> Point:
    """One reply's update ``Δ = W_c − W_k[slice]`` as a :data:`Point`.

    Parameters
    ----------
    state : Mapping[str, torch.Tensor]
        ``W_k``, the full global state.
    slicer : Slicer
        Coupling table of the model's unit groups.
    compact : Mapping[str, torch.Tensor]
        The reply's compact slice, cut from ``state`` with ``mask``; only its
        floating-point keys are used.
    mask : Mask
        The mask the slice was cut with.

    Returns
    -------
    Point
        Key → ``(index, delta)``: the flat full positions the reply holds (int64, shape
        ``(n,)``) and its update there (float64, shape ``(n,)``).
    """
    p: Point = {}
    for key, t in compact.items():
        full = state[key]
        if not full.is_floating_point():
            continue
        if key in slicer.coupled:
            idx = slicer.flat_index(key, full.shape, mask).long()
        else:
            idx = torch.arange(full.numel())
        base = full.detach().reshape(-1)[idx].to(torch.float64)  # the held entries only, then widened (exact)
        p[key] = (idx, t.detach().reshape(-1).to(device=base.device, dtype=torch.float64) - base)
    return p


def holder_sums(points: Sequence[Point], key: str, numel: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(total, count)`` of ``key`` over ``points``: per entry the sum of the updates of the
    points holding it and their number, float64 of shape ``(numel,)`` (0 where none does)."""
    total = torch.zeros(numel, dtype=torch.float64)
    count = torch.zeros(numel, dtype=torch.float64)
    for p in points:
        if key in p:
            idx, d = p[key]
            total.index_add_(0, idx, d)
            count.index_add_(0, idx, torch.ones(idx.numel(), dtype=torch.float64))
    return total, count


def bucket_order(num: int, seed: int, server_round: int) -> list[int]:
    """The round's shuffle of ``num`` replies: ``torch.randperm`` from
    ``generator_for(seed, server_round, BUCKET_SLOT)`` (never the global random state; the
    reference uses ``np.random.shuffle``)."""
    return torch.randperm(num, generator=generator_for(seed, server_round, BUCKET_SLOT)).tolist()


def bucket_means(points: Sequence[Point], numels: Mapping[str, int], order: Sequence[int],
                 bucket_size: int) -> list[Point]:
    """The bucket means of Karimireddy et al., ICLR 2022, Algorithm 1, masked.

    The points, taken in ``order``, are cut into ``T = ⌈n / s⌉`` buckets of ``s`` consecutive
    points (the last one may be smaller); bucket ``t``'s mean holds the entries some member
    holds, each the plain mean over the members that hold it (reference ``bucketing_wrapper``:
    ``g_bar = sum(inputs[i] for i in indices_slice) / len(indices_slice)``).

    Parameters
    ----------
    points : Sequence[Point]
        The updates (see :data:`Point`).
    numels : Mapping[str, int]
        Key → ``N_k``.
    order : Sequence[int]
        A permutation of ``range(len(points))`` (:func:`bucket_order`).
    bucket_size : int
        s ≥ 1.

    Returns
    -------
    list[Point]
        ``T`` points.

    Raises
    ------
    ValueError
        If ``bucket_size`` is invalid (naming ``bucket-size``) or ``order`` is not a
        permutation of the points.
    """
    s = check_bucket_size(bucket_size)
    if sorted(order) != list(range(len(points))):
        raise ValueError(f"order must be a permutation of range({len(points)}), got {list(order)!r}")
    out = []
    for start in range(0, len(points), s):
        members = [points[i] for i in order[start:start + s]]
        bucket: Point = {}
        for key, n in numels.items():
            if not any(key in m for m in members):
                continue
            total, cnt = holder_sums(members, key, n)
            held = torch.nonzero(cnt).squeeze(1)
            bucket[key] = (held, total[held] / cnt[held])
        out.append(bucket)
    return out


class WholeUpdateRule(_RobustAggregator):
    """Shared machinery of the rules that look at each reply's whole update.

    A reply becomes a :data:`Point` (its update ``Δ_i = W_i − W_k[slice_i]`` over the
    entries it holds, float64); :meth:`_aggregate` turns the points into an aggregate
    update ``v`` (key → float64 of shape ``(N_k,)``); :meth:`finalize` applies it to the
    entries the points it used held: ``W_{k+1}[e] = W_k[e] + v[e]``, every other entry
    keeps ``W_k[e]``; integer tensors take the max over holders.

    Subclasses set :attr:`keeps_center` when the next round starts from this round's
    aggregate update (centered clipping); :meth:`_aggregate` may set :attr:`_used` to
    the indices of the points it used (Multi-Krum's selection), all by default.
    """

    #: Whether :meth:`finalize` records :attr:`next_center` (the round's aggregate update).
    keeps_center = False

    def __init__(self, global_state: Mapping[str, torch.Tensor], slicer: Slicer) -> None:
        super().__init__(global_state, slicer)
        self.next_center: dict[str, torch.Tensor] | None = None
        self._used: list[int] | None = None
        self._held: dict[str, torch.Tensor] | None = None
        self.flat: FlatMap | None = None

    def use_flat(self, flat: FlatMap | None) -> WholeUpdateRule:
        """Lay each reply's update out as one vector over the float tensors end to end
        (``flat``'s order; the :data:`Point`'s one key :data:`WHOLE`) instead of one entry
        per tensor, when ``flat`` maps exactly the global state's float tensors (else
        ignored). The same entries, norms and means (to rounding: sums run in another
        order), with a fixed number of tensor operations per reply and iteration instead
        of one per tensor: the small models of many tensors :mod:`fl_subnet.core.flat`
        is for; the checks and :meth:`held` of the replies go through ``flat`` too
        (:class:`~fl_subnet.core.aggregate.MaskedAggregator`'s flat path). Returns ``self``.

        Raises
        ------
        RuntimeError
            If a reply was added already."""
        if self._replies:
            raise RuntimeError("use_flat() comes before the first add()")
        self.flat = flat if flat is not None and flat.matches(self.state) else None
        if self.flat is not None:
            self._inner = MaskedAggregator(self.state, self.slicer, flat=self.flat)
        return self

    def _numels(self) -> dict[str, int]:
        if self.flat is not None:
            return {WHOLE: self.flat.numel}
        return {k: t.numel() for k, t in self.state.items() if t.is_floating_point()}

    def _points(self) -> list[Point]:
        """Every added reply as a :data:`Point` (its update over the entries it holds)."""
        if self.flat is None:
            return [update_point(self.state, self.slicer, compact, mask) for compact, mask in self._replies]
        whole = self.flat.concat(self.state)
        points = []
        for compact, mask in self._replies:
            idx = self.flat.kept(mask).long()  # ascending: the order of the compact tensors end to end
            values = self.flat.concat(compact, compact).detach()
            points.append({WHOLE: (idx, values.to(torch.float64) - whole[idx].to(torch.float64))})
        return points

    def _by_point_key(self, tensors: Mapping[str, torch.Tensor] | None) -> dict[str, torch.Tensor] | None:
        """Key → tensor (e.g. a center) as the points' keys have it: as given, or, with
        :meth:`use_flat`, one vector under :data:`WHOLE` (a missing key: zeros)."""
        if tensors is None or self.flat is None:
            return None if tensors is None else dict(tensors)
        parts = {k: tensors[k].detach().reshape(-1).to(device="cpu", dtype=torch.float64) if k in tensors
                 else torch.zeros(math.prod(shape), dtype=torch.float64) for k, shape in self.flat.shapes.items()}
        return {WHOLE: self.flat.concat(parts)}

    def _by_state_key(self, per_point_key: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Inverse of :meth:`_by_point_key` for flat vectors: key → ``(N_k,)``."""
        if self.flat is None:
            return per_point_key
        return {k: t.reshape(-1) for k, t in self.flat.split(per_point_key[WHOLE]).items()}

    def _aggregate(self, points: list[Point]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def held(self) -> dict[str, torch.Tensor]:
        """Which entries the replies the rule used held (after :meth:`finalize`; before
        it, or when every reply was used, :meth:`MaskedAggregator.held`)."""
        return self._held if self._held is not None else self._inner.held()

    def finalize(self) -> dict[str, torch.Tensor]:
        """The new global state ``W_{k+1}`` (new tensors; ``W_k`` if no reply was added)."""
        if not self._replies:
            return {k: t.clone() for k, t in self.state.items()}
        with torch.no_grad():
            points = self._points()
            self._used = None
            v = self._aggregate(points)
            used = range(len(points)) if self._used is None else self._used
            held = {key: torch.zeros(n, dtype=torch.bool) for key, n in self._numels().items()}
            for key, h in held.items():
                idx = [points[i][key][0] for i in used if key in points[i]]
                if idx:
                    h[torch.cat(idx)] = True
            v, held = self._by_state_key(v), self._by_state_key(held)
            if self._used is not None:
                self._held = {key: h.reshape(self.state[key].shape).to(self.state[key].device)
                              for key, h in held.items()}
            out, center = {}, {}
            for key, full in self.state.items():
                if not full.is_floating_point():
                    out[key] = self._inner._num.get(key, full).clone()  # max over holders (MaskedAggregator.add)
                    continue
                step = torch.where(held[key], v[key], torch.zeros((), dtype=torch.float64)).to(full.device)
                new = (full.reshape(-1).to(torch.float64) + step).to(full.dtype)
                out[key] = torch.where(held[key].to(full.device), new, full.reshape(-1)).reshape(full.shape)
                center[key] = step.reshape(full.shape)
            if self.keeps_center:
                self.next_center = center
        return out


class MaskedCenteredClip(WholeUpdateRule):
    """Masked centered clipping of the replies' updates (``aggregation = "centered-clip"``).

    With ``Δ_i = W_i − W_k[slice_i]`` (float64) over the entries reply ``i`` holds, ``v``
    from :func:`centered_clip` (its norms over each reply's held entries, each entry's mean
    over its holders, unweighted), every entry some reply held becomes::

        W_{k+1}[e] = W_k[e] + v[e]

    and an entry nobody held keeps ``W_k[e]``; integer tensors take the max over holders.
    All floating-point tensors of a reply (BatchNorm running statistics included) make up
    its update and its norm, as in the norm screening
    (:func:`fl_subnet.core.robust.update_ratio`).

    Source: Karimireddy, He & Jaggi, ICML 2021, Algorithm 2, where ``v`` starts from the
    previous aggregate (the reference keeps ``self.momentum`` across calls): pass the
    previous round's :attr:`next_center` as ``center`` (the strategy does).

    Parameters
    ----------
    global_state : Mapping[str, torch.Tensor]
        ``W_k``; not modified.
    slicer : Slicer
        Coupling table of the model's unit groups.
    clip_radius : float
        τ ≥ 0 (``clip-radius``); 0: the round's median distance to the start
        (:func:`centered_clip`).
    clip_iterations : int
        L ≥ 1 (``clip-iterations``).
    center : Mapping[str, torch.Tensor], optional
        ``v_0``: key → the previous round's aggregate update, full shape; missing keys
        (or ``None``) start at 0.

    Attributes
    ----------
    next_center : dict[str, torch.Tensor] or None
        After :meth:`finalize` with at least one reply: key → float64 of the key's full
        shape, ``v`` on the held entries and 0 elsewhere (this round's aggregate update).
    radius : float or None
        The τ used by the last :meth:`finalize`.

    Raises
    ------
    ValueError
        If ``clip_radius`` or ``clip_iterations`` is invalid (naming ``clip-radius`` /
        ``clip-iterations``); from ``add``/``check`` as :class:`MaskedAggregator`.
    """

    keeps_center = True

    def __init__(self, global_state: Mapping[str, torch.Tensor], slicer: Slicer, clip_radius: float = 0.0,
                 clip_iterations: int = CLIP_ITERATIONS,
                 center: Mapping[str, torch.Tensor] | None = None) -> None:
        self.clip_radius = check_clip_radius(clip_radius)
        self.clip_iterations = check_clip_iterations(clip_iterations)
        super().__init__(global_state, slicer)
        self.center = center
        self.radius: float | None = None

    def _aggregate(self, points: list[Point]) -> dict[str, torch.Tensor]:
        v, self.radius, clipped = centered_clip(points, self._numels(), self._by_point_key(self.center),
                                                self.clip_radius, self.clip_iterations)
        log.debug("centered clipping: %d point(s), radius %.4g, %d clipped in the first iteration",
                  len(points), self.radius, clipped)
        return v


class MaskedBucketing(MaskedCenteredClip):
    """Bucketing, then masked centered clipping of the bucket means
    (``aggregation = "bucketing"``).

    The round's replies are shuffled by :func:`bucket_order` (from the run seed and the
    server round only), averaged in buckets of ``bucket_size`` by :func:`bucket_means`
    (each entry over the bucket members holding it, unweighted), and the bucket means are
    aggregated by :func:`centered_clip` as in :class:`MaskedCenteredClip` (a bucket holds
    the union of its members' entries; the data-driven radius is the median over the
    buckets). ``W_{k+1}[e] = W_k[e] + v[e]`` on held entries, ``W_k[e]`` elsewhere.

    Source: Karimireddy, He & Jaggi, "Byzantine-Robust Learning on Heterogeneous Datasets
    via Bucketing", ICLR 2022, Algorithm 1; reference ``bucketing_wrapper`` (``utils.py``
    of epfml/byzantine-robust-noniid-optimizer), whose shuffle uses the global numpy state.

    Parameters
    ----------
    global_state, slicer, clip_radius, clip_iterations, center
        As :class:`MaskedCenteredClip`.
    bucket_size : int
        s ≥ 1 (``bucket-size``); 1 is centered clipping after a shuffle (the same result).
    seed : int
        The run seed.
    server_round : int
        The server round (with the seed, it alone sets the shuffle).

    Raises
    ------
    ValueError
        If ``bucket_size`` is invalid (naming ``bucket-size``), or as
        :class:`MaskedCenteredClip`.

    Notes
    -----
    With ``n ≤ s`` replies there is one bucket and the result is their plain mean over
    holders: bucketing needs several replies per bucket count to act.
    """

    def __init__(self, global_state: Mapping[str, torch.Tensor], slicer: Slicer, clip_radius: float = 0.0,
                 clip_iterations: int = CLIP_ITERATIONS, center: Mapping[str, torch.Tensor] | None = None,
                 bucket_size: int = BUCKET_SIZE, seed: int = 0, server_round: int = 0) -> None:
        self.bucket_size = check_bucket_size(bucket_size)
        super().__init__(global_state, slicer, clip_radius, clip_iterations, center)
        self.seed = int(seed)
        self.server_round = int(server_round)

    def _aggregate(self, points: list[Point]) -> dict[str, torch.Tensor]:
        order = bucket_order(len(points), self.seed, self.server_round)
        buckets = bucket_means(points, self._numels(), order, self.bucket_size)
        return super()._aggregate(buckets)


def make_center(rule: object, previous: Mapping[str, torch.Tensor] | None) -> Mapping[str, torch.Tensor] | None:
    """The ``center`` to carry to the next round after ``rule`` was finalized: its
    :attr:`~MaskedCenteredClip.next_center` when it has one, else ``previous``."""
    nxt = getattr(rule, "next_center", None)
    return nxt if nxt is not None else previous


__all__ = ["BUCKET_SIZE", "BUCKET_SLOT", "CLIP_ITERATIONS", "MaskedBucketing", "MaskedCenteredClip", "Point",
           "WholeUpdateRule", "bucket_means", "bucket_order", "centered_clip", "check_bucket_size",
           "check_clip_iterations", "check_clip_radius", "holder_sums", "make_center", "update_point", "WHOLE"]
