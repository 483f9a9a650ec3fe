"""torch-pruning (1.6.x) as an independent reference for dependency groups and pruned weights."""

from __future__ import annotations

import copy

import torch
import torch_pruning as tp
from torch import nn

_PRUNABLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _build(model: nn.Module, example_input: torch.Tensor):
    """Build a dependency graph of ``model`` (switched to eval mode by torch-pruning).

    The input is wrapped in a 1-tuple: torch-pruning first tries ``model(*example_inputs)``,
    which for a bare tensor would unpack its batch dimension.
    """
    return tp.DependencyGraph().build_dependency(
        model, example_inputs=(example_input,), verbose=False
    )


def _pruning_fn(module: nn.Module, kind: str):
    if kind not in ("out", "in"):
        raise ValueError(f"kind must be 'out' or 'in', not {kind!r}")
    if isinstance(module, nn.Linear):
        return tp.prune_linear_out_channels if kind == "out" else tp.prune_linear_in_channels
    if isinstance(module, _PRUNABLE):
        return tp.prune_conv_out_channels if kind == "out" else tp.prune_conv_in_channels
    raise TypeError(f"no torch-pruning function for {type(module).__name__}")


def prune_with_torch_pruning(
    model: nn.Module,
    example_input: torch.Tensor,
    module_name: str,
    drop: list[int],
    kind: str = "out",
) -> dict[str, torch.Tensor]:
    """Prune channels ``drop`` of ``module_name`` and everything coupled to them.

    Parameters
    ----------
    model : nn.Module
        Model to prune; it is deep-copied and left untouched.
    example_input : torch.Tensor
        An input batch for tracing.
    module_name : str
        Name (as in ``named_modules``) of the Linear/Conv layer that roots the group.
    drop : list[int]
        Output (``kind="out"``) or input (``kind="in"``) channels to remove.
    kind : str
        ``"out"`` or ``"in"``.

    Returns
    -------
    dict[str, torch.Tensor]
        The pruned copy's ``state_dict()``, detached.
    """
    pruned = copy.deepcopy(model)
    dg = _build(pruned, example_input)
    module = pruned.get_submodule(module_name)
    group = dg.get_pruning_group(module, _pruning_fn(module, kind), idxs=list(drop))
    if not dg.check_pruning_group(group):
        raise ValueError(f"torch-pruning refuses group rooted at {module_name}: {group}")
    group.prune()
    return {k: v.detach().clone() for k, v in pruned.state_dict().items()}


def _last_linear(model: nn.Module) -> nn.Module | None:
    last = None
    for m in model.modules():
        if isinstance(m, nn.Linear):
            last = m
    return last


def torch_pruning_groups(model: nn.Module, example_input: torch.Tensor) -> list[set[str]]:
    """Names of the modules in each torch-pruning out-channel group.

    One set per prunable Linear/Conv root (out-channel pruning), in the graph's order,
    the model's last ``nn.Linear`` (the output layer) being ignored. A set holds every
    module (or unwrapped parameter) that the group prunes, in or out.

    Parameters
    ----------
    model : nn.Module
        Model to analyse; it is deep-copied.
    example_input : torch.Tensor
        An input batch for tracing.

    Returns
    -------
    list[set[str]]
        Module names per group.
    """
    m = copy.deepcopy(model)
    last = _last_linear(m)
    ignored = [last] if last is not None else []
    dg = _build(m, example_input)  # ignoring at build time would hide the head's in-channels
    names = {mod: name for name, mod in m.named_modules()}
    pnames = {p: name for name, p in m.named_parameters()}
    groups: list[set[str]] = []
    for group in dg.get_all_groups(ignored_layers=ignored, root_module_types=_PRUNABLE):
        members = set()
        for dep, _ in group:
            target = dep.target.module
            if isinstance(target, nn.Parameter):
                members.add(pnames.get(target, "<param>"))
            elif target in names:
                members.add(names[target])
        groups.append(members)
    return groups
