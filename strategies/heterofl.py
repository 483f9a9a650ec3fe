"""HeteroFL and FedRolex: width-heterogeneous nodes, each training the share of every
group its capacity allows."""

from __future__ import annotations

from collections.abc import Sequence

from fl_subnet.core.samplers import CapacitySampler, NestedPrefixSampler, RollingWindowSampler

from .base import SubnetStrategy
from .registry import register_protocol


class CapacityStrategy(SubnetStrategy):
    """Base of the width-heterogeneous protocols (HeteroFL, FedRolex, FjORD): a
    :class:`~fl_subnet.core.samplers.CapacitySampler` draws each node's mask from its
    capacity (declared in its node config, else ``capacity_tiers`` by node order).

    With ``order_by_partition=True`` nodes are ordered by the partition-id they report to
    a one-off QUERY, which also learns their declared capacities; it needs a ClientApp
    that answers it (fl-subnet's own App turns it on). Off by default, so a plain Flower
    ClientApp (only ``@app.train()`` / ``@app.evaluate()``) works unchanged: the tiers
    then go to the nodes by node order, and the strategy logs that once.

    Raises
    ------
    ValueError
        If a tier is outside (0, 1] (naming ``capacity``).
    """

    def __init__(self, model_factory, sampler: CapacitySampler, capacity_tiers: Sequence[float] = (1.0,),
                 **kwargs):
        super().__init__(model_factory, sampler, **kwargs)
        self.capacity_tiers = tuple(sampler.capacities(len(capacity_tiers), capacity_tiers))


@register_protocol(
    "heterofl",
    mask="first ⌈r·size⌉ units of every group for a node of capacity r (nested)",
    local_work="τ",
    scale="1/r",
    aggregation="count mean over holders",
    source="Diao et al. ICLR 2021")
class HeteroFL(CapacityStrategy):
    """HeteroFL (Diao, Ding & Tarokh, ICLR 2021): a node of capacity ``r`` trains the
    first ``⌈r·size⌉`` units of every group (nested sub-models), its kept outputs scaled
    by ``1/r`` while training (§3.2 "scaler"); the server averages each entry over the
    nodes that held it, unweighted (count mean, §3.1). Where a BatchNorm follows the
    units' layer, the scaler sits before the norm as in the reference's models
    (``conv -> scaler -> norm``, src/models/conv.py and resnet.py), so the batch
    statistics cancel it (:func:`fl_subnet.core.unit_scale.training_scale`).

    Parameters
    ----------
    model_factory : Callable[[], nn.Module]
        The full model (see :class:`SubnetStrategy`).
    capacity_tiers : Sequence[float]
        Capacities for nodes that declare none: node ``i`` of the ordered node list gets
        ``capacity_tiers[i mod len]`` (a simulation's distribution of tiers). A node
        declares its own with ``--node-config "capacity=0.25"``, reported to the node
        query when ``order_by_partition=True`` (fl-subnet's ClientApp answers it; in
        your own, ``@app.query()`` returning :func:`fl_subnet.clients.partition_reply`).
    scale : bool
        The 1/r scaler (default True).
    **kwargs
        :class:`SubnetStrategy` options; HeteroFL's paper also uses static BatchNorm
        (``batchnorm="static"`` with ``calibration_batches``).

    Raises
    ------
    ValueError
        If a tier is outside (0, 1] (naming ``capacity``).
    """

    @classmethod
    def from_run_config(cls, cfg, model_factory, **common):
        """Build from a run config (:func:`~fl_subnet.strategies.build_strategy` passes ``common``)."""
        return cls(model_factory, cfg.tiers(), local_steps=cfg.local_steps, fraction_train=cfg.fraction_train,
                   **common)

    def __init__(self, model_factory, capacity_tiers: Sequence[float] = (1.0,), *, scale: bool = True,
                 seed: int = 0, **kwargs):
        kwargs.setdefault("weighted", False)
        super().__init__(model_factory, NestedPrefixSampler(1.0, scale=scale, seed=seed), capacity_tiers,
                         seed=seed, **kwargs)


@register_protocol(
    "fedrolex",
    mask="a window of ⌈r·size⌉ units rolling by one unit per round",
    local_work="τ",
    scale="1",
    aggregation="count mean over holders",
    source="Alam et al. NeurIPS 2022")
class FedRolex(CapacityStrategy):
    """FedRolex (Alam et al., NeurIPS 2022): a node of capacity ``r`` trains a window of
    ``⌈r·size⌉`` units of every group that rolls by one unit per server round (Eq. 3), so
    every unit is trained as often as every other; the server averages each entry over the
    nodes that held it, unweighted and independent of the nodes' order (the reference
    code's order-dependent weights are not reproduced).

    Parameters are those of :class:`HeteroFL` (``scale`` defaults to False, as in FedRolex).
    """

    @classmethod
    def from_run_config(cls, cfg, model_factory, **common):
        """Build from a run config (:func:`~fl_subnet.strategies.build_strategy` passes ``common``)."""
        return cls(model_factory, cfg.tiers(), local_steps=cfg.local_steps, fraction_train=cfg.fraction_train,
                   **common)

    def __init__(self, model_factory, capacity_tiers: Sequence[float] = (1.0,), *, scale: bool = False,
                 seed: int = 0, **kwargs):
        kwargs.setdefault("weighted", False)
        super().__init__(model_factory, RollingWindowSampler(1.0, scale=scale, seed=seed), capacity_tiers,
                         seed=seed, **kwargs)
