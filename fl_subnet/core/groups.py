"""Unit groups: sets of interchangeable units and every tensor slice coupled to them.

A *unit group* is, e.g., the hidden neurons of one Linear layer, the channels of a conv
(with its BatchNorm), or the heads of an attention layer (docs/design.md, "Vocabulary").
Hidden neuron ``j`` of Linear ``l`` couples row ``j`` of ``W_l``, entry ``j`` of ``b_l``
and column ``j`` of ``W_{l+1}``. Keeping or dropping a unit keeps or drops all of them.
Groups are found by :func:`fl_subnet.analyze`; a model can also declare its own with a
``unit_groups() -> list[UnitGroup]`` method (see :class:`UnitGroup` for an example, and
docs/any-architecture.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True, eq=False)
class Coupling:
    """One tensor dimension indexed by a group's units, with its index map.

    Attributes
    ----------
    key : str
        ``state_dict`` key of the tensor.
    dim : int
        Dimension of that tensor whose positions belong to the group's units.
    units, positions : torch.Tensor, optional
        Shape ``(M,)`` int64 each: position ``positions[i]`` of ``dim`` belongs to unit
        ``units[i]``. This table is the index map: identity (``None``: unit ``i`` at
        position ``i``), a block (a channel before a flatten owns ``h·w`` positions), an
        offset (a concat) or a repeat (packed q/k/v). A position listed for several units
        (shared by them) is kept while any of them is kept; positions of the dim listed
        by no group are always kept.
    """

    key: str
    dim: int
    units: torch.Tensor | None = None
    positions: torch.Tensor | None = None


@dataclass(frozen=True)
class UnitGroup:
    """A set of ``size`` interchangeable units.

    Attributes
    ----------
    name : str
        Unique name: the path of the module that produces the units (e.g. ``"conv1"``,
        ``"blocks.0.attn"`` for heads).
    size : int
        Number of units in the full model.
    couplings : tuple[Coupling, ...]
        Every (tensor, dim, index map) that the units index.
    consumers : tuple[str, ...]
        Paths of the modules whose *input* mixes these units (the next Linear or conv);
        the output scale (e.g. 1/ξ of inverted dropout) is applied there. For groups
        declared by hand, the compact builder uses exactly these.
    kind : str
        ``neurons``, ``channels``, ``heads``, ``features``, ``ranks`` (of a LoRA adapter,
        :mod:`fl_subnet.core.lora`) or ``units``.

    Examples
    --------
    A model declares its groups with a ``unit_groups()`` method when the analysis cannot
    find them, e.g. around an ``nn.LSTM`` (recurrent layers have no rule). Then
    :func:`fl_subnet.analyze` uses exactly these groups, without tracing or verifying.
    Here the hidden neurons of the head after an LSTM: neuron ``j`` of ``fc1`` is row
    ``j`` of ``fc1.weight``, entry ``j`` of ``fc1.bias`` and column ``j`` of
    ``fc2.weight``, and ``fc2`` mixes them (their output scale applies at its input);
    the LSTM's tensors stay full.

    >>> import torch
    >>> from torch import nn
    >>> from fl_subnet import Coupling, Mask, UnitGroup, analyze
    >>> class LSTMClassifier(nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.lstm = nn.LSTM(6, 32, batch_first=True)
    ...         self.fc1 = nn.Linear(32, 64)
    ...         self.fc2 = nn.Linear(64, 3)
    ...
    ...     def forward(self, x):
    ...         out, _ = self.lstm(x)
    ...         return self.fc2(torch.relu(self.fc1(out[:, -1])))
    ...
    ...     def unit_groups(self):
    ...         fc1 = (Coupling("fc1.weight", 0), Coupling("fc1.bias", 0), Coupling("fc2.weight", 1))
    ...         return [UnitGroup("fc1", 64, fc1, consumers=("fc2",), kind="neurons")]
    >>> spec = analyze(LSTMClassifier)
    >>> mask = Mask({"fc1": torch.arange(0, 64, 2)})  # keep 32 of the 64 neurons
    >>> small = spec.build(spec.gather(LSTMClassifier().state_dict(), mask), mask)
    >>> tuple(small.fc1.weight.shape), tuple(small.fc2.weight.shape)
    ((32, 32), (3, 32))
    """

    name: str
    size: int
    couplings: tuple[Coupling, ...]
    consumers: tuple[str, ...] = ()
    kind: str = "units"


DimEntries = list[tuple[str, torch.Tensor | None, torch.Tensor | None]]


def couplings_by_key(groups: list[UnitGroup]) -> dict[str, dict[int, DimEntries]]:
    """Map each coupled ``state_dict`` key to ``{dim: [(group, units, positions), ...]}``."""
    out: dict[str, dict[int, DimEntries]] = {}
    for g in groups:
        for c in g.couplings:
            out.setdefault(c.key, {}).setdefault(c.dim, []).append((g.name, c.units, c.positions))
    return out


def dim_keep(length: int, entries: DimEntries, keep_units: dict[str, torch.Tensor]) -> torch.Tensor:
    """Boolean ``(length,)``: which positions of a dim a mask keeps.

    ``keep_units[g]`` is group ``g``'s boolean keep vector ``(size,)``. A position is kept
    if no group lists it, or if some kept unit lists it.
    """
    covered = torch.zeros(length, dtype=torch.bool)
    kept = torch.zeros(length, dtype=torch.bool)
    for g, units, pos in entries:
        ku = keep_units[g]
        if units is None:
            covered[: ku.numel()] = True
            kept[: ku.numel()] |= ku
        else:
            covered[pos] = True
            kept[pos[ku[units]]] = True
    return kept | ~covered


def dim_scale(length: int, entries: DimEntries, keep_units: dict[str, torch.Tensor],
              unit_scale: dict[str, torch.Tensor]) -> torch.Tensor:
    """Float64 ``(length,)``: each position's output scale (0 if dropped, 1 if no group's)."""
    out = torch.ones(length, dtype=torch.float64)
    for g, units, pos in entries:
        s = (unit_scale[g] * keep_units[g]).to(out.dtype)
        if units is None:
            out[: s.numel()] = s
        else:
            out[pos] = s[units]
    return out
