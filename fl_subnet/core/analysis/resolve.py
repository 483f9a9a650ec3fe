"""Turn a traced :class:`Propagation` into unit groups, consumers and view sizes."""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx, nn

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
    batch_normalized : frozenset[int]
        Indices into ``consumers`` whose input comes from a BatchNorm layer on every path
        (through activations, pooling, dropout, reshapes and additions only): while that
        BatchNorm normalises by batch statistics, a positive per-unit factor applied
        where the units are produced is cancelled before they reach the consumer.
    """

    groups: list[UnitGroup]
    default: list[str]
    excluded: dict[str, str]
    pinned: dict[str, str]
    consumers: list[tuple[str, int, int, int, DimEntries]]
    views: dict[str, list[tuple[int, DimEntries]]]
    heads: dict[str, str]
    batch_normalized: frozenset[int] = frozenset()


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
    memo: dict[str, bool] = {}
    batch_normalized = frozenset(i for i, (node, arg, *_) in enumerate(consumers)
                                 if _after_batchnorm(prop.gm, nodes[node].args[arg], memo))
    return Resolved(groups, default, excluded, pinned, consumers, views, heads, batch_normalized)


# Ops a unit's value passes through unchanged per unit, so a BatchNorm before them still
# decides whether a factor applied at the unit's producer reaches the next layer.
_PASS_MODULES = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.Hardswish,
                 nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.Identity, nn.Flatten,
                 nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
                 nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
                 nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d)
_PASS_FUNCTIONS = {F.relu, F.relu6, F.leaky_relu, F.elu, F.gelu, F.silu, F.hardswish, torch.relu, torch.tanh,
                   torch.sigmoid, F.dropout, F.dropout1d, F.dropout2d, torch.flatten, F.max_pool1d, F.max_pool2d,
                   F.avg_pool1d, F.avg_pool2d, F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_max_pool2d,
                   operator.add, torch.add}
_PASS_METHODS = {"relu", "relu_", "tanh", "sigmoid", "flatten", "view", "reshape", "contiguous", "add", "add_"}
_FIRST_ARG_ONLY = {"view", "reshape", "flatten", torch.flatten}


def _after_batchnorm(gm, value, memo: dict[str, bool]) -> bool:
    """Whether every path from ``value`` back to a tensor's source passes a BatchNorm
    module first (HeteroFL's ``conv -> scaler -> norm``: a per-unit factor before the norm
    is cancelled by batch statistics). Anything else met first (a parametric layer, an
    input, an op not listed above) answers False."""
    if not isinstance(value, fx.Node):
        return True  # a constant: carries no unit
    if value.name in memo:
        return memo[value.name]
    memo[value.name] = False  # cycles cannot occur in an fx graph; this guards re-entry
    if value.op == "call_module":
        module = gm.get_submodule(str(value.target))
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            memo[value.name] = True
            return True
        ok = isinstance(module, _PASS_MODULES)
        inputs = value.args[:1]
    elif value.op == "call_function":
        ok = value.target in _PASS_FUNCTIONS
        inputs = value.args[:1] if value.target in _FIRST_ARG_ONLY else value.args
    elif value.op == "call_method":
        ok = value.target in _PASS_METHODS
        inputs = value.args[:1] if value.target in _FIRST_ARG_ONLY else value.args
    else:
        ok = False
        inputs = ()
    tensors = [a for a in inputs if isinstance(a, fx.Node)]
    memo[value.name] = ok and bool(tensors) and all(_after_batchnorm(gm, a, memo) for a in tensors)
    return memo[value.name]


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
