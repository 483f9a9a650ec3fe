"""Build a named strategy from a validated :class:`~fl_subnet.experiments.config.RunConfig`."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from fl_subnet.experiments.config import STRATEGIES, RunConfig

from fl_subnet.core.server_opt import make_server_optimizer

from .base import SubnetStrategy
from .dropout import Dropout, MultiSampleDropout
from .fedavg import SubnetFedAvg
from .federated_dropout import FederatedDropout
from .heterofl import FedRolex, HeteroFL
from .core_alternation import CoreAlternation
from .fjord import FjORD
from .ist import IST
from .random_path import RandomPath
from fl_subnet.core.paths import progressive_schedule


def build_strategy(cfg: RunConfig, model_factory: Callable[[], nn.Module], *, example_input=None,
                   calibration_batches=None, **fedavg_kwargs) -> SubnetStrategy:
    """The strategy named by ``cfg.strategy`` with the config's knobs.

    ``fraction-train`` applies to FedAvg, federated dropout and IST (at least p
    nodes); dropout and multi-sample dropout take exactly 1 (resp. p) nodes per round.
    ``min_available_nodes`` etc. can be passed through ``fedavg_kwargs``;
    ``example_input`` and ``calibration_batches`` go to :class:`SubnetStrategy`;
    the defences (``aggregation``, ``max-update-ratio``, ...; 0 = off) and
    ``node-wait-timeout`` come from the config.
    """
    common = dict(seed=cfg.seed, untouched=cfg.untouched, example_input=example_input,
                  batchnorm=cfg.batchnorm, calibration_batches=calibration_batches,
                  aggregation=cfg.aggregation, trim_fraction=cfg.trim_fraction,
                  max_update_ratio=cfg.max_update_ratio or None, max_ratio_to_median=cfg.max_ratio_to_median or None,
                  screen=cfg.screen, max_num_examples=cfg.max_num_examples or None,
                  max_failed_rounds=cfg.max_failed_rounds or None, node_wait_timeout=cfg.node_wait_timeout,
                  lr_scaling=cfg.lr_scaling,
                  server_optimizer=make_server_optimizer(cfg.server_optimizer, lr=cfg.server_lr or None,
                                                         momentum=cfg.server_momentum),
                  order_by_partition=True,  # fl-subnet's ClientApp answers the partition-id query
                  fraction_evaluate=cfg.fraction_evaluate, **fedavg_kwargs)
    steps = cfg.local_steps
    if cfg.strategy == "fedavg":
        return SubnetFedAvg(model_factory, local_steps=steps, fraction_train=cfg.fraction_train, **common)
    if cfg.strategy == "federated-dropout":
        return FederatedDropout(model_factory, cfg.keep_prob, local_steps=steps, sampling=cfg.dropout_sampling,
                                fraction_train=cfg.fraction_train, **common)
    if cfg.strategy == "ist":
        return IST(model_factory, cfg.num_subnets, local_steps=max(steps, 1),
                   partition_mode=cfg.partition_mode, scaling=cfg.ist_scaling,
                   fraction_train=cfg.fraction_train, **common)
    if cfg.strategy in ("heterofl", "fedrolex"):
        cls = HeteroFL if cfg.strategy == "heterofl" else FedRolex
        return cls(model_factory, cfg.tiers(), local_steps=steps, fraction_train=cfg.fraction_train, **common)
    if cfg.strategy == "fjord":  # nodes' max widths from the tiers
        return FjORD(model_factory, cfg.tiers(), cfg.widths(), local_steps=steps, fraction_train=cfg.fraction_train,
                     **common)
    if cfg.strategy == "dropout":
        return Dropout(model_factory, cfg.keep_prob, local_steps=steps, **common)
    if cfg.strategy == "multisample-dropout":
        return MultiSampleDropout(model_factory, cfg.keep_prob, cfg.num_subnets,
                                  loss_average=cfg.loss_average, local_steps=steps, **common)
    if cfg.strategy == "random-path":  # RaPTr: equal stages over the rounds, one per path-length fraction
        schedule = progressive_schedule(cfg.path_lengths(), cfg.num_server_rounds)
        return RandomPath(model_factory, schedule=schedule, local_steps=steps, fraction_train=cfg.fraction_train,
                          **common)
    if cfg.strategy == "core-alternation":  # a fixed core (nested prefix) in core rounds, the full model else
        return CoreAlternation(model_factory, cfg.core_fraction, cfg.core_period, local_steps=steps,
                               fraction_train=cfg.fraction_train, **common)
    raise ValueError(f"strategy must be one of {STRATEGIES}, got {cfg.strategy!r}")

