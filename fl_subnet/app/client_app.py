"""The fl-subnet ClientApp (``flwr run .``): trains what the server sends on this node's data."""

from __future__ import annotations

import functools

from flwr.app import Context

from fl_subnet.clients import make_client_app

from fl_subnet.experiments.config import RunConfig
from fl_subnet.experiments.experiment import context_data, factory_for
from fl_subnet.logs import use_flower_console

use_flower_console()


@functools.lru_cache(maxsize=8)
def _factory_of(run_config: tuple) -> object:
    """One factory object per run config: the client's analysis cache (``cached_spec``) is
    keyed by the factory, so a new one per message would re-analyse the model every
    message and keep one analysis per message."""
    return factory_for(RunConfig.from_mapping(dict(run_config)))


def _factory(context: Context):
    return _factory_of(tuple(sorted(context.run_config.items())))


app = make_client_app(None, context_data, context_factory=_factory)
