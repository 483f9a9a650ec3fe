"""Fold per-group output scales into the weights of the layers that consume them.

IST as ResIST trains it (Dun et al., UAI 2022): the p sub-networks train unscaled, and the
full model multiplies the split units' outputs by 1/p at evaluation only. The evaluated
function is the full model with a scale ``s_g`` on each group's units where they are mixed
(:meth:`SubnetSpec.reference` with a full mask). For a consumer that is a linear map of
that input, ``W (x ⊙ s) + b = (W diag(s)) x + b``: the scale can be folded into ``W``, which
gives a plain state_dict that the user's own model class loads and evaluates directly.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from .groups import dim_scale


def fold_output_scales(spec, state: Mapping[str, torch.Tensor],
                       scales: Mapping[str, float]) -> dict[str, torch.Tensor]:
    """``state`` with each group's output scale folded into its consumers' weights.

    Parameters
    ----------
    spec : SubnetSpec
        The model's analysis (:func:`fl_subnet.analyze`; needs the traced graph).
    state : Mapping[str, torch.Tensor]
        The full model's state_dict; not modified.
    scales : Mapping[str, float]
        Group name → factor ``s_g`` for all its units (e.g. ``1/p``).

    Returns
    -------
    dict[str, torch.Tensor]
        New tensors: the consumers' weights multiplied along their input dimension
        (``nn.Linear``: ``W[:, j] · s_j``; ``nn.Conv{1,2,3}d`` with ``groups=1``:
        ``W[:, c] · s_c``); every other tensor is shared with ``state``. The model with
        this state computes, in eval mode, what :meth:`SubnetSpec.reference` computes with
        the scales applied (tests/test_fold.py).

    Raises
    ------
    ValueError
        Naming the consumer, if a scaled group is mixed by an operation that is not a
        ``Linear``/``Conv`` module reading it on its feature/channel dimension (e.g.
        attention, a functional call): the scale cannot be folded into a weight there.
    """
    if spec.graph is None or spec.resolved is None:
        raise ValueError("folding output scales needs a traced model (analyze() with an fx graph)")
    names = {g.name for g in spec.all_groups}
    unknown = sorted(set(scales) - names)
    if unknown:
        raise ValueError(f"unknown unit group(s) {unknown}; the model's groups are {sorted(names)}")
    heads = {g: path for path, g in spec.resolved.heads.items()}
    for g, s in scales.items():
        if g in heads and float(s) != 1.0:
            raise ValueError(f"cannot fold an output scale into '{heads[g]}' (nn.MultiheadAttention): the scale of "
                             f"head group '{g}' acts inside the attention, not on a weight's input")
    keep = {g.name: torch.ones(g.size, dtype=torch.bool) for g in spec.all_groups}
    unit = {g.name: torch.full((g.size,), float(scales.get(g.name, 1.0)), dtype=torch.float64)
            for g in spec.all_groups}
    nodes = {n.name: n for n in spec.graph.graph.nodes}
    out = dict(state)
    for name, arg, dim, length, ent in spec.resolved.consumers:
        vec = dim_scale(length, ent, keep, unit)
        if bool((vec == 1).all()):
            continue
        node = nodes[name]
        module = spec.graph.get_submodule(node.target) if node.op == "call_module" else None
        is_conv = isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) and module.groups == 1
        last = len(node.args[0].meta["tensor_meta"].shape) - 1
        if not (arg == 0 and ((isinstance(module, nn.Linear) and dim == last) or (is_conv and dim == 1))):
            raise ValueError(f"cannot fold an output scale into '{name}' "
                             f"({type(module).__name__ if module is not None else node.op}): only nn.Linear and "
                             f"nn.Conv layers reading the scaled units on their input dimension can absorb it")
        key = f"{node.target}.weight"
        w = out[key]
        shape = [1] * w.dim()
        shape[1] = -1
        out[key] = w * vec.to(device=w.device, dtype=w.dtype).view(shape)
    return out
