"""The public names ``fl_subnet``, ``fl_subnet.strategies`` and ``fl_subnet.clients``
import in all three ways the project is used (docs/design.md, "Layout"):

1. source tree: the project folder on ``sys.path`` (tests, a Flower FAB), with no
   install at all;
2. wheel: a built wheel installed into a plain folder;
3. editable: ``pip install -e .`` (the dev venv).

Modes 1 and 2 run a child interpreter with ``-S``, so no ``.pth`` file is processed and
the editable install's import hook is never registered; the venv's site-packages is put
back on ``sys.path`` (last) only so that torch and flwr import. Each mode then checks
that *every* loaded ``fl_subnet*`` module file comes from the tree under test.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from importlib import metadata
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PUBLIC = ("fl_subnet", "fl_subnet.strategies", "fl_subnet.clients")
PURELIB = sysconfig.get_paths()["purelib"]  # this venv's site-packages (torch, flwr)

# Imports the public names and reports where every fl_subnet module came from.
PROBE = """
import importlib, importlib.util, json, sys
sys.path.append({purelib!r})
for name in {public!r}:
    importlib.import_module(name)
files = {{n: getattr(m, "__file__", None) for n, m in sys.modules.items()
         if n == "fl_subnet" or n.startswith("fl_subnet.")}}
print(json.dumps({{
    "files": files,
    "finders": [type(f).__name__ if not isinstance(f, type) else f.__name__ for f in sys.meta_path],
    "top_level_strategies": importlib.util.find_spec("strategies") is not None,
    "top_level_clients": importlib.util.find_spec("clients") is not None,
    "other_folders": [n for n in ("fl_subnet.tests", "fl_subnet.fl_subnet", "fl_subnet.scenarios")
                      if importlib.util.find_spec(n) is not None],
}}))
"""

COPY_IGNORE = shutil.ignore_patterns(
    ".git", ".venv", "build", "dist", "runs", "*.egg-info", "__pycache__", ".pytest_cache",
    ".hypothesis", "*.fab",
)


def _env(pythonpath: Path | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "PYTHONSAFEPATH", "PYTHONHOME", "PYTHONSTARTUP")}
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath)
    return env


def _run(args: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{args[:4]} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc


def _probe(cwd: Path, pythonpath: Path | None, isolated: bool = True) -> dict:
    code = PROBE.format(purelib=PURELIB, public=PUBLIC)
    flags = ["-S"] if isolated else []
    proc = _run([sys.executable, *flags, "-c", code], cwd, _env(pythonpath))
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _assert_all_under(files: dict[str, str | None], root: Path) -> None:
    assert set(PUBLIC) <= set(files), files
    for name, f in files.items():
        assert f is not None, f"{name} has no __file__ (namespace package?)"
        assert Path(f).resolve().is_relative_to(root.resolve()), f"{name} loaded from {f}, not {root}"


def _expected_layout(files: dict[str, str | None], pkg: Path, strategies: Path, clients: Path) -> None:
    assert Path(files["fl_subnet"]).resolve() == (pkg / "__init__.py").resolve()
    assert Path(files["fl_subnet.strategies"]).resolve() == (strategies / "__init__.py").resolve()
    assert Path(files["fl_subnet.clients"]).resolve() == (clients / "__init__.py").resolve()


def test_source_tree_without_install(tmp_path):
    """A copy of the three source folders, on sys.path, with the editable hook absent."""
    for folder in ("fl_subnet", "strategies", "clients", "tests"):
        shutil.copytree(REPO / folder, tmp_path / folder, ignore=COPY_IGNORE)
    (tmp_path / "scenarios").mkdir()
    (tmp_path / "scenarios" / "__init__.py").write_text("")
    out = _probe(cwd=tmp_path, pythonpath=tmp_path)
    assert "_EditableFinder" not in out["finders"], "editable import hook leaked into the child"
    _assert_all_under(out["files"], tmp_path)
    _expected_layout(out["files"], tmp_path / "fl_subnet", tmp_path / "strategies", tmp_path / "clients")
    assert out["other_folders"] == [], "only strategies/ and clients/ may resolve under fl_subnet"


def test_wheel_install(tmp_path):
    """Build a wheel from a copy of the project, install it into a folder, import from there."""
    src, dist, site, elsewhere = (tmp_path / d for d in ("src", "dist", "site", "cwd"))
    shutil.copytree(REPO, src, ignore=COPY_IGNORE)  # keeps build/ and egg-info out of the repo
    elsewhere.mkdir()
    env = _env()
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
          "-w", str(dist), str(src)], tmp_path, env)
    wheels = list(dist.glob("fl_subnet-*.whl"))
    assert len(wheels) == 1, wheels
    names = zipfile.ZipFile(wheels[0]).namelist()
    assert "fl_subnet/strategies/__init__.py" in names and "fl_subnet/clients/__init__.py" in names
    tops = {n.split("/", 1)[0] for n in names if not n.split("/", 1)[0].endswith(".dist-info")}
    assert tops == {"fl_subnet"}, f"wheel ships top-level {sorted(tops)}"
    _run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-compile",
          "--target", str(site), str(wheels[0])], tmp_path, env)

    out = _probe(cwd=elsewhere, pythonpath=site)
    assert "_EditableFinder" not in out["finders"]
    _assert_all_under(out["files"], site)
    pkg = site / "fl_subnet"
    _expected_layout(out["files"], pkg, pkg / "strategies", pkg / "clients")
    assert not out["top_level_strategies"] and not out["top_level_clients"]


def _editable_root() -> Path | None:
    # Look in site-packages only: from the repo root, ``fl_subnet.egg-info`` (no
    # direct_url.json) would shadow the installed distribution.
    dists = list(metadata.distributions(name="fl-subnet", path=[PURELIB]))
    if not dists:
        return None
    info = json.loads(dists[0].read_text("direct_url.json") or "{}")
    if not info.get("dir_info", {}).get("editable") or not info.get("url", "").startswith("file://"):
        return None
    return Path(info["url"][len("file://"):])


def test_editable_install(tmp_path):
    """The dev venv's editable install maps the names onto the repo's folders."""
    root = _editable_root()
    if root is None or root.resolve() != REPO:
        pytest.skip(f"fl-subnet is not editable-installed from {REPO}")
    # Outside the repo and with nothing on PYTHONPATH: only the install can resolve them.
    out = _probe(cwd=tmp_path, pythonpath=None, isolated=False)
    _assert_all_under(out["files"], REPO)
    _expected_layout(out["files"], REPO / "fl_subnet", REPO / "strategies", REPO / "clients")

    import fl_subnet.clients
    import fl_subnet.strategies

    assert Path(fl_subnet.strategies.__file__).resolve() == REPO / "strategies" / "__init__.py"
    assert Path(fl_subnet.clients.__file__).resolve() == REPO / "clients" / "__init__.py"


@pytest.mark.parametrize("name", ["strategies", "clients"])
def test_top_level_import_is_refused(name):
    """From the repo root, ``import strategies`` must fail and name the right import."""
    code = (f"import sys; sys.path.append({PURELIB!r})\n"
            f"try:\n    import {name}\nexcept ImportError as e:\n"
            f"    print(type(e).__name__ + ': ' + str(e))\nelse:\n    print('imported')")
    proc = _run([sys.executable, "-S", "-c", code], REPO, _env())
    line = proc.stdout.strip().splitlines()[-1]
    assert line.startswith("ImportError:"), line
    assert f"fl_subnet.{name}" in line, line
