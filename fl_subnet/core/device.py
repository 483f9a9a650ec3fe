"""Where a node trains: the ``device`` and ``amp`` settings, resolved on the machine that runs.

A run config says ``device = "auto" | "cpu" | "cuda" | "cuda:N"`` and
``amp = "none" | "bf16" | "fp16"``. Whether the device exists is a fact of the machine that
trains (each node's own hardware), so the syntax is checked where the config is read
(:func:`check_device_name`) and the device itself where it is used (:func:`resolve_device`):
``"cuda"`` on a machine without CUDA is a ``ValueError`` naming the key there, never a
silent fall-back to the CPU.

``"auto"`` (the default) is ``"cuda"`` when ``torch.cuda.is_available()``, else ``"cpu"``.
Mixed precision (:func:`autocast`) runs the forward pass under ``torch.autocast`` in
bfloat16 (CPU or CUDA) or float16 (CUDA only, with a gradient scaler, :func:`grad_scaler`).
"""

from __future__ import annotations

import contextlib
import re

import torch
from torch import nn

#: The accepted ``device`` values, in words (error messages and the run config's docs).
DEVICE_CHOICES = '"auto", "cpu", "cuda" or "cuda:N" (N an integer >= 0)'
#: ``amp``: no autocast, bfloat16 autocast, float16 autocast with a gradient scaler (CUDA only).
AMP_MODES = ("none", "bf16", "fp16")
_DEVICE = re.compile(r"auto|cpu|cuda(:(0|[1-9][0-9]{0,3}))?")
_AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def check_device_name(value: str) -> str:
    """``value`` unchanged if it is a valid ``device`` name (syntax only: whether this
    machine has it is :func:`resolve_device`'s question).

    Raises
    ------
    ValueError
        If ``value`` is not one of :data:`DEVICE_CHOICES`.
    """
    if not isinstance(value, str) or not _DEVICE.fullmatch(value):
        raise ValueError(f"device must be {DEVICE_CHOICES}, got {str(value)[:60]!r}")
    return value


def resolve_device(value: str | torch.device | None, *, key: str = "device") -> torch.device:
    """The ``torch.device`` of a ``device`` setting on this machine.

    Parameters
    ----------
    value : str, torch.device or None
        ``"auto"`` (or None): ``cuda`` if ``torch.cuda.is_available()``, else ``cpu``;
        ``"cpu"``, ``"cuda"``, ``"cuda:N"``; a ``torch.device`` of type cpu or cuda.
    key : str
        How error messages name the setting (e.g. ``"node-config key 'device'"``).

    Returns
    -------
    torch.device

    Raises
    ------
    ValueError
        Naming ``key``: a value that is not a device name, ``cuda`` on a machine whose
        torch has no usable CUDA device, or ``cuda:N`` beyond its device count.
    """
    if isinstance(value, torch.device):
        name = str(value)
    elif value is None:
        name = "auto"
    else:
        name = value
    if not isinstance(name, str) or not _DEVICE.fullmatch(name):
        raise ValueError(f"{key} must be {DEVICE_CHOICES}, got {str(value)[:60]!r}")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cpu":
        return device
    if not torch.cuda.is_available():
        build = "a CPU-only build" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}"
        raise ValueError(f"{key} is {name!r} but this machine has no usable CUDA device "
                         f"(torch.cuda.is_available() is False; torch {torch.__version__}, {build}): "
                         "use device 'auto' or 'cpu' here, or install a CUDA build of torch")
    count = torch.cuda.device_count()
    if device.index is not None and device.index >= count:
        raise ValueError(f"{key} is {name!r} but this machine has {count} CUDA device(s) "
                         f"(cuda:0 to cuda:{count - 1})")
    return device


def model_device(model: nn.Module) -> torch.device:
    """The device of ``model``'s first parameter (else first buffer; none: ``cpu``)."""
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


def check_amp(amp: str, device: torch.device, *, key: str = "amp") -> None:
    """Raise ``ValueError`` naming ``key`` if ``amp`` is not one of :data:`AMP_MODES` or
    cannot run on ``device``: ``fp16`` needs CUDA (its gradient scaler is CUDA's), ``bf16``
    a device whose autocast supports bfloat16 (any CPU; a CUDA GPU that reports it)."""
    if amp not in AMP_MODES:
        raise ValueError(f"{key} must be one of {AMP_MODES}, got {str(amp)[:60]!r}")
    if amp == "fp16" and device.type != "cuda":
        raise ValueError(f"{key} 'fp16' needs a CUDA device (float16 autocast with a gradient scaler), but this "
                         f"node trains on {device}: use amp 'bf16' or 'none' there")
    if amp == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError(f"{key} 'bf16': the GPU {device} does not support bfloat16: use amp 'fp16' or 'none'")


def autocast(device: torch.device, amp: str) -> contextlib.AbstractContextManager:
    """``torch.autocast`` of ``amp`` on ``device`` for a forward pass (a no-op for ``none``).

    Raises
    ------
    ValueError
        As :func:`check_amp`.
    """
    check_amp(amp, device)
    if amp == "none":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=_AMP_DTYPES[amp])


def grad_scaler(device: torch.device, amp: str) -> torch.amp.GradScaler | None:
    """The gradient scaler float16 training needs (``amp = "fp16"`` on CUDA), else None."""
    check_amp(amp, device)
    return torch.amp.GradScaler(device.type) if amp == "fp16" else None


__all__ = ["DEVICE_CHOICES", "AMP_MODES", "check_device_name", "resolve_device", "model_device", "check_amp",
           "autocast", "grad_scaler"]
