"""Protocols register themselves (strategies/registry.py): the run config's choices, the
package's public names and build_strategy all come from the one registry."""

from __future__ import annotations

import typing

import pytest

import fl_subnet.strategies as S
from fl_subnet.experiments.config import STRATEGIES, RunConfig
from fl_subnet.strategies import PROTOCOLS, SubnetStrategy, build_strategy, protocol_class, register_protocol
from fl_subnet.strategies.registry import Protocol

ROW = dict(mask="m", local_work="w", scale="s", aggregation="a", source="x")


def test_every_registered_protocol_is_a_choice_a_public_name_and_a_strategy():
    assert STRATEGIES == tuple(PROTOCOLS) == tuple(sorted(PROTOCOLS))
    assert typing.get_args(RunConfig.__pydantic_fields__["strategy"].annotation) == STRATEGIES
    for name, p in PROTOCOLS.items():
        assert issubclass(p.cls, SubnetStrategy) and p.cls.protocol == name
        assert getattr(S, p.cls.__name__) is p.cls and p.cls.__name__ in S.__all__
    assert S.__all__ == sorted(S.__all__)


def test_build_strategy_gives_the_registered_class():
    from strategy_helpers import factory

    for name in ("fedavg", "federated-dropout", "heterofl"):
        strategy = build_strategy(RunConfig(strategy=name, capacity_tiers="0.5,1"), factory)
        assert type(strategy) is PROTOCOLS[name].cls


def test_unknown_name_duplicate_and_incomplete_registrations_are_refused():
    with pytest.raises(ValueError, match="strategy must be one of .*got 'fedavgg'"):
        protocol_class("fedavgg")
    with pytest.raises(ValueError, match="'ist' is already registered by fl_subnet.strategies.ist.IST"):
        register_protocol("ist", **ROW)(type("Other", (SubnetStrategy,), {"from_run_config": classmethod(
            lambda cls, cfg, f, **kw: None)}))
    with pytest.raises(TypeError, match="must define the classmethod from_run_config"):
        register_protocol("no-builder", **ROW)(type("NoBuilder", (), {}))
    assert "no-builder" not in PROTOCOLS and PROTOCOLS["ist"].cls is S.IST


def test_registering_adds_a_row_and_a_builder(monkeypatch):
    monkeypatch.setattr("fl_subnet.strategies.registry.PROTOCOLS", dict(PROTOCOLS))
    from fl_subnet.strategies import registry

    @register_protocol("aaa-test", **ROW)
    class Probe(S.SubnetFedAvg):
        @classmethod
        def from_run_config(cls, cfg, model_factory, **common):
            return ("built", cfg, model_factory)

    assert registry.PROTOCOLS["aaa-test"] == Protocol("aaa-test", Probe, **ROW)
    assert list(registry.PROTOCOLS)[0] == "aaa-test"  # sorted by name
    assert registry.protocol_table().splitlines()[2] == "| `aaa-test` | `Probe` | m | w | s | a | x |"
    cfg = type("Cfg", (), {"strategy": "aaa-test"})
    monkeypatch.setattr(registry, "make_server_optimizer", lambda *a, **k: None)
    for key in ("seed", "untouched", "batchnorm", "aggregation", "trim_fraction", "clip_radius", "clip_iterations",
                "bucket_size", "weiszfeld_iterations", "weiszfeld_smoothing", "krum_rogues", "min_cosine",
                "max_update_ratio", "max_ratio_to_median", "screen", "max_num_examples", "max_failed_rounds", "node_wait_timeout",
                "lr_scaling", "server_optimizer", "server_lr", "server_momentum", "fraction_evaluate"):
        setattr(cfg, key, 0)
    cfg.screen = "reject"
    assert registry.build_strategy(cfg, "factory") == ("built", cfg, "factory")
