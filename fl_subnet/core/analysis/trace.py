"""Trace a model with torch.fx and propagate unit labels through its graph.

The model is traced symbolically (functional ops — ``F.relu``, ``x.view``,
``torch.flatten``, ``+``, ``torch.cat``, ``@`` — are seen, not only leaf modules),
shapes come from :class:`torch.fx.passes.shape_prop.ShapeProp` on the ``meta`` device
(nothing is allocated), and every node gets one label per output dim
(:mod:`~fl_subnet.core.analysis.labels`). Layer knowledge lives in
:mod:`~fl_subnet.core.analysis.rules`.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from . import rules as R
from .labels import EMPTY, Label, Segment, Spaces, identity_label, reshape_labels, shift, unite


class SubnetTracer(fx.Tracer):
    """Leaf modules are exactly those with a rule; everything else is traced through."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return R.module_rule(m) is not None


@dataclass
class Propagation:
    """The state of one analysis: spaces, parameter couplings, consumptions, node labels."""

    gm: fx.GraphModule
    spaces: Spaces = field(default_factory=Spaces)
    couplings: list[tuple[str, int, Segment]] = field(default_factory=list)
    consumptions: list[tuple[str, int, int, Label]] = field(default_factory=list)
    values: dict[str, object] = field(default_factory=dict)

    # ---------------------------------------------------------------- helpers for rules
    def shape(self, node) -> list[int]:
        meta = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
        return list(meta.shape) if meta is not None and hasattr(meta, "shape") else []

    def new_space(self, n: int, name: str, kind: str) -> tuple[int, Label]:
        sid = self.spaces.new(n, name, kind)
        return sid, identity_label(sid, n)

    def couple(self, key: str, dim: int, label: Label) -> None:
        for seg in label:
            self.couplings.append((key, dim, seg))

    def couple_table(self, key: str, dim: int, sid: int, atoms: torch.Tensor, pos: torch.Tensor) -> None:
        self.couplings.append((key, dim, Segment(sid, atoms, pos)))

    def consume(self, node, arg: int, dim: int, label: Label) -> None:
        """``node`` mixes the units of its input ``arg`` along ``dim`` (output scale goes here)."""
        if label:
            self.consumptions.append((node.name, arg, dim, label))

    def unite(self, a: Label, b: Label, node, residual: bool = False) -> Label:
        return unite(self.spaces, a, b, _where(node), residual)

    def softmax(self, node, x: list[Label], dim: int) -> list[Label]:
        d = dim % len(x)
        if x[d]:
            self.spaces.flag_label(x[d], "normalized", f"{_where(node)}: softmax over units")
        return list(x)

    def block(self, node, *values) -> None:
        """An op without a rule: the units it touches stay full (flag 'op')."""
        for v in values:
            if isinstance(v, list):
                for lab in v:
                    self.spaces.flag_label(lab, "op", _where(node))
            elif isinstance(v, (tuple, list)):
                self.block(node, *v)


def _where(node) -> str:
    """The op and the module it runs in, e.g. ``'torch.cumsum' in module 'mix' (CumSum)``."""
    if node.op == "call_module":
        return f"module '{node.target}'"
    target = node.target if isinstance(node.target, str) else (
        f"{getattr(node.target, '__module__', '') or ''}.{getattr(node.target, '__name__', node.target)}".lstrip("."))
    stack = node.meta.get("nn_module_stack") or {}
    if stack:
        path, cls = list(stack.values())[-1]
        return f"'{target}' in module '{path}' ({getattr(cls, '__name__', cls)})"
    return f"'{target}' in the model's forward"


def trace(model: nn.Module, example: torch.Tensor | tuple) -> Propagation:
    """Trace ``model`` (on any device; shapes on ``meta``) and label every node.

    Raises
    ------
    AnalysisError
        (a ``NotImplementedError``) If the model has a recurrent layer (``nn.LSTM``,
        ``nn.GRU``, ``nn.RNN`` or a cell: no rule, their hidden units are not a supported
        unit group), or torch.fx cannot trace it (data-dependent control flow); the
        message says how to declare groups by hand instead.
    """
    from .resolve import AnalysisError  # resolve imports this module

    recurrent = [(path, type(m).__name__) for path, m in model.named_modules()
                 if isinstance(m, (nn.RNNBase, nn.RNNCellBase))]
    if recurrent:
        raise AnalysisError(
            f"{type(model).__name__} has recurrent layer(s) "
            f"{', '.join(f'{path!r} (nn.{cls})' for path, cls in recurrent)}: recurrent layers (nn.LSTM, nn.GRU, "
            f"nn.RNN and their cells) have no fl_subnet rule, their hidden units are not a supported unit group, "
            f"so the model cannot be analysed automatically. Declare the groups to mask by hand with a "
            f"model.unit_groups() method (e.g. the hidden neurons of the Linear layers after the recurrent one; "
            f"the recurrent layer's tensors then stay full): see docs/any-architecture.md")
    try:
        graph = SubnetTracer().trace(model)
    except Exception as err:  # noqa: BLE001 — fx raises many kinds
        raise AnalysisError(
            f"torch.fx cannot trace {type(model).__name__}: {err}. Declare its unit groups by hand with a "
            "model.unit_groups() method (docs/any-architecture.md)") from err
    gm = fx.GraphModule(model, graph)
    examples = example if isinstance(example, tuple) else (example,)
    meta_gm = gm.to("meta") if any(t.device.type != "meta" for t in gm.state_dict().values()) else gm
    was_training = meta_gm.training
    ShapeProp(meta_gm.eval()).propagate(*(t.to("meta") for t in examples))
    meta_gm.train(was_training)
    prop = Propagation(gm)
    for node in gm.graph.nodes:
        prop.values[node.name] = _propagate(prop, node)
    return prop


def _val(prop: Propagation, a):
    if isinstance(a, fx.Node):
        return prop.values.get(a.name)
    if isinstance(a, (tuple, list)):
        return type(a)(_val(prop, x) for x in a)
    return a


def _propagate(prop: Propagation, node: fx.Node):
    shape = prop.shape(node)
    if node.op == "placeholder":
        return [EMPTY] * len(shape)
    if node.op == "get_attr":
        return R.Param(str(node.target), tuple(shape))
    if node.op == "output":
        def pin(v):
            if isinstance(v, list):
                for lab in v:
                    prop.spaces.flag_label(lab, "output", "reaches the model output")
            elif isinstance(v, (tuple, list)):
                for x in v:
                    pin(x)
        pin(_val(prop, node.args[0]))
        return None
    args = [_val(prop, a) for a in node.args]
    kwargs = {k: _val(prop, v) for k, v in node.kwargs.items()}
    if node.op == "call_module":
        module = prop.gm.get_submodule(node.target)
        rule = R.module_rule(module)
        tensors = [a for a in args if isinstance(a, list)]
        if rule is R._mha:
            return rule(prop, node, module, *args[:3])
        return rule(prop, node, module, *(tensors[:1] or [[EMPTY] * 0]))
    return _call(prop, node, args, kwargs, shape)


def _call(prop: Propagation, node: fx.Node, args, kwargs, shape):
    t = node.target
    is_method = node.op == "call_method"
    x = args[0] if args else None
    if not shape and not (isinstance(x, tuple) and t is operator.getitem):
        return None  # sizes, dims, other non-tensors
    if (t in R.UNARY_FUNCS and not is_method) or (is_method and t in R.UNARY_METHODS):
        return list(x) if isinstance(x, list) else [EMPTY] * len(shape)
    if t in R.POOL_FUNCS and not is_method:
        return [x[0], x[1]] + [EMPTY] * (len(shape) - 2)
    if (not is_method and t in R.BINARY) or (is_method and t in R.BINARY_METHODS):
        residual = R.BINARY[t] if not is_method else R.BINARY_METHODS[t]
        return _binary(prop, node, args[:2], shape, residual)
    if (is_method and t in R.RESHAPE_METHODS) or (not is_method and t in R.RESHAPE_FUNCS):
        return reshape_labels(prop.spaces, x, prop.shape(node.args[0]), shape, node.name)
    if is_method and t in ("transpose", "permute", "t") or t is torch.transpose:
        return _permute(node, x, args, shape)
    if t in R.MATMUL or (is_method and t in ("matmul", "bmm")):
        return _matmul(prop, node, args[0], args[1], shape)
    if t is torch.nn.functional.linear:
        w, b = args[1], (args[2] if len(args) > 2 else kwargs.get("bias"))
        if isinstance(w, R.Param):
            return R.linear_like(prop, node, x, w.key, b.key if isinstance(b, R.Param) else None, w.shape[0], w.key.rpartition(".")[0] or w.key)
    if t in R.SOFTMAX or (is_method and t in ("softmax", "log_softmax")):
        return prop.softmax(node, x, kwargs.get("dim", args[1] if len(args) > 1 else -1))
    if t in (torch.cat, torch.concat):
        return _cat(prop, node, args[0], kwargs.get("dim", args[1] if len(args) > 1 else 0), shape)
    if (is_method and t in R.REDUCE_METHODS) or (not is_method and t in R.REDUCE_FUNCS):
        return _reduce(prop, node, x, kwargs.get("dim", args[1] if len(args) > 1 else None),
                       kwargs.get("keepdim", args[2] if len(args) > 2 else False))
    if t is torch.nn.functional.scaled_dot_product_attention:
        q, k, v = args[:3]
        prop.unite(q[-1], k[-1], node)
        for d in range(len(q) - 2):
            prop.unite(q[d], k[d], node)
            prop.unite(q[d], v[d], node)
        return [*q[:-1], v[-1]]
    if t is operator.getitem:
        if isinstance(x, tuple):
            return x[args[1]]
        return _getitem(prop, node, x, args[1], shape)
    prop.block(node, *args, *kwargs.values())
    return [EMPTY] * len(shape)


def _binary(prop, node, operands, shape, residual):
    """``+ - * /`` with broadcasting: operands that both carry units on a dim carry the
    same units (a residual add merges two streams); a parameter operand is coupled."""
    n = len(shape)
    pairs = [(v, prop.shape(a)) for v, a in zip(operands, node.args) if isinstance(v, list)]
    params = [v for v in operands if isinstance(v, R.Param)]
    out: list[Label] = []
    for d in range(n):
        big = [v[d - (n - len(v))] for v, sh in pairs if _size_at(sh, d, n) == shape[d]]
        lab = big[0] if big else EMPTY
        for other in big[1:]:
            lab = prop.unite(lab, other, node, residual)
        for prm in params:
            k = d - (n - len(prm.shape))
            if k >= 0 and prm.shape[k] == shape[d] and lab:
                prop.couple(prm.key, k, lab)
        out.append(lab)
    return out


def _size_at(shape: list[int], d: int, n: int) -> int:
    k = d - (n - len(shape))
    return shape[k] if k >= 0 else 1


def _permute(node, x, args, shape):
    n = len(x)
    if node.target == "t":
        order = list(range(n))[::-1]
    elif node.target == "permute":
        dims = args[1] if len(args) == 2 and isinstance(args[1], (tuple, list)) else args[1:]
        order = [d % n for d in dims]
    else:
        a, b = args[1] % n, args[2] % n
        order = list(range(n))
        order[a], order[b] = order[b], order[a]
    return [x[i] for i in order]


def _matmul(prop, node, a, b, shape):
    if isinstance(b, R.Param) and isinstance(a, list) and len(b.shape) == 2:
        return _param_matmul(prop, node, a, b)
    if not (isinstance(a, list) and isinstance(b, list)) or len(a) < 2 or len(b) < 2:
        prop.block(node, a, b)
        return [EMPTY] * len(shape)
    prop.consume(node, 0, len(a) - 1, a[-1])
    prop.unite(a[-1], b[-2], node)
    n = len(shape)
    batch = []
    for d in range(n - 2):
        la = a[d - (n - len(a))] if d - (n - len(a)) >= 0 else EMPTY
        lb = b[d - (n - len(b))] if d - (n - len(b)) >= 0 else EMPTY
        batch.append(prop.unite(la, lb, node) if (la or lb) else EMPTY)
    return [*batch, a[-2], b[-1]]


def _param_matmul(prop, node, a, w: R.Param):
    """``x @ W`` with a parameter ``W`` of shape ``(in, out)``."""
    prop.consume(node, 0, len(a) - 1, a[-1])
    prop.couple(w.key, 0, a[-1])
    _, lab = prop.new_space(w.shape[1], w.key, "neurons")
    prop.couple(w.key, 1, lab)
    return [*a[:-1], lab]


def _cat(prop, node, tensors, dim, shape):
    n = len(shape)
    d = dim % n
    out = [EMPTY] * n
    offset, segs = 0, []
    for src, lab in zip(node.args[0], tensors):
        if not isinstance(lab, list):
            prop.block(node, *[t for t in tensors if isinstance(t, list)])
            return [EMPTY] * n
        segs.extend(shift(lab[d], offset))
        offset += prop.shape(src)[d]
        for k in range(n):
            if k != d and lab[k]:
                out[k] = prop.unite(out[k], lab[k], node) if out[k] else lab[k]
    out[d] = tuple(segs)
    return out


def _reduce(prop, node, x, dim, keepdim):
    n = len(x)
    dims = list(range(n)) if dim is None else [d % n for d in (dim if isinstance(dim, (tuple, list)) else [dim])]
    for d in dims:
        if x[d]:
            prop.spaces.flag_label(x[d], "op", f"{_where(node)}: reduces over units")
    return [EMPTY if d in dims else x[d] for d in range(n) if keepdim or d not in dims]


def _getitem(prop, node, x, index, shape):
    """Basic indexing: ints drop dims, ``:`` keeps them, ``None`` adds one; a partial
    slice of a dim that carries units keeps those units full."""
    idx = index if isinstance(index, tuple) else (index,)
    if any(i is Ellipsis for i in idx):
        k = idx.index(Ellipsis)
        idx = idx[:k] + (slice(None),) * (len(x) - (len(idx) - 1 - sum(i is None for i in idx))) + idx[k + 1:]
    out, d = [], 0
    for i in idx:
        if i is None:
            out.append(EMPTY)
            continue
        if isinstance(i, slice):
            if i != slice(None) and x[d]:
                prop.spaces.flag_label(x[d], "op", f"{_where(node)}: slices a dim of units")
                out.append(EMPTY)
            else:
                out.append(x[d])
        elif isinstance(i, int):
            if x[d]:
                prop.spaces.flag_label(x[d], "op", f"{_where(node)}: indexes a dim of units")
        else:
            prop.block(node, x)
            return [EMPTY] * len(shape)
        d += 1
    out.extend(x[d:])
    return out if len(out) == len(shape) else [EMPTY] * len(shape)
