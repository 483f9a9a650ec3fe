"""fl-subnet: subnetwork training as Flower strategies.

The core (this package) turns a torch model plus a mask into a physically smaller
sub-model and folds trained sub-models back into the full one. Strategies live in
``fl_subnet.strategies`` and the ClientApp side in ``fl_subnet.clients``.
"""

from __future__ import annotations

import importlib.abc as _abc
import importlib.util as _util
import os as _os
import sys as _sys


class _SiblingFinder(_abc.MetaPathFinder):
    """In the source tree (tests, a Flower FAB that puts the project folder on sys.path)
    ``strategies/`` and ``clients/`` sit beside this package instead of inside it: this
    resolves exactly ``fl_subnet.strategies`` and ``fl_subnet.clients`` there, and nothing
    else of the project folder (docs/design.md, "Layout"). An install maps them itself."""

    def __init__(self, root: str):
        self.root = root

    def find_spec(self, fullname, path=None, target=None):
        if fullname not in ("fl_subnet.strategies", "fl_subnet.clients"):
            return None
        folder = _os.path.join(self.root, fullname.rpartition(".")[2])
        return _util.spec_from_file_location(fullname, _os.path.join(folder, "__init__.py"),
                                             submodule_search_locations=[folder])


_root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
if (_os.path.isfile(_os.path.join(_root, "strategies", "__init__.py"))
        and not _os.path.isdir(_os.path.join(_os.path.dirname(_os.path.abspath(__file__)), "strategies"))
        and not any(isinstance(f, _SiblingFinder) for f in _sys.meta_path)):
    _sys.meta_path.insert(0, _SiblingFinder(_root))

__version__ = "0.1.0"

from .exceptions import AnalysisError, NotEnoughNodes, ReplyError, RunFailed, TrainingStalled  # noqa: E402
from .core.groups import Coupling, UnitGroup  # noqa: E402
from .core.masks import Mask  # noqa: E402
from .core.spec import SubnetSpec, analyze  # noqa: E402

__all__ = sorted(["analyze", "SubnetSpec", "Mask", "UnitGroup", "Coupling",
                  "AnalysisError", "NotEnoughNodes", "ReplyError", "RunFailed", "TrainingStalled"])
