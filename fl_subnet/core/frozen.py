"""Trainable and frozen state: which tensors travel, and a fingerprint of those that do not.

With a frozen base and trainable adapters (LoRA, :mod:`fl_subnet.core.lora`), only the
trainable tensors are masked, sent and aggregated: the server and every node hold the same
base, and a fingerprint of it tells a node holding another base apart. A tensor is
*trainable* when it is a parameter with ``requires_grad``; every other ``state_dict``
entry (frozen parameters, persistent buffers) belongs to the *frozen* state.

The Slicer and the :class:`~fl_subnet.core.aggregate.MaskedAggregator` take a state
restricted to the trainable keys as they take a full one: every key they cut is coupled
to a group, and the groups of a LoRA model couple only adapter tensors.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping

import torch
from torch import nn

#: Bytes hashed per step (one host copy of at most this size per step for a tensor that
#: is not already in CPU memory).
CHUNK_BYTES = 1 << 26


def trainable_keys(model: nn.Module) -> list[str]:
    """``state_dict`` keys of the parameters with ``requires_grad``, in ``state_dict``
    order (every name of a tied parameter). Works on a model built on ``meta``."""
    return [k for k, v in model.state_dict(keep_vars=True).items()
            if isinstance(v, nn.Parameter) and v.requires_grad]


def frozen_keys(model: nn.Module) -> list[str]:
    """Every other ``state_dict`` key: frozen parameters and persistent buffers."""
    trainable = set(trainable_keys(model))
    return [k for k in model.state_dict(keep_vars=True) if k not in trainable]


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The trainable tensors of ``model``, detached (no copy), keyed as its ``state_dict``:
    what a node trains and sends, and what the aggregator averages."""
    keys = set(trainable_keys(model))
    return {k: v.detach() for k, v in model.state_dict(keep_vars=True).items() if k in keys}


def state_fingerprint(state: Mapping[str, torch.Tensor], keys: Iterable[str]) -> str:
    """SHA-256 hex digest of ``keys`` of ``state``: for each key in sorted order, its
    name, shape, dtype and raw bytes (row-major, the machine's byte order).

    Parameters
    ----------
    state : Mapping[str, torch.Tensor]
        Tensors of any shape, dtype and device (not ``meta``).
    keys : Iterable[str]
        The keys to hash (e.g. :func:`frozen_keys`).

    Returns
    -------
    str
        64 hex digits. Equal for equal tensors under equal names; any changed byte,
        shape, dtype or name changes it.

    Raises
    ------
    KeyError
        If a key is missing from ``state``.
    ValueError
        If a tensor is on the ``meta`` device (it has no bytes).

    Notes
    -----
    Cost: one read of every hashed byte (SHA-256 on one core), plus a host copy of each
    chunk of a tensor held on an accelerator or not contiguous. For a base of billions of
    parameters that is seconds: compute it once per process, not per message.
    """
    h = hashlib.sha256()
    for key in sorted(keys):
        t = state[key].detach()
        if t.is_meta:
            raise ValueError(f"cannot fingerprint '{key}': a meta tensor has no data")
        header = f"{key}\0{tuple(t.shape)}\0{t.dtype}\0{t.numel() * t.element_size()}\0"
        h.update(header.encode())
        flat = t.reshape(-1)
        step = max(1, CHUNK_BYTES // max(1, t.element_size()))
        for start in range(0, flat.numel(), step):
            h.update(flat[start:start + step].cpu().contiguous().view(torch.uint8).numpy())
    return h.hexdigest()


def base_fingerprint(model: nn.Module) -> str:
    """:func:`state_fingerprint` of ``model``'s frozen state (:func:`frozen_keys`): equal
    on two processes exactly when they hold the same base, whatever their adapters."""
    return state_fingerprint(model.state_dict(), frozen_keys(model))


def check_base(expected: str, actual: str, who: str = "this node") -> None:
    """Refuse a base whose fingerprint differs from the expected one.

    Raises
    ------
    ValueError
        Saying that ``who`` holds another frozen base (other weights, dtypes, shapes or
        names), with both fingerprints.
    """
    if expected != actual:
        raise ValueError(f"{who} holds another frozen base model: its fingerprint is {actual[:16]}…, "
                         f"expected {expected[:16]}… (the base weights, dtypes, shapes or names differ); "
                         "load the same base model as the server")
