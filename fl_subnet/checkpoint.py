"""Saving the global model and the state to continue a run, atomically.

Every file is written to a temporary name in the same folder, flushed to disk and then
renamed over the old one (``os.replace``), so a run killed at any instant leaves either
the previous complete file or the new complete file, never a truncated one.

Layout of a checkpoint folder::

    model.safetensors   the global model's state_dict (safetensors; load it with
                        :func:`load_model` or ``safetensors.torch.load_file``), with the
                        checkpoint's metadata in its header (one atomic file)
    checkpoint.json     the same metadata, readable: {"server-round": r, ...}; both hold
                        "sha256", a digest of the tensors and the rest of the metadata
                        (:func:`checkpoint_digest`), checked on load
    server-optimizer-<r>.safetensors
                        the masked server optimizer's state after round r (only with a
                        ``server-optimizer``); written BEFORE the model file of round r,
                        and the one of round r-1 removed after it, so the model file's
                        round always names an optimizer file that exists
    clip-center-<r>.safetensors
                        the centered-clipping rule's centre after round r (the round's
                        aggregate update; only with ``aggregation`` ``centered-clip`` or
                        ``bucketing``), kept like the optimizer's
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
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
CLIP_CENTER_STEM = "clip-center-"
WIDTH_STATS_STEM = "fjord-bn-"
#: Key of the checkpoint's digest in its metadata (:func:`checkpoint_digest`).
DIGEST_KEY = "sha256"


class CheckpointError(ValueError):
    """A checkpoint that cannot be trusted (changed or damaged after it was saved, or
    disagreeing with the files beside it); the message names the file and the reason."""


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


def checkpoint_digest(state: Mapping[str, torch.Tensor], meta: Mapping[str, object]) -> str:
    """SHA-256 (hex) of a checkpoint: every tensor's name, dtype, shape and bytes (names
    sorted) and the metadata as canonical JSON (sorted keys; ``sha256`` itself left out).

    A flipped bit in any tensor or an edited header field (``server-round``, the run
    config) changes it.
    """
    h = hashlib.sha256()
    h.update(json.dumps({k: v for k, v in meta.items() if k != DIGEST_KEY}, sort_keys=True).encode("utf-8"))
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        h.update(f"\0{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode("utf-8"))
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def save_checkpoint(folder: str | Path, state: Mapping[str, torch.Tensor], meta: Mapping[str, object],
                    optimizer_state: Mapping[str, torch.Tensor] | None = None,
                    clip_center: Mapping[str, torch.Tensor] | None = None,
                    width_stats: Mapping[float, Mapping[str, torch.Tensor]] | None = None) -> None:
    """Save the model with ``meta`` (must hold ``server-round``) and its digest
    (:func:`checkpoint_digest`, key ``sha256``) in one atomic file, then a readable copy
    of that metadata as ``checkpoint.json``.

    ``optimizer_state`` (the server optimizer's flat ``state_dict``) goes to
    ``server-optimizer-<round>.safetensors``, written before the model file; older
    optimizer files are removed after it. ``clip_center`` (the centered-clipping rule's
    centre) goes to ``clip-center-<round>.safetensors`` alike, and ``width_stats`` (FjORD's
    per-width BatchNorm statistics, ``{width: {buffer key: tensor}}``) to
    ``fjord-bn-<round>.safetensors`` (tensor names ``"<width>/<key>"``).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rnd = int(meta["server-round"])
    meta = {k: v for k, v in meta.items() if k != DIGEST_KEY}
    meta[DIGEST_KEY] = checkpoint_digest(state, meta)
    flat_stats = None if width_stats is None else {
        f"{float(w)!r}/{k}": t for w in sorted(width_stats) for k, t in width_stats[w].items()}
    extras = {OPTIMIZER_STEM: optimizer_state, CLIP_CENTER_STEM: clip_center, WIDTH_STATS_STEM: flat_stats}
    for stem, extra in extras.items():
        if extra is not None:
            save_model(folder / f"{stem}{rnd}.safetensors", extra, {"server-round": rnd})
    save_model(folder / MODEL_FILE, state, meta)
    atomic_write_text(folder / STATE_FILE, json.dumps(dict(meta), indent=2))
    for stem in extras:
        for old in folder.glob(f"{stem}*.safetensors"):
            if old.name != f"{stem}{rnd}.safetensors":
                old.unlink(missing_ok=True)


def load_optimizer_state(folder: str | Path, server_round: int) -> dict[str, torch.Tensor] | None:
    """The server optimizer state saved with round ``server_round`` (None if there is none)."""
    path = Path(folder) / f"{OPTIMIZER_STEM}{int(server_round)}.safetensors"
    return load_model(path) if path.is_file() else None


def load_clip_center(folder: str | Path, server_round: int) -> dict[str, torch.Tensor] | None:
    """The centered-clipping centre saved with round ``server_round`` (None if there is none)."""
    path = Path(folder) / f"{CLIP_CENTER_STEM}{int(server_round)}.safetensors"
    return load_model(path) if path.is_file() else None


def load_width_stats(folder: str | Path, server_round: int) -> dict[float, dict[str, torch.Tensor]] | None:
    """FjORD's per-width statistics saved with round ``server_round`` (None if there are none).

    Raises
    ------
    CheckpointError
        If a tensor name is not ``"<width>/<key>"`` or a value is not finite (naming the
        file).
    """
    path = Path(folder) / f"{WIDTH_STATS_STEM}{int(server_round)}.safetensors"
    if not path.is_file():
        return None
    out: dict[float, dict[str, torch.Tensor]] = {}
    for name, t in load_model(path).items():
        head, _, key = name.partition("/")
        try:
            width = float(head)
        except ValueError:
            width = float("nan")
        if not key or not 0 < width <= 1 or not bool(torch.isfinite(t).all()):
            raise CheckpointError(f"{path}: tensor {name!r} is not a finite '<width>/<buffer key>' statistic")
        out.setdefault(width, {})[key] = t
    return out


def load_checkpoint(folder: str | Path, *, verify: bool = True) -> tuple[dict[str, torch.Tensor], dict]:
    """``(model state, meta)`` of the last round saved in ``folder``, verified.

    With ``verify`` (the default) the checkpoint is refused unless (1) its digest
    (:func:`checkpoint_digest`) matches the tensors and the header, (2) every floating
    tensor is finite, (3) ``checkpoint.json`` names the same ``server-round``, or is
    missing or one round behind (a run killed between the model file and its readable
    copy, written after it: logged, the model file's round is used).
    A checkpoint written before digests existed (no ``sha256``) is checked for (2) and
    (3) and loads with a warning.

    Raises
    ------
    FileNotFoundError
        If ``folder`` has no ``model.safetensors``.
    ValueError
        If the file is not a checkpoint written by :func:`save_checkpoint`.
    CheckpointError
        (a ``ValueError``) If a check fails; the message names the file and the check.
    """
    from safetensors import safe_open

    path = Path(folder) / MODEL_FILE
    state = load_model(path)
    with safe_open(str(path), "pt") as f:
        header = (f.metadata() or {}).get("fl-subnet")
    if header is None:
        raise ValueError(f"{path}: a model file without fl-subnet checkpoint metadata")
    try:
        meta = json.loads(header)
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path}: its fl-subnet header is not JSON ({err})") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("server-round"), int) or meta["server-round"] < 0:
        raise CheckpointError(f"{path}: its header has no 'server-round' integer >= 0")
    if verify:
        verify_checkpoint(Path(folder), state, meta)
    return state, meta


def verify_checkpoint(folder: Path, state: Mapping[str, torch.Tensor], meta: Mapping[str, object]) -> None:
    """The checks of :func:`load_checkpoint`; raises :class:`CheckpointError`."""
    path = folder / MODEL_FILE
    saved = meta.get(DIGEST_KEY)
    if saved is None:
        log.warning("%s: a checkpoint without a digest (written by an older fl-subnet): its tensors cannot "
                    "be verified", path)
    elif saved != checkpoint_digest(state, meta):
        raise CheckpointError(f"{path}: its digest does not match its tensors and header: the file was changed "
                              "or damaged after it was saved (refusing it; restore a copy, or start the run "
                              "again)")
    for name, t in state.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise CheckpointError(f"{path}: tensor {name!r} holds NaN or Inf: not a model to continue from")
    readable = folder / STATE_FILE
    try:
        other = json.loads(readable.read_text())
    except FileNotFoundError:
        other = None
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{readable}: not readable JSON ({err})") from None
    got = other.get("server-round") if isinstance(other, dict) else None
    if got != meta["server-round"]:
        if other is None or got == meta["server-round"] - 1:
            # the readable copy is written after the model file: a kill between the two
            # leaves it missing (round 0) or one round behind; the model file's header wins
            log.warning("%s: %s is %s: the run was stopped between the two writes; continuing from the model "
                        "file's round %d", path, STATE_FILE, "missing" if other is None else f"of round {got}",
                        meta["server-round"])
        else:
            raise CheckpointError(f"{path}: its header says server-round {meta['server-round']} but {STATE_FILE} "
                                  f"says {got}: one of them was edited")
    seconds = meta.get("seconds", 0.0)
    if not (isinstance(seconds, (int, float)) and math.isfinite(seconds)):
        raise CheckpointError(f"{path}: 'seconds' in its header must be a finite number, got {seconds!r}")
