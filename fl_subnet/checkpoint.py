"""Saving the global model and the state to continue a run, atomically.

Every file is written to a temporary name in the same folder, flushed to disk and then
renamed over the old one (``os.replace``), so a run killed at any instant leaves either
the previous complete file or the new complete file, never a truncated one.

Layout of a checkpoint folder::

    model.safetensors   the global model's state_dict (safetensors; load it with
                        :func:`load_model` or ``safetensors.torch.load_file``), with the
                        checkpoint's metadata in its header (one atomic file)
    checkpoint.json     the same metadata, readable: {"server-round": r, ...}
    server-optimizer-<r>.safetensors
                        the masked server optimizer's state after round r (only with a
                        ``server-optimizer``); written BEFORE the model file of round r,
                        and the one of round r-1 removed after it, so the model file's
                        round always names an optimizer file that exists
"""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
from collections.abc import Mapping
from pathlib import Path

import torch

log = logging.getLogger(__name__)

MODEL_FILE = "model.safetensors"
STATE_FILE = "checkpoint.json"
OPTIMIZER_STEM = "server-optimizer-"


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temporary file, fsync, rename)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


_TEMPORARY = re.compile(r"^\.(?P<name>.+)\.[A-Za-z0-9_]{8}$")


def remove_stale_temporaries(folder: str | Path) -> list[str]:
    """Delete the temporary files a killed writer left in ``folder`` (names
    ``.<file>.<8 random characters>``, as :func:`atomic_write_bytes` makes them).

    A SIGKILL between ``mkstemp`` and ``os.replace`` cannot be cleaned up by the dying
    process; the final files are still complete. Call this when a run (re)starts in a
    folder, never while another writer uses it.

    Returns
    -------
    list of str
        The names removed.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for p in folder.iterdir():
        if p.is_file() and _TEMPORARY.match(p.name):
            p.unlink(missing_ok=True)
            removed.append(p.name)
    if removed:
        log.info("removed %d temporary file(s) left by an interrupted run in %s: %s", len(removed), folder,
                 ", ".join(sorted(removed)))
    return removed


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))


def save_model(path: str | Path, state: Mapping[str, torch.Tensor], meta: Mapping[str, object] | None = None) -> None:
    """Save a ``state_dict`` as safetensors, atomically; ``meta`` (JSON-serialisable)
    goes into the file's header, so model and metadata can never disagree.

    Tensors are saved as contiguous CPU copies (safetensors stores no aliases).
    """
    from safetensors.torch import save

    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in state.items()}
    header = {"fl-subnet": json.dumps(dict(meta))} if meta is not None else None
    atomic_write_bytes(path, save(tensors, metadata=header))


def load_model(path: str | Path) -> dict[str, torch.Tensor]:
    """The ``state_dict`` saved by :func:`save_model` (load it into the full model with
    ``model.load_state_dict(load_model(path))``).

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist.
    ValueError
        If it is not a safetensors file.
    """
    from safetensors.torch import load_file

    if not Path(path).is_file():
        raise FileNotFoundError(f"no model file {path}")
    try:
        return load_file(str(path))
    except Exception as err:  # noqa: BLE001 — safetensors raises its own error types
        raise ValueError(f"{path}: not a safetensors model file ({err})") from None


def save_checkpoint(folder: str | Path, state: Mapping[str, torch.Tensor], meta: Mapping[str, object],
                    optimizer_state: Mapping[str, torch.Tensor] | None = None) -> None:
    """Save the model with ``meta`` (must hold ``server-round``) in one atomic file, then
    a readable copy of ``meta`` as ``checkpoint.json``.

    ``optimizer_state`` (the server optimizer's flat ``state_dict``) goes to
    ``server-optimizer-<round>.safetensors``, written before the model file; older
    optimizer files are removed after it.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rnd = int(meta["server-round"])
    if optimizer_state is not None:
        save_model(folder / f"{OPTIMIZER_STEM}{rnd}.safetensors", optimizer_state, {"server-round": rnd})
    save_model(folder / MODEL_FILE, state, meta)
    atomic_write_text(folder / STATE_FILE, json.dumps(dict(meta), indent=2))
    for old in folder.glob(f"{OPTIMIZER_STEM}*.safetensors"):
        if old.name != f"{OPTIMIZER_STEM}{rnd}.safetensors":
            old.unlink(missing_ok=True)


def load_optimizer_state(folder: str | Path, server_round: int) -> dict[str, torch.Tensor] | None:
    """The server optimizer state saved with round ``server_round`` (None if there is none)."""
    path = Path(folder) / f"{OPTIMIZER_STEM}{int(server_round)}.safetensors"
    return load_model(path) if path.is_file() else None


def load_checkpoint(folder: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """``(model state, meta)`` of the last round saved in ``folder``.

    Raises
    ------
    FileNotFoundError
        If ``folder`` has no ``model.safetensors``.
    ValueError
        If the file is not a checkpoint written by :func:`save_checkpoint`.
    """
    from safetensors import safe_open

    path = Path(folder) / MODEL_FILE
    state = load_model(path)
    with safe_open(str(path), "pt") as f:
        header = (f.metadata() or {}).get("fl-subnet")
    if header is None:
        raise ValueError(f"{path}: a model file without fl-subnet checkpoint metadata")
    return state, json.loads(header)
