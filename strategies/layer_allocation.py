"""Layer allocation for heterogeneous LoRA (Fed-HeLLo's HLA strategies): a node of capacity
``c`` trains the adapters of ``⌈c·L⌉`` of the model's ``L`` layers.

A library class, not a run-config protocol (it is not registered with
:func:`~fl_subnet.strategies.registry.register_protocol`): import it as
``from fl_subnet.strategies.layer_allocation import LayerAllocation``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from fl_subnet.core.lora import KIND
from fl_subnet.core.lora_layers import LayerAllocationSampler, check_allocation, lora_layers

from .heterofl import CapacityStrategy

log = logging.getLogger(__name__)


class LayerAllocation(CapacityStrategy):
    """Heterogeneous LoRA layer allocation (Zhang, Liu, Xu & Hu, "Fed-HeLLo: Efficient
    Federated Foundation Model Fine-Tuning with Heterogeneous LoRA Allocation", IEEE TNNLS
    2025, arXiv 2506.12213; the rules and what they were checked against:
    :mod:`fl_subnet.core.lora_layers`).

    A node of capacity ``c`` trains the LoRA adapters of ``n = max(1, ⌈c·L⌉)`` of the
    model's ``L`` layers (all adapters of one transformer block are one layer:
    :func:`fl_subnet.core.lora_layers.lora_layers`), chosen by ``allocation``
    (:class:`~fl_subnet.core.lora_layers.LayerAllocationSampler`): the GD-HLA patterns
    ``"triangle"`` (the first ``n`` layers, input side), ``"inverted-triangle"`` (the last
    ``n``), ``"bottleneck"`` (the first ``⌈n/2⌉`` and the last ``⌊n/2⌋``), ``"uniform"``
    (``n`` layers evenly spread over the depth); their randomized versions
    ``"rgd-<pattern>"`` (RGD-HLA: ``n`` layers drawn each round with probabilities
    proportional to the pattern's collective distribution over ``capacity_tiers``); or
    ``"random"`` (``n`` layers uniformly at random each round).

    The other adapters keep **0 ranks** on the node: they are absent from its compact
    model and from the messages in both directions, and the node's forward pass skips
    them (Fed-HeLLo instead keeps them in the client's forward pass, frozen at their
    global values: see :mod:`fl_subnet.core.lora_layers`, "Where this differs from
    Fed-HeLLo"). The server averages each adapter over the nodes that trained it (count
    mean, unweighted by default as the authors' ``average_lora_depthfl``; pass
    ``weighted=True`` to weight by ``num-examples``); an adapter no node trained in a
    round keeps its value.

    Parameters
    ----------
    model_factory : Callable[[], nn.Module]
        The full model with LoRA adapters (a peft ``PeftModel``; docs/lora.md).
    capacity_tiers : Sequence[float]
        Capacities for nodes that declare none: node ``i`` of the ordered node list gets
        ``capacity_tiers[i mod len]`` (as :class:`~fl_subnet.strategies.HeteroFL`); a node
        declares its own with ``--node-config "capacity=0.5"``. The ``"rgd-*"``
        allocations also take their layer probabilities from these tiers (one budget per
        tier).
    allocation : str
        One of :data:`fl_subnet.core.lora_layers.ALLOCATIONS` (default ``"bottleneck"``).
    ranks : {"full", "nested"}
        What an allocated adapter keeps: every rank (default), or the first ``⌈c·r⌉``.
    seed : int
        Seeds the randomized allocations (``generator_for(seed, round, slot)``) and the
        node sampling.
    **kwargs
        :class:`~fl_subnet.strategies.SubnetStrategy` options (``weighted`` defaults to False).

    Raises
    ------
    ValueError
        If ``allocation`` or ``ranks`` is unknown (naming it), a tier is outside (0, 1]
        (naming ``capacity``), or the model has no LoRA rank group (naming the model and
        what the analysis found).
    """

    def __init__(self, model_factory, capacity_tiers: Sequence[float] = (1.0,), *, allocation: str = "bottleneck",
                 ranks: str = "full", seed: int = 0, **kwargs):
        check_allocation(allocation)
        kwargs.setdefault("weighted", False)
        sampler = LayerAllocationSampler(allocation, 1.0, ranks=ranks, reference_capacities=capacity_tiers,
                                         seed=seed)
        super().__init__(model_factory, sampler, capacity_tiers, seed=seed, **kwargs)
        if not any(g.kind == KIND for g in self.groups):
            found = f"groups {[g.name for g in self.groups][:5]}" if self.groups else "no group"
            raise ValueError(f"LayerAllocation allocates LoRA adapters by layer, but {self.spec.model_name} has no "
                             f"LoRA rank group (the analysis found {found}): use a model with trainable peft LoRA "
                             f"adapters (docs/lora.md), or HeteroFL / FederatedDropout for other unit groups")
        self.allocation = allocation
        self.layers = lora_layers(self.groups)
        log.info("LayerAllocation: %s over %d LoRA layers, tiers %s", allocation, len(self.layers),
                 list(self.capacity_tiers))

    def settings(self) -> dict[str, object]:
        out = super().settings()
        out["layer allocation"] = f"{self.allocation} over {len(self.layers)} LoRA layers"
        return out
