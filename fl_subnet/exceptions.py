"""Every exception fl-subnet raises for users to catch, in one place.

Each is also importable from the module that raises it (e.g.
``fl_subnet.strategies.base.TrainingStalled``); this module imports nothing, so every
layer (the pure-torch core, the Flower layer, the harness) can use it.
"""

from __future__ import annotations


class AnalysisError(NotImplementedError):
    """The model cannot be split into sub-models as asked; the message names the module
    and the group (raised at analysis time, never inside a round)."""


class ReplyError(ValueError):
    """A reply that cannot be aggregated; the message says why (the strategy logs it and
    goes on with the other replies)."""


class NotEnoughNodes(RuntimeError):
    """Fewer nodes connected than a round needs, for longer than ``node_wait_timeout``."""


class TrainingStalled(RuntimeError):
    """No node produced a valid train reply for ``max_failed_rounds`` consecutive rounds."""


class RunFailed(RuntimeError):
    """A run that finished without a usable model (no valid reply, or a diverged loss);
    its results were written before this is raised."""


__all__ = ["AnalysisError", "NotEnoughNodes", "ReplyError", "RunFailed", "TrainingStalled"]
