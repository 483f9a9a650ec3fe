"""Reference models for tests, scenarios and the paper's setting."""

from .mlp import MLP, FixedReadout, ShallowReLU

__all__ = ["MLP", "FixedReadout", "ShallowReLU"]
