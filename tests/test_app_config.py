"""The Flower App's [tool.flwr.app.config] equals RunConfig's defaults, key for key."""

import dataclasses
import tomllib
from pathlib import Path

from fl_subnet.experiments.config import RunConfig

ROOT = Path(__file__).resolve().parents[1]


def test_app_config_lists_every_key_with_its_default():
    table = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    defaults = {f.name.replace("_", "-"): f.default for f in dataclasses.fields(RunConfig)}
    assert table == defaults
    RunConfig.from_mapping(table)  # and it validates


def test_every_scenario_file_validates():
    from fl_subnet.experiments.cli import load_scenario

    files = sorted((ROOT / "scenarios").glob("*.toml"))
    assert len(files) >= 8
    for path in files:
        load_scenario(path)
