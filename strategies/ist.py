"""Independent Subnetwork Training (IST) as a federated protocol."""

from __future__ import annotations

from fl_subnet.core.samplers import PartitionSampler

from .base import SubnetStrategy

IST_SCALINGS = ("none", "p")


class IST(SubnetStrategy):
    """Partition every group's hidden units into ``p`` disjoint sub-networks per round.

    Yuan et al., "Distributed Learning of Fully Connected Neural Networks using
    Independent Subnet Training", VLDB 2022; categorical masks of Liao & Kyrillidis,
    TMLR 2022, §3. Node slot ``i`` trains part ``i mod p`` for τ local steps; each
    hidden unit has exactly one holder (with ``p`` nodes), so aggregation is
    reassembly; tensors not coupled to hidden units are averaged.

    Parameters
    ----------
    model_factory : Callable[[], nn.Module]
        Builds the full architecture.
    num_subnets : int
        p ≥ 1. Nodes per round: ``num_train_nodes`` if given (``p`` is classic IST),
        else Flower's ``fraction_train`` rule with at least ``p`` nodes; slot ``i``
        trains part ``i mod p``, so a part held by several nodes is averaged.
    local_steps : int
        τ ≥ 1.
    partition_mode : {"equal", "iid"}
        Equal blocks after a shuffle, or iid categorical (the paper's code).
    scaling : {"none", "p"}
        Output scale of kept units: none (IST's code) or p = 1/ξ (Liao & Kyrillidis).
    precision : {"float64", "float32"}
        Aggregation sums; float64 (default) makes reassembly bit-exact.

    Raises
    ------
    ValueError
        For p < 1, τ < 1, or an unknown mode/scaling (the message names the key).
    """

    def __init__(self, model_factory, num_subnets: int, *, local_steps: int = 1,
                 partition_mode: str = "equal", scaling: str = "none", seed: int = 0,
                 num_train_nodes: int | None = None, precision: str = "float64", **kwargs):
        if scaling not in IST_SCALINGS:
            raise ValueError(f"ist-scaling must be one of {IST_SCALINGS}, got {scaling!r}")
        if int(local_steps) < 1:
            raise ValueError(f"local-steps must be >= 1, got {local_steps!r}")
        sampler = PartitionSampler(num_subnets, mode=partition_mode,
                                   scale=float(num_subnets) if scaling == "p" else 1.0, seed=seed)
        if num_train_nodes is None:  # Flower's fraction rule, but never fewer than p nodes
            kwargs["min_train_nodes"] = max(kwargs.get("min_train_nodes", 2), sampler.num_subnets)
            kwargs.setdefault("min_available_nodes", sampler.num_subnets)
        super().__init__(model_factory, sampler, local_steps=local_steps, seed=seed,
                         num_train_nodes=num_train_nodes, precision=precision, **kwargs)

    def _need_reason(self) -> str:
        return f"num-subnets={self.sampler.num_subnets}: one sub-network per node"
