"""fl_subnet.strategies (lives in the top-level `strategies/` folder).

Flower strategies that train a model through per-node sub-models.
"""

if __name__ == "strategies":  # imported as a top-level package by accident
    raise ImportError("import this package as 'fl_subnet.strategies', not 'strategies'")

from .base import SubnetStrategy  # noqa: E402
from .dropout import Dropout, MultiSampleDropout  # noqa: E402
from .fedavg import SubnetFedAvg  # noqa: E402
from .federated_dropout import FederatedDropout  # noqa: E402
from .heterofl import FedRolex, HeteroFL  # noqa: E402
from .ist import IST  # noqa: E402
from .random_path import RandomPath  # noqa: E402
from .fjord import FjORD  # noqa: E402
from .core_alternation import CoreAlternation  # noqa: E402

__all__ = ["SubnetStrategy", "SubnetFedAvg", "IST", "Dropout", "MultiSampleDropout", "FederatedDropout",
           "HeteroFL", "FedRolex"]
__all__ += ["RandomPath"]
__all__ += ["FjORD"]
__all__ += ["CoreAlternation"]
from .registry import build_strategy  # noqa: E402

__all__ += ["build_strategy"]
