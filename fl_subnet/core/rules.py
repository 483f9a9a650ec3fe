"""The aggregation rules: one interface, one registry.

Every rule folds masked replies into the global state with the same contract
(:class:`AggregationRule`): ``check`` validates a reply against its mask (``ValueError``
naming the key), ``add(compact, mask, weight, checked=...)`` takes it in (``checked=True``:
already validated by ``check``), ``held()`` says which entries some reply held, and
``finalize()`` returns the new state, every entry no reply held keeping its value. One
shared test suite (tests/test_aggregation_rules.py) runs against every rule of
:data:`AGGREGATION_RULES`; a new rule is one class and one entry here.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Protocol

import torch

from .aggregate import MaskedAggregator
from .lora_rule import MaskedProductSpace
from .masks import Mask
from .robust import MaskedMedian, MaskedTrimmedMean
from .robust_direction import BUCKET_SIZE, CLIP_ITERATIONS, MaskedBucketing, MaskedCenteredClip
from .robust_distance import (KRUM_ROGUES_AUTO, WEISZFELD_ITERATIONS, WEISZFELD_SMOOTHING, MaskedGeometricMedian,
                              MaskedMultiKrum)
from .slicing import Slicer


class AggregationRule(Protocol):
    """What the strategy needs of a rule (see the module docstring)."""

    @property
    def num_replies(self) -> int: ...

    def check(self, compact: Mapping[str, torch.Tensor], mask: Mask) -> None: ...

    def add(self, compact: Mapping[str, torch.Tensor], mask: Mask, weight: float = 1.0,
            checked: bool = False) -> None: ...

    def held(self) -> dict[str, torch.Tensor]: ...

    def finalize(self) -> dict[str, torch.Tensor]: ...


def _mean(state, slicer, *, untouched="keep", denominator="holders", precision="float32", flat=None,
          **_) -> MaskedAggregator:
    return MaskedAggregator(state, slicer, untouched, denominator, precision, flat=flat)


def _median(state, slicer, **_) -> MaskedMedian:
    return MaskedMedian(state, slicer)


def _trimmed_mean(state, slicer, *, trim_fraction=0.25, **_) -> MaskedTrimmedMean:
    return MaskedTrimmedMean(state, slicer, trim_fraction)


def _centered_clip(state, slicer, *, clip_radius=0.0, clip_iterations=CLIP_ITERATIONS, center=None, flat=None,
                   **_) -> MaskedCenteredClip:
    return MaskedCenteredClip(state, slicer, clip_radius, clip_iterations, center).use_flat(flat)


def _bucketing(state, slicer, *, clip_radius=0.0, clip_iterations=CLIP_ITERATIONS, center=None,
               bucket_size=BUCKET_SIZE, seed=0, server_round=0, flat=None, **_) -> MaskedBucketing:
    return MaskedBucketing(state, slicer, clip_radius, clip_iterations, center, bucket_size, seed,
                           server_round).use_flat(flat)


def _geometric_median(state, slicer, *, weiszfeld_iterations=WEISZFELD_ITERATIONS,
                      weiszfeld_smoothing=WEISZFELD_SMOOTHING, flat=None, **_) -> MaskedGeometricMedian:
    return MaskedGeometricMedian(state, slicer, weiszfeld_iterations, weiszfeld_smoothing).use_flat(flat)


def _multi_krum(state, slicer, *, krum_rogues=KRUM_ROGUES_AUTO, flat=None, **_) -> MaskedMultiKrum:
    return MaskedMultiKrum(state, slicer, krum_rogues).use_flat(flat)


def _product_space(state, slicer, **_) -> MaskedProductSpace:
    return MaskedProductSpace(state, slicer)


#: Rule name (the run config's ``aggregation``) -> constructor ``(global_state, slicer, **options)``.
#: ``mean``: the (weighted) mean over each entry's holders (Flower's FedAvg rule on the held
#: entries); ``median`` / ``trimmed-mean``: the coordinate-wise median / β-trimmed mean over
#: each entry's holders, unweighted (Yin et al., ICML 2018); ``centered-clip`` / ``bucketing``:
#: centered clipping of whole updates (Karimireddy et al., ICML 2021), alone or on bucket
#: means (Karimireddy et al., ICLR 2022), unweighted (:mod:`fl_subnet.core.robust_direction`);
#: ``geometric-median`` / ``multi-krum``: the geometric median of whole updates (RFA, Pillutla et
#: al. 2022) or the mean of the m best by Krum's score (Blanchard et al. 2017), unweighted
#: (:mod:`fl_subnet.core.robust_distance`); ``product-space``: for LoRA adapters, FlexLoRA's
#: SVD of the weighted mean of the products ``B A`` per rank group, the mean elsewhere
#: (Bai et al., NeurIPS 2024; :mod:`fl_subnet.core.lora_rule`).
AGGREGATION_RULES: dict[str, Callable[..., AggregationRule]] = {
    "mean": _mean, "median": _median, "trimmed-mean": _trimmed_mean, "centered-clip": _centered_clip,
    "bucketing": _bucketing, "geometric-median": _geometric_median, "multi-krum": _multi_krum,
    "product-space": _product_space}


def make_rule(name: str, global_state: Mapping[str, torch.Tensor], slicer: Slicer, **options) -> AggregationRule:
    """The rule ``name`` over ``global_state`` (``W_k``, not modified).

    ``options``: ``untouched``, ``denominator``, ``precision``, ``flat`` (the mean and the
    whole-update rules, :meth:`~fl_subnet.core.robust_direction.WholeUpdateRule.use_flat`),
    ``trim_fraction`` (the trimmed mean), ``clip_radius``, ``clip_iterations``, ``center``
    (centered clipping and bucketing), ``bucket_size``, ``seed``, ``server_round``
    (bucketing), ``weiszfeld_iterations``, ``weiszfeld_smoothing`` (the geometric median),
    ``krum_rogues`` (Multi-Krum); a rule ignores the others.

    Raises
    ------
    ValueError
        If ``name`` is not a rule of :data:`AGGREGATION_RULES`, or an option is invalid.
    """
    if name not in AGGREGATION_RULES:
        raise ValueError(f"aggregation must be one of {tuple(AGGREGATION_RULES)}, got {name!r}")
    return AGGREGATION_RULES[name](global_state, slicer, **options)
