"""fl_subnet.clients (lives in the top-level `clients/` folder).

ClientApp handlers that train the compact slice a node receives, and
:func:`compact_model` for a Flower user's own ClientApp.
"""

if __name__ == "clients":  # imported as a top-level package by accident
    raise ImportError("import this package as 'fl_subnet.clients', not 'clients'")

from .app import make_client_app, node_device, partition_reply  # noqa: E402
from .compact import Received, compact_model, receive, reply_arrays, width_schedule  # noqa: E402
from .train import TrainConfig, evaluate_model, train_local  # noqa: E402

__all__ = ["make_client_app", "partition_reply", "node_device", "compact_model", "receive", "reply_arrays",
           "Received", "width_schedule", "TrainConfig", "train_local", "evaluate_model"]
