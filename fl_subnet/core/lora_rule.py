"""The product-space aggregation rule for LoRA adapters (``aggregation = "product-space"``):
a reducer per rank group that is not element-wise.

Every LoRA rank group (kind ``"ranks"``, :mod:`fl_subnet.core.lora`) couples an adapter's
``lora_A`` (dim 0) and ``lora_B`` (dim 1). Averaging ``A`` and ``B`` entry by entry (the
holder mean) averages the factors, not the update ``B A`` they make; FlexLoRA averages the
products and factors the mean again by SVD (:func:`~fl_subnet.core.lora_svd.product_space_mean`).
This rule does that for every rank group and the holder mean
(:class:`~fl_subnet.core.aggregate.MaskedAggregator`) for every other trainable tensor (a
classifier head, biases).

Pure torch; no Flower import.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from .aggregate import MaskedAggregator
from .lora import KIND
from .lora_svd import product_space_mean
from .masks import Mask
from .slicing import Slicer


def rank_pairs(slicer: Slicer) -> dict[str, tuple[str, str]]:
    """Rank group name → ``(lora_A key, lora_B key)`` for every LoRA rank group of ``slicer``."""
    pairs = {}
    for g in slicer.groups:
        if g.kind != KIND:
            continue
        a = next(c.key for c in g.couplings if c.dim == 0)
        b = next(c.key for c in g.couplings if c.dim == 1)
        pairs[g.name] = (a, b)
    return pairs


class MaskedProductSpace:
    """FlexLoRA's product-space mean for LoRA rank groups, the holder mean elsewhere.

    For every rank group with adapter factors ``A`` (``r × in``) and ``B`` (``out × r``) in
    ``W_k``: each reply ``i`` holds the compact factors of its kept ranks ``B_i``
    (``out × r_i``) and ``A_i`` (``r_i × in``), whichever ranks they are;
    ``W_{k+1}``'s ``B, A`` are :func:`~fl_subnet.core.lora_svd.product_space_mean` of them
    at the full rank ``r`` (``B = U_r Σ_r``, ``A = V_rᵀ`` of ``Σ w_i B_i A_i / Σ w_i``), so a
    node keeping the first ``r_k`` ranks next round gets the best rank-``r_k``
    approximation of that mean. Every other floating-point tensor is the weighted mean over
    its holders (:class:`MaskedAggregator`); an adapter no reply carried keeps its value.

    Source: Bai et al., "Federated Fine-tuning of Large Language Models under
    Heterogeneous Tasks and Client Resources" (FlexLoRA), NeurIPS 2024, §3.

    Parameters
    ----------
    global_state : Mapping[str, torch.Tensor]
        ``W_k`` (the trainable tensors); not modified.
    slicer : Slicer
        Coupling table of the model's unit groups; must hold LoRA rank groups.

    Raises
    ------
    ValueError
        If ``slicer`` has no LoRA rank group (the rule needs adapters); from
        ``add``/``check`` as :class:`MaskedAggregator`.
    """

    def __init__(self, global_state: Mapping[str, torch.Tensor], slicer: Slicer) -> None:
        self.pairs = rank_pairs(slicer)
        if not self.pairs:
            raise ValueError("aggregation 'product-space' needs a model with LoRA rank groups (peft's LoRA "
                             "layers, fl_subnet.core.lora); this model has none")
        self._inner = MaskedAggregator(global_state, slicer)
        self.state = self._inner.state
        self._factors: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {name: [] for name in self.pairs}
        self._weights: dict[str, list[float]] = {name: [] for name in self.pairs}

    @property
    def num_replies(self) -> int:
        return self._inner.num_replies

    def check(self, compact: Mapping[str, torch.Tensor], mask: Mask) -> None:
        """:meth:`MaskedAggregator.check`."""
        self._inner.check(compact, mask)

    def add(self, compact: Mapping[str, torch.Tensor], mask: Mask, weight: float = 1.0,
            checked: bool = False) -> None:
        """Take one reply in (:meth:`MaskedAggregator.add`: every check, and the holder
        mean of the tensors outside the rank groups); its adapter factors are kept, by
        reference, for :meth:`finalize`."""
        self._inner.add(compact, mask, weight, checked=checked)
        for name, (a, b) in self.pairs.items():
            if a in compact and b in compact:
                self._factors[name].append((compact[b], compact[a]))
                self._weights[name].append(float(weight))

    def held(self) -> dict[str, torch.Tensor]:
        """Which entries changed: every entry of an adapter some reply carried (its
        factors are replaced whole), elsewhere :meth:`MaskedAggregator.held`."""
        out = self._inner.held()
        for name, (a, b) in self.pairs.items():
            if self._factors[name]:
                out[a] = torch.ones((), dtype=torch.bool)
                out[b] = torch.ones((), dtype=torch.bool)
        return out

    def finalize(self) -> dict[str, torch.Tensor]:
        """The new trainable state ``W_{k+1}`` (new tensors; ``W_k`` if no reply was added)."""
        out = self._inner.finalize()
        with torch.no_grad():
            for name, (a, b) in self.pairs.items():
                if not self._factors[name]:
                    continue
                full_a = self.state[a]
                b_new, a_new, _ = product_space_mean(self._factors[name], self._weights[name], full_a.shape[0])
                out[a] = a_new.to(dtype=full_a.dtype, device=full_a.device)
                out[b] = b_new.to(dtype=self.state[b].dtype, device=self.state[b].device)
        return out


__all__ = ["MaskedProductSpace", "rank_pairs"]
