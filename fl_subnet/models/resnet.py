"""A small pre-activation ResNet (He et al. 2016, "Identity Mappings in Deep Residual Networks")."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


class PreActBlock(nn.Module):
    """Pre-activation basic block: ``conv2(relu(bn2(conv1(relu(bn1(x)))))) + shortcut``.

    The shortcut is the identity, or a 1x1 conv (``shortcut``, applied to
    ``relu(bn1(x))`` as in the paper's code) when the stride or the width changes.

    Parameters
    ----------
    in_planes : int
        Input channels.
    planes : int
        Output channels.
    stride : int
        Stride of ``conv1`` (and of the 1x1 shortcut).

    Notes
    -----
    Input ``(N, in_planes, H, W)``; output ``(N, planes, ceil(H / stride), ceil(W / stride))``.
    """

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.has_shortcut = stride != 1 or in_planes != planes
        if self.has_shortcut:
            self.shortcut = nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the block to ``(N, in_planes, H, W)``."""
        out = F.relu(self.bn1(x))
        shortcut = self.shortcut(out) if self.has_shortcut else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + shortcut


class PreActResNet(nn.Module):
    """Pre-activation ResNet: stem conv → :class:`PreActBlock` stages → bn → ReLU → GAP → fc.

    The first stage keeps the resolution; every later stage starts with a stride-2 block.

    Parameters
    ----------
    in_channels : int
        Input channels ``C``.
    num_classes : int
        Output logits ``K``.
    widths : Sequence[int]
        Channels of each stage (the stem has ``widths[0]``).
    blocks_per_stage : int
        Blocks in each stage.

    Notes
    -----
    Input ``(N, C, H, W)`` float; output ``(N, K)`` logits.
    """

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 10,
        widths: Sequence[int] = (16, 32),
        blocks_per_stage: int = 1,
    ) -> None:
        super().__init__()
        widths = tuple(int(w) for w in widths)
        self.stem = nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False)
        stages: list[nn.Module] = []
        in_planes = widths[0]
        for i, planes in enumerate(widths):
            blocks = []
            for j in range(blocks_per_stage):
                stride = 2 if (i > 0 and j == 0) else 1
                blocks.append(PreActBlock(in_planes, planes, stride))
                in_planes = planes
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.bn = nn.BatchNorm2d(in_planes)
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_planes, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map ``(N, C, H, W)`` images to ``(N, K)`` logits."""
        x = self.stages(self.stem(x))
        x = F.relu(self.bn(x))
        return self.fc(torch.flatten(self.gap(x), 1))


def resnet18_shaped(num_classes: int = 10, in_channels: int = 3) -> PreActResNet:
    """A PreAct ResNet-18-shaped network: widths (64, 128, 256, 512), 2 blocks per stage.

    Parameters
    ----------
    num_classes : int
        Output logits.
    in_channels : int
        Input channels.

    Returns
    -------
    PreActResNet
        11,172,170 parameters with the defaults (``num_classes=10, in_channels=3``).
    """
    return PreActResNet(in_channels, num_classes, widths=(64, 128, 256, 512), blocks_per_stage=2)
