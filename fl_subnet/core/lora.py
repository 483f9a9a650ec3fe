"""LoRA ranks as unit groups: the rank of an adapter is the unit a mask keeps or drops.

A LoRA layer (Hu et al., ICLR 2022) adds ``s · B A x`` to a frozen layer's output, with
``A`` of shape ``(r, in_features)``, ``B`` of shape ``(out_features, r)`` and the scale
``s = lora_alpha / r`` (``lora_alpha / √r`` with rsLoRA). Rank ``j`` couples row ``j`` of
``A`` and column ``j`` of ``B``; keeping ranks ``K`` computes ``s · B[:, K] A[K] x``, the
full adapter with the other ranks removed. So one adapted module is one
:class:`~fl_subnet.core.groups.UnitGroup` of ``r`` units (kind ``"ranks"``): nested
prefixes of it are HeteroFL / FjORD (and HetLoRA's truncation), random subsets are
dropout / IST, rolling windows are FedRolex, and the per-entry mean over holders
(:class:`~fl_subnet.core.aggregate.MaskedAggregator`) averages each rank over the nodes
that held it.

The layers are found by duck typing, as peft's ``peft.tuners.lora.LoraLayer`` stores
them (``lora_A[adapter]`` and ``lora_B[adapter]`` ``nn.Linear`` in ``nn.ModuleDict``s,
``r``, ``lora_alpha``, ``scaling`` and ``use_rslora`` dicts per adapter): this module
imports neither peft nor transformers. :func:`fl_subnet.analyze` uses these groups for
any model holding such a layer (a ``PeftModel`` or a model with adapters injected),
without tracing it (torch.fx cannot trace most transformers models): only the ranks of
trainable adapters are masked; the frozen base has no group and is never cut.

Scale of a node's adapter
-------------------------
A node that keeps ``r_k`` of the ``r`` ranks keeps the full adapter's scale
``s = lora_alpha / r`` (``r = r_max``), not ``lora_alpha / r_k``. Its compact adapter then
computes exactly the slice ``s · B[:, K] A[K]`` of the full one, so merging it into the
base gives the base merged with the full adapter whose other ranks are zeroed, and a
rank's parameters mean the same thing on every node, which is what averaging them rank by
rank assumes. HetLoRA (Cho et al., EMNLP 2024) hands each node the rank-``r_k``
truncation of the global adapter and zero-pads it back for aggregation: a node's adapter
is a slice of the global one. FlexLoRA (Bai et al., NeurIPS 2024) averages the nodes'
full-size products ``B_k A_k`` and redistributes the mean by SVD: products of nodes of
different ranks are terms of one update only if they carry one scale, which a per-node
``lora_alpha / r_k`` would break. With ``lora_alpha / r_k`` a node's
adapter would be its slice multiplied by ``r / r_k``; a protocol that wants that factor
sets it as the mask's output scale of the group (``NestedPrefixSampler(scale=True)``,
HeteroFL's scaler ``1/capacity``), which multiplies the kept ranks at ``lora_B``'s input
in the forward pass (a forward hook: ``merge_and_unload`` does not see it).

The compact module built by :func:`~fl_subnet.core.compact.build_compact_module` follows
this rule through :func:`resize_lora` (a :data:`~fl_subnet.core.analysis.rules.RESIZE`
entry registered for every LoRA layer class found): ``r[adapter]`` becomes ``r_k``,
``scaling[adapter]`` keeps the full module's value and ``lora_alpha[adapter]`` becomes
``scaling · r_k`` (``scaling · √r_k`` with rsLoRA), so that peft's own recomputation of
the scale from ``lora_alpha`` and ``r`` (``set_scale``, ``unscale_layer``) keeps it too.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from torch import nn

from .analysis.rules import register_resize
from .groups import Coupling, UnitGroup

log = logging.getLogger(__name__)

#: ``UnitGroup.kind`` of LoRA rank groups.
KIND = "ranks"


@dataclass
class LoraGroups:
    """What :func:`find_lora_groups` found.

    Attributes
    ----------
    groups : list[UnitGroup]
        One group per adapted module and trainable adapter, named
        ``"<module path>.lora_A.<adapter>"``; its ``r`` units couple
        ``<module path>.lora_A.<adapter>.weight`` dim 0 (shape ``(r, in_features)``) and
        ``<module path>.lora_B.<adapter>.weight`` dim 1 (shape ``(out_features, r)``);
        its consumer is ``<module path>.lora_B.<adapter>`` (the mask's output scale
        multiplies the kept ranks there).
    pinned : dict[str, str]
        Adapters whose ranks are not masked (their tensors travel whole), with why: not
        a pair of ``nn.Linear`` (LoRA on an embedding or a conv), a LoRA variant (DoRA,
        ...), or a frozen adapter.
    """

    groups: list[UnitGroup] = field(default_factory=list)
    pinned: dict[str, str] = field(default_factory=dict)


def is_lora_layer(module: nn.Module) -> bool:
    """Whether ``module`` stores adapters as peft's ``LoraLayer`` does (duck typing:
    ``lora_A`` and ``lora_B`` ``nn.ModuleDict``s and ``r`` / ``scaling`` dicts)."""
    return (isinstance(getattr(module, "lora_A", None), nn.ModuleDict)
            and isinstance(getattr(module, "lora_B", None), nn.ModuleDict)
            and isinstance(getattr(module, "r", None), dict)
            and isinstance(getattr(module, "scaling", None), dict))


def find_lora_groups(model: nn.Module) -> LoraGroups | None:
    """The rank groups of every LoRA layer of ``model``, or None if it has none.

    Works on a model built on the ``meta`` device (only shapes and ``requires_grad`` are
    read). Registers :func:`resize_lora` as the
    :data:`~fl_subnet.core.analysis.rules.RESIZE` rule of each LoRA layer class found, so
    that a compact model built afterwards carries its kept rank and the full scale.

    Parameters
    ----------
    model : nn.Module
        A ``peft.PeftModel``, or any model with LoRA layers injected
        (``peft.inject_adapter_in_model``); keys are those of its own ``state_dict``.

    Returns
    -------
    LoraGroups or None

    Raises
    ------
    ValueError
        If an adapter's ``lora_A`` rows, ``lora_B`` columns and ``r`` disagree (naming
        the module and adapter).
    """
    found = False
    out = LoraGroups()
    for path, module in model.named_modules():
        if not is_lora_layer(module):
            continue
        found = True
        register_resize(type(module), resize_lora)
        prefix = f"{path}." if path else ""
        for adapter, a in module.lora_A.items():
            name = f"{prefix}lora_A.{adapter}"
            b = module.lora_B[adapter] if adapter in module.lora_B else None
            why = _unmaskable(module, adapter, a, b)
            if why:
                out.pinned[name] = why
                continue
            rank = int(a.weight.shape[0])
            if int(b.weight.shape[1]) != rank or int(module.r.get(adapter, rank)) != rank:
                raise ValueError(f"LoRA layer '{path}', adapter '{adapter}': lora_A has {rank} rows, lora_B "
                                 f"{int(b.weight.shape[1])} columns and r = {module.r.get(adapter)}; they must agree")
            out.groups.append(UnitGroup(
                name, rank,
                (Coupling(f"{prefix}lora_A.{adapter}.weight", 0), Coupling(f"{prefix}lora_B.{adapter}.weight", 1)),
                consumers=(f"{prefix}lora_B.{adapter}",), kind=KIND))
    if not found:
        return None
    log.debug("LoRA: %d rank groups, %d adapters left whole", len(out.groups), len(out.pinned))
    return out


def rank_capacity(rank: int, groups: Sequence[UnitGroup]) -> float:
    """The capacity (share of every unit group, as HeteroFL / FjORD / FedRolex take it) that
    gives a node ``rank`` ranks of its LoRA adapters: ``rank / r_max``, ``r_max`` the
    largest rank group.

    The capacity samplers keep ``max(1, ⌈c · r_g⌉)`` units of a group of ``r_g``
    (:func:`fl_subnet.core.samplers.prefix_size`, HeteroFL's rule), so every group of
    ``r_max`` ranks keeps exactly ``rank``, and a smaller group (peft's ``rank_pattern``)
    its share ``⌈rank · r_g / r_max⌉``.

    Parameters
    ----------
    rank : int
        The node's rank budget, ``1 ≤ rank ≤ r_max``.
    groups : Sequence[UnitGroup]
        The model's groups (``spec.groups``); the rank groups (kind ``"ranks"``) are used.

    Returns
    -------
    float
        The capacity in (0, 1].

    Raises
    ------
    ValueError
        If there is no rank group, or ``rank`` is not an integer in ``[1, r_max]``.
    """
    sizes = [g.size for g in groups if g.kind == KIND]
    if not sizes:
        raise ValueError("rank_capacity needs LoRA rank groups; these groups have none")
    r_max = max(sizes)
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= r_max:
        raise ValueError(f"rank must be an integer in [1, {r_max}] (the adapters' largest rank), got {rank!r}")
    return rank / r_max


def _unmaskable(module: nn.Module, adapter: str, a: nn.Module, b: nn.Module | None) -> str | None:
    """Why an adapter's ranks cannot be masked, or None."""
    if not (isinstance(a, nn.Linear) and isinstance(b, nn.Linear)):
        return (f"lora: lora_A/lora_B are {type(a).__name__}/{type(b).__name__}, "
                "only adapters of two nn.Linear have rank groups")
    variant = getattr(module, "lora_variant", {}).get(adapter)
    if variant is not None:
        return f"lora: variant {type(variant).__name__}, only plain LoRA and rsLoRA have rank groups"
    if not (a.weight.requires_grad and b.weight.requires_grad):
        return "lora: frozen adapter (requires_grad=False), not trained"
    return None


def resize_lora(module: nn.Module) -> None:
    """Set a compact LoRA layer's per-adapter ``r`` from its ``lora_A`` rows, keeping the
    full module's ``scaling`` (see the module docstring, "Scale of a node's adapter").

    ``lora_alpha[adapter]`` becomes ``scaling · r_k`` (``scaling · √r_k`` with rsLoRA), so
    that ``lora_alpha / r`` (``/ √r``) still equals the kept scale. Idempotent: the scale
    is read, never recomputed. The ``lora_A`` / ``lora_B`` ``nn.Linear`` themselves are
    resized by their own rule.
    """
    for adapter, a in module.lora_A.items():
        weight = getattr(a, "weight", None)
        if not isinstance(a, nn.Linear) or weight is None or adapter not in module.scaling:
            continue
        rank = int(weight.shape[0])
        if module.r.get(adapter) == rank:
            continue
        scale = module.scaling[adapter]
        module.r[adapter] = rank
        rslora = bool(getattr(module, "use_rslora", {}).get(adapter, False))
        if hasattr(module, "lora_alpha"):
            module.lora_alpha[adapter] = scale * (math.sqrt(rank) if rslora else rank)
