"""Core alternation: rounds alternate between a fixed core sub-network and the full model."""

from __future__ import annotations

from fl_subnet.core.core_sampler import CoreAlternationSampler
from fl_subnet.core.masks import Mask

from .base import SubnetStrategy
from .registry import register_protocol


@register_protocol(
    "core-alternation",
    mask="the core (first ⌈`core-fraction`·size⌉ units) in rounds k mod `core-period` ≠ 0, else the full model",
    local_work="τ",
    scale="1",
    aggregation="weighted mean over holders",
    source="core sub-networks")
class CoreAlternation(SubnetStrategy):
    """Train a core sub-network that can split off from the full model.

    Core rounds (server round ``k`` with ``k mod period != 0``) send every sampled node
    the same core: the first ``⌈core_fraction·size⌉`` units of every unit group
    (:class:`~fl_subnet.core.core_sampler.CoreAlternationSampler`); the other rounds send
    the full model. Aggregation is Flower's FedAvg restricted to the entries each reply
    holds (weighted by ``num-examples``), so a core round updates exactly the core's
    entries and leaves every other entry unchanged, and a full round is plain FedAvg.
    After training the core is the capacity tier ``core_fraction``:
    ``fl_subnet.tiers.extract_submodel(state, model_factory, core_fraction)``; the
    harness reports it as ``tier-<f>-acc``.

    Parameters
    ----------
    model_factory : Callable[[], nn.Module]
        The full model (see :class:`SubnetStrategy`).
    core_fraction : float
        ``f`` in (0, 1], the core's share of every group's units (run-config key
        ``core-fraction``).
    period : int
        ``p ≥ 2``: ``p − 1`` core rounds, then one full round (``core-period``).
    scale : bool
        Scale the core's outputs by ``1/f`` in core rounds (default False: the core
        trains the function it computes alone).
    **kwargs
        :class:`SubnetStrategy` options.

    Raises
    ------
    ValueError
        Naming ``core-fraction`` or ``core-period`` when out of range.
    """

    @classmethod
    def from_run_config(cls, cfg, model_factory, **common):
        """Build from a run config (:func:`~fl_subnet.strategies.build_strategy` passes ``common``)."""
        return cls(model_factory, cfg.core_fraction, cfg.core_period, local_steps=cfg.local_steps,
                   fraction_train=cfg.fraction_train, **common)

    def __init__(self, model_factory, core_fraction: float = 0.5, period: int = 2, *, scale: bool = False,
                 seed: int = 0, **kwargs):
        sampler = CoreAlternationSampler(core_fraction, period, scale=scale, seed=seed)
        super().__init__(model_factory, sampler, seed=seed, **kwargs)
        self.core_fraction = sampler.core_fraction
        self.period = sampler.period

    def core_mask(self) -> Mask:
        """The core's mask over this strategy's unit groups."""
        return self.sampler.core_mask(self.groups)
