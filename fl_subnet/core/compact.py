"""Build the compact ``nn.Module`` of a sub-model without allocating the full model."""

from __future__ import annotations

import weakref
from collections import OrderedDict
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .groups import UnitGroup
from .masks import Mask
from .unit_scale import HeadPlan, ScalePlan, UnitScale


def _as_dtype_of(old: torch.Tensor | None, value: torch.Tensor) -> torch.Tensor:
    """``value`` in the model's own floating dtype: a server may send float64 arrays for a
    float32 model (Flower's FedAdam returns float64), as ``load_state_dict`` would copy them."""
    if old is not None and old.is_floating_point() and value.is_floating_point() and value.dtype != old.dtype:
        return value.to(old.dtype)
    return value


def _set_tensor(model: nn.Module, key: str, value: torch.Tensor) -> None:
    path, _, leaf = key.rpartition(".")
    module = model.get_submodule(path) if path else model
    if leaf in module._parameters:
        old = module._parameters[leaf]
        module._parameters[leaf] = nn.Parameter(_as_dtype_of(old, value), requires_grad=old.requires_grad)
    elif leaf in module._buffers:
        module._buffers[leaf] = _as_dtype_of(module._buffers[leaf], value)
    else:
        raise ValueError(f"'{key}' is neither a parameter nor a buffer of the model")


def _scale_hook(scale: float):
    def hook(_module, args):
        return (args[0] * scale, *args[1:])
    return hook


def apply_output_scale(model: nn.Module, groups: Sequence[UnitGroup], mask: Mask) -> list:
    """Multiply each group's kept units by its mask scale where they are consumed.

    Registers a forward pre-hook on every consumer module of a group whose scale is not
    1 (inverted dropout: ``h ↦ h/ξ``, Srivastava et al. 2014). Returns the hook handles.
    """
    handles = []
    for g in groups:
        s = mask.scale.get(g.name, 1.0)
        if isinstance(s, torch.Tensor) and s.dim() > 0:
            raise NotImplementedError(
                f"per-unit output scales (mask scale['{g.name}'] of shape {tuple(s.shape)}) need a traced "
                "model (fl_subnet.analyze); a model declaring unit_groups() takes one float scale per group")
        s = float(s)
        if s != 1.0:
            for c in g.consumers:
                handles.append(model.get_submodule(c).register_forward_pre_hook(_scale_hook(s)))
    return handles


def build_compact_module(
    factory: Callable[[], nn.Module],
    compact_state: Mapping[str, torch.Tensor],
    groups: Sequence[UnitGroup],
    mask: Mask,
) -> nn.Module:
    """Instantiate the sub-model that holds exactly ``compact_state``.

    The architecture is built on the ``meta`` device (no memory for the full model),
    then every parameter and buffer is replaced by its compact tensor, and the group
    output scales are attached as forward pre-hooks. Buffers outside the ``state_dict``
    (registered with ``persistent=False``: rotary frequencies, position ids) are not in
    ``compact_state``: they are taken whole from one full build of ``factory`` on the CPU,
    made once per factory and process (:func:`_non_persistent_buffers`), and only for a
    model that has such buffers.

    Parameters
    ----------
    factory : Callable[[], nn.Module]
        Builds the *full* architecture (any initialisation is discarded).
    compact_state : Mapping[str, torch.Tensor]
        Output of :meth:`Slicer.gather` (or what the server sent).
    groups : Sequence[UnitGroup]
        The full model's unit groups.
    mask : Mask
        The mask the slice was cut with (for the output scales).

    Returns
    -------
    nn.Module
        The compact model on the CPU, in training mode.

    Raises
    ------
    ValueError
        If a key of ``compact_state`` is not in the model, or the model has a parameter
        or buffer that ``compact_state`` lacks.
    """
    with torch.device("meta"):
        model = factory()
    if mask.block_scale:
        raise NotImplementedError("depth-block scales (Mask.block_scale) need a traced model (fl_subnet.analyze)")
    expected = set(model.state_dict(keep_vars=True))
    missing = sorted(expected - set(compact_state))
    if missing:
        raise ValueError(f"compact state lacks {missing}")
    for key, value in compact_state.items():
        _set_tensor(model, key, value)
    _fill_non_persistent(model, factory)
    _resize(model)
    apply_output_scale(model, groups, mask)
    return model.train()


_NON_PERSISTENT: "OrderedDict[Callable, dict[str, torch.Tensor]]" = OrderedDict()
#: Factories whose non-persistent buffers are kept per process (least recently used dropped first).
MAX_NON_PERSISTENT = 8


def _fill_non_persistent(model: nn.Module, factory: Callable[[], nn.Module]) -> None:
    """Give every buffer still on the ``meta`` device after the state was set (those
    outside the ``state_dict``) its value in a full build of ``factory`` (a copy).

    Raises
    ------
    ValueError
        Naming a buffer that a full build does not hold either.
    """
    meta = [name for name, b in model.named_buffers() if b.is_meta]
    if not meta:
        return
    values = _non_persistent_buffers(factory)
    for name in meta:
        if name not in values:
            raise ValueError(f"buffer '{name}' is neither in the compact state nor a non-persistent buffer "
                             "of the full model")
        path, _, leaf = name.rpartition(".")
        (model.get_submodule(path) if path else model)._buffers[leaf] = values[name].clone()


def _non_persistent_buffers(factory: Callable[[], nn.Module]) -> dict[str, torch.Tensor]:
    """The buffers of a full CPU build of ``factory`` that its ``state_dict`` leaves out,
    cached per factory (the build is dropped: only these buffers are kept)."""
    try:
        hit = _NON_PERSISTENT.get(factory)
    except TypeError:  # an unhashable factory: built each time
        hit, factory_key = None, None
    else:
        factory_key = factory
    if hit is not None:
        _NON_PERSISTENT.move_to_end(factory_key)
        return hit
    with torch.device("cpu"):
        full = factory()
    keys = set(full.state_dict(keep_vars=True))
    out = {name: b.detach() for name, b in full.named_buffers() if name not in keys}
    if factory_key is not None:
        _NON_PERSISTENT[factory_key] = out
        while len(_NON_PERSISTENT) > MAX_NON_PERSISTENT:
            _NON_PERSISTENT.popitem(last=False)
    return out


def build_compact_graph(gm: "fx.GraphModule", resolved, compact_state: Mapping[str, torch.Tensor],
                        slicer, mask: Mask, *, full: bool = False, blocks=None,
                        dynamic: Collection[str] = ()) -> nn.Module:
    """The compact sub-model as a copy of the traced graph (``fx.GraphModule``).

    Every parameter and buffer is replaced by its compact tensor, the size attributes of
    ruled layers follow the tensors, an ``nn.MultiheadAttention`` with masked heads
    becomes a :class:`~fl_subnet.core.attention.SubnetMultiheadAttention`, the size
    constants of ``view``/``reshape`` calls on dims that carry units are set to the
    compact sizes (a hard-coded ``x.view(-1, 16 * 5 * 5)`` keeps working), each
    group's output scale multiplies the input of the layers that mix its units, skipped
    depth blocks become the identity and a kept block's ``Mask.block_scale`` multiplies
    its branch before the add (:class:`BlockScale`).

    With ``full=True`` it builds the *reference*: the full-size model in which every
    dropped unit's contribution is removed (its positions scaled by 0 where it is mixed)
    — the function the compact model must compute.

    Parameters
    ----------
    gm : fx.GraphModule
        The traced full model (on the ``meta`` device; it is copied, not changed).
    resolved : Resolved
        The analysis (consumers, view sizes, head groups).
    compact_state : Mapping[str, torch.Tensor]
        :meth:`Slicer.gather` output (or, with ``full=True``, the full state).
    slicer : Slicer
        Over every group a mask may name.
    mask : Mask
        Kept units and output scales (a float or a ``(k_g,)`` tensor per group).
    dynamic : Collection[str]
        Groups whose output scales may change after the build (:func:`set_unit_scales`;
        FjORD's per-batch widths, :mod:`fl_subnet.core.ordered`): a :class:`UnitScale` is
        inserted at every layer that mixes their units even where the scale is 1.

    Notes
    -----
    The graph edits depend only on the mask's *structure* (skipped blocks, kept-head
    counts, view sizes, which consumers carry a scale), so each structure is compiled
    once per traced graph and process (an LRU of :data:`MAX_TEMPLATES`); a build then
    copies that template's module tree and sets the tensors and scale vectors, without
    recompiling the graph (``bench/analysis.py`` times a build). Models of one structure
    share the template's fx graph and compiled ``forward``: edit ``model.graph`` only on
    a ``copy.deepcopy`` of the model.

    Returns
    -------
    nn.Module
        On the CPU, in training mode, with ``state_dict`` keys equal to the full model's.
        Every inserted :class:`UnitScale` carries the :class:`ScalePlan` its vector is
        derived from, and every :class:`SubnetMultiheadAttention` its head group.

    Raises
    ------
    ValueError
        If ``compact_state`` lacks a parameter or buffer of the model, or has extra keys,
        or ``dynamic`` names a group the slicer does not know, or a ``block_scale`` names
        a block the model lacks or skips, or is not finite and > 0.
    """
    from .groups import dim_keep, dim_scale

    dynamic = frozenset(dynamic)
    unknown = sorted(dynamic - set(slicer.by_name))
    if unknown:
        raise ValueError(f"dynamic names unknown unit group(s) {unknown}; groups: {sorted(slicer.by_name)}")
    keep_units = slicer.keep_units(mask)
    unit_scale = {g.name: _unit_scale(mask, g) for g in slicer.groups}
    heads = {}  # attention path -> (kept heads, head scale vector, plan)
    for path, gname in resolved.heads.items():
        keep = keep_units[gname]
        scale = unit_scale[gname] * keep if full else unit_scale[gname][keep]
        heads[path] = (slicer.by_name[gname].size if full else int(keep.sum()), scale,
                       HeadPlan(gname, keep.clone(), unit_scale[gname].clone(), full))
    views = {}  # view/reshape node -> its compact size per dim (None: unchanged)
    if not full:
        for name, dims in resolved.views.items():
            sizes = tuple(int(dim_keep(length, ent, keep_units).sum()) if ent else None for length, ent in dims)
            if any(s is not None for s in sizes):
                views[name] = sizes
    dtype = _float_dtype(compact_state)
    normalized = resolved.batch_normalized if mask.scale_before_norm else frozenset()
    sites = {}  # consumer index -> (scale vector, plan): where an output scale is not 1
    for i, (_, _, _, length, ent) in enumerate(resolved.consumers):
        keep_pos = None if full else dim_keep(length, ent, keep_units)
        vec = dim_scale(length, ent, keep_units, unit_scale)
        if keep_pos is not None:
            vec = vec[keep_pos]
        if bool((vec == 1).all()) and not any(g in dynamic for g, _, _ in ent):
            continue
        names = {g for g, _, _ in ent}
        sites[i] = (vec, ScalePlan(length, list(ent), {g: keep_units[g].clone() for g in names},
                                   {g: unit_scale[g].clone() for g in names}, keep_pos, [],
                                   batch_normalized=i in normalized))
    block_scale = _block_scales(mask, blocks)
    structure = (full, bool(normalized), tuple(sorted(mask.skip)), tuple(sorted((p, h[0]) for p, h in heads.items())),
                 tuple(sorted(views.items())), tuple(sorted(sites)), tuple(sorted(block_scale)))
    template = _template(gm, structure, resolved, mask.skip, blocks, heads, views, sites, tuple(sorted(block_scale)))
    model = _clone(template.model)
    missing, extra = sorted(template.keys - set(compact_state)), sorted(set(compact_state) - template.keys)
    if missing or extra:
        raise ValueError(f"compact state does not match the model: missing {missing}, extra {extra}")
    for key, value in compact_state.items():
        _set_tensor(model, key, value)
    _resize(model)
    for path in template.heads:
        _, scale, plan = heads[path]
        attention = model.get_submodule(path)
        attention.head_scale, attention.fl_subnet_heads = scale.to(dtype), plan
    for i, shape in template.sites.items():
        vec, plan = sites[i]
        plan.shape = list(shape)
        site = model.get_submodule(_site_name(i))
        site.scale, site.plan = vec.view(shape).to(dtype), plan
        if plan.batch_normalized:
            site.train_scale = plan.vector(training=True).to(dtype)
    for name, factor in block_scale.items():
        model.get_submodule(_block_site_name(blocks[name])).scale = factor
    return model.train()


class BlockScale(nn.Module):
    """``x ↦ scale·x`` on a kept depth block's residual branch output ``f(x)``, inserted
    before the block's add (``y = x + scale·f(x)``; ``Mask.block_scale``). ``scale`` is
    a Python float: no state, so the sub-model's ``state_dict`` keys are unchanged; the
    product keeps the branch's dtype. Applied in training and in eval mode alike (it is
    part of the sub-model's function); the global model carries none (factor 1)."""

    def __init__(self, scale: float = 1.0) -> None:
        super().__init__()
        self.scale = float(scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale

    def extra_repr(self) -> str:
        return f"scale={self.scale!r}"


def _block_scales(mask: Mask, blocks) -> dict[str, float]:
    """``mask.block_scale`` without the factors of 1, checked against the model's blocks.

    Raises
    ------
    ValueError
        Naming the block if it is not a depth block of the model or is skipped, or its
        factor is not finite and > 0.
    """
    out = {}
    for name, factor in mask.block_scale.items():
        if blocks is None or name not in blocks:
            raise ValueError(f"mask block_scale names '{name}', not a depth block of the model "
                             f"(blocks: {sorted(blocks or ())})")
        if name in mask.skip:
            raise ValueError(f"mask block_scale['{name}']: the block is skipped, only a kept block has a scale")
        if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not 0 < float(factor) < float("inf"):
            raise ValueError(f"mask block_scale['{name}'] must be a finite number > 0, got {factor!r}")
        if float(factor) != 1.0:
            out[name] = float(factor)
    return out


def _block_site_name(block) -> str:
    return f"_fl_subnet_block_scale_{block.node}"  # the add's fx node name: unique in the graph


def _float_dtype(state: Mapping[str, torch.Tensor]) -> torch.dtype:
    """The dtype of the model's floating tensors (its scales are applied in it: 1/0.3 in a
    float64 model is 1/0.3 to float64's precision, not float32's)."""
    for value in state.values():
        if torch.is_floating_point(value):
            return value.dtype
    return torch.get_default_dtype()


@dataclass(eq=False)
class _Template:
    """A compact graph's structure on the ``meta`` device, shared by every sub-model with
    the same skipped blocks, kept-head counts, view sizes and scale sites."""

    model: nn.Module  # fx.GraphModule: its graph and compiled forward are shared by the clones
    keys: frozenset[str]  # its state_dict keys
    heads: tuple[str, ...]  # paths of the attention layers it holds (outside skipped blocks)
    sites: dict[int, tuple[int, ...]]  # consumer index -> broadcast shape of its UnitScale


_TEMPLATES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # traced graph -> LRU of templates
MAX_TEMPLATES = 64


def _site_name(i: int) -> str:
    return f"_fl_subnet_scale_{i}"


def _template(gm, structure, resolved, skip, blocks, heads, views, sites, scaled_blocks=()) -> _Template:
    """The cached template of ``structure`` (built on a miss: a copy of the traced graph
    with the skipped branches removed, attention layers narrowed, view sizes set, a
    :class:`UnitScale` inserted at every scale site and a :class:`BlockScale` on the
    branch of every ``scaled_blocks`` depth block, then compiled once)."""
    import copy

    from .attention import SubnetMultiheadAttention

    cache = _TEMPLATES.setdefault(gm, OrderedDict())
    hit = cache.get(structure)
    if hit is not None:
        cache.move_to_end(structure)
        return hit
    model = copy.deepcopy(gm)
    # the branch operand's position in each scaled block's add, read before skipping rewires
    # an add's identity operand (consecutive blocks)
    original = {n.name: n for n in gm.graph.nodes}
    branch_arg = {name: next(i for i, a in enumerate(original[blocks[name].node].args[:2])
                             if getattr(a, "name", None) != blocks[name].identity) for name in scaled_blocks}
    if skip:
        _skip_blocks(model, [blocks[name] for name in sorted(skip)])
    present = []
    for path, (num_heads, scale, _) in heads.items():
        try:
            old = model.get_submodule(path)
        except AttributeError:  # in a skipped depth block
            continue
        parent, _, leaf = path.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, leaf,
                SubnetMultiheadAttention.like(old, num_heads, scale))
        present.append(path)
    nodes = {n.name: n for n in model.graph.nodes}
    for name, sizes in views.items():
        node = nodes.get(name)
        if node is None:  # in a skipped depth block
            continue
        old = list(node.args[1]) if len(node.args) == 2 and isinstance(node.args[1], (tuple, list)) \
            else list(node.args[1:])
        if len(old) == len(sizes):
            node.args = (node.args[0], *[s if s is not None else o for s, o in zip(sizes, old)])
    shapes = {}
    for i, (name, arg, dim, _, _) in enumerate(resolved.consumers):
        if i not in sites or name not in nodes:
            continue
        node = nodes[name]
        src = node.args[arg]
        shape = [1] * len(src.meta["tensor_meta"].shape)
        shape[dim] = -1
        model.add_submodule(_site_name(i), UnitScale(sites[i][0].view(shape), None,
                                                     sites[i][0].view(shape) if sites[i][1].batch_normalized else None))
        with model.graph.inserting_before(node):
            scaled = model.graph.call_module(_site_name(i), (src,))
        args = list(node.args)
        args[arg] = scaled
        node.args = tuple(args)
        shapes[i] = tuple(shape)
    for name in scaled_blocks:
        node, arg = nodes[blocks[name].node], branch_arg[name]
        model.add_submodule(_block_site_name(blocks[name]), BlockScale())
        with model.graph.inserting_before(node):
            scaled_branch = model.graph.call_module(_block_site_name(blocks[name]), (node.args[arg],))
        args = list(node.args)
        args[arg] = scaled_branch
        node.args = tuple(args)
    model.graph.lint()
    model.recompile()
    template = cache[structure] = _Template(model, frozenset(model.state_dict(keep_vars=True)), tuple(present), shapes)
    if len(cache) > MAX_TEMPLATES:
        cache.popitem(last=False)
    return template


def _clone(module: nn.Module, graph=None) -> nn.Module:
    """A copy of a template's module tree, each module of its own class (an fx module keeps
    its compiled ``forward``), sharing only the fx graph and the template's ``meta``
    tensors (no data; every state tensor is then replaced). Dicts of parameters, buffers
    and submodules are new; other mutable attributes are deep-copied, empty containers
    (the hook dicts) created anew: cheaper than ``copy.deepcopy``, which would copy the
    graph, and paid by the client once a message."""
    import copy

    new = object.__new__(type(module))
    attrs = dict(module.__dict__)  # shared values as they are; the others replaced below
    for name in _copied_attrs(module):
        value = attrs[name]
        if name == "_modules":
            attrs[name] = {k: None if m is None else _clone(m) for k, m in value.items()}
        elif name in ("_parameters", "_buffers"):
            attrs[name] = dict(value)
        elif isinstance(value, (dict, list, set)) and not value:
            attrs[name] = type(value)()
        else:
            attrs[name] = copy.deepcopy(value)
    new.__dict__.update(attrs)
    return new


def _copied_attrs(module: nn.Module) -> tuple[str, ...]:
    """The names of ``module``'s attributes that :func:`_clone` does not share (submodules,
    parameter and buffer dicts, mutable values), found once per template module: a
    template's attributes keep their names and types."""
    names = _COPIED.get(module)
    if names is None or names[0] != tuple(module.__dict__):
        names = _COPIED[module] = (tuple(module.__dict__), tuple(
            name for name, value in module.__dict__.items()
            if name in ("_modules", "_parameters", "_buffers")
            or not (name == "_graph" or isinstance(value, (_IMMUTABLE, torch.Tensor)) or callable(value))))
    return names[1]


#: Template module → (its attribute names, those :func:`_clone` copies); weak keys: a
#: template dropped from its LRU takes its entry along.
_COPIED: "weakref.WeakKeyDictionary[nn.Module, tuple[tuple[str, ...], tuple[str, ...]]]" = weakref.WeakKeyDictionary()


_IMMUTABLE = (bool, int, float, complex, str, bytes, type(None), torch.dtype, torch.device, frozenset)


def _skip_blocks(model, blocks) -> None:
    """Drop skipped residual branches: each add becomes its identity operand, then the
    branch's nodes and modules (and so their state keys) are removed."""
    nodes = {n.name: n for n in model.graph.nodes}
    gone: dict[str, str] = {}  # add already replaced -> its identity (consecutive skipped blocks)
    for block in blocks:
        identity = block.identity
        while identity in gone:
            identity = gone[identity]
        nodes[block.node].replace_all_uses_with(nodes[identity])
        gone[block.node] = identity
    model.graph.eliminate_dead_code()
    model.delete_all_unused_submodules()


def _unit_scale(mask: Mask, group: UnitGroup) -> torch.Tensor:
    """Per-unit output scale ``(size,)`` of ``group`` (kept units' scale; 1 elsewhere)."""
    s = mask.scale.get(group.name, 1.0)
    out = torch.ones(group.size, dtype=torch.float64)
    if isinstance(s, torch.Tensor) and s.dim() == 1:
        out[mask.kept(group)] = s.to(out.dtype)
    else:
        out.fill_(float(s))
    return out


def _resize(model: nn.Module) -> None:
    """Set the size attributes of every ruled layer from its (compact) tensors."""
    from .analysis.rules import RESIZE

    for module in model.modules():
        for cls in type(module).__mro__:
            if cls in RESIZE:
                RESIZE[cls](module)
                break
