"""Build the compact ``nn.Module`` of a sub-model without allocating the full model."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
from torch import nn

from .groups import UnitGroup
from .masks import Mask

# Size attributes to keep in step with the tensors (repr and user code read them).
_SIZE_ATTRS: dict[type[nn.Module], tuple[tuple[str, str, int], ...]] = {
    nn.Linear: (("out_features", "weight", 0), ("in_features", "weight", 1)),
}


def _set_tensor(model: nn.Module, key: str, value: torch.Tensor) -> None:
    path, _, leaf = key.rpartition(".")
    module = model.get_submodule(path) if path else model
    if leaf in module._parameters:
        old = module._parameters[leaf]
        module._parameters[leaf] = nn.Parameter(value, requires_grad=old.requires_grad)
    elif leaf in module._buffers:
        module._buffers[leaf] = value
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
        s = mask.scale_of(g)
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
    output scales are attached as forward pre-hooks.

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
    expected = set(model.state_dict(keep_vars=True))
    missing = sorted(expected - set(compact_state))
    if missing:
        raise ValueError(f"compact state lacks {missing}")
    for key, value in compact_state.items():
        _set_tensor(model, key, value)
    for module in model.modules():
        for attr, tensor_name, dim in _SIZE_ATTRS.get(type(module), ()):
            setattr(module, attr, getattr(module, tensor_name).shape[dim])
    apply_output_scale(model, groups, mask)
    return model.train()
