"""Model factories for the App's run config (``model``, ``hidden``)."""

from __future__ import annotations

import functools
from collections.abc import Callable

from torch import nn

from .config import RunConfig
from fl_subnet.models import CNN1d, CNNBN, MLP, FlowerCNN, MHATransformer, PreActResNet, ShallowReLU


def model_factory(cfg: RunConfig, d_in: int | tuple[int, ...], d_out: int) -> Callable[[], nn.Module]:
    """A no-argument factory of the configured architecture.

    ``d_in`` is the number of input features (``mlp``, ``shallow-relu``; ``mlp`` with
    ``hidden = ""`` is one Linear, logistic regression), the image shape ``(C, H, W)``
    (``cnn``, ``cnn-bn``, ``resnet``), the signal shape ``(C, L)`` (``cnn1d``, MNIST-1D's
    CNN) or the sequence length (``transformer``, over the 16-token vocabulary of
    ``synthetic-sequence``).
    ``shallow-relu`` fixes its ±1 read-out with ``seed`` so that every process builds
    the same model (the read-out is also sent as a buffer).
    """
    if cfg.model == "cnn":
        c, h, _ = d_in
        return functools.partial(FlowerCNN, c, d_out, h)
    if cfg.model == "cnn-bn":
        return functools.partial(CNNBN, d_in[0], d_out)
    if cfg.model == "cnn1d":
        c, length = d_in
        return functools.partial(CNN1d, c, d_out, length)
    if cfg.model == "resnet":
        return functools.partial(PreActResNet, d_in[0], d_out, blocks_per_stage=cfg.blocks_per_stage)
    if cfg.model == "transformer":
        from .data import SEQUENCE_VOCAB

        return functools.partial(MHATransformer, SEQUENCE_VOCAB, int(d_in), num_classes=d_out)
    widths = cfg.hidden_widths()
    if cfg.model == "shallow-relu":
        return functools.partial(ShallowReLU, d_in, widths[0], d_out, cfg.seed)
    return functools.partial(MLP, d_in, widths, d_out, norm=cfg.model == "mlp-bn")
