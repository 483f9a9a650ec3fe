"""Federated Dropout (Caldas et al., 2018)."""

from __future__ import annotations

from fl_subnet.core.coverage import EvenCoverageSampler
from fl_subnet.core.samplers import BernoulliSampler

DROPOUT_SAMPLINGS = ("bernoulli", "even")

from .base import SubnetStrategy
from .registry import register_protocol


@register_protocol(
    "federated-dropout",
    mask="Bernoulli(ξ) per node",
    local_work="τ",
    scale="1/ξ (optional)",
    aggregation="per-entry mean over holders",
    source="Caldas et al. 2018")
class FederatedDropout(SubnetStrategy):
    """Each sampled node trains its own Bernoulli(ξ) sub-model for τ steps or E epochs.

    Caldas, Konečný, McMahan, Talwalkar, "Expanding the Reach of Federated Learning by
    Reducing Client Resource Requirements", arXiv:1812.07210, 2018, §3. Entries are
    averaged over the nodes that held them (weighted by ``num-examples``); entries no
    node held keep their value.

    Parameters
    ----------
    model_factory : Callable[[], nn.Module]
        Builds the full architecture.
    keep_prob : float
        ξ ∈ (0, 1] (Caldas et al. use a fixed fraction of units; the size here is
        Binomial(size, ξ)).
    scale : bool
        Inverted-dropout 1/ξ scaling (default True; Caldas et al. evaluate the full
        model, which the scaling keeps consistent).
    sampling : {"bernoulli", "even"}
        ``bernoulli``: each unit kept independently per node (Binomial(size, ξ) units);
        ``even``: FedEcover's even coverage (ICDE 2025; :class:`EvenCoverageSampler`):
        ⌈ξ·size⌉ units per node, dealt without replacement across the round's nodes.
        FedEcover's server step size is ``server_optimizer=MaskedFedAvgM(η, 0.0)``.
    min_holders : int
        k ≥ 1 (``min-holders``), redundancy for the robust aggregation rules: after a
        round's masks are drawn, every unit of every group held by fewer than
        ``min(k, n)`` of the round's ``n`` nodes is added to the masks of randomly chosen
        nodes that do not hold it (drawn from the seed and the round:
        :func:`~fl_subnet.core.holders.top_up_holders`). Added units are trained at the
        same 1/ξ scale as the node's other units (the scale stays one number per group).
        With fewer than ``k`` nodes in a round every node holds every such unit, and a
        warning is logged once. 1 (default): the masks as drawn, bit for bit (a unit
        may have no holder in a round). Costs bytes: every added unit travels down and up.
    **kwargs
        :class:`SubnetStrategy` / Flower FedAvg options (``fraction_train``, ...).

    Raises
    ------
    ValueError
        If ``keep_prob`` is outside (0, 1] (names ``keep-prob``), ``sampling`` is
        unknown (names ``dropout-sampling``) or ``min_holders`` is not an integer ≥ 1
        (names ``min-holders``).
    """

    #: Takes ``min-holders`` (the run config refuses it for protocols without this flag).
    supports_min_holders = True

    @classmethod
    def from_run_config(cls, cfg, model_factory, **common):
        """Build from a run config (:func:`~fl_subnet.strategies.build_strategy` passes ``common``)."""
        return cls(model_factory, cfg.keep_prob, local_steps=cfg.local_steps, sampling=cfg.dropout_sampling,
                   fraction_train=cfg.fraction_train, min_holders=cfg.min_holders, **common)

    def __init__(self, model_factory, keep_prob: float, *, scale: bool = True, seed: int = 0,
                 sampling: str = "bernoulli", min_holders: int = 1, **kwargs):
        if sampling not in DROPOUT_SAMPLINGS:
            raise ValueError(f"dropout-sampling must be one of {DROPOUT_SAMPLINGS}, got {sampling!r}")
        cls = BernoulliSampler if sampling == "bernoulli" else EvenCoverageSampler
        super().__init__(model_factory, cls(keep_prob, scale=scale, seed=seed, min_holders=min_holders),
                         seed=seed, **kwargs)
