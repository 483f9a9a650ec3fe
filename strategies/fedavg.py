"""FedAvg as the full mask (McMahan et al., AISTATS 2017)."""

from __future__ import annotations

from fl_subnet.core.samplers import FullSampler

from .base import SubnetStrategy
from .registry import register_protocol


@register_protocol(
    "fedavg",
    mask="full",
    local_work="τ steps / E epochs",
    scale="1",
    aggregation="weighted mean (≡ Flower's `FedAvg`, tested to 1e-6)",
    source="McMahan et al. 2017")
class SubnetFedAvg(SubnetStrategy):
    """Every node trains the whole model; the aggregation is FedAvg's weighted mean.

    Equals Flower's own ``FedAvg`` (same data and seeds) — a test checks it to 1e-6.
    Parameters as :class:`SubnetStrategy` (without ``sampler``). Masks nothing, so it
    accepts a model without unit groups.
    """

    masks_units = False

    @classmethod
    def from_run_config(cls, cfg, model_factory, **common):
        """Build from a run config (:func:`~fl_subnet.strategies.build_strategy` passes ``common``)."""
        return cls(model_factory, local_steps=cfg.local_steps, fraction_train=cfg.fraction_train, **common)

    def __init__(self, model_factory, *, local_steps: int | None = None, seed: int = 0, **kwargs):
        super().__init__(model_factory, FullSampler(seed), local_steps=local_steps, seed=seed, **kwargs)
