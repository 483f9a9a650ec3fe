"""Depth training: each node trains a random path through the model's residual blocks
(RaPTr's progressive subnetworks, ResIST's partition of the blocks)."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch

from fl_subnet.core.paths import RandomPathSampler, progressive_schedule

from .base import SubnetStrategy
from .registry import register_protocol

log = logging.getLogger(__name__)

DEPTH_ARCHITECTURES = ("residual networks whose blocks have an identity shortcut (fl_subnet.models.PreActResNet "
                       "with blocks_per_stage >= 2: a stride/width-changing block has a conv shortcut and cannot "
                       "be skipped) and transformers (each attention and FFN branch is a block)")


@register_protocol(
    "random-path",
    mask="full width; L of the B residual blocks (first and last always), L growing by stage (`path-length`)",
    local_work="τ",
    scale="1 (skipped block = identity); `path-scale = \"raptr\"`: kept middle branches ×(B−2)/(L−2)",
    aggregation="per-block mean over holders",
    source="RaPTr, Panigrahi et al. 2024; ResIST, Dun et al. 2022")
class RandomPath(SubnetStrategy):
    """Every node trains the full-width model along a path of L of its B depth blocks.

    Depth blocks are the skippable residual branches ``y = x + f(x)`` that
    :func:`fl_subnet.analyze` finds (:attr:`SubnetSpec.blocks`); a block off a node's
    path is the identity there, and its tensors are neither sent nor returned
    (``Mask.skip``). The server averages each tensor over the replies that held it
    (weighted by ``num-examples``; :class:`~fl_subnet.core.aggregate.MaskedAggregator`);
    a block no node held keeps its value.

    - RaPTr (Panigrahi et al., "Efficient Stagewise Pretraining via Progressive
      Subnetworks", 2024, Alg. 1): the first and last block are always kept, the other
      ``L − 2`` drawn uniformly per node and round; the stage ``schedule`` lengthens the
      path over the rounds up to the full model. A skipped block is the plain
      identity. ``scale="raptr"`` (run-config key ``path-scale``) rescales the path's
      kept middle blocks while the nodes train: ``y = x + s·f(x)`` with
      ``s = (B − 2)/(L − 2)``, the inverse of a middle block's keep probability, so the
      expected residual sum over paths equals the full model's; the first and last
      block stay at 1 (:class:`~fl_subnet.core.paths.RandomPathSampler` says why this
      rule). The factor travels in the mask (``Mask.block_scale``, config key
      ``block-scale``); the global model, evaluated and saved, is the full model with
      factor 1. The nodes' ``lr`` does not follow it (``lr-scaling`` reads only unit
      scales).
    - ResIST (Dun et al., "ResIST: Layer-wise decomposition of ResNets for distributed
      training", UAI 2022), ``mode="partition"``: the nodes of a round split the
      middle blocks among themselves (each held by exactly one node; the first and last
      by all).

    Parameters
    ----------
    model_factory : Callable[[], nn.Module]
        The full model (see :class:`SubnetStrategy`); it must have depth blocks.
    path_length : int or float, optional
        L in every round: blocks kept (int) or a fraction of B (float in (0, 1]).
    schedule : Sequence[tuple[int, int | float]], optional
        RaPTr's stages ``((round_from, L), ...)`` instead of ``path_length``
        (:func:`fl_subnet.core.paths.progressive_schedule` builds equal stages).
    mode : {"random", "partition"}
        RaPTr's random paths or ResIST's partition.
    scale : {"none", "raptr"}
        ``none`` (default): kept blocks unscaled; ``raptr``: the kept middle blocks'
        branches ×(B − 2)/(L − 2) while training (mode ``random`` only).
    seed : int
        Seeds the paths and the node sample.
    **kwargs
        :class:`SubnetStrategy` options (``local_steps``, ``fraction_train``, ...).

    Raises
    ------
    ValueError
        If the model has no depth blocks (naming its class and the architectures that
        have them), or for a malformed ``path_length`` / ``schedule`` / ``mode`` /
        ``scale`` (naming the key: ``path-scale`` for the scale) or a count of blocks
        outside ``[2, B]``.
    """

    masks_units = False  # full width: it skips depth blocks, no unit group needed

    needs_depth_blocks = True  # the run config checks that its model has skippable blocks

    @classmethod
    def check_run_config(cls, cfg) -> None:
        """Every stage of ``path-length`` needs at least one server round."""
        if len(cfg.path_lengths()) > cfg.num_server_rounds:
            raise ValueError(f"path-length has {len(cfg.path_lengths())} stages but num-server-rounds is "
                             f"{cfg.num_server_rounds}: every stage needs at least one round")

    @classmethod
    def from_run_config(cls, cfg, model_factory, **common):
        """Build from a run config (:func:`~fl_subnet.strategies.build_strategy` passes ``common``)."""
        schedule = progressive_schedule(cfg.path_lengths(), cfg.num_server_rounds)  # RaPTr: equal stages
        return cls(model_factory, schedule=schedule, scale=cfg.path_scale, local_steps=cfg.local_steps,
                   fraction_train=cfg.fraction_train, **common)

    def __init__(self, model_factory, path_length: int | float | None = None, *,
                 schedule: Sequence[tuple[int, int | float]] | None = None, mode: str = "random",
                 scale: str = "none", seed: int = 0, **kwargs):
        sampler = RandomPathSampler(path_length, schedule=schedule, mode=mode, seed=seed, scale=scale)
        super().__init__(model_factory, sampler, seed=seed, **kwargs)
        with torch.device("meta"):
            name = type(self.spec.factory()).__name__
        if not self.spec.blocks:
            raise ValueError(f"RandomPath needs a model with depth blocks (skippable residual branches); "
                             f"{name} has none. Architectures with depth blocks: {DEPTH_ARCHITECTURES}")
        sampler.bind([b.name for b in self.spec.blocks])
        if len(self.spec.blocks) < 3:
            log.warning("RandomPath: %s has %d depth block(s) %s: with the first and last always kept no block "
                        "can be left out, every path is the full model", name,
                        len(self.spec.blocks), [b.name for b in self.spec.blocks])
        log.info("RandomPath (%s, path-scale %s): %d depth blocks %s", mode, scale, len(self.spec.blocks),
                 [b.name for b in self.spec.blocks])
