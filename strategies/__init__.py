"""fl_subnet.strategies (lives in the top-level `strategies/` folder).

Flower strategies that train a model through per-node sub-models. Every module of this
package is imported here; a protocol registers itself where it is defined
(:func:`register_protocol`), and its class is then a public name of this package. So a new
protocol is one new module: nothing here or elsewhere lists the protocols.
"""

if __name__ == "strategies":  # imported as a top-level package by accident
    raise ImportError("import this package as 'fl_subnet.strategies', not 'strategies'")

import importlib as _importlib  # noqa: E402
import pkgutil as _pkgutil  # noqa: E402

from .base import SubnetStrategy  # noqa: E402,F401
from .registry import PROTOCOLS, Protocol, build_strategy, protocol_class, protocol_table, register_protocol  # noqa: E402,F401

for _module in sorted(m.name for m in _pkgutil.iter_modules(__path__)):
    _importlib.import_module(f"{__name__}.{_module}")

globals().update({p.cls.__name__: p.cls for p in PROTOCOLS.values()})

__all__ = sorted({"SubnetStrategy", "PROTOCOLS", "Protocol", "build_strategy", "protocol_class", "protocol_table",
                  "register_protocol", *(p.cls.__name__ for p in PROTOCOLS.values())})
