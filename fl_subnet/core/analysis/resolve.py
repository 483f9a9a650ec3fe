"""Turn a traced :class:`Propagation` into unit groups, consumers and view sizes."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..groups import Coupling, DimEntries, UnitGroup
from .labels import HARD, SOFT, Label
from .trace import Propagation
from fl_subnet.exceptions import AnalysisError  # noqa: F401  (re-exported: raised here)


@dataclass
class Resolved:
    """What the compact builder needs besides the groups.

    Attributes
    ----------
    groups : list[UnitGroup]
        Every group a mask may name (candidates), in graph order.
    default : list[str]
        Names of the groups masked by default.
    excluded : dict[str, str]
        Candidate groups left full by default → why (residual stream, normalized).
    pinned : dict[str, str]
        Spaces that can never be masked → why (input, output, no rule, structure).
    consumers : list[tuple[str, int, int, int, DimEntries]]
        ``(node, arg, dim, length, entries)``: where a group's units are mixed (the
        output scale is applied to that input of that node).
    views : dict[str, list[tuple[int, DimEntries]]]
        Reshape node → per output dim ``(full length, entries)`` (entries empty: no unit).
    heads : dict[str, str]
        ``nn.MultiheadAttention`` module path → its head group's name.
    """

    groups: list[UnitGroup]
    default: list[str]
    excluded: dict[str, str]
    pinned: dict[str, str]
    consumers: list[tuple[str, int, int, int, DimEntries]]
    views: dict[str, list[tuple[int, DimEntries]]]
    heads: dict[str, str]


def resolve(prop: Propagation, exclude: frozenset[str] = frozenset()) -> Resolved:
    """Groups from the merged spaces; raises :class:`AnalysisError` for a group that would
    be masked by default (and is not in ``exclude``) but meets an op without a rule."""
    spaces = prop.spaces
    nodes = {n.name: n for n in prop.gm.graph.nodes}
    roots = sorted({spaces.find(s.id) for s in spaces.items})
    names: dict[int, str] = {}
    pinned, excluded, default = {}, {}, []
    for r in roots:
        sp = spaces.items[r]
        hard = {k: v for k, v in sp.reasons.items() if k in HARD}
        soft = {k: v for k, v in sp.reasons.items() if k in SOFT}
        if hard:
            only_op = set(hard) == {"op"}
            if only_op and not soft and sp.name not in exclude:
                raise AnalysisError(
                    f"unit group '{sp.name}' ({sp.kind}) passes through {hard['op']}, which has no "
                    f"fl_subnet rule: add a rule, or leave the group full with exclude=['{sp.name}']")
            pinned[sp.name] = "; ".join(f"{k}: {v}" for k, v in hard.items())
            continue
        names[r] = sp.name
        if soft:
            excluded[sp.name] = "; ".join(f"{k}: {v}" for k, v in soft.items())
        else:
            default.append(sp.name)

    def entries(label: Label) -> DimEntries:
        out = []
        for seg in label:
            r = spaces.find(seg.space)
            if r in names:
                b = spaces.items[r].block
                units = (seg.atoms // b).view(-1, 1).expand_as(seg.pos).reshape(-1)
                out.append((names[r], units, seg.pos.reshape(-1)))
        return out

    couplings: dict[int, list[Coupling]] = {r: [] for r in names}
    for key, dim, seg in prop.couplings:
        r = spaces.find(seg.space)
        if r in names:
            (g, units, pos), = entries((seg,))
            couplings[r].append(Coupling(key, dim, units, pos))
    mixers: dict[int, list[str]] = {r: [] for r in names}  # modules that mix each group's units
    for node_name, _, _, label in prop.consumptions:
        for seg in label:
            r = spaces.find(seg.space)
            path = _module_path(nodes[node_name])
            if r in mixers and path is not None and path not in mixers[r]:
                mixers[r].append(path)
    groups = [UnitGroup(names[r], spaces.items[r].n // spaces.items[r].block, tuple(couplings[r]),
                        tuple(mixers[r]), kind=_kind(spaces.items[r])) for r in names if couplings[r]]
    kept_names = {g.name for g in groups}
    default = [n for n in default if n in kept_names]
    consumers = []
    for node, arg, dim, label in prop.consumptions:
        ent = [e for e in entries(label) if e[0] in kept_names]
        if ent and all(_unique(e[2]) for e in ent):
            shape = prop.shape(nodes[node].args[arg])
            consumers.append((node, arg, dim % len(shape), shape[dim], ent))
    views = {}
    for node in prop.gm.graph.nodes:
        if node.op == "call_method" and node.target in ("view", "reshape") or node.target is torch.reshape:
            labels = prop.values.get(node.name) or []
            shape = prop.shape(node)
            views[node.name] = [(shape[d], [e for e in entries(lab) if e[0] in kept_names])
                                for d, lab in enumerate(labels)]
    heads = {}
    for r in names:
        sp = spaces.items[r]
        if sp.kind == "heads" and names[r] in kept_names:
            heads[sp.name] = sp.name
    return Resolved(groups, default, excluded, pinned, consumers, views, heads)


def _unique(pos: torch.Tensor) -> bool:
    return pos.unique().numel() == pos.numel()


def _module_path(node) -> str | None:
    """The module a node runs in: its target for ``call_module``, else the innermost
    module of its ``nn_module_stack``."""
    if node.op == "call_module":
        return str(node.target)
    stack = node.meta.get("nn_module_stack") or {}
    return list(stack.values())[-1][0] if stack else None


def _kind(space) -> str:
    """A Linear's neurons viewed as ``(heads, head_dim)`` are heads."""
    return "heads" if space.block > 1 and space.kind == "neurons" else space.kind
