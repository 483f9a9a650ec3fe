"""FjORD: ordered dropout, nested widths sampled per batch on each node."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from flwr.app import ArrayRecord, RecordDict

from fl_subnet.core.masks import Mask
from fl_subnet.core.samplers import NestedPrefixSampler, check_keep_prob
from fl_subnet.wire import FJORD_WIDTHS, widths_to_config
from fl_subnet.wire.records import FJORD_BN_RECORD, FJORD_DISTILL, width_stats_from_record, width_stats_to_record

from .heterofl import CapacityStrategy
from .registry import register_protocol

log = logging.getLogger(__name__)

DEFAULT_WIDTHS = (0.2, 0.4, 0.6, 0.8, 1.0)
#: ``fjord-bn``: one set of BatchNorm running statistics for all widths, one per width, or
#: ``auto`` (the default): per width wherever that applies (averaged BatchNorm, a model with
#: running statistics on its masked units), shared otherwise
FJORD_BN_MODES = ("auto", "shared", "per-width")


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

    With per-width statistics (``bn="per-width"``, or ``"auto"``, the default, with
    averaged BatchNorm on a model that has BatchNorm; run-config key ``fjord-bn``;
    FjORD's ``ODBatchNorm2d``, ``baselines/fjord/fjord/od/layers/batch_norm.py``) every
    width ``p`` keeps its own BatchNorm running mean and variance over its first
    ``⌈p·n⌉`` channels (the affine weight and bias stay shared): the server holds them,
    sends a node those of its
    allowed widths in a second ArrayRecord ``fjord-bn`` (their bytes count in
    ``bytes-down``/``bytes-up``), the node normalises and updates width ``p``'s while it
    trains a batch at ``p`` (:func:`fl_subnet.core.ordered.set_width_stats`), and the
    server averages width ``p``'s over the nodes that hold it (``p_max ≥ p``), weighted
    by ``num-examples`` — ``fjord_average``'s ``layer_p`` branch in the baseline's
    ``strategy.py``. The global model's own statistics are then the largest width's, and
    a tier of capacity ``p`` is evaluated with width ``p``'s (:meth:`tier_state`). A
    node's statistics that do not match what it was sent (widths, keys, shapes, NaN,
    Inf or a negative variance) are left out with a warning; its weights still count.
    ``num_batches_tracked`` stays shared. Needs ``batchnorm="averaged"`` (static
    BatchNorm recomputes each tier's statistics on the server instead).

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
    bn : {"auto", "shared", "per-width"}
        BatchNorm running statistics shared by all widths or kept per width; ``auto``
        (default): per width with ``batchnorm="averaged"`` on a model with running
        statistics on its masked units (where it measured better: docs/heterogeneous.md,
        "Per-width BatchNorm statistics"), shared otherwise (static BatchNorm recomputes
        every tier's statistics; a model without BatchNorm has none). :attr:`bn` holds
        the mode in use.
    **kwargs
        :class:`SubnetStrategy` options (``weighted`` defaults to True).

    Raises
    ------
    ValueError
        If a width or tier is outside (0, 1] (naming ``widths`` / ``capacity``), a
        tier is below the smallest width (no sub-model fits it), ``distill`` is not a
        bool (naming ``distill``), ``bn`` is unknown or ``"per-width"`` with static
        BatchNorm or a model without BatchNorm statistics (naming ``fjord-bn``), or the
        model declares its groups with ``unit_groups()`` (ordered dropout needs the
        traced model).
    """

    @classmethod
    def check_run_config(cls, cfg) -> None:
        """Every capacity tier must fit the smallest of ``fjord-widths``; ``fjord-distill``
        needs the cross-entropy."""
        if cfg.fjord_distill and cfg.loss_name != "cross-entropy":
            raise ValueError(f"fjord-distill (FjORD's self-distillation) needs a classification loss "
                             f"('cross-entropy'), got loss {cfg.loss_name!r}")
        if cfg.fjord_bn == "per-width" and cfg.batchnorm != "averaged":
            raise ValueError(f"fjord-bn = 'per-width' needs batchnorm = 'averaged', got {cfg.batchnorm!r} (static "
                             "BatchNorm recomputes every tier's statistics on the server)")
        low = min(cfg.tiers())
        if low < min(cfg.widths()):
            raise ValueError(f"capacity-tiers ({cfg.capacity_tiers}) has a tier {low:g} below the smallest of "
                             f"fjord-widths ({cfg.fjord_widths}): no FjORD sub-model fits it")

    @classmethod
    def from_run_config(cls, cfg, model_factory, **common):
        """Build from a run config (:func:`~fl_subnet.strategies.build_strategy` passes ``common``)."""
        return cls(model_factory, cfg.tiers(), cfg.widths(), distill=cfg.fjord_distill, bn=cfg.fjord_bn,
                   local_steps=cfg.local_steps, fraction_train=cfg.fraction_train, **common)

    def __init__(self, model_factory, capacity_tiers: Sequence[float] = (1.0,),
                 widths: Sequence[float] = DEFAULT_WIDTHS, *, distill: bool = False, bn: str = "auto",
                 seed: int = 0, **kwargs):
        self.widths = check_widths(widths)
        if not isinstance(distill, bool):
            raise ValueError(f"distill (fjord-distill) must be a bool, got {distill!r}")
        self.distill = distill
        if bn not in FJORD_BN_MODES:
            raise ValueError(f"fjord-bn must be one of {FJORD_BN_MODES}, got {bn!r}")
        self.bn = bn
        #: per-width statistics, full shapes: width → buffer key → tensor (``bn="per-width"``)
        self.width_stats: dict[float, dict[str, torch.Tensor]] | None = None
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
        self._stat_keys: tuple[str, ...] = ()
        if bn == "auto":
            self.bn = bn = "per-width" if self.batchnorm == "averaged" and self._gated_buffers() else "shared"
            log.info("FjORD: fjord-bn 'auto' -> %r", bn)
        if bn == "per-width":
            if self.batchnorm != "averaged":
                raise ValueError(f"fjord-bn = 'per-width' needs batchnorm = 'averaged', got {self.batchnorm!r} "
                                 "(static BatchNorm recomputes every tier's statistics on the server)")
            self._stat_keys = self._gated_buffers()
            if not self._stat_keys:
                raise ValueError(f"fjord-bn = 'per-width': {self.spec.model_name} has no BatchNorm running "
                                 "statistics on its masked units")
            self._width_masks = {w: NestedPrefixSampler(1.0, scale=False).sample(self.groups, 0, 1, capacities=[w])[0]
                                 for w in self.widths}

    def settings(self) -> dict[str, object]:
        """The strategy's settings (:meth:`SubnetStrategy.settings`) with ``fjord-bn``."""
        return {**super().settings(), "fjord-bn": self.bn}

    def _gated_buffers(self) -> tuple[str, ...]:
        """The floating buffers (BatchNorm's running statistics) coupled to a masked group:
        those a node's ordered model keeps per width (:func:`~fl_subnet.core.ordered.build_ordered`)."""
        names = {g.name for g in self.groups}
        params = self.spec.parameter_keys
        return tuple(k for k, (_, dtype) in self.spec.state_meta.items()
                     if k not in params and dtype.is_floating_point
                     and any(g in names for entries in self.slicer.coupled.get(k, {}).values() for g, _, _ in entries))

    def _ensure_width_stats(self) -> dict[float, dict[str, torch.Tensor]]:
        """The per-width statistics, started from the global model's own (first round)."""
        if self.width_stats is None:
            self.width_stats = {w: {k: self._state[k].detach().clone() for k in self._stat_keys}
                                for w in self.widths}
        return self.width_stats

    def restore_width_stats(self, stats: dict[float, dict[str, torch.Tensor]] | None) -> None:
        """Per-width statistics saved with a checkpoint (:func:`fl_subnet.checkpoint.load_width_stats`),
        for a resumed run; None: every width starts from the model's own.

        Raises
        ------
        ValueError
            Naming ``fjord-bn``, unless they hold exactly this strategy's widths and
            buffers at the full model's shapes and dtypes.
        """
        if stats is None:
            self.width_stats = None
            return
        meta = self.spec.state_meta
        if sorted(stats) != list(self.widths):
            raise ValueError(f"fjord-bn: the saved per-width statistics hold widths {sorted(stats)}, the run has "
                             f"{list(self.widths)}")
        for w, per_key in stats.items():
            if set(per_key) != set(self._stat_keys):
                raise ValueError(f"fjord-bn: the saved statistics of width {w:g} hold {sorted(per_key)}, expected "
                                 f"{sorted(self._stat_keys)}")
            for k, t in per_key.items():
                if tuple(t.shape) != tuple(meta[k][0]) or t.dtype != meta[k][1]:
                    raise ValueError(f"fjord-bn: the saved statistic '{k}' of width {w:g} is {tuple(t.shape)} "
                                     f"{t.dtype}, the model's {tuple(meta[k][0])} {meta[k][1]}")
        self.width_stats = {w: {k: t.clone() for k, t in per_key.items()} for w, per_key in stats.items()}

    def _width_slice(self, width: float) -> dict[str, torch.Tensor]:
        """Width ``width``'s statistics restricted to its units (what a node holds of them)."""
        mask = self._width_masks[width]
        return {k: self.slicer.gather_key(t, self.slicer.kept(mask, k, t.shape))
                for k, t in self._ensure_width_stats()[width].items()}

    def node_records(self, node: int, mask: Mask) -> dict[str, ArrayRecord]:
        """``{"fjord-bn": the statistics of the node's allowed widths}`` with per-width
        statistics, else none."""
        if self.bn != "per-width":
            return {}
        return {FJORD_BN_RECORD: width_stats_to_record(
            {w: self._width_slice(w) for w in self.allowed_widths(self.capacity_of(node))})}

    def aggregate_records(self, server_round: int, replies: list[tuple[int, RecordDict, float]]) -> None:
        """Per-width statistics: width ``p``'s averaged over the replies holding it
        (weighted), written back at its units; a node's that do not match are left out,
        logged."""
        if self.bn != "per-width":
            return
        stats = self._ensure_width_stats()
        sent = {w: self._width_slice(w) for w in self.widths}  # what every node was sent, once for all replies
        sums: dict[float, dict[str, torch.Tensor]] = {}
        totals: dict[float, float] = {}
        for node, content, weight in replies:
            try:
                got = self._check_stats(node, content, sent)
            except ValueError as err:
                log.warning("FjORD: round %d: node %d's per-width statistics left out: %s", server_round, node, err)
                continue
            for w, per_key in got.items():
                acc = sums.setdefault(w, {})
                for k, t in per_key.items():
                    acc[k] = acc.get(k, 0) + weight * t.double()
                totals[w] = totals.get(w, 0.0) + weight
        for w, acc in sums.items():
            mean = {k: (v / totals[w]).to(stats[w][k].dtype) for k, v in acc.items()}
            stats[w] = self.slicer.scatter(mean, self._width_masks[w], stats[w])

    def _check_stats(self, node: int, content: RecordDict, sent: dict[float, dict[str, torch.Tensor]]
                     ) -> dict[float, dict[str, torch.Tensor]]:
        """The node's per-width statistics, checked against what it was sent (``sent``:
        every width's statistics restricted to its units).

        Raises
        ------
        ValueError
            Naming ``fjord-bn``: absent, other widths or keys, other shapes, NaN/Inf, or
            a negative ``running_var``.
        """
        if FJORD_BN_RECORD not in content.array_records:
            raise ValueError(f"the reply has no '{FJORD_BN_RECORD}' ArrayRecord (a ClientApp that does not reply "
                             "with fl_subnet.clients.reply_arrays)")
        got = width_stats_from_record(content.array_records[FJORD_BN_RECORD])
        allowed = self.allowed_widths(self.capacity_of(node))
        if sorted(got) != sorted(allowed):
            raise ValueError(f"'{FJORD_BN_RECORD}' holds widths {sorted(got)}, the node was sent {list(allowed)}")
        for w in allowed:
            want = sent[w]
            if set(got[w]) != set(want):
                raise ValueError(f"'{FJORD_BN_RECORD}' width {w:g}: buffers {sorted(got[w])}, expected {sorted(want)}")
            for k, t in got[w].items():
                if t.shape != want[k].shape or t.dtype != want[k].dtype:
                    raise ValueError(f"'{FJORD_BN_RECORD}' width {w:g}, '{k}': {tuple(t.shape)} {t.dtype}, expected "
                                     f"{tuple(want[k].shape)} {want[k].dtype}")
                if not bool(torch.isfinite(t).all()):
                    raise ValueError(f"'{FJORD_BN_RECORD}' width {w:g}, '{k}': NaN or Inf")
                if k.endswith("running_var") and bool((t < 0).any()):
                    raise ValueError(f"'{FJORD_BN_RECORD}' width {w:g}, '{k}': a negative variance")
        return got

    def after_aggregation(self, aggregate, held):
        """The base step; with per-width statistics the model's own statistics become the
        largest width's (the full model's, when 1.0 is a width)."""
        new_state = super().after_aggregation(aggregate, held)
        if self.bn == "per-width" and self.width_stats is not None:
            new_state = self._with_width_stats(new_state, self.widths[-1])
        return new_state

    def _with_width_stats(self, state: dict[str, torch.Tensor], width: float) -> dict[str, torch.Tensor]:
        """``state`` with width ``width``'s statistics written at its units."""
        return {**state, **self.slicer.scatter(self._width_slice(width), self._width_masks[width],
                                               {k: state[k] for k in self._stat_keys})}

    def tier_state(self, capacity: float, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The full state a tier of ``capacity`` is cut from: with per-width statistics
        and ``capacity`` one of the widths, its statistics are that width's; otherwise
        ``state`` unchanged."""
        width = float(capacity)
        if self.bn != "per-width" or self.width_stats is None or width not in self.width_stats:
            return state
        return self._with_width_stats(state, width)

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


__all__ = ["FjORD", "DEFAULT_WIDTHS", "FJORD_BN_MODES", "check_widths"]
