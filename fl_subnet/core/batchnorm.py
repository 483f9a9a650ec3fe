"""BatchNorm policies for sub-model training: averaged running statistics or static BatchNorm.

``averaged`` (the default): a node's compact BatchNorm layers track running statistics
while it trains; the server folds ``running_mean``/``running_var`` back per entry over
the nodes that held the channel, like any other coupled tensor (``num_batches_tracked``
is a shared scalar and is averaged). Cheap and needs no server data, but a sub-model's
statistics describe the sub-model's activations, not the full model's.

``static`` (Diao et al., "HeteroFL", ICLR 2021, §3.2 "Static Batch Normalization"):
nodes normalise with the statistics of each batch and do not update the running
statistics (they come back unchanged, so the aggregate keeps the global ones); before
the full model is evaluated, the server recomputes them in one pass over data it holds
(:func:`recompute_bn_stats`). The statistics then describe the full model, which is the
one evaluated, at the price of a server-side calibration set and one forward pass.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

BN_POLICIES = ("averaged", "static")
_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def check_policy(policy: str) -> str:
    """Return ``policy`` or raise ``ValueError`` naming ``batchnorm`` and the choices."""
    if policy not in BN_POLICIES:
        raise ValueError(f"batchnorm must be one of {BN_POLICIES}, got {policy!r}")
    return policy


def batchnorm_layers(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """The BatchNorm1d/2d/3d layers of ``model`` (also those of a patched fx graph)."""
    return [m for m in model.modules() if isinstance(m, _BN)]


def use_batch_statistics(model: nn.Module) -> nn.Module:
    """Static BatchNorm on a node: normalise by batch statistics, leave running ones as sent.

    Sets ``track_running_stats = False`` on every BatchNorm layer (the buffers stay in
    the state dict, so the reply has the keys the server expects, unchanged). In eval
    mode such a layer also uses batch statistics. Returns ``model``.
    """
    for bn in batchnorm_layers(model):
        bn.track_running_stats = False
    return model


@torch.no_grad()
def recompute_bn_stats(model: nn.Module, batches: Iterable[torch.Tensor]) -> nn.Module:
    """Recompute every BatchNorm layer's running statistics on ``batches`` (HeteroFL's sBN).

    The statistics are reset and accumulated as a cumulative average over all batches
    (``momentum=None``), in train mode without gradients; the model's parameters are
    unchanged and its mode and momenta are restored afterwards.

    Parameters
    ----------
    model : nn.Module
        The full model (modified in place, returned).
    batches : Iterable[torch.Tensor]
        Inputs ``(B, ...)`` as the model takes them (e.g. the server's calibration set).

    Raises
    ------
    ValueError
        If ``batches`` is empty while the model has BatchNorm layers.
    """
    layers = batchnorm_layers(model)
    if not layers:
        return model
    saved = [(bn, bn.momentum, bn.track_running_stats) for bn in layers]
    was_training = model.training
    for bn in layers:
        bn.reset_running_stats()
        bn.momentum = None
        bn.track_running_stats = True
    model.train()
    seen = 0
    try:
        for x in batches:
            model(x)
            seen += 1
    finally:
        for bn, momentum, track in saved:
            bn.momentum = momentum
            bn.track_running_stats = track
        model.train(was_training)
    if seen == 0:
        raise ValueError("recompute_bn_stats: no calibration batch")
    return model
