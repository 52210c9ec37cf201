"""centroid_update: every backend against an independent float64 sum, deterministic, validated."""
import pytest
import torch

from _grids import device_backend_pairs
from gig_fast import ops
from gig_fast.ops import available_backends, centroid_update

AVAIL = available_backends()
CPU_BACKENDS = [b for b in ("torch", "cpp", "triton") if AVAIL[b].startswith("runs")]
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


def _device_backends():
    return device_backend_pairs()


def _shapes(backend):
    if backend == "triton":
        return [(1, 1, 1), (5, 3, 2), (70, 19, 2), (33, 7, 70)]  # (N, C, K): small-K and sorted paths
    # chunked path (K <= 64), several chunks (N > 1024), and the sorted path (K > 64)
    return [(1, 1, 1), (5, 3, 2), (2500, 19, 2), (3000, 33, 5), (700, 7, 300), (40, 9, 1)]


def _expected(X, labels, K):
    onehot = (labels[None, :] == torch.arange(K)[:, None]).double()  # [K, N], independent of index_add_
    sums = onehot @ X.double()
    counts = torch.tensor([int((labels == k).sum()) for k in range(K)], dtype=torch.int64)
    return sums, counts


@pytest.mark.parametrize("device,backend", _device_backends())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_matches_float64_sum(device, backend, dtype):
    for N, C, K in _shapes(backend):
        X = torch.randn(N, C).to(dtype).to(device)
        labels = torch.randint(K, (N,), device=device)
        if K > 2:
            labels[labels == K - 1] = 0  # an empty cluster must come back as zeros
        sums, counts = centroid_update(X, labels, K, backend=backend)
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        assert sums.dtype == acc and sums.shape == (K, C) and counts.dtype == torch.int64
        ref_sums, ref_counts = _expected(X.cpu(), labels.cpu(), K)
        assert torch.equal(counts.cpu(), ref_counts)
        tol = 1e-10 if dtype == torch.float64 else 2e-5 * max(1.0, (N / K) ** 0.5)
        torch.testing.assert_close(sums.double().cpu(), ref_sums, atol=tol, rtol=tol)


@pytest.mark.parametrize("device,backend", _device_backends())
def test_two_clusters_deterministic(device, backend):
    """The 2-means case: all points in two clusters; two runs give bit-identical sums."""
    N, C = (3000, 40) if backend != "triton" else (200, 8)
    X = torch.randn(N, C, device=device)
    labels = (torch.rand(N, device=device) < 0.7).long()
    s1, c1 = centroid_update(X, labels, 2, backend=backend)
    s2, c2 = centroid_update(X, labels, 2, backend=backend)
    assert torch.equal(s1, s2) and torch.equal(c1, c2)
    ref_sums, _ = _expected(X.cpu(), labels.cpu(), 2)
    torch.testing.assert_close(s1.double().cpu(), ref_sums, atol=1e-3, rtol=1e-5)


@pytest.mark.parametrize("device,backend", _device_backends())
def test_empty_input(device, backend):
    sums, counts = centroid_update(torch.randn(0, 4, device=device), torch.zeros(0, dtype=torch.long, device=device),
                                   3, backend=backend)
    assert torch.equal(sums.cpu(), torch.zeros(3, 4)) and counts.tolist() == [0, 0, 0]


def test_cpp_thread_count_does_not_change_sums():
    if "cpp" not in CPU_BACKENDS:
        pytest.skip("cpp extension not built")
    X = torch.randn(5000, 17)
    labels = torch.randint(2, (5000,))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        s1, _ = centroid_update(X, labels, 2, backend="cpp")
    finally:
        torch.set_num_threads(threads)
    s2, _ = centroid_update(X, labels, 2, backend="cpp")
    assert torch.equal(s1, s2)


def test_opcheck():
    X, labels = torch.randn(9, 5), torch.randint(3, (9,))
    for backend in CPU_BACKENDS:
        torch.library.opcheck(ops.spec("centroid_update").custom_op, (X, labels, 3, backend))


@pytest.mark.parametrize("bad", ["label_high", "label_negative", "length", "K0", "label_dtype", "nan", "rank"])
def test_bad_input(bad):
    X, labels, K = torch.randn(6, 4), torch.randint(3, (6,)), 3
    if bad == "label_high":
        labels[2] = 3
    elif bad == "label_negative":
        labels[0] = -1
    elif bad == "length":
        labels = labels[:5]
    elif bad == "K0":
        K = 0
    elif bad == "label_dtype":
        labels = labels.int()
    elif bad == "nan":
        X[0, 0] = float("inf")
    else:
        X = X[None]
    with pytest.raises(ValueError):
        centroid_update(X, labels, K)
