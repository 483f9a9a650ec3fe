"""The 1-D CNN of MNIST-1D's reference models, for length-``L`` signals of ``C`` channels."""

from __future__ import annotations

import torch
from torch import nn


def conv1d_length(length: int, kernel: int, stride: int, padding: int) -> int:
    """Output length of an ``nn.Conv1d`` (dilation 1) on ``length`` points:
    ``⌊(L + 2·padding − kernel) / stride⌋ + 1``."""
    return (length + 2 * padding - kernel) // stride + 1


class CNN1d(nn.Module):
    """MNIST-1D's CNN: three strided 1-D convolutions with ReLU, then a linear classifier.

    ``conv1 (C → c, kernel 5, stride 2, pad 1) → ReLU → conv2 (c → c, kernel 3, stride 2,
    pad 1) → ReLU → conv3 (c → c, kernel 3, stride 2, pad 1) → ReLU → flatten → linear``.
    Layers, channels (``c = 25``), kernel sizes, strides, padding, activation, layer order
    and PyTorch's default initialisation are those of ``ConvBase`` in
    ``notebooks/models.py`` of github.com/greydanus/mnist1d (Greydanus and Kobak,
    "Scaling down deep learning with MNIST-1D", ICML 2024, arXiv:2011.14439), the CNN
    behind the paper's 94 % test accuracy; the pip package ``mnist1d`` ships the data
    generator only, not that file. ``ConvBase`` hard-codes the linear layer's input as
    125 = 25 channels × 5 points (a 40-point signal: 40 → 19 → 10 → 5); here it is
    computed from ``length`` (:func:`conv1d_length`), the same 125 for MNIST-1D.
    ``ConvBase`` reshapes a flat ``(N, L)`` batch to ``(N, 1, L)`` in its forward; here
    the caller does (the model zoo's ``as_model_input``), so that every layer is a
    module the unit-group analysis sees.

    Parameters
    ----------
    in_channels : int
        Input channels ``C`` (1 for MNIST-1D).
    num_classes : int
        Output logits ``K``.
    length : int
        Input length ``L`` (40 for MNIST-1D); at least 3.
    channels : int
        Channels ``c`` of each of the three convolutions (``ConvBase``'s ``channels=25``).

    Notes
    -----
    Input ``(N, C, L)`` float; output ``(N, K)`` logits. Unit groups found by
    :func:`fl_subnet.analyze`: the output channels of ``conv1``, ``conv2`` and ``conv3``
    (each of ``conv3``'s channels owns ``L₃`` consecutive columns of ``linear``); the
    classes stay full.
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10, length: int = 40, channels: int = 25) -> None:
        super().__init__()
        if length < 3:
            raise ValueError(f"CNN1d needs a length of at least 3, got {length}")
        self.conv1 = nn.Conv1d(in_channels, channels, 5, stride=2, padding=1)
        self.conv2 = nn.Conv1d(channels, channels, 3, stride=2, padding=1)
        self.conv3 = nn.Conv1d(channels, channels, 3, stride=2, padding=1)
        out_len = length
        for conv in (self.conv1, self.conv2, self.conv3):
            out_len = conv1d_length(out_len, conv.kernel_size[0], conv.stride[0], conv.padding[0])
        self.linear = nn.Linear(channels * out_len, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map ``(N, C, L)`` signals to ``(N, K)`` logits."""
        h = torch.relu(self.conv1(x))
        h = torch.relu(self.conv2(h))
        h = torch.relu(self.conv3(h))
        return self.linear(torch.flatten(h, 1))
