"""Extra small models for tests: a residual MLP, a model with an op that has no rule, one
that declares its own unit group with an integer buffer and a 0-dim tensor, and a tiny CNN
with BatchNorm (FjORD's per-width statistics, devices)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fl_subnet.core.groups import Coupling, UnitGroup


class ResidualMLP(nn.Module):
    """``fc_in → (x + fc2(relu(fc1(x)))) → head``.

    Parameters
    ----------
    d : int
        Input features.
    hidden : int
        Width of the residual stream (``fc_in`` out, ``fc2`` out).
    out : int
        Output features.

    Notes
    -----
    Input ``(N, d)``; output ``(N, out)``. ``fc1`` has ``2 * hidden`` units.
    """

    def __init__(self, d: int = 16, hidden: int = 32, out: int = 4) -> None:
        super().__init__()
        self.fc_in = nn.Linear(d, hidden)
        self.fc1 = nn.Linear(hidden, hidden * 2)
        self.fc2 = nn.Linear(hidden * 2, hidden)
        self.head = nn.Linear(hidden, out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map ``(N, d)`` to ``(N, out)``."""
        x = self.fc_in(x)
        x = x + self.fc2(F.relu(self.fc1(x)))
        return self.head(x)


class UnsupportedOnPath(nn.Module):
    """``Linear(8, 16) → cumsum over features → Linear(16, 4)``.

    ``cumsum`` mixes the hidden units, so no per-unit rule applies to it.

    Notes
    -----
    Input ``(N, 8)``; output ``(N, 4)``.
    """

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(8, 16)
        self.fc2 = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map ``(N, 8)`` to ``(N, 4)``."""
        h = self.fc1(x)
        h = torch.cumsum(h, dim=-1)
        return self.fc2(h)


class WithBuffers(nn.Module):
    """A custom model declaring its own group, with an int buffer and a 0-dim tensor."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.arange(8.0).reshape(4, 2))
        self.t = nn.Parameter(torch.tensor(1.0))
        self.register_buffer("steps", torch.tensor(0, dtype=torch.int64))

    def unit_groups(self):
        return [UnitGroup("rows", 4, (Coupling("w", 0),), ())]


class TinyBN(nn.Module):
    """``conv1 → bn1 → ReLU → conv2 → bn2 → ReLU → mean pool → fc`` (classes unmasked).

    Input ``(N, 1, H, W)``; output ``(N, 3)``; ``conv1`` has 8 channels, ``conv2`` 6.
    """

    C1, C2, CLASSES = 8, 6, 3

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(1, self.C1, 3, padding=1), nn.BatchNorm2d(self.C1)
        self.conv2, self.bn2 = nn.Conv2d(self.C1, self.C2, 3, padding=1), nn.BatchNorm2d(self.C2)
        self.fc = nn.Linear(self.C2, self.CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.bn1(self.conv1(x)))
        h = F.relu(self.bn2(self.conv2(h)))
        return self.fc(h.mean(dim=(2, 3)))
