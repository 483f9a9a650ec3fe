"""The Makefile's test targets, as ``make -n`` prints them (nothing is run).

``make test`` is the whole suite (what .ci/run calls) with pytest's slowest 25 durations,
``make test-fast`` leaves out the tests marked slow, and ``PYTEST_ARGS`` passes further
pytest options to either (``make test -m "not slow"`` would hand ``-m`` to make itself).
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="make not installed")


def pytest_command(*make_args: str) -> list[str]:
    """The pytest command line of ``make -n <make_args>``, split into arguments."""
    out = subprocess.run(["make", "-n", "-C", str(ROOT), *make_args], capture_output=True, text=True,
                         check=True).stdout
    lines = [line for line in out.splitlines() if " -m pytest " in line]
    assert len(lines) == 1, out
    return shlex.split(lines[0])[3:]  # after <venv python> -m pytest


def test_make_test_runs_everything_with_durations():
    args = pytest_command("test")
    assert "--durations=25" in args and "-m" not in args, args


def test_make_test_fast_leaves_out_the_slow_tests():
    args = pytest_command("test-fast")
    assert args[args.index("-m") + 1] == "not slow" and "--durations=25" in args, args


@pytest.mark.parametrize("target", ["test", "test-fast"])
def test_pytest_args_reach_pytest(target):
    args = pytest_command(target, "PYTEST_ARGS=-k robust -x")
    assert args[-3:] == ["-k", "robust", "-x"], args


def test_ci_and_readme_name_the_targets():
    assert re.search(r"^make test$", (ROOT / ".ci" / "run").read_text(), re.M)  # the whole suite
    readme = (ROOT / "README.md").read_text()
    block = readme.split("## Two commands", 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
    assert "make test-fast" in block and 'make test PYTEST_ARGS="' in block, block
    assert 'make test -m' not in readme


def test_make_test_runs_on_two_workers_one_test_at_a_time():
    """pytest-xdist, 2 workers (CI's cores) taking one test at a time (the longest first, conftest's
    LONGEST_FIRST, which must name files that exist); PYTEST_WORKERS=0 runs in one process."""
    from conftest import LONGEST_FIRST

    args = pytest_command("test")
    assert args[args.index("-n") + 1] == "2", args
    assert args[args.index("--maxschedchunk") + 1] == "1", args
    args = pytest_command("test", "PYTEST_WORKERS=0")
    assert args[args.index("-n") + 1] == "0", args
    assert all((ROOT / "tests" / name).is_file() for name in LONGEST_FIRST), LONGEST_FIRST
