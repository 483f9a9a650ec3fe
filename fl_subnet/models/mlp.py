"""Reference models: an MLP and the shallow ReLU network of Liao & Kyrillidis (2022)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


class FixedReadout(nn.Module):
    """A linear read-out with fixed (untrained) weights: ``y = scale · x Aᵀ``.

    Parameters
    ----------
    weight : torch.Tensor
        Fixed weights ``A`` of shape ``(out, m)``, stored as a buffer.
    scale : float
        Constant factor (``1/√m`` in the paper's model).
    """

    def __init__(self, weight: torch.Tensor, scale: float) -> None:
        super().__init__()
        self.register_buffer("weight", weight)
        self.scale = float(scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight) * self.scale


class ShallowReLU(nn.Module):
    """``f(W, x) = (1/√m) Σ_r a_r ReLU(⟨w_r, x⟩)`` (Liao & Kyrillidis, TMLR 2022, §2).

    Only ``W`` (``hidden.weight``, shape ``(m, d)``) is trained; ``a`` ∈ {±1}^{out×m}
    is a fixed buffer (``readout.weight``). ``1/√m`` uses the *full* width ``m`` so that a
    sub-network's output is the full output with the dropped neurons removed.

    Parameters
    ----------
    d : int
        Input dimension.
    m : int
        Number of hidden neurons.
    out : int
        Output dimension (1 in the paper).
    seed : int
        Seeds ``W ~ N(0, κ² I)`` and the signs ``a``.
    kappa : float
        Standard deviation of the initial ``W``.
    """

    def __init__(self, d: int, m: int, out: int = 1, seed: int = 0, kappa: float = 1.0):
        super().__init__()
        g = torch.Generator(device="cpu").manual_seed(seed)
        self.hidden = nn.Linear(d, m, bias=False)
        with torch.no_grad():
            if self.hidden.weight.device.type != "meta":
                self.hidden.weight.copy_(torch.randn(m, d, generator=g) * kappa)
        signs = torch.randint(0, 2, (out, m), generator=g, device="cpu").float() * 2 - 1
        self.act = nn.ReLU()
        self.readout = FixedReadout(signs, 1.0 / math.sqrt(m))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.readout(self.act(self.hidden(x)))


class MLP(nn.Sequential):
    """``Linear → ReLU → … → Linear`` with the given hidden widths.

    Parameters
    ----------
    d_in : int
        Input features (inputs are flattened first).
    hidden : Sequence[int]
        Hidden widths, one unit group each.
    d_out : int
        Output features (classes).
    norm : bool
        ``Linear → BatchNorm1d → ReLU`` in every hidden layer, the BatchNorm without
        running statistics (it always normalises by the batch's): IST's reference code
        (Yuan et al., VLDB 2022), where it makes the reassembled full model's pre-
        activations independent of how many sub-networks contributed to them.
    """

    def __init__(self, d_in: int, hidden: Sequence[int], d_out: int, norm: bool = False) -> None:
        layers: list[nn.Module] = [nn.Flatten()]
        widths = [d_in, *hidden]
        for a, b in zip(widths, widths[1:]):
            layers += [nn.Linear(a, b), *([nn.BatchNorm1d(b, track_running_stats=False)] if norm else []), nn.ReLU()]
        layers.append(nn.Linear(widths[-1], d_out))
        super().__init__(*layers)
