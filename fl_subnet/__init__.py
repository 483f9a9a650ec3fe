"""fl-subnet: subnetwork training as Flower strategies.

The core (this package) turns a torch model plus a mask into a physically smaller
sub-model and folds trained sub-models back into the full one. Strategies live in
``fl_subnet.strategies`` and the ClientApp side in ``fl_subnet.clients``.
"""

from __future__ import annotations

import os as _os

# In the source tree (tests, a Flower FAB that puts the project folder on sys.path)
# ``strategies/`` and ``clients/`` sit beside this package instead of inside it: let
# ``fl_subnet.strategies`` and ``fl_subnet.clients`` resolve there (docs/design.md, "Layout").
_root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
if _os.path.isfile(_os.path.join(_root, "strategies", "__init__.py")):
    __path__.append(_root)  # type: ignore[name-defined]  # noqa: F821

__version__ = "0.1.0"

from .exceptions import AnalysisError, NotEnoughNodes, ReplyError, RunFailed, TrainingStalled  # noqa: E402
from .core.groups import Coupling, UnitGroup  # noqa: E402
from .core.masks import Mask  # noqa: E402
from .core.spec import SubnetSpec, analyze  # noqa: E402

__all__ = sorted(["analyze", "SubnetSpec", "Mask", "UnitGroup", "Coupling",
                  "AnalysisError", "NotEnoughNodes", "ReplyError", "RunFailed", "TrainingStalled"])
