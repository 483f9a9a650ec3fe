"""Protocols register themselves where they are defined: one decorator, no list elsewhere.

A protocol is a :class:`~fl_subnet.strategies.SubnetStrategy` subclass decorated with
:func:`register_protocol`, which gives it its run-config name (the ``strategy`` key) and its
row of the README's protocol table. Everything that names protocols derives from
:data:`PROTOCOLS`: the run config's ``strategy`` choices, :func:`build_strategy`, the public
names of :mod:`fl_subnet.strategies` (every module of the package is imported, so a new
module registers itself) and the README's table (:func:`protocol_table`, checked by a test).
The registry follows Opacus's ``register_grad_sampler`` (``opacus/grad_sample/utils.py``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from fl_subnet.core.server_opt import make_server_optimizer

from .defences import Defences


@dataclass(frozen=True)
class Protocol:
    """A registered protocol: its run-config name, class and README table row."""

    name: str
    """The run-config ``strategy`` value, e.g. ``"federated-dropout"``."""
    cls: type
    """The strategy class; it builds itself from a run config (``from_run_config``)."""
    mask: str
    """What mask a node gets each server round."""
    local_work: str
    """What a node trains on it."""
    scale: str
    """The output scale of the kept units."""
    aggregation: str
    """How the replies are combined."""
    source: str
    """The paper (or reference implementation) the protocol follows."""


#: Run-config name -> protocol, sorted by name (the order of the README's table and of the choices).
PROTOCOLS: dict[str, Protocol] = {}


def register_protocol(name: str, *, mask: str, local_work: str, scale: str, aggregation: str,
                      source: str) -> Callable[[type], type]:
    """Class decorator: register a strategy class as the protocol ``name``.

    The class must define the classmethod ``from_run_config(cfg, model_factory, **common)``
    (the keys of the run config it reads) and may define ``check_run_config(cfg)`` (raises
    ``ValueError`` naming the key) for what only it requires of a run config.

    Raises
    ------
    ValueError
        If ``name`` is already registered by another class.
    TypeError
        If the class has no ``from_run_config``.
    """

    def decorator(cls: type) -> type:
        if not callable(getattr(cls, "from_run_config", None)):
            raise TypeError(f"protocol {name!r}: {cls.__qualname__} must define the classmethod from_run_config")
        known = PROTOCOLS.get(name)
        if known is not None and known.cls.__qualname__ != cls.__qualname__:
            raise ValueError(f"protocol {name!r} is already registered by {known.cls.__module__}."
                             f"{known.cls.__qualname__}")
        cls.protocol = name
        PROTOCOLS[name] = Protocol(name, cls, mask, local_work, scale, aggregation, source)
        ordered = sorted(PROTOCOLS.items())
        PROTOCOLS.clear()
        PROTOCOLS.update(ordered)
        return cls

    return decorator


def protocol_class(name: str) -> type:
    """The strategy class registered as ``name``.

    Raises
    ------
    ValueError
        If no protocol of that name is registered (the message lists those that are).
    """
    try:
        return PROTOCOLS[name].cls
    except KeyError:
        raise ValueError(f"strategy must be one of {tuple(PROTOCOLS)}, got {name!r}") from None


def build_strategy(cfg: Any, model_factory: Callable[[], nn.Module], *, example_input=None,
                   calibration_batches=None, **fedavg_kwargs):
    """The strategy named by ``cfg.strategy``, built from a validated run config.

    ``cfg`` is a :class:`~fl_subnet.experiments.config.RunConfig`. The protocol reads its
    own keys (``from_run_config``); the keys every protocol shares are passed to it here:
    the seed, ``untouched``, ``batchnorm``, the defences (``aggregation`` and its options
    ``trim-fraction``, ``clip-radius``, ``clip-iterations``, ``bucket-size``,
    ``weiszfeld-iterations``, ``weiszfeld-smoothing``, ``krum-rogues``, ``min-cosine``,
    ``max-update-ratio``, ...; 0 = off), ``node-wait-timeout``, ``lr-scaling``, the server
    optimizer and ``fraction-evaluate``. ``min_available_nodes`` etc. can be passed through
    ``fedavg_kwargs``; ``example_input`` and ``calibration_batches`` go to
    :class:`~fl_subnet.strategies.SubnetStrategy`.

    Raises
    ------
    ValueError
        If ``cfg.strategy`` names no registered protocol.
    """
    cls = protocol_class(cfg.strategy)
    common = dict(seed=cfg.seed, untouched=cfg.untouched, example_input=example_input,
                  batchnorm=cfg.batchnorm, calibration_batches=calibration_batches,
                  aggregation=cfg.aggregation, trim_fraction=cfg.trim_fraction, clip_radius=cfg.clip_radius,
                  clip_iterations=cfg.clip_iterations, bucket_size=cfg.bucket_size,
                  weiszfeld_iterations=cfg.weiszfeld_iterations, weiszfeld_smoothing=cfg.weiszfeld_smoothing,
                  krum_rogues=cfg.krum_rogues,
                  defences=Defences(max_update_ratio=cfg.max_update_ratio or None,
                                    max_ratio_to_median=cfg.max_ratio_to_median or None, screen=cfg.screen,
                                    max_num_examples=cfg.max_num_examples or None,
                                    min_cosine=cfg.min_cosine if cfg.min_cosine > -1.0 else None),
                  max_failed_rounds=cfg.max_failed_rounds or None, node_wait_timeout=cfg.node_wait_timeout,
                  lr_scaling=cfg.lr_scaling,
                  server_optimizer=make_server_optimizer(cfg.server_optimizer, lr=cfg.server_lr or None,
                                                         momentum=cfg.server_momentum),
                  order_by_partition=True,  # fl-subnet's ClientApp answers the partition-id query
                  fraction_evaluate=cfg.fraction_evaluate, **fedavg_kwargs)
    return cls.from_run_config(cfg, model_factory, **common)


def protocol_table() -> str:
    """The README's protocol table (markdown), one row per registered protocol."""
    rows = ["| `strategy` | class (`fl_subnet.strategies`) | mask per node per round | local work "
            "| kept units scaled by | aggregation | source |",
            "|---|---|---|---|---|---|---|"]
    rows += [f"| `{p.name}` | `{p.cls.__name__}` | {p.mask} | {p.local_work} | {p.scale} | {p.aggregation} "
             f"| {p.source} |" for p in PROTOCOLS.values()]
    return "\n".join(rows)
