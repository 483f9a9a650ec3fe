"""Dropout and multi-sample dropout as federated protocols."""

from __future__ import annotations

from fl_subnet.core.samplers import BernoulliSampler, check_num_subnets

from .base import SubnetStrategy
from .registry import register_protocol


@register_protocol(
    "dropout",
    mask="1 node, Bernoulli(ξ)",
    local_work="1 step",
    scale="1/ξ",
    aggregation="copy back (≡ one dropout SGD step, tested to 1e-6)",
    source="Srivastava et al. 2014; Liao & Kyrillidis 2022 §3")
class Dropout(SubnetStrategy):
    """One node per round trains one Bernoulli(ξ) sub-network for one step; copy back.

    Dropout (Srivastava et al., JMLR 2014) in the form analysed by Liao & Kyrillidis,
    TMLR 2022 (§3, p = 1, τ = 1): kept units scaled by 1/ξ. With one local SGD step
    this equals one dropout SGD step of the full model (tested to 1e-6).

    Parameters
    ----------
    model_factory : Callable[[], nn.Module]
        Builds the full architecture.
    keep_prob : float
        ξ ∈ (0, 1].
    scale : bool
        Inverted-dropout 1/ξ scaling of kept units (default True).

    Raises
    ------
    ValueError
        If ``keep_prob`` is outside (0, 1] (names ``keep-prob``).
    """

    default_lr_scaling = "none"  # one dropout SGD step per mask: the user's lr is dropout's lr

    @classmethod
    def from_run_config(cls, cfg, model_factory, **common):
        """Build from a run config (:func:`~fl_subnet.strategies.build_strategy` passes ``common``)."""
        return cls(model_factory, cfg.keep_prob, local_steps=cfg.local_steps, **common)

    def __init__(self, model_factory, keep_prob: float, *, scale: bool = True, seed: int = 0, **kwargs):
        kwargs.setdefault("local_steps", 1)
        super().__init__(model_factory, BernoulliSampler(keep_prob, scale=scale, seed=seed),
                         num_train_nodes=1, seed=seed, **kwargs)


@register_protocol(
    "multisample-dropout",
    mask="p nodes, Bernoulli(ξ) each",
    local_work="1 step (τ configurable)",
    scale="1/ξ",
    aggregation="per-unit mean over holders; `loss_average=True`: Inoue's 1/p loss average",
    source="Liao & Kyrillidis 2022; Inoue 2019")
class MultiSampleDropout(SubnetStrategy):
    """p nodes per round, each one Bernoulli(ξ) sub-network, one step each.

    Liao & Kyrillidis, TMLR 2022, §3 (p masks, per-neuron mean over the masks that keep
    it: ``loss_average=False``); Inoue, "Multi-Sample Dropout", 2019 (the loss averaged
    over the p masks: ``loss_average=True``, every node counts in every mean).

    Parameters
    ----------
    model_factory : Callable[[], nn.Module]
        Builds the full architecture.
    keep_prob : float
        ξ ∈ (0, 1].
    num_subnets : int
        p ≥ 1 masks (= nodes) per round.
    loss_average : bool
        Inoue's 1/p loss average instead of the per-unit mean over holders.

    Raises
    ------
    ValueError
        If ``keep_prob`` ∉ (0, 1] or ``num_subnets`` < 1 (the message names the key).
    """

    default_lr_scaling = "none"  # one dropout SGD step per mask and node, as in the paper

    @classmethod
    def from_run_config(cls, cfg, model_factory, **common):
        """Build from a run config (:func:`~fl_subnet.strategies.build_strategy` passes ``common``)."""
        return cls(model_factory, cfg.keep_prob, cfg.num_subnets, loss_average=cfg.loss_average,
                   local_steps=cfg.local_steps, **common)

    @classmethod
    def check_run_config(cls, cfg) -> None:
        """``num-subnets`` must not exceed ``num-nodes``: one sub-network per node."""
        if cfg.num_subnets > cfg.num_nodes:
            raise ValueError(f"num-subnets ({cfg.num_subnets}) must not exceed num-nodes ({cfg.num_nodes}): "
                             "multi-sample dropout trains one sub-network per node")

    def __init__(self, model_factory, keep_prob: float, num_subnets: int, *,
                 loss_average: bool = False, scale: bool = True, seed: int = 0, **kwargs):
        kwargs.setdefault("local_steps", 1)
        super().__init__(model_factory, BernoulliSampler(keep_prob, scale=scale, seed=seed),
                         num_train_nodes=check_num_subnets(num_subnets), seed=seed,
                         denominator="all" if loss_average else "holders", **kwargs)

    def _need_reason(self) -> str:
        return f"num-subnets={self.num_train_nodes}: one Bernoulli mask per node"
