"""bisecting_spherical_kmeans: contract of docs/design.md §1.3, determinism, degenerate inputs, quality."""
import heapq
import warnings

import pytest
import torch

from gig_fast.concepts import bisecting_spherical_kmeans, cosine_inertia
from gig_fast.concepts.core import apply_split, apply_splits
from gig_fast.ops import available_backends
from gig_fast.testing import clustered_points

AVAIL = available_backends()
BACKENDS = [b for b in ("torch", "cpp", "triton") if AVAIL[b].startswith("runs")]


def _gen(seed: int = 0) -> torch.Generator:
    """Data of its own generator: a test's points must not depend on which tests ran before it."""
    return torch.Generator().manual_seed(seed)


def _check_partition(X, K, beta, concepts, labels, info=None):
    N, C = X.shape
    assert concepts.shape == (K, C) and concepts.dtype == X.dtype
    assert labels.shape == (N,) and labels.dtype == torch.int64
    sizes = torch.bincount(labels, minlength=K)
    assert sizes.shape == (K,) and int(sizes.sum()) == N and bool((sizes > 0).all())
    Xc = X.double() - (0 if beta is None else beta.double())
    onehot = (labels[None, :] == torch.arange(K)[:, None]).double()
    expected = onehot @ Xc / sizes.double()[:, None]  # concept = mean of the centred raw vectors
    tol = 1e-10 if X.dtype == torch.float64 else 1e-4
    torch.testing.assert_close(concepts.double(), expected, atol=tol, rtol=tol)
    if info is not None:
        assert torch.equal(info.sizes, sizes) and info.splits == K - 1
        assert abs(info.inertia - cosine_inertia(X, labels, K, beta)) < 1e-3 * max(1.0, info.inertia)


@pytest.mark.parametrize("mode", ["sequential", "fast"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_contract_and_determinism(mode, dtype):
    X = clustered_points(400, 12, 10, dtype=dtype, generator=_gen())
    beta = torch.full((12,), 2.0, dtype=dtype)
    c1, l1, info = bisecting_spherical_kmeans(X, 37, beta=beta, seed=3, mode=mode, return_info=True)
    _check_partition(X, 37, beta, c1, l1, info)
    c2, l2 = bisecting_spherical_kmeans(X, 37, beta=beta, seed=3, mode=mode)
    assert torch.equal(c1, c2) and torch.equal(l1, l2)


def test_fast_mode_inertia_within_one_percent():
    X = clustered_points(1500, 16, 30, generator=_gen())
    beta = torch.full((16,), 2.0)
    _, ls, seq = bisecting_spherical_kmeans(X, 64, beta=beta, mode="sequential", return_info=True)
    _, lf, fast = bisecting_spherical_kmeans(X, 64, beta=beta, mode="fast", return_info=True)
    assert fast.rounds < seq.rounds == 63
    assert abs(fast.inertia - seq.inertia) <= 0.01 * seq.inertia, (fast.inertia, seq.inertia)


def test_recovers_separated_clusters():
    """K true directions, K concepts: the partition is the true one (inertia no worse than it)."""
    g = torch.Generator().manual_seed(0)
    k, C = 8, 20
    centres = torch.randn(k, C, generator=g)
    truth = torch.arange(400) % k
    X = centres[truth] + 0.05 * torch.randn(400, C, generator=g)
    _, labels = bisecting_spherical_kmeans(X, k, seed=1)
    assert cosine_inertia(X, labels, k) <= cosine_inertia(X, truth, k) + 1e-6


def test_sequential_splits_largest_and_matches_sklearn_quality():
    sklearn = pytest.importorskip("sklearn.cluster")
    X = clustered_points(800, 16, 20, generator=_gen())
    beta = torch.full((16,), 2.0)
    K = 32
    _, labels = bisecting_spherical_kmeans(X, K, beta=beta, seed=0)
    U = X.double() - 2.0
    U = (U / U.norm(dim=1, keepdim=True)).numpy()
    sk = sklearn.BisectingKMeans(K, random_state=0, bisecting_strategy="largest_cluster").fit(U)
    ours = cosine_inertia(X, labels, K, beta)
    theirs = cosine_inertia(X, torch.from_numpy(sk.labels_).long(), K, beta)
    assert ours <= theirs * 1.05, (ours, theirs)  # small data: one random sklearn run can be lucky


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "torch"])  # each against the torch reference
def test_backends_agree(backend, dtype):
    """Every backend runs the same 2-means splits with the same random draws (the cpp kernel and its torch
    reference; triton has no 2-means of its own and uses the default): the same partition as the torch
    reference, on clustered data with clusters larger than init_sample (refined splits included)."""
    X = clustered_points(400, 8, 6, dtype=dtype, generator=_gen())
    beta = torch.full((8,), 2.0, dtype=dtype)
    kw = dict(beta=beta, n_init=2, init_sample=64, return_info=True)
    c_ref, l_ref, i_ref = bisecting_spherical_kmeans(X, 12, backend="torch", **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "two_means_splits has no 'triton' backend; using its default"
        c, l, info = bisecting_spherical_kmeans(X, 12, backend=backend, **kw)
    _check_partition(X, 12, beta, c, l, info)
    assert info.backends["two_means"] == ("torch" if backend == "torch" else "cpp")
    # the same clusters; their ids may differ, as two initialisations that reach the same partition with
    # the sides swapped tie up to rounding (the kernel sums float32 rows in float32 chunks)
    assert _clusters(l) == _clusters(l_ref)
    assert abs(info.inertia - i_ref.inertia) <= 1e-5 * i_ref.inertia


def _clusters(labels: torch.Tensor) -> set[tuple[int, ...]]:
    """A partition as a set of member tuples (independent of the cluster ids)."""
    return {tuple(torch.nonzero(labels == k).flatten().tolist()) for k in labels.unique().tolist()}


def test_K_equals_1_and_N():
    X = torch.randn(9, 5)
    c, l = bisecting_spherical_kmeans(X, 1)
    assert l.tolist() == [0] * 9
    torch.testing.assert_close(c[0], X.mean(0))
    c, l, info = bisecting_spherical_kmeans(X, 9, return_info=True)
    assert sorted(l.tolist()) == list(range(9)) and info.inertia == pytest.approx(0.0, abs=1e-5)
    torch.testing.assert_close(c[l], X)


def test_duplicates_and_zero_vectors():
    """Identical points and points equal to beta (zero after centring) are split by member order."""
    beta = torch.full((6,), 0.5)
    base = torch.randn(3, 6)
    X = torch.cat([base[0].expand(10, 6), base[1].expand(7, 6), beta.expand(5, 6), base[2:]]).contiguous()
    c, l, info = bisecting_spherical_kmeans(X, 20, beta=beta, return_info=True)
    _check_partition(X, 20, beta, c, l, info)
    assert info.fallback_splits > 0


@pytest.mark.parametrize("bad", ["K_gt_N", "K0", "K_float", "beta_shape", "mode", "nan", "rank", "n_init"])
def test_bad_input(bad):
    X, K, kw = torch.randn(10, 4), 3, {}
    if bad == "K_gt_N":
        K = 11
    elif bad == "K0":
        K = 0
    elif bad == "K_float":
        K = 2.0
    elif bad == "beta_shape":
        kw["beta"] = torch.zeros(5)
    elif bad == "mode":
        kw["mode"] = "parallel"
    elif bad == "nan":
        X[3, 1] = float("nan")
    elif bad == "rank":
        X = X[None]
    else:
        kw["n_init"] = 0
    with pytest.raises(ValueError):
        bisecting_spherical_kmeans(X, K, **kw)


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["sequential", "fast"])
def test_cuda_matches_cpu_quality(mode):
    X = clustered_points(2000, 32, 20, generator=_gen())
    beta = torch.full((32,), 2.0)
    _, _, cpu = bisecting_spherical_kmeans(X, 64, beta=beta, mode=mode, return_info=True)
    c, l, gpu = bisecting_spherical_kmeans(X.cuda(), 64, beta=beta.cuda(), mode=mode, return_info=True)
    _check_partition(X, 64, beta, c.cpu(), l.cpu())
    assert abs(gpu.inertia - cpu.inertia) <= 0.01 * cpu.inertia


# ------------------------------------------------------------------ the fused C++ splits (cpp backend)
# (the two_means ops themselves, against their reference: tests/test_two_means.py)

needs_cpp = pytest.mark.skipif(AVAIL["cpp"] != "runs", reason="needs the compiled CPU extension")


@needs_cpp
@pytest.mark.parametrize("mode", ["sequential", "fast"])
def test_fused_splits_do_not_depend_on_threads(mode):
    X = clustered_points(3000, 24, 40, generator=_gen())
    beta = torch.full((24,), 2.0)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        c1, l1 = bisecting_spherical_kmeans(X, 50, beta=beta, mode=mode, init_sample=300)
        torch.set_num_threads(2)
        c2, l2 = bisecting_spherical_kmeans(X, 50, beta=beta, mode=mode, init_sample=300)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(l1, l2) and torch.equal(c1, c2)


def test_apply_splits_equals_one_split_at_a_time(seed):
    """The round's splits applied with one stable sort give the member lists, ids and heap of
    apply_split called cluster by cluster (in the round's order)."""
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(300, generator=g)
    members = [c.sort().values for c in perm.split([40, 2, 97, 61, 100])]
    done = []
    for cid in (2, 0, 4, 1):  # not in id order
        n = members[cid].shape[0]
        side = torch.randint(0, 2, (n,), generator=g)
        side[0], side[-1] = 0, 1  # both sides non-empty
        done.append((cid, side, False))
    one_members, one_heap = list(members), []
    for cid, side, _ in done:
        apply_split(one_members, one_heap, cid, side)
    all_members, all_heap = list(members), []
    apply_splits(all_members, all_heap, done)
    assert len(all_members) == len(one_members) == 9
    assert all(torch.equal(a, b) for a, b in zip(all_members, one_members))
    assert [heapq.heappop(all_heap) for _ in range(8)] == [heapq.heappop(one_heap) for _ in range(8)]
