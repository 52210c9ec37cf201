"""The pure-PyTorch references (the oracles) against independent float64 NumPy computations."""
import numpy as np
import pytest
import torch

from gig_fast.ops import centroid_update, gig_accumulate, spherical_assign
from gig_fast.ops.reference import centroid_update_ref, gig_accumulate_ref, spherical_assign_ref
from gig_fast.testing import random_codes


def test_spherical_assign_ref_matches_numpy_cosine_argmax():
    X = torch.randn(301, 17, dtype=torch.float64)
    Cn = torch.randn(29, 17, dtype=torch.float64)
    labels, best = spherical_assign_ref(X, Cn, chunk=64)  # several chunks
    x, c = X.numpy(), Cn.numpy()
    cos = (x / np.linalg.norm(x, axis=1, keepdims=True)) @ (c / np.linalg.norm(c, axis=1, keepdims=True)).T
    np.testing.assert_array_equal(labels.numpy(), cos.argmax(1))
    np.testing.assert_allclose(best.numpy(), cos.max(1), rtol=1e-12)


def test_spherical_assign_ties_go_to_the_smaller_index():
    Cn = torch.tensor([[1.0, 0.0], [2.0, 0.0], [0.0, 1.0], [0.0, 3.0]])  # duplicate directions
    X = torch.tensor([[1.0, 0.0], [0.0, 5.0], [1.0, 1.0], [0.0, 0.0]])
    labels, best = spherical_assign(X, Cn, backend="torch")
    assert labels.tolist() == [0, 2, 0, 0]  # exact tie at 45°; a zero point scores 0 everywhere
    assert best[3] == 0


def test_centroid_update_ref_matches_numpy():
    X = torch.randn(200, 11, dtype=torch.float64)
    labels = torch.randint(0, 7, (200,))
    labels[:5] = 6  # make sure the last cluster is used
    sums, counts = centroid_update_ref(X, labels, 9)  # clusters 7, 8 stay empty
    want = np.zeros((9, 11))
    np.add.at(want, labels.numpy(), X.numpy())
    np.testing.assert_allclose(sums.numpy(), want, rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(counts.numpy(), np.bincount(labels.numpy(), minlength=9))
    assert counts[7] == 0 and counts[8] == 0


def test_gig_accumulate_ref_matches_numpy():
    T, m, P, C, K, s = 2, 5, 13, 6, 9, 4
    grads = torch.randn(T, m, P, C, dtype=torch.float64)
    w = torch.rand(m, dtype=torch.float64)
    idx, val = random_codes(P, s, K, dtype=torch.float64, duplicates=True, all_padding_rows=1)
    V = torch.randn(K, C, dtype=torch.float64)
    out = gig_accumulate_ref(grads, w, idx, val, V)
    g = np.einsum("m,tmpc->tpc", w.numpy(), grads.numpy())
    want = np.zeros((T, P, s))
    for p in range(P):
        for j in range(s):
            k = idx[p, j].item()
            if k >= 0:
                want[:, p, j] = val[p, j].item() * g[:, p] @ V[k].numpy()
    np.testing.assert_allclose(out.numpy(), want, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(gig_accumulate(grads[0], w, idx, val, V, backend="torch").numpy(), want[0],
                               rtol=1e-12, atol=1e-12)


def test_gig_accumulate_is_the_ig_sum_of_a_linear_function():
    """For f(X) = ⟨A, X⟩ the gradient is A at every α, so the attributions are val·⟨A_p, V_k⟩ (completeness)."""
    P, C, K, s, m = 8, 5, 6, 3, 7
    A = torch.randn(P, C, dtype=torch.float64)
    idx, val = random_codes(P, s, K, dtype=torch.float64)
    V = torch.randn(K, C, dtype=torch.float64)
    w = torch.full((m,), 1.0 / m, dtype=torch.float64)
    attr = gig_accumulate(A.expand(m, P, C), w, idx, val, V, backend="torch")
    from gig_fast.ops.reference import sparse_reconstruct_ref
    total = (A * sparse_reconstruct_ref(idx, val, V)).sum()
    torch.testing.assert_close(attr.sum(), total)


@pytest.mark.parametrize("call,match", [
    (lambda: spherical_assign(torch.randn(4, 3), torch.randn(5, 4)), "C=4"),
    (lambda: spherical_assign(torch.full((4, 3), float("nan")), torch.randn(5, 3)), "NaN"),
    (lambda: spherical_assign(torch.randn(4, 3), torch.randn(5, 3).double()), "dtype"),
    (lambda: spherical_assign(torch.randn(4, 3), torch.randn(0, 3)), "K = 0"),
    (lambda: centroid_update(torch.randn(4, 3), torch.tensor([0, 1, 2, 3]), 3), "labels must lie"),
    (lambda: centroid_update(torch.randn(4, 3), torch.tensor([0, 1, 2]), 3), "N=4"),
    (lambda: centroid_update(torch.randn(4, 3), torch.tensor([0, 1, 2, 0]).int(), 3), "labels must have dtype"),
    (lambda: centroid_update(torch.randn(4, 3), torch.tensor([0, 1, 2, 0]), 0), "K must be"),
    (lambda: gig_accumulate(torch.randn(3, 4, 5), torch.rand(2), torch.zeros(4, 1, dtype=torch.long),
                            torch.ones(4, 1), torch.randn(2, 5)), "m=3"),
    (lambda: gig_accumulate(torch.randn(3, 4, 5), torch.rand(3), torch.zeros(4, 1, dtype=torch.long),
                            torch.ones(4, 1), torch.randn(2, 6)), "C=6"),
    (lambda: gig_accumulate(torch.randn(3, 4, 5), torch.rand(3), torch.full((4, 1), 2, dtype=torch.long),
                            torch.ones(4, 1), torch.randn(2, 5)), "K=2"),
    (lambda: gig_accumulate(torch.full((3, 4, 5), float("nan")), torch.rand(3), torch.zeros(4, 1, dtype=torch.long),
                            torch.ones(4, 1), torch.randn(2, 5)), "NaN"),
])
def test_bad_inputs_name_the_problem(call, match):
    with pytest.raises(ValueError, match=match):
        call()
