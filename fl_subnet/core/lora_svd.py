"""Product-space aggregation of LoRA adapters of different ranks: the weighted mean of the
nodes' products ``B_k A_k``, truncated back to a rank by SVD, without forming the dense
``out × in`` matrix.

FlexLoRA (Bai, Chen, Chen, Huang, Zhou & Li, "Federated Fine-tuning of Large Language
Models under Heterogeneous Tasks and Client Resources", NeurIPS 2024, §3) aggregates the
full-size updates ``W = Σ_k w_k B_k A_k / Σ_k w_k`` of nodes whose adapters have ranks
``r_k``, and hands node ``k`` the rank-``r_k`` truncation of ``W``'s SVD ``U Σ Vᵀ``:
``B = U_r Σ_r``, ``A = V_rᵀ`` (the prefix of the first ``r_k`` singular directions, its best
rank-``r_k`` approximation, Eckart-Young). The published implementations form ``W`` densely
(``d × k`` per adapted module) and call a full SVD. Here the same ``W`` is factored from the
stacked factors (as HLoRA / FLoRA's stacking does): with ``R = Σ r_k``,

    B_s = [√w̃_1 B_1, …, √w̃_K B_K]  (out × R),   A_s = [√w̃_1 A_1; …; √w̃_K A_K]  (R × in),

``W = B_s A_s`` (``w̃_k = w_k / Σ w``). Reduced QR of ``B_s = Q_1 R_1`` and ``A_sᵀ = Q_2 R_2``
gives ``W = Q_1 (R_1 R_2ᵀ) Q_2ᵀ``; the SVD of the small core ``R_1 R_2ᵀ = U_c Σ V_cᵀ`` gives
``W = (Q_1 U_c) Σ (Q_2 V_c)ᵀ``. Time ``O((out + in) R²)``, memory ``O((out + in) R)``,
float64 throughout.

Pure torch; no Flower import.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch


def _flip_signs(u: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each singular pair's sign fixed so that the entry of largest magnitude of ``u``'s
    column is positive (scikit-learn's ``svd_flip``), so that the result is unique for
    distinct singular values. ``u``: ``(out, r)``; ``v``: ``(in, r)``."""
    if u.numel() == 0:
        return u, v
    rows = u.abs().argmax(dim=0)
    signs = torch.sign(u[rows, torch.arange(u.shape[1])])
    signs[signs == 0] = 1.0
    return u * signs, v * signs


def product_space_mean(factors: Sequence[tuple[torch.Tensor, torch.Tensor]], weights: Sequence[float],
                       rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The rank-``rank`` truncated SVD of ``Σ_k w_k B_k A_k / Σ_k w_k``, as LoRA factors.

    Parameters
    ----------
    factors : Sequence[tuple[torch.Tensor, torch.Tensor]]
        ``(B_k, A_k)`` per node: ``B_k`` of shape ``(out, r_k)``, ``A_k`` of shape
        ``(r_k, in)``, any floating dtype (``r_k`` may differ between nodes, ``r_k ≥ 0``).
        The LoRA scale is not applied: pass factors that share one scale (fl-subnet keeps
        ``lora_alpha / r_max`` on every node, :mod:`fl_subnet.core.lora`).
    weights : Sequence[float]
        ``w_k`` > 0 (e.g. ``num-examples``), one per node.
    rank : int
        ``r ≥ 1``: the rank of the result (the server adapter's ``r_max``).

    Returns
    -------
    (B, A, s) : tuple[torch.Tensor, torch.Tensor, torch.Tensor]
        ``B = U_r Σ_r`` of shape ``(out, rank)``, ``A = V_rᵀ`` of shape ``(rank, in)`` and
        the singular values ``s`` of shape ``(rank,)``, float64, singular values in
        descending order, signs fixed by the largest entry of each column of ``U``
        positive; columns beyond the product's rank are 0. ``B @ A`` is the best
        rank-``rank`` approximation of the weighted mean product (Eckart-Young).

    Raises
    ------
    ValueError
        If there are no factors, the counts of factors and weights differ, a weight is
        not finite and > 0, ``rank < 1``, or the shapes do not chain (``B_k``'s columns
        ≠ ``A_k``'s rows, or ``out`` / ``in`` differ between nodes).

    Notes
    -----
    Source: FlexLoRA (Bai et al., NeurIPS 2024, §3: weighted mean of the full-size
    products, SVD, ``B = U Σ``, ``A = Vᵀ`` truncated to each node's rank), computed from the
    stacked factors instead of the dense product.
    """
    if not factors:
        raise ValueError("product_space_mean needs at least one (B, A) pair")
    if len(weights) != len(factors):
        raise ValueError(f"{len(factors)} factor pairs but {len(weights)} weights")
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank must be an integer >= 1, got {rank!r}")
    out, inn = factors[0][0].shape[0], factors[0][1].shape[1]
    for i, (b, a) in enumerate(factors):
        if b.dim() != 2 or a.dim() != 2 or b.shape[1] != a.shape[0] or b.shape[0] != out or a.shape[1] != inn:
            raise ValueError(f"factor pair {i}: B {tuple(b.shape)} and A {tuple(a.shape)} do not chain into "
                             f"({out}, {inn})")
    for i, w in enumerate(weights):
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not (math.isfinite(w) and w > 0):
            raise ValueError(f"weight {i} must be a finite number > 0, got {w!r}")
    total = float(sum(weights))
    bs = torch.cat([math.sqrt(w / total) * b.detach().to(torch.float64) for (b, _), w in zip(factors, weights)],
                   dim=1)
    as_ = torch.cat([math.sqrt(w / total) * a.detach().to(torch.float64) for (_, a), w in zip(factors, weights)],
                    dim=0)
    q1, r1 = torch.linalg.qr(bs)  # (out, m1), (m1, R)
    q2, r2 = torch.linalg.qr(as_.T)  # (in, m2), (m2, R)
    uc, s, vch = torch.linalg.svd(r1 @ r2.T, full_matrices=False)  # (m1, m), (m,), (m, m2)
    u, v = _flip_signs(q1 @ uc, q2 @ vch.T)
    k = min(rank, s.numel())
    b_new = torch.zeros(out, rank, dtype=torch.float64)
    a_new = torch.zeros(rank, inn, dtype=torch.float64)
    s_new = torch.zeros(rank, dtype=torch.float64)
    b_new[:, :k] = u[:, :k] * s[:k]
    a_new[:k] = v[:, :k].T
    s_new[:k] = s[:k]
    return b_new, a_new, s_new


__all__ = ["product_space_mean"]
