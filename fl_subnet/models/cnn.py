"""Small convolutional reference models: Flower's quickstart CNN and a CNN with BatchNorm."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class FlowerCNN(nn.Module):
    """The CNN of Flower's ``quickstart-pytorch`` template, for ``image_size``-pixel inputs.

    ``conv(3x3, pad 1) → ReLU → maxpool 2 → conv(3x3, pad 1) → ReLU → maxpool 2 →
    flatten → fc1 → ReLU → fc2 → ReLU → fc3``. The flatten is the template's hard-coded
    ``x.view(-1, 16 * s * s)`` with ``s = image_size // 4``.

    Parameters
    ----------
    in_channels : int
        Input channels ``C``.
    num_classes : int
        Output logits ``K``.
    image_size : int
        Input height and width ``H = W`` (a multiple of 4).

    Notes
    -----
    Input ``(N, C, H, H)`` float; output ``(N, K)`` logits.
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10, image_size: int = 8) -> None:
        super().__init__()
        s = image_size // 4
        self.conv1 = nn.Conv2d(in_channels, 6, 3, padding=1)
        self.pool = nn.MaxPool2d(2, 2)
        self.conv2 = nn.Conv2d(6, 16, 3, padding=1)
        self.flat = 16 * s * s
        self.fc1 = nn.Linear(16 * s * s, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map ``(N, C, H, H)`` images to ``(N, K)`` logits."""
        x = self.pool(F.relu(self.conv1(x)))
        x = self.pool(F.relu(self.conv2(x)))
        x = x.view(-1, self.flat)
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return self.fc3(x)


class CNNBN(nn.Module):
    """A three-conv CNN with BatchNorm and global average pooling.

    ``conv1 → bn1 → ReLU → conv2 → bn2 → ReLU → maxpool 2 →
    conv3 (width → 2·width) → bn3 → ReLU → global avg pool → flatten → fc``.
    All convs are 3x3 with padding 1.

    Parameters
    ----------
    in_channels : int
        Input channels ``C``.
    num_classes : int
        Output logits ``K``.
    width : int
        Channels of ``conv1``/``conv2``; ``conv3`` has ``2 * width``.

    Notes
    -----
    Input ``(N, C, H, W)`` float with ``H, W >= 2``; output ``(N, K)`` logits.
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10, width: int = 16) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(width)
        self.pool = nn.MaxPool2d(2)
        self.conv3 = nn.Conv2d(width, 2 * width, 3, padding=1)
        self.bn3 = nn.BatchNorm2d(2 * width)
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map ``(N, C, H, W)`` images to ``(N, K)`` logits."""
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        x = self.pool(x)
        x = F.relu(self.bn3(self.conv3(x)))
        x = torch.flatten(self.gap(x), 1)
        return self.fc(x)
