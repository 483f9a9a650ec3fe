"""FjORD: ordered dropout, nested widths sampled per batch on each node."""

from __future__ import annotations

import logging
from collections.abc import Sequence

from fl_subnet.core.samplers import NestedPrefixSampler, check_keep_prob
from fl_subnet.wire import FJORD_WIDTHS, widths_to_config
from fl_subnet.wire.records import FJORD_DISTILL

from .heterofl import CapacityStrategy
from .registry import register_protocol

log = logging.getLogger(__name__)

DEFAULT_WIDTHS = (0.2, 0.4, 0.6, 0.8, 1.0)


def check_widths(widths: Sequence[float], key: str = "widths") -> tuple[float, ...]:
    """``widths`` sorted and unique; ``ValueError`` naming ``key`` unless a non-empty
    sequence of numbers in (0, 1]."""
    try:
        out = tuple(sorted({check_keep_prob(w, key) for w in widths}))
    except TypeError:
        raise ValueError(f"{key} must be a sequence of numbers in (0, 1], got {widths!r}") from None
    if not out:
        raise ValueError(f"{key} must hold at least one width in (0, 1], got {widths!r}")
    return out


@register_protocol(
    "fjord",
    mask="the nested prefix of the node's max width p_max ≤ r; per batch a width p ≤ p_max drawn from `fjord-widths`",
    local_work="τ, width per batch",
    scale="1",
    aggregation="weighted mean over holders",
    source="Horváth et al. NeurIPS 2021")
class FjORD(CapacityStrategy):
    """FjORD (Horváth, Laskaridis, Almeida, Leontiadis, Venieris & Lane, "FjORD: Fair and
    Accurate Federated Learning under heterogeneous targets with Ordered Dropout",
    NeurIPS 2021).

    Widths form a discrete set ``widths`` (the paper's uniform ``{0.2, 0.4, …, 1.0}``).
    A node of capacity ``r`` has the max width ``p_max = max{p ∈ widths : p ≤ r}`` and
    receives only the compact slice of that nested sub-model (the first
    ``⌈p_max·size⌉`` units of every group, no rescaling: ordered dropout has no 1/p
    scaler) plus its allowed widths ``{p ∈ widths : p ≤ p_max}`` in the train config
    (``fjord-widths``). For every local batch the node draws ``p`` uniformly from them
    and trains the width-``p`` sub-model (§3, "Ordered Dropout" and Alg. 1;
    :mod:`fl_subnet.core.ordered`). The server averages each entry over the nodes whose
    max-width slice holds it, weighted by ``num-examples`` (Alg. 1, aggregation per
    width level: the entries of level ``s`` are averaged over the nodes with
    ``p_max ≥ p_s``).

    With ``distill=True`` (FjORD+KD, §3.3 "Knowledge distillation"; run-config key
    ``fjord-distill``) the train config also carries ``fjord-distill = true``: for every
    batch the node trains its max width ``p_max`` with the cross-entropy and the drawn
    width ``p`` on the cross-entropy against the ``p_max`` pass's detached softmax, one
    optimizer step for both (:func:`fl_subnet.core.ordered.fjord_kd_loss`, a port of
    Flower's FjORD baseline, ``baselines/fjord/fjord/models.py``, ``train``). Off, the
    messages are unchanged.

    Parameters
    ----------
    model_factory : Callable[[], nn.Module]
        The full model (see :class:`SubnetStrategy`).
    capacity_tiers : Sequence[float]
        Capacities for nodes that declare none: node ``i`` of the ordered node list gets
        ``capacity_tiers[i mod len]``; a node declares its own with
        ``--node-config "capacity=0.5"`` (as for :class:`HeteroFL`).
    widths : Sequence[float]
        The discrete widths in (0, 1] (relative to the full model).
    distill : bool
        FjORD+KD's self-distillation from each node's ``p_max`` sub-model (default False).
    **kwargs
        :class:`SubnetStrategy` options (``weighted`` defaults to True).

    Raises
    ------
    ValueError
        If a width or tier is outside (0, 1] (naming ``widths`` / ``capacity``), a
        tier is below the smallest width (no sub-model fits it), ``distill`` is not a
        bool (naming ``distill``), or the model declares its groups with
        ``unit_groups()`` (ordered dropout needs the traced model).
    """

    @classmethod
    def check_run_config(cls, cfg) -> None:
        """Every capacity tier must fit the smallest of ``fjord-widths``; ``fjord-distill``
        needs the cross-entropy."""
        if cfg.fjord_distill and cfg.loss_name != "cross-entropy":
            raise ValueError(f"fjord-distill (FjORD's self-distillation) needs a classification loss "
                             f"('cross-entropy'), got loss {cfg.loss_name!r}")
        low = min(cfg.tiers())
        if low < min(cfg.widths()):
            raise ValueError(f"capacity-tiers ({cfg.capacity_tiers}) has a tier {low:g} below the smallest of "
                             f"fjord-widths ({cfg.fjord_widths}): no FjORD sub-model fits it")

    @classmethod
    def from_run_config(cls, cfg, model_factory, **common):
        """Build from a run config (:func:`~fl_subnet.strategies.build_strategy` passes ``common``)."""
        return cls(model_factory, cfg.tiers(), cfg.widths(), distill=cfg.fjord_distill,
                   local_steps=cfg.local_steps, fraction_train=cfg.fraction_train, **common)

    def __init__(self, model_factory, capacity_tiers: Sequence[float] = (1.0,),
                 widths: Sequence[float] = DEFAULT_WIDTHS, *, distill: bool = False, seed: int = 0, **kwargs):
        self.widths = check_widths(widths)
        if not isinstance(distill, bool):
            raise ValueError(f"distill (fjord-distill) must be a bool, got {distill!r}")
        self.distill = distill
        kwargs.setdefault("weighted", True)
        super().__init__(model_factory, NestedPrefixSampler(1.0, scale=False, seed=seed), capacity_tiers,
                         seed=seed, **kwargs)
        if self.spec.graph is None:  # the nodes would fail building the ordered model, every round
            raise ValueError(f"FjORD's per-batch widths need a traced model, but {self.spec.model_name} declares its "
                             f"groups with unit_groups() (no per-layer sites to narrow per batch): use HeteroFL "
                             f"for nested widths per node")
        for r in self.capacity_tiers:
            if r < self.widths[0]:
                raise ValueError(f"capacity tier {r} is below FjORD's smallest width {self.widths[0]}: "
                                 f"no sub-model of widths {self.widths} fits it")

    def max_width(self, capacity: float | None) -> float:
        """``p_max``: the largest width ≤ ``capacity`` (None: 1.0). A declared capacity
        below the smallest width gets the smallest width, with a warning."""
        r = 1.0 if capacity is None else float(capacity)
        fits = [w for w in self.widths if w <= r + 1e-9]
        if not fits:
            log.warning("FjORD: capacity %g is below the smallest width %g: the node trains width %g",
                        r, self.widths[0], self.widths[0])
            return self.widths[0]
        return fits[-1]

    def allowed_widths(self, capacity: float | None) -> tuple[float, ...]:
        """The widths a node of ``capacity`` samples from: ``{p ∈ widths : p ≤ p_max}``."""
        p_max = self.max_width(capacity)
        return tuple(w for w in self.widths if w <= p_max)

    def capacity_of(self, node: int) -> float:
        """The node's max width ``p_max`` (from its declared capacity or its tier): the
        nested prefix it receives."""
        return self.max_width(super().capacity_of(node))

    def node_config(self, node: int, mask) -> dict[str, object]:
        """The node's allowed widths under ``fjord-widths`` (and ``fjord-distill = true``
        with self-distillation on)."""
        config: dict[str, object] = {FJORD_WIDTHS: widths_to_config(self.allowed_widths(self.capacity_of(node)))}
        if self.distill:
            config[FJORD_DISTILL] = True
        return config


__all__ = ["FjORD", "DEFAULT_WIDTHS", "check_widths"]
