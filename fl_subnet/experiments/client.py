"""The harness's ClientApp: fl-subnet's ClientApp helpers with the model and the node's
data built from the run config (the App's entry point is ``fl_subnet.app.client_app:app``)."""

from __future__ import annotations

import functools

import torch
from flwr.app import Context
from flwr.clientapp import ClientApp

from fl_subnet.clients import make_client_app

from .config import RunConfig
from .experiment import context_config, context_data, factory_for


@functools.lru_cache(maxsize=8)
def _factory_of(run_config: tuple) -> object:
    """One factory object per run config: the client's analysis cache (``cached_spec``) is
    keyed by the factory, so a new one per message would re-analyse the model every
    message and keep one analysis per message."""
    return factory_for(RunConfig.from_mapping(dict(run_config)))


def run_config_factory(context: Context):
    """The model factory of the run config in ``context`` (one object per run config)."""
    return _factory_of(tuple(sorted(context.run_config.items())))


def partition_labels(context: Context) -> list[int] | None:
    """The labels of the node's training partition (sorted), reported to the node query when
    the run config's ``label-split`` is on (HeteroFL's label split); None when it is off or
    every node sees all data (``data-scope = "all"``)."""
    cfg = context_config(context)
    if not cfg.label_split or cfg.data_scope == "all":
        return None
    train, _ = context_data(context)
    return torch.unique(train.tensors[1]).tolist()


def harness_client_app() -> ClientApp:
    """A ClientApp that builds the model from the run config, loads the node's partition
    (:func:`~fl_subnet.experiments.experiment.context_data`) and reports its labels
    (:func:`partition_labels`)."""
    return make_client_app(None, context_data, context_factory=run_config_factory, labels=partition_labels)
