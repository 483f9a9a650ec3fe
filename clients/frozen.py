"""A frozen base on the node side: built once per process, checked against every message.

A message whose config carries ``base-fingerprint`` (sent by a strategy training a model
with a frozen base, :mod:`fl_subnet.strategies.frozen_base`; docs/lora.md) holds only the
trainable tensors of the node's slice. The node builds its full model once per process
with its own factory (which builds or loads the base locally: from a checkpoint on its
disk, in bfloat16 if it likes), keeps the frozen tensors and the base's fingerprint
(:class:`LocalBase`), refuses a message whose fingerprint differs, and builds each round's
compact model from those frozen tensors and the received slice. Its reply holds the
trainable tensors only.

The frozen parameters of a compact model are the cached tensors themselves (no copy per
round; they have ``requires_grad=False``, so no gradient or optimizer state is made for
them): a training loop must not write into them. Buffers are copied per message, since
training in train mode updates some in place (BatchNorm's running statistics): every
round starts from the base's own values.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from fl_subnet.core.compact import build_compact_module
from fl_subnet.core.frozen import base_fingerprint, check_base, trainable_keys
from fl_subnet.core.masks import Mask
from fl_subnet.core.slicing import Slicer
from fl_subnet.wire.records import BASE_FINGERPRINT

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LocalBase:
    """The frozen base this process built, with its fingerprint.

    Attributes
    ----------
    fingerprint : str
        64 hex digits (:func:`fl_subnet.core.frozen.base_fingerprint`).
    trainable : tuple[str, ...]
        ``state_dict`` keys of the trainable parameters, in ``state_dict`` order: the
        keys a message carries and a reply sends.
    frozen : dict[str, torch.Tensor]
        Every other ``state_dict`` entry (frozen parameters and persistent buffers),
        detached, as the factory built them (any device and dtype, e.g. bfloat16).
    buffers : frozenset[str]
        The keys of ``frozen`` that are buffers (copied per message).
    meta : dict[str, tuple[tuple[int, ...], torch.dtype]]
        Shape and dtype of each trainable key (the full model's).
    """

    fingerprint: str
    trainable: tuple[str, ...]
    frozen: dict[str, torch.Tensor]
    buffers: frozenset[str]
    meta: dict[str, tuple[tuple[int, ...], torch.dtype]]

    def with_base(self, trainable: Mapping[str, torch.Tensor], slicer: Slicer | None = None,
                  mask: Mask | None = None) -> dict[str, torch.Tensor]:
        """The compact ``state_dict`` of a message: the frozen tensors plus ``trainable``,
        the tensors it carried.

        Parameters
        ----------
        trainable : Mapping[str, torch.Tensor]
            The received slice of the trainable tensors.
        slicer, mask : Slicer, Mask, optional
            The message's mask. A frozen tensor coupled to a masked group (a model
            whose groups cut frozen layers; never under LoRA, whose groups couple only
            adapter tensors) is cut to the kept units (new memory), and those of skipped
            depth blocks are left out; every other frozen tensor is used as built.

        Raises
        ------
        ValueError
            If ``trainable`` holds a key that is not a trainable key of this model (a
            base tensor, which never travels, or an unknown key).
        """
        allowed = set(self.trainable)
        extra = sorted(k for k in trainable if k not in allowed)
        if extra:
            kind = "frozen base tensors, which never travel" if all(k in self.frozen for k in extra) else \
                "keys that are not trainable tensors of this model"
            raise ValueError(f"the message carries {len(extra)} {kind}: {extra[:5]}"
                             + (f" and {len(extra) - 5} more" if len(extra) > 5 else ""))
        cut = slicer is not None and mask is not None and not slicer.is_full(mask)
        skipped = slicer.skipped_keys(mask) if cut else set()
        out = {}
        for key, value in self.frozen.items():
            if key in skipped:
                continue
            if cut and key in slicer.coupled:
                out[key] = slicer.gather_key(value, slicer.kept(mask, key, tuple(value.shape)))
            else:
                out[key] = value.clone() if key in self.buffers else value
        out.update(trainable)
        return out


_BASES: "OrderedDict[Callable, LocalBase]" = OrderedDict()
#: Bases kept per process (least recently used dropped first): a node holds one base.
MAX_BASES = 2


def local_base(factory: Callable[[], nn.Module]) -> LocalBase:
    """The frozen base ``factory`` builds, built and fingerprinted once per process and
    factory (later calls return the cached one).

    Raises
    ------
    ValueError
        If the factory's model has no frozen parameter.
    """
    base = _BASES.get(factory)
    if base is None:
        t0 = time.perf_counter()
        model = factory()
        if all(p.requires_grad for p in model.parameters()):
            raise ValueError(f"the server sends '{BASE_FINGERPRINT}' (a model with a frozen base), but every parameter "
                             f"of this node's {type(model).__name__} is trainable: build the same model as the server")
        keys = trainable_keys(model)
        state = model.state_dict(keep_vars=True)
        params = {name for name, _ in model.named_parameters(remove_duplicate=False)}
        trainable = set(keys)
        frozen = {k: v.detach() for k, v in state.items() if k not in trainable}
        base = LocalBase(base_fingerprint(model), tuple(keys), frozen,
                         frozenset(k for k in frozen if k not in params),
                         {k: (tuple(state[k].shape), state[k].dtype) for k in keys})
        log.info("frozen base of %s: fingerprint %s... (built and hashed in %.2f s), %d frozen tensors kept",
                 type(model).__name__, base.fingerprint[:12], time.perf_counter() - t0, len(frozen))
        _BASES[factory] = base
        while len(_BASES) > MAX_BASES:
            _BASES.popitem(last=False)
    _BASES.move_to_end(factory)
    return base


def message_base(config: Mapping[str, object], factory: Callable[[], nn.Module]) -> LocalBase | None:
    """This node's base for a message with ``base-fingerprint``, checked against it; None
    for a message without it (every tensor travels).

    Raises
    ------
    ValueError
        Naming ``base-fingerprint`` and both fingerprints' first hex digits, if this node's
        base differs from the server's (other weights, dtypes, shapes or names), or the
        value is not a string.
    """
    expected = config.get(BASE_FINGERPRINT)
    if expected is None:
        return None
    if not isinstance(expected, str):
        raise ValueError(f"config key '{BASE_FINGERPRINT}' must be a string of hex digits, got "
                         f"{type(expected).__name__}")
    base = local_base(factory)
    try:
        check_base(expected, base.fingerprint)
    except ValueError as err:
        raise ValueError(f"config key '{BASE_FINGERPRINT}': {err}") from None
    return base


def full_model(factory: Callable[[], nn.Module], trainable: Mapping[str, torch.Tensor],
               base: LocalBase) -> nn.Module:
    """The full model holding ``base``'s frozen tensors and the ``trainable`` ones (a
    federated evaluation's message), built on the ``meta`` device and filled (the base is
    not built again).

    Raises
    ------
    ValueError
        If ``trainable`` lacks a trainable key or holds another key.
    """
    missing = [k for k in base.trainable if k not in trainable]
    if missing:
        raise ValueError(f"the message lacks trainable tensors {missing[:5]}")
    return build_compact_module(factory, base.with_base(trainable), (), Mask({}))


def clear_bases() -> None:
    """Forget the cached bases (tests; a process that loads another base)."""
    _BASES.clear()


__all__ = ["LocalBase", "local_base", "message_base", "full_model", "clear_bases"]
