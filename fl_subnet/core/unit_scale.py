"""Output scales of kept units where they are mixed: the :class:`UnitScale` sites of a
compact graph, the plans they derive from, and reading / changing them on a built model."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

@dataclass(eq=False)
class ScalePlan:
    """How a :class:`UnitScale`'s vector derives from its groups' per-unit scales.

    Attributes
    ----------
    length : int
        Length of the consumer's input dim in the full model.
    entries : DimEntries
        ``(group, units, positions)`` index maps of that dim (:func:`groups.dim_scale`).
    keep_units : dict[str, torch.Tensor]
        Group → boolean keep vector ``(size,)`` of the mask the model was built with.
    units : dict[str, torch.Tensor]
        Group → current per-unit scale ``(size,)`` float (dropped units' values unused).
    keep_pos : torch.Tensor or None
        Boolean ``(length,)``: the dim's positions the compact model holds (None: a
        full-size reference).
    shape : list[int]
        The vector's broadcast shape (``-1`` at the dim, 1 elsewhere).
    batch_normalized : bool
        The consumer's input comes from a BatchNorm on every path
        (:attr:`~fl_subnet.core.analysis.resolve.Resolved.batch_normalized`).
    """

    length: int
    entries: list
    keep_units: dict[str, torch.Tensor]
    units: dict[str, torch.Tensor]
    keep_pos: torch.Tensor | None
    shape: list[int]
    batch_normalized: bool = False

    def vector(self, training: bool = False) -> torch.Tensor:
        """The scale vector, shape ``shape`` (compact positions), float64.

        ``training=True`` on a batch-normalised site gives each unit 1 where its scale is
        positive and 0 where it is 0 (:func:`training_scale`)."""
        from .groups import dim_scale

        units = {g: training_scale(u) for g, u in self.units.items()} if training and self.batch_normalized \
            else self.units
        vec = dim_scale(self.length, self.entries, self.keep_units, units)
        return (vec if self.keep_pos is None else vec[self.keep_pos]).view(self.shape)


def training_scale(units: torch.Tensor) -> torch.Tensor:
    """Per-unit scales as a BatchNorm in training mode leaves them: 1 where positive, 0 where 0.

    HeteroFL's reference puts its ``Scaler`` between a layer and its norm (``conv ->
    scaler -> norm -> ReLU``, src/models/conv.py and resnet.py of
    github.com/diaoenmao/HeteroFL-Computation-and-Communication-Efficient-Federated-
    Learning-for-Heterogeneous-Clients); the norm divides each channel by its batch
    standard deviation, so a positive factor ``s`` changes the output only through
    BatchNorm's ``eps`` (``σ² + eps`` becomes ``σ² + eps/s²``). A unit scaled by 0 is
    dropped and stays out of the next layer.
    """
    return (units != 0).to(units.dtype)


@dataclass(eq=False)
class HeadPlan:
    """The head group of a :class:`SubnetMultiheadAttention` and its kept heads."""

    group: str
    keep: torch.Tensor  # bool (size,)
    units: torch.Tensor  # float (size,) per-head scale
    full: bool

    def vector(self) -> torch.Tensor:
        return self.units * self.keep if self.full else self.units[self.keep]


class UnitScale(nn.Module):
    """``x * scale``: the output scales of a group's kept units where they are mixed.

    A submodule (not a bare buffer on the graph module) so that the scale stays out of
    ``state_dict()`` through ``copy.deepcopy`` too (an fx ``GraphModule`` copy
    re-registers bare tensors as persistent buffers).

    For a mask with ``scale_before_norm`` (HeteroFL, FedRolex) whose units reach this
    input through a BatchNorm on every path, the scale belongs before that norm, as in
    HeteroFL's reference (:func:`training_scale`): in training mode the site
    multiplies by ``train_scale`` (each unit's 1 or 0; the norm has cancelled the rest),
    in eval mode by ``scale``.

    Parameters
    ----------
    scale : torch.Tensor
        Broadcastable to the input, e.g. ``(1, C, 1, 1)``, in the model's dtype.
    plan : ScalePlan, optional
        How ``scale`` derives from per-group unit scales (:func:`set_unit_scales`).
    train_scale : torch.Tensor, optional
        The training-mode vector of a batch-normalised site (None: ``scale`` in both modes).
    """

    def __init__(self, scale: torch.Tensor, plan: ScalePlan | None = None,
                 train_scale: torch.Tensor | None = None) -> None:
        super().__init__()
        self.register_buffer("scale", scale, persistent=False)
        self.register_buffer("train_scale", train_scale, persistent=False)
        self.plan = plan

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * (self.train_scale if self.training and self.train_scale is not None else self.scale)


def _sites(model: nn.Module):
    """``(module, plan)`` of every UnitScale and attention layer with a plan."""
    for module in model.modules():
        plan = getattr(module, "plan", None) if isinstance(module, UnitScale) else \
            getattr(module, "fl_subnet_heads", None)
        if plan is not None:
            yield module, plan


def unit_scales(model: nn.Module) -> dict[str, torch.Tensor]:
    """The current per-kept-unit output scale of every group with a scale site in ``model``.

    Returns
    -------
    dict[str, torch.Tensor]
        Group → ``(k_g,)`` float, in the order of the kept units.
    """
    out: dict[str, torch.Tensor] = {}
    for _, plan in _sites(model):
        if isinstance(plan, HeadPlan):
            out.setdefault(plan.group, plan.units[plan.keep].clone())
        else:
            for g, units in plan.units.items():
                out.setdefault(g, units[plan.keep_units[g]].clone())
    return out


@torch.no_grad()
def set_unit_scales(model: nn.Module, scales: Mapping[str, torch.Tensor | float]) -> None:
    """Set the output scale of each kept unit of the named groups on a built compact model.

    Every :class:`UnitScale` whose input mixes a named group's units, and every
    attention layer over a named head group, is recomputed from the new per-unit
    values (docs/design.md, "Exact semantics": a unit's scale multiplies its output
    where it is mixed; 0 removes its contribution, as in the reference model). Groups
    not named keep their current scales. Build the model with ``dynamic=[group, ...]``
    (:func:`build_compact_graph`) so that a site exists even where the mask's scale is 1.

    Parameters
    ----------
    model : nn.Module
        Built by :func:`build_compact_graph` (or :meth:`SubnetSpec.build`).
    scales : Mapping[str, torch.Tensor or float]
        Group → a float, or a ``(k_g,)`` tensor of finite values ≥ 0, one per kept unit
        in the order of the mask's kept indices.

    Raises
    ------
    ValueError
        Naming the group, if it has no scale site in ``model``, or its vector has the
        wrong shape or a non-finite or negative value.
    """
    sites = list(_sites(model))
    known = {plan.group for _, plan in sites if isinstance(plan, HeadPlan)} | {
        g for _, plan in sites if isinstance(plan, ScalePlan) for g in plan.units}
    for g in scales:
        if g not in known:
            raise ValueError(f"unit group '{g}' has no output-scale site in this model; build it with "
                             f"dynamic=['{g}'] (sites: {sorted(known)})")
    checked: dict[str, torch.Tensor] = {}
    for module, plan in sites:
        touched = False
        for g, keep in ([(plan.group, plan.keep)] if isinstance(plan, HeadPlan) else plan.keep_units.items()):
            if g not in scales:
                continue
            touched = True
            if g not in checked:
                checked[g] = _check_units(g, scales[g], int(keep.sum()))
            if isinstance(plan, HeadPlan):
                plan.units[keep] = checked[g]
            else:
                plan.units[g][keep] = checked[g]
        if not touched:
            continue
        old = module.scale if isinstance(module, UnitScale) else module.head_scale
        new = plan.vector().to(device=old.device, dtype=old.dtype)
        if isinstance(module, UnitScale):
            module.scale = new
            if plan.batch_normalized:
                module.train_scale = plan.vector(training=True).to(device=old.device, dtype=old.dtype)
        else:
            module.head_scale = new


def _check_units(group: str, value, k: int) -> torch.Tensor:
    v = torch.as_tensor(value, dtype=torch.float64)
    if v.dim() == 0:
        v = v.expand(k)
    if v.shape != (k,):
        raise ValueError(f"scale of unit group '{group}' must have shape ({k},) (one per kept unit), "
                         f"got {tuple(v.shape)}")
    if not bool(torch.isfinite(v).all()) or bool((v < 0).any()):
        raise ValueError(f"scale of unit group '{group}' must be finite and >= 0")
    return v
