"""Independent Subnetwork Training (IST) as a federated protocol."""

from __future__ import annotations

import torch

from fl_subnet.core.batchnorm import batchnorm_layers
from fl_subnet.core.fold import fold_output_scales
from fl_subnet.core.samplers import PartitionSampler

from .base import SubnetStrategy
from .registry import register_protocol

IST_SCALINGS = ("none", "p", "p-lr", "eval")


@register_protocol(
    "ist",
    mask="disjoint partition into p parts (`equal` blocks or `iid` categorical)",
    local_work="τ ≥ 1",
    scale="none (IST) or p",
    aggregation="reassembly, bit-exact (float64 sums); shared tensors averaged",
    source="Yuan et al. VLDB 2022; Liao & Kyrillidis 2022")
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
    scaling : {"none", "p", "p-lr", "eval"}
        How the full model's output scale is handled (each node trains 1/p of the units;
        the full model sums p times as many):

        * ``none``: no scaling (IST's code, Yuan et al.), the full model as reassembled;
        * ``p`` (default): kept units' outputs scaled by p = 1/ξ while training (Liao &
          Kyrillidis §3), the nodes' ``lr`` following the scale by the strategy's
          ``lr_scaling`` (default ×1/p², :meth:`SubnetStrategy.lr_factor`); the
          ClientApp must train with the ``lr`` of the message's ``config`` (Flower's
          templates do), otherwise use ``none``;
        * ``p-lr``: scaled by p and the nodes' ``lr`` multiplied by 1/p whatever
          ``lr_scaling`` says (``lr_scaling="linear"``);
        * ``eval``: trained unscaled, and the full model multiplies the split units'
          outputs by 1/p at evaluation only (ResIST, Dun et al. UAI 2022): the scale is
          folded into the consuming layers' weights (:func:`fl_subnet.core.fold.fold_output_scales`)
          for central and federated evaluation and the deployed model
          (:meth:`deployed_state`).
    precision : {"float64", "float32"}
        Aggregation sums; float64 (default) makes reassembly bit-exact.
    min_holders : int
        k ≥ 1 (``min-holders``), redundancy for the robust aggregation rules: every part
        (so every hidden unit) is dealt to at least ``k`` of the round's nodes, which
        slot ``i`` → part ``i mod p`` does with ``n ≥ k·p`` nodes (the masks are the same
        as without the option; only the number of nodes changes). With
        ``num_train_nodes`` given, fewer than ``k·p`` raises ``ValueError`` here; without
        it the strategy asks Flower's rule for at least ``k·p`` nodes a round (and waits
        for them, up to ``node_wait_timeout``). Should a round still have fewer (the
        sampler called directly), :class:`PartitionSampler` logs a warning and deals
        the nodes it has. 1 (default): at least ``p`` nodes, as without the option. Costs
        bytes: a round sends ``n`` sub-models of about ``1/p`` of the hidden units each.

    Raises
    ------
    ValueError
        For p < 1, τ < 1, an unknown mode/scaling, ``min_holders`` not an integer ≥ 1,
        or ``num_train_nodes`` below ``min_holders · p`` when ``min_holders`` > 1 (the
        message names the key: ``min-holders`` for the last two).
    """

    #: Takes ``min-holders`` (the run config refuses it for protocols without this flag).
    supports_min_holders = True

    @classmethod
    def from_run_config(cls, cfg, model_factory, **common):
        """Build from a run config (:func:`~fl_subnet.strategies.build_strategy` passes ``common``)."""
        return cls(model_factory, cfg.num_subnets, local_steps=max(cfg.local_steps, 1),
                   partition_mode=cfg.partition_mode, scaling=cfg.ist_scaling,
                   fraction_train=cfg.fraction_train, min_holders=cfg.min_holders, **common)

    @classmethod
    def check_run_config(cls, cfg) -> None:
        """``num-subnets`` must not exceed ``num-nodes``: one sub-network per node; with
        ``min-holders`` k > 1, ``k · num-subnets`` must not exceed ``num-nodes``."""
        if cfg.num_subnets > cfg.num_nodes:
            raise ValueError(f"num-subnets ({cfg.num_subnets}) must not exceed num-nodes ({cfg.num_nodes}): "
                             "IST trains one sub-network per node")
        if cfg.min_holders * cfg.num_subnets > cfg.num_nodes:
            raise ValueError(f"min-holders ({cfg.min_holders}) × num-subnets ({cfg.num_subnets}) must not exceed "
                             f"num-nodes ({cfg.num_nodes}): IST deals every part to at least min-holders nodes")

    def __init__(self, model_factory, num_subnets: int, *, local_steps: int = 1,
                 partition_mode: str = "equal", scaling: str = "p", seed: int = 0,
                 num_train_nodes: int | None = None, precision: str = "float64", min_holders: int = 1,
                 **kwargs):
        if scaling not in IST_SCALINGS:
            raise ValueError(f"ist-scaling must be one of {IST_SCALINGS}, got {scaling!r}")
        if int(local_steps) < 1:
            raise ValueError(f"local-steps must be >= 1, got {local_steps!r}")
        sampler = PartitionSampler(num_subnets, mode=partition_mode,
                                   scale=float(num_subnets) if scaling in ("p", "p-lr") else 1.0, seed=seed,
                                   min_holders=min_holders)
        need = sampler.min_holders * sampler.num_subnets  # p nodes a round, k·p with min-holders k
        if sampler.min_holders > 1 and num_train_nodes is not None and num_train_nodes < need:
            raise ValueError(f"min-holders ({sampler.min_holders}) × num-subnets ({sampler.num_subnets}) = {need} "
                             f"nodes a round needed, but num_train_nodes is {num_train_nodes}: IST deals every part "
                             f"to at least min-holders nodes")
        if num_train_nodes is None:  # Flower's fraction rule, but never fewer than k·p nodes
            kwargs["min_train_nodes"] = max(kwargs.get("min_train_nodes", 1), need)
            kwargs.setdefault("min_available_nodes", need)
        if scaling == "p-lr":  # ×p and lr ×1/p: the linear lr scaling of the base strategy
            kwargs["lr_scaling"] = "linear"
        super().__init__(model_factory, sampler, local_steps=local_steps, seed=seed,
                         num_train_nodes=num_train_nodes, precision=precision, **kwargs)

        self.scaling = scaling
        if scaling == "eval":  # refuse now a model whose scale cannot be folded
            with torch.device("meta"):
                model = self.model_factory()
            bn = batchnorm_layers(model)
            if bn:
                raise ValueError(f"ist-scaling 'eval' cannot be used with BatchNorm layers ({len(bn)} × {type(bn[0]).__name__}): they "
                                 "normalise the folded scale away and their statistics were not taken under it; "
                                 "use ist-scaling 'none' or 'p'")
            self.deployed_state(model.state_dict())

    def deployed_state(self, state: dict) -> dict:
        """With ``scaling="eval"``: ``state`` with 1/p folded into the layers that consume
        every partitioned group (ResIST's evaluation-time scaling); else ``state``.

        Raises
        ------
        ValueError
            If a partitioned group is consumed where a scale cannot be folded (attention
            heads, functional calls): use another ``scaling`` then.
        """
        if self.scaling != "eval":
            return state
        return fold_output_scales(self.spec, state, {g.name: 1.0 / self.sampler.num_subnets for g in self.groups})

    def _need_reason(self) -> str:
        if self.sampler.min_holders > 1:
            return (f"num-subnets={self.sampler.num_subnets} × min-holders={self.sampler.min_holders}: "
                    "every sub-network on at least min-holders nodes")
        return f"num-subnets={self.sampler.num_subnets}: one sub-network per node"
