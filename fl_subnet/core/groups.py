"""Unit groups: sets of interchangeable units and every tensor slice coupled to them.

A *unit group* is, e.g., the hidden neurons of one Linear layer. Hidden neuron ``j``
of Linear ``l`` couples row ``j`` of ``W_l``, entry ``j`` of ``b_l`` and column ``j`` of
``W_{l+1}`` (DESIGN.md §2). Keeping or dropping a unit keeps or drops all of them.

The analysis here covers chains of Linear-like layers with element-wise layers in
between (MLPs and :class:`~fl_subnet.models.ShallowReLU`). Any model can supply its own
groups by defining ``unit_groups() -> list[UnitGroup]``; callers only ever see
:class:`UnitGroup`, so richer analyses (CNN + BatchNorm, residual blocks, attention
heads) plug in without changing them.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .models import FixedReadout


@dataclass(frozen=True)
class Coupling:
    """One tensor dimension indexed by a group's units.

    Attributes
    ----------
    key : str
        ``state_dict`` key of the tensor.
    dim : int
        Dimension of that tensor whose positions are the group's units.
    """

    key: str
    dim: int


@dataclass(frozen=True)
class UnitGroup:
    """A set of ``size`` interchangeable units.

    Attributes
    ----------
    name : str
        Unique name (by default the producing module's path, e.g. ``"net.0"``).
    size : int
        Number of units in the full model.
    couplings : tuple[Coupling, ...]
        Every (tensor, dim) whose positions ``0..size-1`` are these units.
    consumers : tuple[str, ...]
        Paths of the modules whose *input* carries these units; the per-group output
        scale (e.g. 1/ξ of inverted dropout) is applied there.
    """

    name: str
    size: int
    couplings: tuple[Coupling, ...]
    consumers: tuple[str, ...]


# Layers that map features linearly: weight is (out, in); bias (out,) if present.
_LINEAR_LIKE: tuple[type[nn.Module], ...] = (nn.Linear, FixedReadout)
# Layers that act element-wise (or not at all) on the hidden features.
_ELEMENTWISE: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.ELU, nn.Softplus,
    nn.Identity, nn.Dropout,
)
# Layers allowed before the first linear layer (they do not touch hidden units).
_INPUT_ONLY: tuple[type[nn.Module], ...] = (nn.Flatten,)


def _leaves(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if n and not list(m.children())]


def find_unit_groups(model: nn.Module) -> list[UnitGroup]:
    """Find the unit groups of ``model``.

    Parameters
    ----------
    model : nn.Module
        A model whose ``unit_groups()`` method returns its groups, or a chain of
        ``nn.Linear`` / :class:`FixedReadout` layers (in registration order, which
        must be the execution order) with element-wise layers between them.

    Returns
    -------
    list[UnitGroup]
        One group per hidden layer, in order. Input features and outputs are never
        grouped.

    Raises
    ------
    NotImplementedError
        If a layer is not supported by the chain analysis (the message names it), or
        consecutive linear layers do not chain (``out_features != in_features``).
    """
    custom = getattr(model, "unit_groups", None)
    if callable(custom):
        return list(custom())
    linears: list[tuple[str, nn.Module]] = []
    for name, module in _leaves(model):
        if isinstance(module, _LINEAR_LIKE):
            linears.append((name, module))
        elif isinstance(module, _INPUT_ONLY) and not linears:
            continue
        elif not isinstance(module, _ELEMENTWISE):
            raise NotImplementedError(
                f"fl_subnet cannot find unit groups through module '{name}' "
                f"({type(module).__name__}); define model.unit_groups() for it"
            )
    groups = []
    for (pname, prod), (cname, cons) in zip(linears, linears[1:]):
        size = prod.weight.shape[0]
        if cons.weight.shape[1] != size:
            raise NotImplementedError(
                f"layers '{pname}' (out {size}) and '{cname}' (in "
                f"{cons.weight.shape[1]}) do not form a chain"
            )
        couplings = [Coupling(f"{pname}.weight", 0)]
        if getattr(prod, "bias", None) is not None:
            couplings.append(Coupling(f"{pname}.bias", 0))
        couplings.append(Coupling(f"{cname}.weight", 1))
        groups.append(UnitGroup(pname, size, tuple(couplings), (cname,)))
    return groups


def couplings_by_key(groups: list[UnitGroup]) -> dict[str, list[tuple[int, str]]]:
    """Map each coupled ``state_dict`` key to its ``(dim, group name)`` pairs.

    Raises
    ------
    ValueError
        If two groups claim the same dimension of one tensor.
    """
    out: dict[str, list[tuple[int, str]]] = {}
    for g in groups:
        for c in g.couplings:
            dims = out.setdefault(c.key, [])
            if any(d == c.dim for d, _ in dims):
                raise ValueError(f"two unit groups couple dim {c.dim} of '{c.key}'")
            dims.append((c.dim, g.name))
    return out
