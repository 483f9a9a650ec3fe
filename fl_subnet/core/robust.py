"""Robust aggregation rules and reply screening for masked (sub-model) replies.

Three tools a strategy can put between a reply and the model:

* :class:`MaskedMedian` and :class:`MaskedTrimmedMean`: drop-in replacements for
  :class:`~fl_subnet.core.aggregate.MaskedAggregator` that compute, per ENTRY, the
  coordinate-wise median or β-trimmed mean over the clients that held that entry
  (Yin, Chen, Ramchandran & Bartlett, "Byzantine-robust distributed learning: towards
  optimal statistical rates", ICML 2018, the coordinate-wise median and trimmed mean
  of §2). With sub-models, the set of clients that held an entry varies from entry to
  entry: the rule is applied to that set, so a client never votes on an entry it did
  not train.
* :func:`screen_update`: bounds the norm of one reply's update relative to the slice
  of the global model it was cut from (rejects it or clips it; norm clipping as in
  Sun, Kairouz, Suresh & McMahan, "Can you really backdoor federated learning?",
  arXiv:1911.07963, 2019).
* :func:`cap_weight`: caps a client's self-reported weight (``num-examples``).

Pure torch; no Flower import.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from .aggregate import MaskedAggregator
from .masks import Mask
from .slicing import Slicer

SCREEN_MODES = ("reject", "clip")
SCREEN_EPS = 1e-12


class _RobustAggregator:
    """Shared machinery of the coordinate-wise robust rules.

    Validation and the integer tensors are delegated to an inner
    :class:`MaskedAggregator` (composition: same checks, same error messages, and a
    rejected reply leaves no trace); the float tensors are kept by reference and
    reduced per entry in :meth:`finalize` by :meth:`_reduce`.
    """

    def __init__(self, global_state: Mapping[str, torch.Tensor], slicer: Slicer) -> None:
        self._inner = MaskedAggregator(global_state, slicer)
        self.state = self._inner.state
        self.slicer = slicer
        self._replies: list[tuple[dict[str, torch.Tensor], Mask]] = []

    @property
    def num_replies(self) -> int:
        return len(self._replies)

    def check(self, compact: Mapping[str, torch.Tensor], mask: Mask) -> None:
        """Validate a reply's keys, shapes and dtypes (:meth:`MaskedAggregator.check`).

        Raises
        ------
        ValueError
            Naming the key: missing or extra keys, wrong shape or dtype.
        """
        self._inner.check(compact, mask)

    def add(self, compact: Mapping[str, torch.Tensor], mask: Mask, weight: float = 1.0,
            checked: bool = False) -> None:
        """Add one client's trained compact slice (the same contract as
        :meth:`MaskedAggregator.add`).

        Parameters
        ----------
        compact : Mapping[str, torch.Tensor]
            Tensor ``key`` of shape ``slicer.compact_shape(key, ...)``; keys of the
            depth blocks ``mask`` skips are absent (the reply does not hold them).
        mask : Mask
            The mask the slice was cut with.
        weight : float
            Validated exactly as by :meth:`MaskedAggregator.add` (finite, > 0) but
            otherwise IGNORED: the robust rules are unweighted, as in Yin et al. 2018
            (a weight is a client's own claim, which a robust rule must not trust).
        checked : bool
            The caller already ran :meth:`check` on these keys and shapes: not
            checked again (passed on to :meth:`MaskedAggregator.add`).

        Raises
        ------
        ValueError
            If the mask, a tensor (keys, shape, dtype, NaN/Inf) or the weight is
            invalid (:meth:`MaskedAggregator.add`); nothing is accumulated then.
        """
        self._inner.add(compact, mask, weight, checked=checked)  # all checks; integer tensors: running max
        self._replies.append(({k: compact[k] for k, full in self.state.items()
                               if full.is_floating_point() and k in compact}, mask))

    def held(self) -> dict[str, torch.Tensor]:
        """Which entries some added reply held (:meth:`MaskedAggregator.held`)."""
        return self._inner.held()

    def _stack(self, key: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The holders' values of every entry of ``key``, sorted.

        Returns
        -------
        (values, count) or None
            ``values``: shape ``(C_key, N)`` (``C_key`` replies that carry ``key``,
            ``N = full.numel()``), dtype of the tensor, each column sorted ascending
            with the ``count[e]`` holders' values first and ``+inf`` (non-holders)
            after. ``count``: shape ``(N,)`` int64, the number of holders of each
            entry. ``None`` if no reply carries ``key`` (a depth block nobody trained).
        """
        full = self.state[key]
        carriers = [(c[key], m) for c, m in self._replies if key in c]
        if not carriers:
            return None
        n = full.numel()
        # +inf marks "not held": every held value is finite (checked by add), so after
        # an ascending sort the holders come first. The holder count is kept apart
        # rather than read back from the filler.
        values = torch.full((len(carriers), n), math.inf, dtype=full.dtype, device=full.device)
        count = torch.zeros(n, dtype=torch.int64, device=full.device)
        coupled = key in self.slicer.coupled
        one = torch.ones(1, dtype=torch.int64, device=full.device)
        for row, (t, mask) in zip(values, carriers):
            if not coupled:
                row.copy_(t.reshape(-1))
                count += 1
                continue
            flat = self.slicer.flat_index(key, full.shape, mask).long()
            row.index_copy_(0, flat, t.reshape(-1).to(full.dtype))
            count.index_add_(0, flat, one.expand(flat.numel()))  # positions are unique
        return values.sort(dim=0).values, count

    def _reduce(self, values: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
        """Per-entry statistic, shape ``(N,)`` float64, from :meth:`_stack`'s output.
        Entries with ``count == 0`` may hold anything (replaced by the caller)."""
        raise NotImplementedError

    def finalize(self) -> dict[str, torch.Tensor]:
        """The new global state ``W_{k+1}`` (new tensors; ``W_k`` if no reply was added).

        Float tensors: the rule per entry over its holders; entries nobody held keep
        ``W_k[e]``. Integer tensors (e.g. BatchNorm's ``num_batches_tracked``): the
        maximum over holders, as :class:`MaskedAggregator`.

        Notes
        -----
        Keys are processed one at a time; key ``k`` needs about
        ``C_k × numel(k)`` elements of its dtype for the stacked values plus as much
        again for the sort (``C_k`` the replies carrying it), so the peak memory is
        about twice the number of replies times the largest tensor.
        """
        out = {}
        with torch.no_grad():
            for key, full in self.state.items():
                if not full.is_floating_point():
                    # max over holders, accumulated by the inner MaskedAggregator.add
                    out[key] = self._inner._num.get(key, full).clone()
                    continue
                stacked = self._stack(key)
                if stacked is None:
                    out[key] = full.clone()
                    continue
                values, count = stacked
                stat = self._reduce(values, count).to(full.dtype)
                out[key] = torch.where(count > 0, stat, full.reshape(-1)).reshape(full.shape)
        return out


class MaskedMedian(_RobustAggregator):
    """Coordinate-wise median over the holders of each entry.

    For every entry ``e`` held by ``h ≥ 1`` replies, with their values sorted
    ``v_(0) ≤ … ≤ v_(h-1)``::

        W_{k+1}[e] = v_((h-1)//2)                      if h is odd
                   = (v_(h/2-1) + v_(h/2)) / 2         if h is even (mean of the two
                                                        middle values, like numpy;
                                                        torch.nanmedian would return
                                                        the lower one)

    (Yin et al., ICML 2018, coordinate-wise median, applied per entry to the clients
    that held it.) Unweighted: ``weight`` is validated and ignored. Entries nobody
    held keep ``W_k[e]``; integer tensors take the max over holders.

    Parameters
    ----------
    global_state : Mapping[str, torch.Tensor]
        ``W_k``; not modified.
    slicer : Slicer
        Coupling table of the model's unit groups.

    Notes
    -----
    Same interface as :class:`MaskedAggregator` (``add``, ``check``,
    ``num_replies``, ``finalize``). The two middle values are averaged in float64
    and cast back, so an odd ``h`` returns a held value bit-exactly. Memory: see
    :meth:`finalize`.
    """

    def _reduce(self, values: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
        lo = ((count - 1).clamp(min=0) // 2).unsqueeze(0)
        hi = (count // 2).clamp(max=values.shape[0] - 1).unsqueeze(0)
        a = values.gather(0, lo).squeeze(0).to(torch.float64)
        b = values.gather(0, hi).squeeze(0).to(torch.float64)
        return (a + b) / 2


class MaskedTrimmedMean(_RobustAggregator):
    """Coordinate-wise β-trimmed mean over the holders of each entry.

    For every entry ``e`` held by ``h ≥ 1`` replies, with their values sorted
    ``v_(0) ≤ … ≤ v_(h-1)`` and ``t = ⌊β·h⌋``::

        W_{k+1}[e] = (1 / (h - 2t)) · Σ_{r=t}^{h-1-t} v_(r)

    i.e. drop the ``t`` smallest and the ``t`` largest values and average the rest
    (Yin et al., ICML 2018, coordinate-wise trimmed mean, applied per entry to the
    clients that held it; with ``β < 1/2`` at least one value remains). The mean is
    UNWEIGHTED: ``weight`` is validated and ignored, as in the paper. ``β = 0`` gives
    the plain (count) mean over holders. Entries nobody held keep ``W_k[e]``;
    integer tensors take the max over holders.

    Parameters
    ----------
    global_state : Mapping[str, torch.Tensor]
        ``W_k``; not modified.
    slicer : Slicer
        Coupling table of the model's unit groups.
    trim_fraction : float
        β in ``[0, 0.5)``. ``⌊β·h⌋`` is computed as ``floor(β·h + 1e-9)`` so that a
        product that is an integer in exact arithmetic (e.g. ``0.29 · 100``) is not
        rounded down by float error.

    Raises
    ------
    ValueError
        If ``trim_fraction`` is not a real number in ``[0, 0.5)``.

    Notes
    -----
    Same interface as :class:`MaskedAggregator`. The sum is taken in float64 and cast
    back. Memory: see :meth:`finalize`.
    """

    def __init__(self, global_state: Mapping[str, torch.Tensor], slicer: Slicer,
                 trim_fraction: float = 0.1) -> None:
        if isinstance(trim_fraction, bool) or not isinstance(trim_fraction, (int, float)) \
                or not 0.0 <= float(trim_fraction) < 0.5:  # NaN fails the comparison too
            raise ValueError(f"trim_fraction must be a number in [0, 0.5), got {trim_fraction!r}")
        super().__init__(global_state, slicer)
        self.trim_fraction = float(trim_fraction)

    def _reduce(self, values: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
        trim = torch.floor(count.to(torch.float64) * self.trim_fraction + 1e-9).to(torch.int64)
        trim = torch.minimum(trim, (count - 1).clamp(min=0) // 2)  # keep at least one value
        rank = torch.arange(values.shape[0], device=values.device).unsqueeze(1)
        keep = (rank >= trim) & (rank < count - trim)  # (C, N); non-holders sit at rank >= count
        total = torch.where(keep, values, torch.zeros((), dtype=values.dtype)).sum(0, dtype=torch.float64)
        return total / (count - 2 * trim).clamp(min=1).to(torch.float64)


def update_ratio(compact: Mapping[str, torch.Tensor], global_compact: Mapping[str, torch.Tensor],
                 eps: float = SCREEN_EPS) -> float:
    """``‖W_c − W_k[slice]‖₂ / (‖W_k[slice]‖₂ + eps)`` over every floating-point tensor of
    the reply, flattened together, in float64 (see :func:`screen_update`).

    Raises
    ------
    ValueError
        If the keys, shapes or dtypes of the two mappings differ (naming the key), or the
        ratio is not finite (NaN/Inf in the reply).
    """
    missing = sorted(set(global_compact) - set(compact))
    extra = sorted(set(compact) - set(global_compact))
    if missing or extra:
        raise ValueError(f"reply keys differ from the global slice: missing {missing}, extra {extra}")
    keys = []
    for key, g in global_compact.items():
        t = compact[key]
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"'{key}' is not a tensor ({type(t).__name__})")
        if t.shape != g.shape:
            raise ValueError(f"'{key}' has shape {tuple(t.shape)}, expected {tuple(g.shape)}")
        if t.dtype != g.dtype:
            raise ValueError(f"'{key}' has dtype {t.dtype}, expected {g.dtype}")
        if g.is_floating_point():
            keys.append(key)
    with torch.no_grad():
        upd_sq = base_sq = 0.0
        for key in keys:
            g = global_compact[key].to(torch.float64)
            upd_sq += float((compact[key].to(torch.float64) - g).square().sum())
            base_sq += float(g.square().sum())
        ratio = math.sqrt(upd_sq) / (math.sqrt(base_sq) + eps)
        if not math.isfinite(ratio):
            raise ValueError(f"update norm ratio is {ratio} (NaN or Inf in the reply)")
    return ratio


def screen_update(compact: Mapping[str, torch.Tensor], global_compact: Mapping[str, torch.Tensor],
                  max_ratio: float, mode: str = "reject",
                  eps: float = SCREEN_EPS) -> tuple[Mapping[str, torch.Tensor], float, bool]:
    """Bound a reply's update norm relative to the global slice it was cut from.

    ::

        ratio = ‖W_c − W_k[slice]‖₂ / (‖W_k[slice]‖₂ + eps)

    with both norms over every floating-point tensor of the reply, flattened together
    (computed in float64; integer tensors are not part of it and never changed).

    Parameters
    ----------
    compact : Mapping[str, torch.Tensor]
        The reply ``W_c``: key → compact tensor.
    global_compact : Mapping[str, torch.Tensor]
        ``W_k[slice]`` = ``slicer.gather(global_state, mask)``: same keys and shapes.
    max_ratio : float
        The bound on ``ratio``; finite and > 0.
    mode : {"reject", "clip"}
        What to do when ``ratio > max_ratio``: ``reject`` raises; ``clip`` scales the
        update so that the ratio equals ``max_ratio`` (norm clipping, Sun et al. 2019,
        §4 "norm thresholding", made relative to the slice's own norm here so that one
        bound fits slices of any size; the reject variant drops the reply instead).
    eps : float
        Added to the denominator so that an all-zero global slice gives a finite ratio.

    Returns
    -------
    (state, ratio, clipped) : tuple[Mapping[str, torch.Tensor], float, bool]
        Within the bound: ``compact`` itself (the same object and tensors, untouched,
        so an honest run is bit-identical), its ratio, ``False``. Clipped: a new dict
        with every float tensor replaced by ``W_k + (W_c − W_k)·s``,
        ``s = max_ratio / ratio`` (computed in float64, cast back to the tensor's
        dtype; other tensors the same objects), the ratio BEFORE clipping, ``True``.

    Raises
    ------
    ValueError
        If ``mode`` or ``max_ratio`` is invalid; if the keys, shapes or dtypes of the
        two mappings differ (naming the key); if the ratio is not finite (NaN/Inf in
        the reply: nothing to clip); in ``reject`` mode if ``ratio > max_ratio``, with
        the ratio and the bound in the message.
    """
    if mode not in SCREEN_MODES:
        raise ValueError(f"mode must be one of {SCREEN_MODES}, got {mode!r}")
    if isinstance(max_ratio, bool) or not isinstance(max_ratio, (int, float)) \
            or not (math.isfinite(max_ratio) and max_ratio > 0):
        raise ValueError(f"max_ratio must be finite and > 0, got {max_ratio!r}")
    ratio = update_ratio(compact, global_compact, eps)
    with torch.no_grad():
        if ratio <= max_ratio:
            return compact, ratio, False
        if mode == "reject":
            raise ValueError(f"update norm ratio {ratio:.6g} exceeds the bound max_ratio={max_ratio:g}")
        scale = max_ratio / ratio
        out = dict(compact)
        for key in (k for k, g in global_compact.items() if g.is_floating_point()):
            g = global_compact[key].to(torch.float64)
            out[key] = (g + (compact[key].to(torch.float64) - g) * scale).to(compact[key].dtype)
    return out, ratio, True


def cap_weight(weight: float, cap: float | None) -> float:
    """``min(weight, cap)``: bound a client's self-reported weight.

    A reply's ``num-examples`` is the client's own claim and sets its share of a
    weighted mean (Flower's FedAvg, Liao & Kyrillidis' η); capping it bounds the share
    one client can claim to ``cap / Σ weights``. (A guard of this project, not taken
    from a paper.)

    Parameters
    ----------
    weight : float
        Finite and > 0 (the rule of :meth:`MaskedAggregator.add`).
    cap : float or None
        Finite and > 0; ``None`` means no cap.

    Returns
    -------
    float

    Raises
    ------
    ValueError
        If ``weight`` or ``cap`` is not a finite number > 0 (``cap`` may be ``None``).
    """
    for name, value in (("weight", weight), ("cap", cap)):
        if name == "cap" and value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) \
                or not (math.isfinite(value) and value > 0):
            raise ValueError(f"{name} must be finite and > 0, got {value!r}")
    return float(weight) if cap is None else float(min(weight, cap))
