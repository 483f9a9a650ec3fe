"""The fl-subnet ClientApp (``flwr run .``): trains what the server sends on this node's data."""

from __future__ import annotations

from fl_subnet.experiments.client import harness_client_app
from fl_subnet.logs import use_flower_console

use_flower_console()

app = harness_client_app()
