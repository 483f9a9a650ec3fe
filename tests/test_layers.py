"""The import contract of the three layers (pyproject.toml, ``[tool.importlinter]``):
the harness (``fl_subnet.app``, ``fl_subnet.experiments``, ``fl_subnet.tiers``) imports the
Flower layer (``fl_subnet.strategies``, ``fl_subnet.clients``, then ``fl_subnet.wire``),
which imports the pure-torch core (``fl_subnet.core``, ``fl_subnet.models``); never the
other way, and the core imports no ``flwr``. Checked with import-linter on the installed
layout (strategies/ and clients/ inside fl_subnet/, as the wheel ships them)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINT = Path(sys.executable).with_name("lint-imports")
IGNORE = shutil.ignore_patterns("__pycache__")


def installed_layout(tmp: Path) -> Path:
    pkg = tmp / "fl_subnet"
    shutil.copytree(ROOT / "fl_subnet", pkg, ignore=IGNORE)
    for sub in ("strategies", "clients"):
        shutil.copytree(ROOT / sub, pkg / sub, ignore=IGNORE)
    return pkg


def lint(tmp: Path) -> subprocess.CompletedProcess:
    assert LINT.exists(), f"{LINT} missing: import-linter comes with the dev install (make setup)"
    env = {**os.environ, "PYTHONPATH": str(tmp)}
    return subprocess.run([str(LINT), str(ROOT / "pyproject.toml"), "--no-cache"], cwd=tmp, env=env,
                          capture_output=True, text=True, timeout=300)


def test_the_layer_contract_holds(tmp_path):
    installed_layout(tmp_path)
    done = lint(tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Contracts: 2 kept, 0 broken." in done.stdout, done.stdout


@pytest.mark.parametrize("module, line", [
    ("core/masks.py", "import fl_subnet.experiments.config"),  # the core reaching up to the harness
    ("wire/records.py", "import fl_subnet.strategies.registry"),  # the wire contract reaching up
    ("strategies/ist.py", "import fl_subnet.app.server_app"),  # a strategy importing an App
    ("core/fold.py", "import flwr.app"),  # the core importing Flower
])
def test_a_wrong_import_breaks_the_contract(tmp_path, module, line):
    pkg = installed_layout(tmp_path)
    path = pkg / module
    path.write_text(path.read_text() + f"\n{line}  # deliberately wrong\n")
    done = lint(tmp_path)
    name = "fl_subnet." + module.removesuffix(".py").replace("/", ".")
    assert done.returncode != 0 and "BROKEN" in done.stdout, done.stdout + done.stderr
    target = line.split()[1].split(".")[0] if line.startswith("import flwr") else line.split()[1]
    assert re.search(rf"-\s+{re.escape(name)} -> {re.escape(target)}\b", done.stdout), done.stdout  # named
