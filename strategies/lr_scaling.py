"""How a node's learning rate follows the output scale of its sub-model (``lr-scaling``)."""

from __future__ import annotations

import torch

from fl_subnet.core.masks import Mask

#: ``auto`` is the protocol's own default (:attr:`SubnetStrategy.default_lr_scaling`).
LR_SCALINGS = ("auto", "none", "linear", "square")


def lr_factor(mask: Mask, lr_scaling: str) -> float:
    """The factor on a node's ``lr`` for ``mask``: with ``s`` the mask's largest output
    scale (1/ξ for dropout, 1/r for HeteroFL, p for IST), ``1/s`` (``linear``), ``1/s²``
    (``square``) or 1 (``none``, or no scale above 1).

    Why: a tensor that consumes scaled units sees its input ×s, so its gradient is ×s,
    and a tensor between two scaled groups ×s² (the scale multiplies both its input and
    the gradient flowing back into it); over τ local steps on a fixed mask the node's
    effective step grows accordingly, where dropout's per-batch masks average it out
    (Liao & Kyrillidis, TMLR 2022, shrink the step size with ξ for the same reason).
    ``square`` never lets any tensor step further than at the user's ``lr`` on the full
    model; ``linear`` is IST's ``p-lr``.

    Raises
    ------
    ValueError
        If ``lr_scaling`` is not ``none``, ``linear`` or ``square`` (naming ``lr-scaling``).
    """
    if lr_scaling not in LR_SCALINGS[1:]:
        raise ValueError(f"lr-scaling must be one of {LR_SCALINGS[1:]} here, got {lr_scaling!r}")
    if lr_scaling == "none":
        return 1.0
    s = 1.0
    for value in mask.scale.values():
        s = max(s, float(value.max()) if isinstance(value, torch.Tensor) else float(value))
    return 1.0 / s if lr_scaling == "linear" else 1.0 / (s * s)
