"""Depth groups: residual branches that can be skipped, leaving the identity path.

A branch ``y = x + f(x)`` can be dropped from a sub-model (``y = x``) when ``f`` is a
self-contained piece of the graph: every node computing ``f(x)`` from ``x`` feeds only
other nodes of ``f`` or the add, and its parameters and buffers belong to modules that
nothing else calls. This is what random-path / depth training needs (RaPTr, Panigrahi
et al. 2024; ResIST, Dun et al. 2022): a node's compact module really lacks the skipped
blocks, so their bytes and compute are saved. A residual add whose shortcut is not the
identity (a 1x1 conv that changes the width or the stride) is not skippable.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
from torch import fx

_ADDS = (operator.add, operator.iadd, torch.add)


@dataclass(frozen=True)
class DepthBlock:
    """One skippable residual branch.

    Attributes
    ----------
    name : str
        The module path that holds the branch (the common prefix of its modules; when
        one module holds two branches, e.g. attention and FFN of a transformer block,
        the child module with the most parameters: ``blocks.0.attn``, ``blocks.0.ffn``).
    node : str
        The fx node of the residual add.
    identity : str
        The fx node of the add's identity operand (what the add becomes when skipped).
    keys : tuple[str, ...]
        State-dict keys used only by the branch (absent from a sub-model that skips it).
    """

    name: str
    node: str
    identity: str
    keys: tuple[str, ...]


def find_depth_blocks(gm: fx.GraphModule) -> list[DepthBlock]:
    """Every skippable residual branch of a traced model, in graph order."""
    dead = {n for n in gm.graph.nodes if not n.users and n.op != "output"}  # e.g. an unused `C` of `B, T, C = x.shape`
    users_of = {n: set(n.users) - dead for n in gm.graph.nodes}
    found = []
    for node in gm.graph.nodes:
        if node.op not in ("call_function", "call_method") or not _is_add(node):
            continue
        args = [a for a in node.args[:2] if isinstance(a, fx.Node)]
        if len(args) != 2:
            continue
        for ident, out in (args, args[::-1]):
            branch = _branch(ident, out)
            if branch and all(users_of[b] <= branch | {node} for b in branch):
                modules = [str(b.target) for b in branch if b.op == "call_module"]
                if modules and not any(b.op == "get_attr" for b in branch):
                    keys = _own_keys(gm, modules, branch)
                    if keys:
                        found.append((node, ident, modules, keys))
                break
    return _named(gm, found)


def _is_add(node: fx.Node) -> bool:
    return node.target in _ADDS or (node.op == "call_method" and node.target in ("add", "add_"))


def _branch(ident: fx.Node, out: fx.Node) -> set[fx.Node] | None:
    """Nodes on the paths from ``ident`` (exclusive) to ``out`` (inclusive), if ``out``
    depends on ``ident`` and on nothing else but constants/parameters of the branch."""
    branch, todo = set(), [out]
    while todo:
        n = todo.pop()
        if n is ident or n in branch:
            continue
        if n.op in ("placeholder", "output"):
            return None  # depends on another input: not a branch of ident
        branch.add(n)
        todo.extend(a for a in n.all_input_nodes)
    return branch if out is not ident else None


def _own_keys(gm: fx.GraphModule, modules: list[str], branch: set[fx.Node]) -> tuple[str, ...]:
    """State keys of ``modules`` if no node outside ``branch`` calls them, else ()."""
    outside = {str(n.target) for n in gm.graph.nodes if n.op == "call_module" and n not in branch}
    if any(m == o or o.startswith(m + ".") or m.startswith(o + ".") for m in modules for o in outside):
        return ()
    keys = []
    for m in modules:
        keys += [f"{m}.{k}" for k in gm.get_submodule(m).state_dict(keep_vars=True)]
    return tuple(keys)


def _named(gm: fx.GraphModule, found) -> list[DepthBlock]:
    prefixes = [_common_prefix(mods) for _, _, mods, _ in found]
    out = []
    for (node, ident, mods, keys), prefix in zip(found, prefixes):
        name = prefix
        if prefixes.count(prefix) > 1 or not prefix:  # two branches in one module
            sizes: dict[str, int] = {}
            for m in mods:
                child = m[len(prefix) + 1:].split(".")[0] if prefix else m.split(".")[0]
                sizes[child] = sizes.get(child, 0) + sum(p.numel() for p in gm.get_submodule(m).parameters())
            child = max(sizes, key=lambda c: sizes[c])
            name = f"{prefix}.{child}" if prefix else child
        out.append(DepthBlock(name, node.name, ident.name, keys))
    return out


def _common_prefix(paths: list[str]) -> str:
    parts = [p.split(".") for p in paths]
    common = []
    for level in zip(*parts):
        if len(set(level)) != 1:
            break
        common.append(level[0])
    return ".".join(common)
