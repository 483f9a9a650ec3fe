"""Model factories for the App's run config (``model``, ``hidden``)."""

from __future__ import annotations

import functools
from collections.abc import Callable

from torch import nn

from .config import RunConfig
from fl_subnet.models import MLP, ShallowReLU


def model_factory(cfg: RunConfig, d_in: int, d_out: int) -> Callable[[], nn.Module]:
    """A no-argument factory of the configured architecture.

    ``shallow-relu`` fixes its ±1 read-out with ``seed`` so that every process builds
    the same model (the read-out is also sent as a buffer).
    """
    widths = cfg.hidden_widths()
    if cfg.model == "shallow-relu":
        return functools.partial(ShallowReLU, d_in, widths[0], d_out, cfg.seed)
    return functools.partial(MLP, d_in, widths, d_out)
