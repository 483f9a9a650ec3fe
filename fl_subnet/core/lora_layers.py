"""Layer allocation for heterogeneous LoRA: a node trains the adapters of some layers only.

Fed-HeLLo (Zhang, Liu, Xu & Hu, "Fed-HeLLo: Efficient Federated Foundation Model
Fine-Tuning with Heterogeneous LoRA Allocation", IEEE TNNLS 2025, arXiv 2506.12213) gives a
client of a small resource budget the LoRA adapters of fewer of the model's ``L`` layers,
and chooses *which* layers by a heterogeneous LoRA allocation (HLA) strategy. Here a node
of capacity ``c ∈ (0, 1]`` trains ``n = max(1, ⌈c·L⌉)`` layers (:func:`layer_budget`, HeteroFL's rounding as in
:func:`~fl_subnet.core.samplers.prefix_size`), chosen by one of:

``"triangle"``, ``"inverted-triangle"``, ``"bottleneck"``, ``"uniform"``
    Geometrically-Defined HLA (GD-HLA): a fixed rule per budget, so that the
    *collective* distribution of trainable layers over the clients (how many clients
    train layer ``l``, drawn with the input layer at the bottom and each layer as wide as
    that count) has the pattern's shape (:func:`geometric_layers`, budget ``n`` of
    ``L``, layers indexed ``0`` = input side … ``L-1`` = output side):

    - Triangle: the first ``n`` layers ``{0, …, n-1}``; every client trains the input side,
      the count falls with depth (wide base at the input, apex at the output).
    - Inverted Triangle: the last ``n`` layers ``{L-n, …, L-1}``; the count grows with depth.
    - Bottleneck: the first ``⌈n/2⌉`` and the last ``⌊n/2⌋`` layers; both ends are trained
      by every client, the middle by the largest budgets only.
    - Uniform: ``n`` layers spread evenly over the depth, ``{⌊i·L/n⌋ : i < n}``; the count
      is flat over the depth.

``"rgd-<pattern>"``
    Randomized GD-HLA (RGD-HLA): each round, a node draws its ``n`` layers without
    replacement with probabilities proportional to the pattern's collective distribution,
    ``p_l = m_l / Σ_j m_j`` with ``m_l`` the number of budgets (one per node of the
    reference population) whose GD-HLA allocation holds layer ``l``
    (:func:`collective_counts`, :func:`rgd_probabilities`). Layers every client trains
    under GD-HLA stay the most likely, but any node may train any layer.

``"random"``
    ``n`` layers drawn uniformly without replacement each round (a random allocation
    in the spirit of FedRA, Su et al. 2023, one of the baselines of the authors' results).

Fed-HeLLo's FIM-based allocation (FIM-HLA: layers ranked by the gradient norms of their
adapters on the server's data, the authors' ``utils/fim_calculator.py``) is not offered.

Sources, and what was checked against what. The paper's abstract names GD-HLA with its
four patterns ("it shapes the collective distribution of trainable LoRA layers into
specific geometric patterns, such as Triangle, Inverted Triangle, Bottleneck, and
Uniform") and RGD-HLA, its randomized version; the body of the paper (its section and
equation numbers) could not be read where this was written, so the rules above were
checked against the authors' code (github.com/TNI-playground/Fed_HeLLo): Bottleneck and
RGD-HLA against its ``layer_prob: [1/9, 1/9, 1/9, 2/27, 2/27, 1/27, 1/27, 1/27, 2/27, 1/9,
1/9, 1/9]`` (``config/experiments/.../depthffm_fim/*-6_9_12-bone_*.yaml``: ``L = 12``, three
equal groups of budgets 6, 9 and 12, layers drawn with ``np.random.choice(range(L), p=...,
size=n, replace=False)`` in ``algorithms/engine/ffm_fedavg_depthffm.py``), which is
exactly :func:`rgd_probabilities` ``("bottleneck", [6, 9, 12], 12)``; Uniform against its
per-group lists ``[0, 2, 4, 6, 8, 10]`` (budget 6) and ``[0, 1, 2, 4, 5, 6, 8, 9, 10]``
(budget 9) of ``config/experiments/.../6_6_6/*.yaml``. The orientation of Triangle and
Inverted Triangle (which end is the wide base) follows the shapes' names with the input
layer at the bottom, as transformer stacks are drawn; the authors' code has no
configuration of either to check it against.

Where this differs from Fed-HeLLo
---------------------------------
In Fed-HeLLo every client holds every layer's adapter: a non-allocated adapter stays in
the client's forward pass with its current global values, frozen (the authors' code gives
its parameters a learning rate of 0), and only the allocated adapters' updates are sent
and averaged. Here a non-allocated adapter keeps **0 of its ranks**: it is absent from the
node's compact model (its ``lora_A`` weight has shape ``(0, in_features)``, its ``lora_B``
weight ``(out_features, 0)``, so it adds exactly 0), and no value of it travels in either
direction. A node therefore computes ``W_0 x`` at a non-allocated layer, not
``W_0 x + s·B A x`` with the frozen global ``B A``: its forward pass (and so its gradients
for the allocated adapters) differ from Fed-HeLLo's once the global adapters are non-zero.
In exchange a node receives, stores and sends only its allocated adapters. (A 0-rank
adapter has ``r = 0`` and ``lora_alpha = 0`` in the compact model, with the full scale
kept in ``scaling``: peft's ``unscale_layer`` / ``set_scale``, which recompute the scale
as ``lora_alpha / r``, must not be called on a node's compact model.) The
aggregation is the same: each adapter is averaged over the nodes that trained it (the
authors' ``average_lora_depthfl``: the count mean of the updates over the clients holding
the key), an adapter no node trained keeps its value.

Layers
------
A rank group (:mod:`fl_subnet.core.lora`, one per adapted module, named
``"<module path>.lora_A.<adapter>"``) belongs to the layer named by the first
``<container>.<index>.`` segment of its path, ``<container>`` one of
:data:`LAYER_CONTAINERS` (``encoder.layer.3.``, ``model.layers.3.``, ``h.3.``,
``blocks.3.``): all adapters of one transformer block form one layer. Two stacks (an
encoder's and a decoder's ``block.3``) are different layers, keyed by the path up to the
index. A group whose path has no such segment is a layer of its own. Layers are ordered as
their first group appears in the model (``named_modules`` order: input side first).
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .groups import UnitGroup
from .lora import KIND
from .masks import Mask
from .samplers import CapacitySampler, check_keep_prob, generator_for, prefix_size

log = logging.getLogger(__name__)

#: The GD-HLA patterns (Fed-HeLLo), input-side layers first.
GEOMETRIC = ("triangle", "inverted-triangle", "bottleneck", "uniform")
#: RGD-HLA over each pattern (Fed-HeLLo).
RANDOMIZED = tuple(f"rgd-{p}" for p in GEOMETRIC)
#: Every allocation :class:`LayerAllocationSampler` takes.
ALLOCATIONS = (*GEOMETRIC, *RANDOMIZED, "random")
#: What an allocated adapter keeps: every rank, or the first ``⌈c·r⌉`` (nested, as HeteroFL).
RANK_MODES = ("full", "nested")
#: Module-path segments followed by a layer index (``layer.3.``, ``layers.3.``, ``h.3.``, ``block(s).3.``).
LAYER_CONTAINERS = ("layer", "layers", "h", "block", "blocks")

_LAYER = re.compile(r"(?:^|\.)(?:" + "|".join(map(re.escape, LAYER_CONTAINERS)) + r")\.(\d+)(?=\.|$)")


@dataclass(frozen=True)
class LoraLayers:
    """The layers of a model's LoRA rank groups (:func:`lora_layers`).

    Attributes
    ----------
    names : tuple[str, ...]
        One name per layer, ``L`` of them, input side first: the module path up to and
        including the layer index (``"base_model.model.blocks.3"``), or the group's own
        name for a group without an index.
    groups : tuple[tuple[str, ...], ...]
        The rank groups of each layer (``L`` tuples of group names, in model order).
    """

    names: tuple[str, ...]
    groups: tuple[tuple[str, ...], ...]

    def __len__(self) -> int:
        return len(self.names)

    def layer_of(self, group: str) -> int:
        """The layer index (``0 ≤ i < L``) of the rank group named ``group``.

        Raises
        ------
        KeyError
            If ``group`` is no rank group of these layers.
        """
        for i, names in enumerate(self.groups):
            if group in names:
                return i
        raise KeyError(f"'{group}' is not a LoRA rank group of these layers")


def layer_name(group_name: str) -> str:
    """The layer a rank group belongs to: its path up to the first ``<container>.<index>``
    (:data:`LAYER_CONTAINERS`), or ``group_name`` itself when it has none.

    >>> layer_name("base_model.model.encoder.layer.3.attention.self.query.lora_A.default")
    'base_model.model.encoder.layer.3'
    >>> layer_name("base_model.model.classifier.lora_A.default")
    'base_model.model.classifier.lora_A.default'
    """
    m = _LAYER.search(group_name)
    return group_name[:m.end(1)] if m else group_name


def lora_layers(groups: Sequence[UnitGroup]) -> LoraLayers:
    """Group the rank groups (kind ``"ranks"``) of ``groups`` by layer (:func:`layer_name`).

    Parameters
    ----------
    groups : Sequence[UnitGroup]
        A spec's groups (``spec.groups``), in model order; groups of another kind are
        ignored.

    Returns
    -------
    LoraLayers
        ``L ≥ 1`` layers, in the order their first group appears.

    Raises
    ------
    ValueError
        If ``groups`` holds no LoRA rank group (naming ``groups``).
    """
    order: dict[str, list[str]] = {}
    for g in groups:
        if g.kind == KIND:
            order.setdefault(layer_name(g.name), []).append(g.name)
    if not order:
        raise ValueError("groups: layer allocation needs LoRA rank groups (kind 'ranks', fl_subnet.core.lora); "
                         f"these groups have none ({[g.name for g in groups][:5]})")
    return LoraLayers(tuple(order), tuple(tuple(v) for v in order.values()))


def check_allocation(allocation: str) -> str:
    """``allocation`` itself; ``ValueError`` naming ``allocation`` unless in :data:`ALLOCATIONS`."""
    if allocation not in ALLOCATIONS:
        raise ValueError(f"allocation must be one of {ALLOCATIONS}, got {allocation!r}")
    return allocation


def _check_layers(num_layers: int) -> int:
    if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 1:
        raise ValueError(f"num_layers must be an integer >= 1, got {num_layers!r}")
    return num_layers


def _check_budget(budget: int, num_layers: int) -> int:
    if isinstance(budget, bool) or not isinstance(budget, int) or not 1 <= budget <= num_layers:
        raise ValueError(f"budget must be an integer in [1, {num_layers}] (num_layers), got {budget!r}")
    return budget


def layer_budget(capacity: float, num_layers: int) -> int:
    """Layers a node of capacity ``c`` trains: ``max(1, ⌈c·L⌉)`` of ``L``.

    Raises
    ------
    ValueError
        If ``capacity`` is outside (0, 1] (naming ``capacity``) or ``num_layers`` is not an
        integer ≥ 1 (naming ``num_layers``).
    """
    return prefix_size(_check_layers(num_layers), check_keep_prob(capacity, "capacity"))


def geometric_layers(pattern: str, budget: int, num_layers: int) -> list[int]:
    """GD-HLA (Fed-HeLLo): the layers a client of ``budget`` layers trains.

    Parameters
    ----------
    pattern : {"triangle", "inverted-triangle", "bottleneck", "uniform"}
        See the module docstring.
    budget : int
        ``n``, ``1 ≤ n ≤ L``.
    num_layers : int
        ``L ≥ 1``.

    Returns
    -------
    list[int]
        ``n`` sorted, distinct layer indices in ``[0, L)``.

    Raises
    ------
    ValueError
        Naming ``pattern``, ``budget`` or ``num_layers`` when out of range.

    Examples
    --------
    >>> geometric_layers("bottleneck", 9, 12)
    [0, 1, 2, 3, 4, 8, 9, 10, 11]
    >>> geometric_layers("uniform", 9, 12)
    [0, 1, 2, 4, 5, 6, 8, 9, 10]
    """
    if pattern not in GEOMETRIC:
        raise ValueError(f"pattern must be one of {GEOMETRIC}, got {pattern!r}")
    L = _check_layers(num_layers)
    n = _check_budget(budget, L)
    if pattern == "triangle":
        return list(range(n))
    if pattern == "inverted-triangle":
        return list(range(L - n, L))
    if pattern == "bottleneck":
        low = math.ceil(n / 2)
        return list(range(low)) + list(range(L - (n - low), L))
    return [i * L // n for i in range(n)]


def collective_counts(pattern: str, budgets: Sequence[int], num_layers: int) -> torch.Tensor:
    """How many of ``budgets`` train each layer under GD-HLA: ``m_l = #{k : l ∈
    geometric_layers(pattern, n_k, L)}``, shape ``(L,)`` int64 — the pattern's shape.

    Raises
    ------
    ValueError
        As :func:`geometric_layers`; naming ``budgets`` if it is empty.
    """
    L = _check_layers(num_layers)
    if len(budgets) == 0:
        raise ValueError("budgets must hold at least one budget")
    counts = torch.zeros(L, dtype=torch.int64)
    for n in budgets:
        counts[geometric_layers(pattern, n, L)] += 1
    return counts


def rgd_probabilities(pattern: str, budgets: Sequence[int], num_layers: int) -> torch.Tensor:
    """RGD-HLA (Fed-HeLLo): the probability of each layer, ``p_l = m_l / Σ_j m_j``
    (:func:`collective_counts`), shape ``(L,)`` float64, summing to 1.

    >>> [str(round(float(p) * 27)) for p in rgd_probabilities("bottleneck", [6, 9, 12], 12)]
    ['3', '3', '3', '2', '2', '1', '1', '1', '2', '3', '3', '3']
    """
    counts = collective_counts(pattern, budgets, num_layers).to(torch.float64)
    return counts / counts.sum()


def draw_layers(probabilities: torch.Tensor, budget: int, generator: torch.Generator) -> list[int]:
    """``budget`` distinct layers drawn one after another, each with probability
    proportional to ``probabilities`` among those not drawn yet (as
    ``np.random.choice(L, size=n, replace=False, p=p)``). When fewer than ``budget`` layers
    have a probability above 0 (a node whose budget exceeds every reference budget), all of
    them are taken and the rest drawn uniformly from the others.

    Parameters
    ----------
    probabilities : torch.Tensor
        Shape ``(L,)``, finite, ≥ 0, not all 0.
    budget : int
        ``1 ≤ n ≤ L``.
    generator : torch.Generator

    Returns
    -------
    list[int]
        Sorted layer indices.

    Raises
    ------
    ValueError
        Naming ``probabilities`` or ``budget`` when out of range.
    """
    p = torch.as_tensor(probabilities, dtype=torch.float64)
    if p.dim() != 1 or not bool(torch.isfinite(p).all()) or bool((p < 0).any()) or not float(p.sum()) > 0:
        raise ValueError(f"probabilities must be a 1-D tensor of finite values >= 0, not all 0, got {p.tolist()}")
    n = _check_budget(budget, len(p))
    nonzero = int((p > 0).sum())
    picked = torch.multinomial(p, min(n, nonzero), replacement=False, generator=generator)
    if n > nonzero:
        rest = torch.nonzero(p == 0).flatten()
        picked = torch.cat([picked, rest[torch.randperm(len(rest), generator=generator)[:n - nonzero]]])
    return sorted(int(i) for i in picked)


def allocate_layers(allocation: str, budget: int, num_layers: int, *, generator: torch.Generator | None = None,
                    reference_budgets: Sequence[int] | None = None) -> list[int]:
    """The layers a client of ``budget`` layers trains under ``allocation`` (one of
    :data:`ALLOCATIONS`; see the module docstring).

    Parameters
    ----------
    allocation : str
    budget : int
        ``1 ≤ n ≤ L``.
    num_layers : int
        ``L``.
    generator : torch.Generator, optional
        Needed by ``"random"`` and ``"rgd-*"`` (unused by GD-HLA).
    reference_budgets : Sequence[int], optional
        ``"rgd-*"``: the budgets whose collective GD-HLA distribution sets the
        probabilities (default: ``[budget]``).

    Returns
    -------
    list[int]
        Sorted, distinct layer indices in ``[0, L)``.

    Raises
    ------
    ValueError
        Naming ``allocation``, ``budget`` or ``num_layers`` when out of range, or
        ``generator`` when a randomized allocation has none.
    """
    check_allocation(allocation)
    if allocation in GEOMETRIC:
        return geometric_layers(allocation, budget, num_layers)
    L = _check_layers(num_layers)
    n = _check_budget(budget, L)
    if generator is None:
        raise ValueError(f"generator: allocation {allocation!r} is randomized and needs a torch.Generator")
    if allocation == "random":
        return sorted(int(i) for i in torch.randperm(L, generator=generator)[:n])
    pattern = allocation.removeprefix("rgd-")
    probs = rgd_probabilities(pattern, list(reference_budgets) if reference_budgets else [n], L)
    return draw_layers(probs, n, generator)


class LayerAllocationSampler(CapacitySampler):
    """One mask per node from its capacity: the rank groups of its allocated layers are
    kept (every rank, or the first ``⌈c·r⌉`` with ``ranks="nested"``), every other rank
    group keeps **0** of its ranks (the adapter is absent from the node's compact model
    and its messages). Groups of another kind than ``"ranks"`` are kept whole.

    A node of capacity ``c`` trains ``n = max(1, ⌈c·L⌉)`` of the model's ``L`` LoRA layers
    (:func:`lora_layers`), chosen by ``allocation`` (:func:`allocate_layers`; Fed-HeLLo's
    GD-HLA and RGD-HLA, or uniform random). The randomized allocations draw from
    ``generator_for(seed, server_round, slot)``, so a round's masks depend on the seed,
    the round and the slot only. Output scales are 1 (no HeteroFL scaler: an allocated
    adapter computes what it computes in the global model).

    Parameters
    ----------
    allocation : str
        One of :data:`ALLOCATIONS` (default ``"bottleneck"``, the pattern of the authors'
        released Fed-HeLLo configuration).
    default_capacity : float
        Capacity of a node that declared none.
    ranks : {"full", "nested"}
        What an allocated adapter keeps: every rank (default), or the first ``⌈c·r⌉``
        (:func:`~fl_subnet.core.samplers.prefix_size`; HetLoRA-style nested ranks on top of
        the layer allocation).
    reference_capacities : Sequence[float], optional
        ``"rgd-*"``: the capacities whose collective GD-HLA distribution gives the layer
        probabilities (Fed-HeLLo fixes it from the clients' budget groups; the
        :class:`~fl_subnet.strategies.layer_allocation.LayerAllocation` strategy passes its
        capacity tiers). Default: the capacities of the round's nodes.
    seed : int
        Run seed.

    Raises
    ------
    ValueError
        If ``allocation`` is unknown (naming ``allocation``), ``ranks`` is unknown (naming
        ``ranks``), a capacity is outside (0, 1] (naming ``capacity``); from
        :meth:`sample`, if the groups hold no LoRA rank group (naming ``groups``).
    """

    def __init__(self, allocation: str = "bottleneck", default_capacity: float = 1.0, *, ranks: str = "full",
                 reference_capacities: Sequence[float] | None = None, seed: int = 0) -> None:
        super().__init__(default_capacity, scale=False, seed=seed)
        self.allocation = check_allocation(allocation)
        if ranks not in RANK_MODES:
            raise ValueError(f"ranks must be one of {RANK_MODES}, got {ranks!r}")
        self.ranks = ranks
        self.reference_capacities = None if reference_capacities is None else tuple(
            check_keep_prob(c, "capacity") for c in reference_capacities) or None

    def allocations(self, groups: Sequence[UnitGroup], server_round: int,
                    capacities: Sequence[float | None]) -> list[list[int]]:
        """The layer indices (into :func:`lora_layers` ``(groups)``) of each slot.

        Raises
        ------
        ValueError
            As :meth:`sample`.
        """
        L = len(lora_layers(groups))
        caps = self.capacities(len(capacities), capacities)
        budgets = [layer_budget(c, L) for c in caps]
        reference = [layer_budget(c, L) for c in self.reference_capacities] if self.reference_capacities else budgets
        randomized = self.allocation not in GEOMETRIC
        return [allocate_layers(self.allocation, n, L, reference_budgets=reference,
                                generator=generator_for(self.seed, server_round, slot) if randomized else None)
                for slot, n in enumerate(budgets)]

    def sample(self, groups, server_round, num_masks, capacities=None):
        """``num_masks`` masks (see the class docstring); ``capacities`` one per slot (None: default).

        Returns
        -------
        list[Mask]
            Per mask, ``indices[g]`` is ``arange(size)`` (or its first ``⌈c·size⌉`` with
            ``ranks="nested"``) for a rank group of an allocated layer and an empty
            ``(0,)`` int64 tensor for any other rank group.
        """
        layers = lora_layers(groups)
        caps = self.capacities(num_masks, capacities)
        by_name = {g.name: g for g in groups}
        empty = torch.zeros(0, dtype=torch.int64)
        masks = []
        for c, chosen in zip(caps, self.allocations(groups, server_round, caps)):
            kept = {name for i in chosen for name in layers.groups[i]}
            idx = {}
            for names in layers.groups:
                for name in names:
                    size = by_name[name].size
                    idx[name] = (torch.arange(prefix_size(size, c) if self.ranks == "nested" else size)
                                 if name in kept else empty.clone())
            masks.append(Mask(idx))
        return masks

