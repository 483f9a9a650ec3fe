"""Ordered dropout: train a node's compact model at a smaller nested width, batch by batch.

FjORD (Horváth et al., NeurIPS 2021, §3, Alg. 1): a node holds the nested sub-model of
its maximum width ``p_max`` and, for every local batch, samples a width ``p ≤ p_max``
from a discrete set and trains the sub-model of width ``p``, which keeps the first
``⌈p·size_g⌉`` units of every group ``g`` (:func:`samplers.prefix_size`).

Here the width-``p`` sub-model is the ``p_max`` compact model with the other units
silenced: their output scale is set to 0 wherever they are mixed (the
:class:`~fl_subnet.core.unit_scale.UnitScale` sites of a model built with ``dynamic``
groups), so one batch computes exactly the width-``p`` compact model's forward and
gradients (tested against it), and the units beyond ``p`` get zero gradient. Buffers
that belong to them (BatchNorm running statistics) are restored when the width changes,
so they end as the width-``p`` model would leave them. Parameters beyond ``p`` only see
a zero gradient: momentum and weight decay still act on them, as in FjORD's slicing
implementation.

BatchNorm statistics: by default one set of running statistics is shared by all widths
(the averaged/static policies of :mod:`fl_subnet.core.batchnorm`). With per-width
statistics (:func:`set_width_stats`; FjORD's ``ODBatchNorm2d``, Flower's FjORD baseline
``baselines/fjord/fjord/od/layers/batch_norm.py``: one ``BatchNorm2d(affine=False)`` per
width ``p`` over the first ``⌈p·n⌉`` channels, one shared affine weight and bias) every
width keeps its own running mean and variance: a batch drawn at width ``p`` updates only
width ``p``'s, and the model's buffers hold the max width's between batches. The
affine parameters and ``num_batches_tracked`` stay shared.

FjORD+KD (§3.3, self-distillation): :attr:`WidthSchedule.distill` asks the loop for a
teacher pass at ``p_max`` (:meth:`WidthSchedule.teacher`) and :func:`fjord_kd_loss` for
the width-``p`` pass.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Collection, Iterator, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .unit_scale import set_unit_scales, unit_scales
from .groups import dim_keep
from .masks import Mask
from .samplers import prefix_size

_HOLDER = "fl_subnet_ordered"
_TAG = 0x466A4F5244  # "FjORD": keeps the width draws apart from the mask and batch-order streams


class OrderedWidths(nn.Module):
    """Holder of what a width change needs (no parameters or buffers; survives ``deepcopy``).

    Attributes
    ----------
    sizes : dict[str, int]
        Full size of every gated group.
    kept : dict[str, torch.Tensor]
        Kept unit indices ``(k_g,)`` int64 of the max-width mask.
    base : dict[str, torch.Tensor]
        Per-kept-unit output scale ``(k_g,)`` of the max-width mask.
    keep_units : dict[str, torch.Tensor]
        Boolean ``(size,)`` keep vector of every group (gated or not) of the mask.
    buffers : list[tuple[str, int, int, list, torch.Tensor]]
        ``(key, dim, full length, index map entries, compact positions (bool))`` of every
        floating buffer dim coupled to a gated group.
    width : float or None
        The current width (None: the max width).
    stats : dict[float, dict[str, torch.Tensor]] or None
        Per-width statistics (:func:`set_width_stats`), keyed by width then buffer key,
        each the buffer restricted to the width's units; None: shared statistics.
    """

    def __init__(self, sizes, kept, base, keep_units, buffers) -> None:
        super().__init__()
        self.sizes, self.kept, self.base = sizes, kept, base
        self.keep_units, self.buffers = keep_units, buffers
        self.width: float | None = None
        self.saved: list[tuple[str, int, torch.Tensor, torch.Tensor]] = []
        self.stats: dict[float, dict[str, torch.Tensor]] | None = None
        self.max_width: float | None = None  # the key of the max width's statistics

    def forward(self, *args):  # pragma: no cover — never called
        raise RuntimeError("OrderedWidths holds state only")


def build_ordered(spec, compact_state: Mapping[str, torch.Tensor], mask: Mask,
                  gated: Collection[str] | None = None) -> nn.Module:
    """The compact model of ``mask`` whose width can be lowered per batch (:func:`set_width`).

    Parameters
    ----------
    spec : SubnetSpec
        The architecture's analysis (traced; :func:`fl_subnet.analyze`).
    compact_state : Mapping[str, torch.Tensor]
        The slice of ``mask`` (:meth:`SubnetSpec.gather`, or what the server sent).
    mask : Mask
        The node's max-width mask (normally FjORD's nested prefix,
        :class:`~fl_subnet.core.samplers.NestedPrefixSampler`).
    gated : Collection[str], optional
        The groups whose width follows :func:`set_width`; default: every group the mask
        names (``mask.indices``).

    Returns
    -------
    nn.Module
        Computes the same function as :meth:`SubnetSpec.build` at the max width; in
        training mode; ``state_dict`` keys and shapes as ``spec.build``'s.

    Raises
    ------
    ValueError
        If ``spec`` was not traced (a model declaring ``unit_groups()``), or the state
        does not match the mask.
    """
    from .compact import build_compact_graph

    if spec.graph is None:
        raise ValueError("ordered dropout needs a traced model (fl_subnet.analyze); a model declaring "
                         "unit_groups() has no per-layer output-scale sites")
    names = set(mask.indices if gated is None else gated)
    unknown = sorted(names - set(spec.slicer.by_name))
    if unknown:
        raise ValueError(f"gated names unknown unit group(s) {unknown}; groups: {sorted(spec.slicer.by_name)}")
    gated = [g for g in spec.slicer.groups if g.name in names]
    model = build_compact_graph(spec.graph, spec.resolved, compact_state, spec.slicer, mask,
                                blocks={b.name: b for b in spec.blocks}, dynamic=[g.name for g in gated])
    keep_units = spec.slicer.keep_units(mask)
    full_shapes = {k: tuple(v.shape) for k, v in spec.graph.state_dict().items()}
    params = {k for k, _ in model.named_parameters()}
    buffers = []
    for key, value in model.state_dict(keep_vars=True).items():
        if key in params or not value.is_floating_point():
            continue
        for dim, entries in sorted(spec.slicer.coupled.get(key, {}).items()):
            if any(g in names for g, _, _ in entries):
                length = full_shapes[key][dim]
                buffers.append((key, dim, length, list(entries), dim_keep(length, entries, keep_units)))
    current = unit_scales(model)
    holder = OrderedWidths({g.name: g.size for g in gated}, {g.name: mask.kept(g) for g in gated},
                           {g.name: current[g.name] for g in gated if g.name in current}, keep_units, buffers)
    model.add_submodule(_HOLDER, holder)
    return model


def _holder(model: nn.Module) -> OrderedWidths:
    holder = getattr(model, _HOLDER, None)
    if not isinstance(holder, OrderedWidths):
        raise ValueError("this model cannot change its width: build it with "
                         "fl_subnet.core.ordered.build_ordered (fl-subnet's receive() does when the train "
                         "config carries 'fjord-widths')")
    return holder


def max_width_units(model: nn.Module) -> dict[str, int]:
    """Kept units ``k_g`` of every gated group at the max width (the node's ``p_max``)."""
    return {g: int(k.numel()) for g, k in _holder(model).kept.items()}


@torch.no_grad()
def set_width(model: nn.Module, width: float | None) -> None:
    """Restrict a :func:`build_ordered` model to the nested sub-model of ``width``.

    Every gated group ``g`` keeps its first ``⌈width·size_g⌉`` units (FjORD §3,
    :func:`samplers.prefix_size`), the others are scaled by 0 where they are mixed.
    Buffers of the silenced units changed while a smaller width was set are restored
    first, so after ``set_width(model, None)`` they hold what the width-``p`` models
    would have left. Call ``set_width(model, None)`` (or use :func:`ordered_width`)
    before reading ``state_dict()``.

    Parameters
    ----------
    model : nn.Module
        Built by :func:`build_ordered`.
    width : float or None
        ``p`` in (0, 1], at most the node's max width (relative to the full model);
        None: back to the max width.

    Raises
    ------
    ValueError
        If the model was not built by :func:`build_ordered`, ``width`` is outside
        (0, 1], or its prefix of some group holds a unit the node's mask lacks (a width
        above the node's max width), naming the group.
    """
    holder = _holder(model)
    if width is not None and not (isinstance(width, (int, float)) and not isinstance(width, bool)
                                  and 0 < width <= 1 and math.isfinite(width)):
        raise ValueError(f"width must be a number in (0, 1] or None, got {width!r}")
    gates: dict[str, torch.Tensor] = {}
    if width is not None:
        for g, kept in holder.kept.items():
            k = prefix_size(holder.sizes[g], width)
            if k > int((kept < k).sum()):
                raise ValueError(f"width {width} keeps the first {k} units of group '{g}' but this node holds "
                                 f"only {int(kept.numel())} of them (above its max width)")
            gates[g] = (kept < k).to(torch.float32)
    if holder.stats is not None:  # per-width statistics: keep what the width being left gathered
        _store_stats(model, holder, holder.width)
    for key, dim, idx, values in holder.saved:  # restore the silenced units' buffers
        model.get_buffer(key).index_copy_(dim, idx, values.to(model.get_buffer(key).device))
    holder.saved = []
    set_unit_scales(model, {g: holder.base[g] * gates[g] if width is not None else holder.base[g]
                            for g in holder.base})
    holder.width = None if width is None else float(width)
    if width is not None:
        for key, dim, idx in _positions(holder, width, inside=False):
            buf = model.get_buffer(key)
            holder.saved.append((key, dim, idx.to(buf.device), buf.index_select(dim, idx.to(buf.device))))
    if holder.stats is not None:
        _load_stats(model, holder, holder.width)


def _positions(holder: OrderedWidths, width: float | None, inside: bool = True
               ) -> list[tuple[str, int, torch.Tensor]]:
    """``(key, dim, compact positions)`` of every gated buffer dim: the positions of the
    units of ``width`` (``inside``) or of the others; None: every position (inside).
    Cached per holder."""
    cache = holder.__dict__.setdefault("_positions", {})
    hit = cache.get((width, inside))
    if hit is None:
        hit = cache[(width, inside)] = _compute_positions(holder, width, inside)
    return hit


def _compute_positions(holder: OrderedWidths, width: float | None, inside: bool) -> list[tuple[str, int, torch.Tensor]]:
    keep_p = dict(holder.keep_units)
    if width is not None:
        for g, kept in holder.kept.items():
            v = torch.zeros(holder.sizes[g], dtype=torch.bool)
            v[kept[kept < prefix_size(holder.sizes[g], width)]] = True
            keep_p[g] = v
    out = []
    for key, dim, length, entries, keep_pos in holder.buffers:
        held = dim_keep(length, entries, keep_p)[keep_pos]
        idx = torch.nonzero(held if inside else ~held).flatten()
        if idx.numel() or inside:
            out.append((key, dim, idx))
    return out


def _stats_key(holder: OrderedWidths, width: float | None) -> float:
    return holder.max_width if width is None else float(width)


def _store_stats(model: nn.Module, holder: OrderedWidths, width: float | None) -> None:
    """Copy the buffers' values at the units of ``width`` into its statistics."""
    stats = holder.stats[_stats_key(holder, width)]
    for key, dim, idx in _positions(holder, width):
        buf = model.get_buffer(key)
        stats[key] = buf.index_select(dim, idx.to(buf.device)).clone()


def _load_stats(model: nn.Module, holder: OrderedWidths, width: float | None) -> None:
    """Write the statistics of ``width`` into the buffers at its units."""
    stats = holder.stats[_stats_key(holder, width)]
    for key, dim, idx in _positions(holder, width):
        buf = model.get_buffer(key)
        buf.index_copy_(dim, idx.to(buf.device), stats[key].to(device=buf.device, dtype=buf.dtype))


def width_stats_shapes(model: nn.Module, widths: Sequence[float]) -> dict[float, dict[str, tuple[int, ...]]]:
    """The shape of every per-width statistic of a :func:`build_ordered` model: for each
    width, each gated floating buffer (BatchNorm's ``running_mean``/``running_var``)
    restricted to the width's units.

    Raises
    ------
    ValueError
        If the model was not built by :func:`build_ordered`.
    """
    holder = _holder(model)
    out: dict[float, dict[str, tuple[int, ...]]] = {}
    for w in widths:
        out[float(w)] = {}
        for key, dim, idx in _positions(holder, float(w)):
            shape = list(model.get_buffer(key).shape)
            shape[dim] = int(idx.numel())
            out[float(w)][key] = tuple(shape)
    return out


@torch.no_grad()
def set_width_stats(model: nn.Module, stats: Mapping[float, Mapping[str, torch.Tensor]]) -> None:
    """Give every width its own BatchNorm running statistics (FjORD's ``ODBatchNorm2d``).

    From here on a batch at width ``p`` (:func:`set_width`) normalises with, and updates,
    width ``p``'s statistics; between batches (at the max width) the buffers hold the max
    width's. Read them back with :func:`width_stats`.

    Parameters
    ----------
    model : nn.Module
        Built by :func:`build_ordered`, at its max width.
    stats : Mapping[float, Mapping[str, torch.Tensor]]
        For every width the node may draw (including its max width ``p_max``), every
        gated floating buffer restricted to that width's units, shapes as
        :func:`width_stats_shapes`; the largest width is taken as ``p_max``.

    Raises
    ------
    ValueError
        If the model was not built by :func:`build_ordered` or is not at its max width,
        a width or buffer is missing or extra, a shape differs, or a value is not finite
        (naming the width and the buffer).
    """
    holder = _holder(model)
    if holder.width is not None:
        raise ValueError("set_width_stats needs the model at its max width (set_width(model, None))")
    if not stats:
        raise ValueError("set_width_stats: no width given")
    widths = sorted(float(w) for w in stats)
    want = width_stats_shapes(model, widths)
    clean: dict[float, dict[str, torch.Tensor]] = {}
    for w in widths:
        got = stats[w]
        if set(got) != set(want[w]):
            raise ValueError(f"per-width statistics of width {w:g}: expected buffers {sorted(want[w])}, "
                             f"got {sorted(got)}")
        clean[w] = {}
        for key, shape in want[w].items():
            t = got[key]
            if not isinstance(t, torch.Tensor) or tuple(t.shape) != shape:
                raise ValueError(f"per-width statistics of width {w:g}, '{key}': expected shape {shape}, got "
                                 f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
            if not bool(torch.isfinite(t).all()):
                raise ValueError(f"per-width statistics of width {w:g}, '{key}': NaN or Inf")
            clean[w][key] = t.detach().clone()
    holder.stats, holder.max_width = clean, widths[-1]
    for key, dim, idx in _positions(holder, None):
        if int(idx.numel()) != want[widths[-1]][key][dim]:
            raise ValueError(f"per-width statistics: the largest width given, {widths[-1]:g}, is not the node's "
                             f"max width ('{key}' holds {int(idx.numel())} units, width {widths[-1]:g} "
                             f"{want[widths[-1]][key][dim]})")
    _load_stats(model, holder, None)


@torch.no_grad()
def width_stats(model: nn.Module) -> dict[float, dict[str, torch.Tensor]] | None:
    """The per-width statistics of a model given them by :func:`set_width_stats`
    (including what the current width has gathered), or None (shared statistics).

    Raises
    ------
    ValueError
        If the model was not built by :func:`build_ordered`.
    """
    holder = _holder(model)
    if holder.stats is None:
        return None
    _store_stats(model, holder, holder.width)
    return {w: {k: t.clone() for k, t in s.items()} for w, s in holder.stats.items()}


@contextlib.contextmanager
def ordered_width(model: nn.Module, width: float | None) -> Iterator[nn.Module]:
    """``with ordered_width(model, p): ...`` — :func:`set_width` for the block, then back
    to the width that was set before. Yields ``model``.

    Raises
    ------
    ValueError
        As :func:`set_width`.
    """
    before = _holder(model).width
    set_width(model, width)
    try:
        yield model
    finally:
        set_width(model, before)


def width_generator(seed: int, server_round: int, partition: int) -> torch.Generator:
    """A CPU generator for a node's width draws, determined by ``(seed, server_round,
    partition)`` alone and independent of the mask and batch-order streams."""
    entropy = [int(v) % 2**64 for v in (seed, server_round, partition, _TAG)]
    state = np.random.SeedSequence(entropy).generate_state(2)
    return torch.Generator(device="cpu").manual_seed(int(state[0]) << 32 | int(state[1]))


class WidthSchedule:
    """Per-batch width sampling (FjORD §3: ``p ~ U(widths)``, the node's allowed widths).

    Call it with the step index before each batch's forward (``train_local``'s
    ``before_step``); use it as a context manager so that the model is back at its max
    width (and its buffers restored) afterwards.

    Parameters
    ----------
    model : nn.Module
        Built by :func:`build_ordered` (any model when ``widths`` is empty).
    widths : Sequence[float]
        The allowed widths, each in (0, 1] and at most the node's max width; empty: an
        inactive schedule (calls do nothing and return None), for messages without
        FjORD's key.
    generator : torch.Generator
        E.g. :func:`width_generator`.
    distill : bool, optional
        FjORD+KD (§3.3): the training loop adds, per batch, a teacher pass at the max
        width ``p_max`` (:meth:`teacher`) trained with the cross-entropy, and trains the
        drawn width ``p`` on :func:`fjord_kd_loss` against the teacher's detached
        outputs (:func:`fl_subnet.clients.train.train_local` does). Default False.

    Attributes
    ----------
    history : list[float]
        The width drawn for each step, in order.

    Raises
    ------
    ValueError
        If a width is invalid for ``model`` (:func:`set_width`), ``model`` was not
        built by :func:`build_ordered` while ``widths`` is not empty, or ``distill`` is
        not a bool or is True with empty ``widths`` (naming ``fjord-distill``).
    """

    def __init__(self, model: nn.Module, widths: Sequence[float], generator: torch.Generator,
                 distill: bool = False) -> None:
        self.model = model
        self.widths = tuple(float(w) for w in widths)
        if not isinstance(distill, bool):
            raise ValueError(f"fjord-distill must be a bool, got {distill!r}")
        if distill and not self.widths:
            raise ValueError("fjord-distill needs FjORD's per-batch widths (fjord-widths), got none")
        self.distill = distill
        if self.widths:
            _holder(model)
            for w in self.widths:  # every allowed width must fit the node's slice
                set_width(model, w)
            set_width(model, None)
        self.generator = generator
        self.history: list[float] = []

    @property
    def active(self) -> bool:
        """Whether widths are sampled (the message carried FjORD's key)."""
        return bool(self.widths)

    def __call__(self, step: int) -> float | None:
        """Draw this step's width uniformly from :attr:`widths` and set it; returns it
        (None, doing nothing, when inactive)."""
        if not self.widths:
            return None
        width = self.widths[int(torch.randint(len(self.widths), (1,), generator=self.generator))]
        set_width(self.model, width)
        self.history.append(width)
        return width

    def teacher(self) -> contextlib.AbstractContextManager[nn.Module]:
        """``with schedule.teacher(): ...`` — the node's max width ``p_max`` for the block
        (FjORD+KD's teacher pass), then back to the width drawn for this step.

        Raises
        ------
        ValueError
            If the schedule is inactive (no widths).
        """
        if not self.widths:
            raise ValueError("an inactive width schedule (no fjord-widths) has no teacher width")
        return ordered_width(self.model, None)

    def close(self) -> None:
        """Back to the max width (restores the silenced units' buffers)."""
        if self.widths:
            set_width(self.model, None)

    def __enter__(self) -> "WidthSchedule":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def fjord_kd_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """FjORD+KD's loss of the width-``p`` pass: the cross-entropy of the student's logits
    against the softmax of the teacher's (the node's own ``p_max`` sub-model), detached.

    A port of Flower's FjORD baseline by the paper's authors (``baselines/fjord/fjord/
    models.py``, function ``train``, branch ``know_distill``)::

        full_output = net(images, sampler=max_sampler)
        full_loss = criterion(full_output, target)
        full_loss.backward()
        target = full_output.detach().softmax(dim=1)
        partial_loss = criterion(net(images, sampler=sampler), target)

    with ``criterion = CrossEntropyLoss()`` (mean over the batch). This equals
    ``KL(softmax(teacher) || softmax(student))`` plus the teacher's entropy, a constant for
    the student, so its gradient is that of the KL term. Horváth et al. (NeurIPS 2021,
    §3.3) write the width-``p`` loss as a mix, weighted by ``α``, of the cross-entropy
    with the labels and the KL divergence to the ``p_max`` outputs softened by a
    temperature ``T``; the authors' code above uses ``T = 1`` and the soft target alone
    (``α = 1``), and this port follows the code. The teacher's own cross-entropy with the
    labels is a separate loss; both gradients are summed before the one optimizer step.

    Parameters
    ----------
    student : torch.Tensor
        Logits ``(N, C)`` of the width-``p`` pass.
    teacher : torch.Tensor
        Logits ``(N, C)`` of the ``p_max`` pass (detached here).

    Returns
    -------
    torch.Tensor
        Scalar: ``-mean_n Σ_c softmax(teacher)[n, c] · log_softmax(student)[n, c]``.

    Raises
    ------
    ValueError
        If the shapes differ or are not ``(N, C)`` (naming ``fjord-distill``).
    """
    if student.dim() != 2 or student.shape != teacher.shape:
        raise ValueError(f"fjord-distill needs (N, C) logits of equal shapes, got student "
                         f"{tuple(student.shape)} and teacher {tuple(teacher.shape)}")
    return F.cross_entropy(student, teacher.detach().softmax(dim=1))


__all__ = ["OrderedWidths", "build_ordered", "set_width", "ordered_width", "max_width_units",
           "set_width_stats", "width_stats", "width_stats_shapes",
           "width_generator", "WidthSchedule", "fjord_kd_loss"]
