"""A frozen base on the server side: only the trainable tensors are the global model.

A model with a frozen parameter (``requires_grad=False``; the common case is a peft model,
whose base is frozen under trainable LoRA adapters, docs/lora.md) is trained through its
trainable tensors only: the strategy's global state, the slices it sends, the replies it
reads, the aggregate and ``Strategy.start``'s ``result.arrays`` hold the trainable keys and
nothing else. Every node builds or loads the base itself; a fingerprint of the base
(:func:`fl_subnet.core.frozen.base_fingerprint`) travels in every train and evaluate
config under ``base-fingerprint``, so that a node holding another base refuses the
message (:mod:`fl_subnet.clients.frozen`).

What is frozen
--------------
As in :mod:`fl_subnet.core.frozen`: every ``state_dict`` entry that is not a parameter
with ``requires_grad``, i.e. the frozen parameters and **every** persistent buffer. A
buffer has no ``requires_grad`` of its own, and a node rebuilds the base it trains on from
its own copy every round, so a buffer that training updates in place (a BatchNorm's running
statistics) is never sent or aggregated: each round starts from the base's values. The
strategy logs a warning at construction for such buffers inside a module that also has a
trainable parameter (a trainable BatchNorm, say), whose statistics the user might expect
to travel. A model without any frozen parameter is not affected: every tensor travels, as
before.
"""

from __future__ import annotations

import functools
import logging
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from flwr.app import ArrayRecord
from torch import nn

from fl_subnet.core.frozen import base_fingerprint
from fl_subnet.core.spec import SubnetSpec
from fl_subnet.exceptions import ReplyError
from fl_subnet.wire.records import BASE_FINGERPRINT

log = logging.getLogger(__name__)

_HEX64 = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class FrozenBase:
    """The trainable keys of a model with a frozen base, and the base's fingerprint.

    Attributes
    ----------
    trainable : tuple[str, ...]
        ``state_dict`` keys of the trainable parameters, in ``state_dict`` order (for a
        peft model: ``...lora_A.<adapter>.weight`` / ``...lora_B.<adapter>.weight``, and
        any ``modules_to_save`` copies).
    keys : frozenset[str]
        Every ``state_dict`` key of the full model (trainable and frozen).
    fingerprint : str
        64 hex digits: SHA-256 of the base every node must hold.
    """

    trainable: tuple[str, ...]
    keys: frozenset[str]
    fingerprint: str

    @classmethod
    def of(cls, spec: SubnetSpec, fingerprint: str | None = None) -> "FrozenBase | None":
        """The frozen base of ``spec``'s model, or None when every parameter is trainable.

        Parameters
        ----------
        spec : SubnetSpec
            The analysis (:attr:`SubnetSpec.trainable` says whether a parameter is frozen).
        fingerprint : str, optional
            The base's fingerprint, if already known (64 lowercase hex digits, as
            :func:`~fl_subnet.core.frozen.base_fingerprint` gives it); else computed here
            from one build of ``spec.factory`` on the CPU: the base every node is expected
            to build. For a base of billions of parameters that build and hash take
            seconds to minutes, once per strategy.

        Raises
        ------
        ValueError
            If the model has no trainable parameter left (nothing to train), or
            ``fingerprint`` is not 64 lowercase hex digits (naming ``base-fingerprint``).
        """
        if spec.trainable is None:
            if fingerprint is not None:
                log.warning("%s: base_fingerprint given, but every parameter of the model is trainable: no base is "
                            "frozen, every tensor travels and no fingerprint is sent", spec.model_name)
            return None
        if not spec.trainable:
            raise ValueError(f"{spec.model_name}: every parameter is frozen (requires_grad=False): nothing to train")
        if fingerprint is not None and not (isinstance(fingerprint, str) and _HEX64.fullmatch(fingerprint)):
            raise ValueError(f"{BASE_FINGERPRINT} must be 64 lowercase hex digits (a SHA-256 from "
                             f"fl_subnet.core.frozen.base_fingerprint), got {str(fingerprint)[:80]!r}")
        keys = frozenset(spec.state_meta)
        _warn_trained_buffers(spec.factory, set(spec.trainable))
        if fingerprint is None:
            t0 = time.perf_counter()
            fingerprint = base_fingerprint(spec.factory())
            log.info("%s: frozen base fingerprint %s... (%.2f s); %d trainable tensors travel, %d frozen stay on "
                     "the nodes", spec.model_name, fingerprint[:12], time.perf_counter() - t0, len(spec.trainable),
                     len(keys) - len(spec.trainable))
        return cls(tuple(spec.trainable), keys, fingerprint)

    def config(self) -> dict[str, str]:
        """``{"base-fingerprint": <64 hex digits>}``: the entry of every train and evaluate
        config (counted in ``bytes-down`` as the config's other strings: 64 bytes)."""
        return {BASE_FINGERPRINT: self.fingerprint}

    def restrict(self, arrays: ArrayRecord, what: str = "arrays") -> ArrayRecord:
        """``arrays`` restricted to the trainable keys: ``arrays`` itself when it holds
        exactly those, else a new record of the same ``Array`` objects without the frozen
        keys (no data copy).

        Parameters
        ----------
        arrays : ArrayRecord
            The full ``state_dict`` or only its trainable part, keyed as the model's
            ``state_dict`` names them (``ArrayRecord(model.state_dict())`` or
            ``ArrayRecord(fl_subnet.core.frozen.trainable_state(model))``).
        what : str
            The name used in errors (``initial_arrays``, ...).

        Raises
        ------
        ValueError
            Naming ``what``, if a trainable key is missing or a key is not the model's.
        """
        held = set(arrays.keys())
        if held == self._trainable:
            return arrays
        missing = [k for k in self.trainable if k not in held]
        unknown = sorted(held - self.keys)
        if missing or unknown:
            raise ValueError(
                f"{what}: expected the model's full state_dict or its trainable tensors (keys as model.state_dict() "
                f"names them, e.g. fl_subnet.core.frozen.trainable_state(model); peft's get_peft_model_state_dict "
                f"drops the adapter name); missing trainable {_few(missing)}, unknown {_few(unknown)}")
        return ArrayRecord({k: arrays[k] for k in self.trainable})

    def check_reply(self, compact: Mapping[str, object]) -> None:
        """Refuse a reply that holds frozen tensors (a ClientApp replying
        ``ArrayRecord(model.state_dict())``): the base never travels.

        Raises
        ------
        ReplyError
            Naming how many frozen keys it holds and a few of them.
        """
        frozen = [k for k in compact if k in self.keys and k not in self._trainable]
        if frozen:
            raise ReplyError(f"the reply holds {len(frozen)} tensors of the frozen base ({_few(sorted(frozen), 3)}): "
                             "reply with the trainable tensors only (fl_subnet.clients.reply_arrays, or "
                             "fl_subnet.core.frozen.trainable_state(model))")

    @functools.cached_property
    def _trainable(self) -> frozenset[str]:
        return frozenset(self.trainable)


def _few(keys: list[str], most: int = 5) -> str:
    return f"{keys[:most]}" + (f" and {len(keys) - most} more" if len(keys) > most else "")


def _warn_trained_buffers(factory: Callable[[], nn.Module], trainable: set[str]) -> None:
    """Log the persistent buffers of modules that also hold a trainable parameter: they
    are part of the frozen base, never sent nor aggregated (see the module docstring)."""
    with torch.device("meta"):
        model = factory()
    found = []
    for path, module in model.named_modules():
        prefix = f"{path}." if path else ""
        if not any(f"{prefix}{n}" in trainable for n, _ in module.named_parameters(recurse=False)):
            continue
        found += [f"{prefix}{n}" for n, _ in module.named_buffers(recurse=False)
                  if n not in module._non_persistent_buffers_set]
    if found:
        log.warning("frozen base: the buffers %s belong to trainable modules but, as every buffer of a model with "
                    "a frozen base, stay on the nodes: their values after local training are not aggregated",
                    _few(found))


__all__ = ["FrozenBase"]
