"""The hint for a simulation with too few SuperNodes names commands flwr 1.41 accepts.

Since flwr 1.32 the local simulation federation has 2 SuperNodes and is resized with
``flwr run . --federation-config "num-supernodes=N"`` (one run) or ``flwr federation
simulation-config @none/default --num-supernodes N`` (stored in the SuperLink); the
``options.num-supernodes`` connection entries of ``config.toml`` are deprecated. Every
such command in the strategy's error, in README.md and in docs/*.md is parsed with flwr's own CLI.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from types import SimpleNamespace

import click
import pytest
import typer
from flwr.cli.app import app as flwr_cli
from flwr.cli.run.run import _parse_federation_config_overrides

from fl_subnet.models import MLP
from fl_subnet.strategies import IST
from fl_subnet.strategies.nodes import NotEnoughNodes

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
COMMAND = re.compile(r"flwr (?:run|federation simulation-config)\b[^`\n]*")


def parse_flwr(argv: list[str]) -> tuple[str, dict]:
    """Parse ``flwr <argv>`` as the installed flwr CLI would (nothing is run): the
    subcommand's name and its parameters; a click.UsageError for what it rejects."""
    command = typer.main.get_command(flwr_cli)
    ctx = command.make_context("flwr", list(argv))
    while isinstance(command, click.Group):
        name, command, argv = command.resolve_command(ctx, argv)
        ctx = command.make_context(name, argv, parent=ctx)
    return command.name, ctx.params


def num_supernodes(command: str) -> int:
    """The number of SuperNodes a ``flwr run`` / ``flwr federation simulation-config``
    command line sets, through flwr's own parsing."""
    name, params = parse_flwr(shlex.split(command)[1:])
    if name == "run":
        config = _parse_federation_config_overrides(list(params["federation_config_overrides"]),
                                                    SimpleNamespace(options=None))
        return config.num_supernodes
    assert name == "simulation-config", command
    return params["num_supernodes"]


class TwoNodes:
    def get_node_ids(self):
        return [11, 12]


def test_too_few_nodes_error_names_working_commands():
    strategy = IST(lambda: MLP(8, [16], 2), num_subnets=4, node_wait_timeout=0.01)
    with pytest.raises(NotEnoughNodes) as err:
        strategy.wait_for_nodes(TwoNodes(), 4)
    message = str(err.value)
    assert "only 2 connected" in message and "options.num-supernodes" not in message, message
    commands = COMMAND.findall("\n".join(re.split(r", or | for ", message)))
    assert len(commands) == 2, message
    assert [num_supernodes(c) for c in commands] == [4, 4]


def test_readme_resizes_the_simulation_with_flwr_141_syntax():
    """README.md and the docs pages (docs/deployment.md, docs/scenarios.md, ...)."""
    pages = [README, *sorted((ROOT / "docs").glob("*.md"))]
    for page in pages:
        assert "options.num-supernodes" not in page.read_text(), page.name
    resizing = {page.name: [c.split(" #")[0].strip() for c in COMMAND.findall(page.read_text()) if "num-supernodes" in c]
                for page in pages}
    assert resizing["README.md"], "README.md shows no flwr command that sizes the simulation"
    commands = [c for found in resizing.values() for c in found]
    assert len(commands) >= 3, resizing
    for command in commands:
        command = command.replace("num-supernodes=N", "num-supernodes=4").replace("num-supernodes N", "num-supernodes 4")
        assert num_supernodes(command) == int(re.search(r"num-supernodes[= ](\d+)", command)[1]), command
