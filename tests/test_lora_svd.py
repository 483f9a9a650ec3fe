"""Product-space aggregation of LoRA factors of different ranks (fl_subnet/core/lora_svd.py):
against a numpy dense-SVD reference of FlexLoRA's rule (the weighted mean of the products,
SVD, B = U_r Σ_r, A = V_rᵀ), a hand-computed case, a size whose dense product could not be
held in memory, and bad input."""

import numpy as np
import pytest
import torch

from fl_subnet.core.lora_svd import product_space_mean


def numpy_reference(factors, weights, rank):
    """FlexLoRA's rule with the dense product: W = Σ w B A / Σ w, numpy SVD, signs fixed
    as scikit-learn's svd_flip (largest |entry| of each column of U positive)."""
    w = np.asarray(weights, dtype=np.float64)
    dense = sum(wk * (b.numpy().astype(np.float64) @ a.numpy().astype(np.float64))
                for (b, a), wk in zip(factors, w)) / w.sum()
    u, s, vt = np.linalg.svd(dense, full_matrices=False)
    rows = np.argmax(np.abs(u), axis=0)
    signs = np.sign(u[rows, np.arange(u.shape[1])])
    u, vt = u * signs, vt * signs[:, None]
    b = np.zeros((dense.shape[0], rank))
    a = np.zeros((rank, dense.shape[1]))
    k = min(rank, int((s > 1e-12 * s[0]).sum()))
    b[:, :k] = u[:, :k] * s[:k]
    a[:k] = vt[:k]
    return b, a, s[:rank]


def _factors(ranks, out=12, inn=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(out, r, generator=g), torch.randn(r, inn, generator=g)) for r in ranks]


@pytest.mark.parametrize("ranks,weights,rank", [([4, 8, 2], [10.0, 30.0, 5.0], 8), ([4, 8, 2], [1, 1, 1], 4),
                                                ([3, 3], [2.0, 7.0], 3), ([8], [5.0], 8), ([2, 2, 2, 2], [1, 2, 3, 4], 6)])
def test_equals_the_numpy_dense_svd_reference(ranks, weights, rank):
    factors = _factors(ranks)
    b, a, s = product_space_mean(factors, weights, rank)
    rb, ra, rs = numpy_reference(factors, weights, rank)
    k = min(rank, sum(ranks))
    np.testing.assert_allclose(s[:k].numpy(), rs[:k], rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(b.numpy(), rb, rtol=0, atol=1e-9)
    np.testing.assert_allclose(a.numpy(), ra, rtol=0, atol=1e-9)
    assert b.shape == (12, rank) and a.shape == (rank, 9)


def test_full_rank_keeps_the_weighted_mean_product():
    """With rank ≥ Σ r_k nothing is truncated: B A equals Σ w B_k A_k / Σ w."""
    factors = _factors([2, 3])
    b, a, _ = product_space_mean(factors, [1.0, 3.0], 5)
    (b0, a0), (b1, a1) = [(b.double(), a.double()) for b, a in factors]
    want = (1.0 * b0 @ a0 + 3.0 * b1 @ a1) / 4.0
    torch.testing.assert_close(b @ a, want, rtol=0, atol=1e-12)


def test_hand_computed_case():
    """One node, B = [[3], [0]], A = [[0, 2]]: W = [[0, 6], [0, 0]], σ = 6, U = e_1, V = e_2:
    B = [[6], [0]], A = [[0, 1]]; a second requested rank is 0."""
    b, a, s = product_space_mean([(torch.tensor([[3.0], [0.0]]), torch.tensor([[0.0, 2.0]]))], [4.0], 2)
    assert b.tolist() == [[6.0, 0.0], [0.0, 0.0]]
    assert a.tolist() == [[0.0, 1.0], [0.0, 0.0]]
    assert s.tolist() == [6.0, 0.0]


def test_never_forms_the_dense_product():
    """out = in = 200,000: the dense product would be 320 GB in float64; the stacked factors
    are 200,000 × 6."""
    g = torch.Generator().manual_seed(1)
    n = 200_000
    factors = [(torch.randn(n, r, generator=g), torch.randn(r, n, generator=g)) for r in (2, 4)]
    b, a, s = product_space_mean(factors, [1.0, 1.0], 4)
    assert b.shape == (n, 4) and a.shape == (4, n)
    # A's rows are orthonormal right singular vectors
    torch.testing.assert_close(a @ a.T, torch.eye(4, dtype=torch.float64), rtol=0, atol=1e-10)
    assert bool((s[:-1] >= s[1:]).all())


@pytest.mark.parametrize("factors,weights,rank,match", [
    ([], [], 2, "at least one"),
    ([(torch.zeros(3, 2), torch.zeros(2, 4))], [1.0, 2.0], 2, "weights"),
    ([(torch.zeros(3, 2), torch.zeros(3, 4))], [1.0], 2, "do not chain"),
    ([(torch.zeros(3, 2), torch.zeros(2, 4)), (torch.zeros(5, 2), torch.zeros(2, 4))], [1.0, 1.0], 2, "do not chain"),
    ([(torch.zeros(3, 2), torch.zeros(2, 4))], [0.0], 2, "weight 0"),
    ([(torch.zeros(3, 2), torch.zeros(2, 4))], [float("nan")], 2, "weight 0"),
    ([(torch.zeros(3, 2), torch.zeros(2, 4))], [1.0], 0, "rank"),
])
def test_bad_input_is_refused(factors, weights, rank, match):
    with pytest.raises(ValueError, match=match):
        product_space_mean(factors, weights, rank)
