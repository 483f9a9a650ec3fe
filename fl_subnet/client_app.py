"""The fl-subnet ClientApp (``flwr run .``): trains what the server sends on this node's data."""

from __future__ import annotations

from flwr.app import Context

from fl_subnet.clients import make_client_app

from .experiments.config import RunConfig
from .experiments.experiment import context_data, factory_for
from .logs import use_flower_console

use_flower_console()


def _factory(context: Context):
    return factory_for(RunConfig.from_mapping(context.run_config))


app = make_client_app(None, context_data, context_factory=_factory)
