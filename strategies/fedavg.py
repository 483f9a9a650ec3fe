"""FedAvg as the full mask (McMahan et al., AISTATS 2017)."""

from __future__ import annotations

from fl_subnet.core.samplers import FullSampler

from .base import SubnetStrategy


class SubnetFedAvg(SubnetStrategy):
    """Every node trains the whole model; the aggregation is FedAvg's weighted mean.

    Equals Flower's own ``FedAvg`` (same data and seeds) — a test checks it to 1e-6.
    Parameters as :class:`SubnetStrategy` (without ``sampler``). Masks nothing, so it
    accepts a model without unit groups.
    """

    masks_units = False

    def __init__(self, model_factory, *, local_steps: int | None = None, seed: int = 0, **kwargs):
        super().__init__(model_factory, FullSampler(seed), local_steps=local_steps, seed=seed, **kwargs)
