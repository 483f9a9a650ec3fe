"""HeteroFL and FedRolex: width-heterogeneous nodes, each training the share of every
group its capacity allows."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch

from fl_subnet.core.label_split import OutputLayer, output_layer as find_output_layer, row_restriction
from fl_subnet.core.samplers import CapacitySampler, NestedPrefixSampler, RollingWindowSampler
from fl_subnet.wire.records import LABELS_KEY

from .base import SubnetStrategy
from .registry import register_protocol

log = logging.getLogger(__name__)


class CapacityStrategy(SubnetStrategy):
    """Base of the width-heterogeneous protocols (HeteroFL, FedRolex, FjORD): a
    :class:`~fl_subnet.core.samplers.CapacitySampler` draws each node's mask from its
    capacity (declared in its node config, else ``capacity_tiers`` by node order).

    With ``order_by_partition=True`` nodes are ordered by the partition-id they report to
    a one-off QUERY, which also learns their declared capacities; it needs a ClientApp
    that answers it (fl-subnet's own App turns it on). Off by default, so a plain Flower
    ClientApp (only ``@app.train()`` / ``@app.evaluate()``) works unchanged: the tiers
    then go to the nodes by node order, and the strategy logs that once.

    With ``label_split=True`` (HeteroFL's and FedRolex's, :attr:`supports_label_split`)
    the query also learns the labels each node holds (``labels``; a node reporting none
    holds every label), each node's train config carries them (``labels``: the node
    masks the other logits, :func:`fl_subnet.core.label_split.mask_logits`), and each
    reply contributes only its labels' rows of the output layer to the aggregate, so
    each class's row is averaged over the nodes holding it (HeteroFL's official code,
    ``src/fed.py``, ``Federation.combine``; :mod:`fl_subnet.core.label_split`). It turns
    ``order_by_partition`` on, since the labels come with the node query.

    Raises
    ------
    ValueError
        If a tier is outside (0, 1] (naming ``capacity``); naming ``label-split``, if the
        protocol does not support it, the aggregation is not ``mean``, or the output layer
        cannot be found (pass ``output_layer``).
    """

    #: Whether the protocol takes ``label_split=True`` (run-config key ``label-split``).
    supports_label_split: bool = False

    @classmethod
    def check_run_config(cls, cfg) -> None:
        """``label-split`` needs a classification loss and the ``mean`` aggregation."""
        if getattr(cfg, "label_split", False):
            if cfg.aggregation != "mean":
                raise ValueError(f"label-split needs aggregation 'mean' (HeteroFL's count mean over the nodes "
                                 f"holding each label), got {cfg.aggregation!r}: set aggregation = \"mean\" "
                                 f"(the run config's default is centered-clip)")
            if cfg.loss_name != "cross-entropy":
                raise ValueError(f"label-split masks classification logits: it needs loss 'cross-entropy', got "
                                 f"{cfg.loss_name!r}")

    def __init__(self, model_factory, sampler: CapacitySampler, capacity_tiers: Sequence[float] = (1.0,), *,
                 label_split: bool = False, output_layer: str | None = None, **kwargs):
        if not isinstance(label_split, bool):
            raise ValueError(f"label-split must be true or false, got {label_split!r}")
        if label_split and not self.supports_label_split:
            raise ValueError(f"label-split: {type(self).__name__} does not support HeteroFL's label split "
                             "(HeteroFL, HeteroFLDynamic and FedRolex do)")
        if label_split and not kwargs.get("order_by_partition", False):
            log.info("%s: label_split asks every node for its labels with the node query: order_by_partition on",
                     type(self).__name__)
            kwargs["order_by_partition"] = True
        super().__init__(model_factory, sampler, **kwargs)
        self.capacity_tiers = tuple(sampler.capacities(len(capacity_tiers), capacity_tiers))
        self.label_split = label_split
        #: The layer producing the logits, whose rows follow the labels (label split on), else None.
        self.output_layer: OutputLayer | None = None
        if label_split:
            if self.aggregation != "mean":
                raise ValueError(f"label-split needs aggregation 'mean', got {self.aggregation!r}")
            self.output_layer = find_output_layer(self.spec, output_layer, key="label-split")
            self.label_classes = self.output_layer.classes

    def settings(self) -> dict[str, object]:
        out = super().settings()
        if self.label_split:
            out["label split"] = f"on (output layer {self.output_layer.weight}, {self.output_layer.classes} classes)"
        return out

    def node_config(self, node: int, mask) -> dict[str, object]:
        """The node's ``labels`` (label split on, when it reported some), besides the base's entries."""
        out = super().node_config(node, mask)
        labels = self._labels.get(node) if self.label_split else None
        if labels:
            out[LABELS_KEY] = list(labels)
        return out

    def reply_rows(self, node: int) -> dict[str, torch.Tensor] | None:
        """Label split on: the output layer's rows of the node's labels
        (:func:`~fl_subnet.core.label_split.row_restriction`); else (or for a node that
        reported none) None: every row."""
        if not self.label_split:
            return None
        return row_restriction(self.output_layer, self._labels.get(node, ()))


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
        The 1/r scaler (default True), on every group but LoRA rank groups.
    rank_scale : bool
        The 1/r scaler on LoRA rank groups too (default False: a node's adapter keeps the
        scale ``lora_alpha / r_max``, docs/lora.md, "The scale of a node's adapter";
        :class:`~fl_subnet.core.samplers.CapacitySampler`).
    label_split : bool
        HeteroFL's label split for non-IID labels (default False; run-config key
        ``label-split``): see :class:`CapacityStrategy`.
    output_layer : str, optional
        The module producing the logits, for the label split; found in the traced graph
        when not given (:func:`fl_subnet.core.label_split.output_layer`).
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
                   label_split=getattr(cfg, "label_split", False), **common)

    supports_label_split = True

    def __init__(self, model_factory, capacity_tiers: Sequence[float] = (1.0,), *, scale: bool = True,
                 rank_scale: bool = False, seed: int = 0, **kwargs):
        kwargs.setdefault("weighted", False)
        super().__init__(model_factory, NestedPrefixSampler(1.0, scale=scale, seed=seed, rank_scale=rank_scale),
                         capacity_tiers,
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
                   label_split=getattr(cfg, "label_split", False), **common)

    supports_label_split = True

    def __init__(self, model_factory, capacity_tiers: Sequence[float] = (1.0,), *, scale: bool = False,
                 seed: int = 0, **kwargs):
        kwargs.setdefault("weighted", False)
        super().__init__(model_factory, RollingWindowSampler(1.0, scale=scale, seed=seed), capacity_tiers,
                         seed=seed, **kwargs)
