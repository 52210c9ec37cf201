"""The ``batched`` backend of two_means_splits / two_means_step (all clusters of a batch at once, as
segments) against the per-cluster torch reference: the same sides, sums, inertia and fallbacks over a
grid of cluster counts, sizes and dtypes, and the same bisecting k-means (both modes, single-process and
the sharded path)."""
import threading
import warnings

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from _grids import DEVICES, accumulation_bound, unit_roundoff
from gig_fast import ops
from gig_fast.concepts import bisecting_spherical_kmeans, distributed_bisecting_kmeans
from gig_fast.ops.reference import SplitMix64
from gig_fast.kernels import two_means_batched
from gig_fast.kernels.two_means_batched import SUM_CHUNK, SideSums, splitmix64_draws
from gig_fast.testing import clustered_points, pfv_like


def _unit(X: torch.Tensor) -> torch.Tensor:
    return (X / X.norm(dim=1, keepdim=True).clamp_min(1e-12)).contiguous()


def _points(n: int, C: int, dtype, g: torch.Generator) -> torch.Tensor:
    """Unit rows around a few directions, with inseparable corners: every 53rd row zero (a PFV equal to
    β) and a run of 101 identical rows at 99…199."""
    U = _unit(clustered_points(n, C, max(2, n // 150), dtype=torch.float64, generator=g) - 2.0)
    U[::53] = 0
    U[100:200] = U[99]
    return U.to(dtype).contiguous()


def _clusters(case: str, N: int, g: torch.Generator) -> list[torch.Tensor]:
    """Sorted member lists of disjoint clusters (as bisecting passes them) of the sizes the case names."""
    sizes = {
        "tiny": [2, 2, 3, 4, 5],                       # size-2 clusters: any split is a fallback or 1 | 1
        "mixed": [2, 17, 64, 65, 300, 700],             # around and beyond init_sample = 64
        "one_large": [1500],                            # one cluster refined on 1,500 rows
        "many": torch.randint(2, 90, (40,), generator=g).tolist(),  # 40 clusters in one call
        "pairs": [40, 41, 120, 300],                    # two tight groups each: see _pairs
    }[case]
    perm = torch.randperm(N, generator=g)
    out, start = [], 0
    for s in sizes:
        out.append(perm[start:start + s].sort().values)
        start += s
    return out


def _inseparable(N: int) -> list[torch.Tensor]:
    """Clusters that 2-means cannot split — 100 identical rows (100…199, more than init_sample), zero
    rows (multiples of 53), two identical rows —, zero rows with copies of one direction (inseparable
    or not, by the draws: from a copy and a zero row every score is ≤ 0, all on side 0; from a zero row
    and a copy the copies score 1) and one that splits: a zero row, two copies and two other rows."""
    return [torch.arange(100, 200), torch.arange(0, N, 53)[5:10], torch.tensor([101, 102]),
            torch.tensor([0, 53, 101, 102, 103]), torch.tensor([0, 101, 102, 500, 902])]


def _pairs(U: torch.Tensor, members: list[torch.Tensor], g: torch.Generator) -> torch.Tensor:
    """Each cluster made of two tight groups (two random directions, noise 1e-3): every initialisation
    reaches the same partition, with its sides in either order, and equal inertia up to rounding — the
    case where the "lower by more than 1e-9·n" rule decides which one is kept."""
    U = U.clone()
    for m in members:
        dirs = torch.randn(2, U.shape[1], dtype=torch.float64, generator=g)
        half = torch.arange(m.shape[0]) % 2
        rows = dirs[half] + 1e-3 * torch.randn(m.shape[0], U.shape[1], dtype=torch.float64, generator=g)
        U[m] = _unit(rows).to(U.dtype)
    return U.contiguous()


def _bounds(U: torch.Tensor, members: list[torch.Tensor], refine: bool, init_sample: int):
    """Per-cluster bounds on the difference two summation orders make in the float64 side sums ``[B, 2, C]``
    and in the inertia ``[B]`` (|‖a‖ − ‖b‖| ≤ ‖a − b‖): zero on the CPU, where both use index_add_ in
    member order, but the bound is what the contract promises on every device."""
    S_bound, I_bound = [], []
    for m in members:
        rows = U[m].double().abs()
        n = m.shape[0] if refine or m.shape[0] <= init_sample else init_sample
        b = accumulation_bound(rows.sum(0), n, torch.float64)
        S_bound.append(b.expand(2, -1))
        I_bound.append(2 * float(b.norm()) + 4 * n * unit_roundoff(torch.float64))
    return torch.stack(S_bound), torch.tensor(I_bound, dtype=torch.float64)


def test_a_one_member_cluster_is_a_named_error():
    """A size-1 cluster cannot be split: the op refuses it by name on this backend too."""
    U = _unit(torch.randn(10, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"members\[1\] has 1 member"):
        ops.two_means_splits(U, [torch.arange(4), torch.tensor([7])], [1, 2], backend="batched")


def test_vectorised_splitmix64_is_the_stream():
    """The k-th draw computed in closed form equals the k-th ``next()`` of the reference generator."""
    for seed in (0, 1234567, 2**62 + 12345, 2**63 - 2):
        rng = SplitMix64(seed)
        stream = [rng.next() for _ in range(50)]
        assert [int(z) for z in splitmix64_draws(seed, np.arange(50))] == stream, seed
    rng = SplitMix64(1234567)
    assert int(splitmix64_draws(1234567, 0)) == 6457827717110365317 == rng.next()  # Vigna's splitmix64.c


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case, refine, n_init, max_iter", [
    ("tiny", True, 3, 30), ("mixed", True, 3, 30), ("mixed", False, 3, 30), ("one_large", True, 3, 30),
    ("one_large", False, 3, 30), ("many", True, 3, 30),
    ("many", True, 2, 2),        # stopped by max_iter before convergence
    ("pairs", True, 8, 30),      # equal-inertia initialisations: the first one is kept
    ("inseparable", True, 3, 30), ("inseparable", False, 3, 30)])
def test_batched_splits_equal_the_reference(case, refine, n_init, max_iter, dtype, device, seed):
    g = torch.Generator().manual_seed(seed)
    N, init_sample = 3000, 64
    U = _points(N, 12, dtype, g)
    members = _inseparable(N) if case == "inseparable" else _clusters(case, N, g)
    if case == "pairs":
        U = _pairs(U, members, g)
    seeds = [int(s) for s in torch.randint(0, 2**62, (len(members),), generator=g)]
    seeds[0] = 2**63 - 2  # the largest seed split_seed can give
    kw = dict(n_init=n_init, max_iter=max_iter, init_sample=init_sample, refine=refine)
    U, members = U.to(device), [m.to(device) for m in members]
    got = ops.two_means_splits(U, members, seeds, backend="batched", **kw)
    ref = ops.two_means_splits(U, members, seeds, backend="torch", **kw)
    for b, (s_got, s_ref) in enumerate(zip(got[0], ref[0])):
        assert s_got.dtype == torch.int64 and s_got.device == U.device
        assert torch.equal(s_got, s_ref), (b, members[b].shape[0], int((s_got != s_ref).sum()))
    S_bound, I_bound = _bounds(U.cpu(), [m.cpu() for m in members], refine, init_sample)
    assert bool(((got[1] - ref[1]).abs().cpu() <= S_bound).all())
    assert bool(((got[2] - ref[2]).abs().cpu() <= I_bound).all()), (got[2], ref[2])
    assert torch.equal(got[3], ref[3])
    if case == "inseparable":  # identical rows, zero rows and two identical rows fall back; the last splits
        # (refine=False: the 100 identical rows stop at their sample of 64, constant sides, no fallback)
        assert got[3][[0, 1, 2, 4]].tolist() == [refine, True, True, False]
        assert got[0][0].tolist() == ([0] * 50 + [1] * 50 if refine else [0] * 64)


@pytest.mark.parametrize("device", DEVICES)
def test_chunked_side_sums_equal_index_add(device, seed):
    """The CUDA reduction (chunks of SUM_CHUNK rows, then per cluster) against index_add_ in member
    order, on clusters of 1, SUM_CHUNK − 1, SUM_CHUNK, SUM_CHUNK + 1 and 5·SUM_CHUNK + 7 rows."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([1, SUM_CHUNK - 1, SUM_CHUNK, SUM_CHUNK + 1, 5 * SUM_CHUNK + 7, 2])
    M, C = int(lengths.sum()), 9
    X64 = torch.randn(M, C, dtype=torch.float64, generator=g)
    side = torch.randint(0, 2, (M,), generator=g)
    seg = torch.repeat_interleave(torch.arange(6), lengths)
    want = SideSums(seg, lengths, chunked=False)(X64, side)
    dev = torch.device(device)
    got = SideSums(seg.to(dev), lengths.to(dev), chunked=True)(X64.to(dev), side.to(dev)).cpu()
    expect = torch.stack([torch.stack([X64[seg == b][side[seg == b] == k].sum(0) for k in (0, 1)]) for b in range(6)])
    torch.testing.assert_close(want, expect, rtol=0, atol=1e-12)
    magnitude = torch.zeros(12, C, dtype=torch.float64).index_add_(0, 2 * seg + side, X64.abs()).view(6, 2, C)
    assert bool(((got - want).abs() <= accumulation_bound(magnitude, int(lengths.max()), torch.float64)).all())


@pytest.mark.parametrize("case", ["mixed", "one_large", "many"])
def test_batched_splits_with_the_cuda_reduction_on_the_cpu(case, seed, monkeypatch):
    """The whole batched split with the CUDA side sums (run on the CPU here): the reference's sides,
    sums within the summation bound — what the GPU rows of the test above check on a GPU."""
    monkeypatch.setattr(two_means_batched, "CHUNKED_SUM_DEVICES", {"cpu", "cuda"})
    g = torch.Generator().manual_seed(seed)
    U = _points(3000, 12, torch.float32, g)
    members = _clusters(case, 3000, g)
    seeds = [int(s) for s in torch.randint(0, 2**62, (len(members),), generator=g)]
    got = ops.two_means_splits(U, members, seeds, init_sample=300, backend="batched")
    ref = ops.two_means_splits(U, members, seeds, init_sample=300, backend="torch")
    assert all(torch.equal(a, b) for a, b in zip(got[0], ref[0]))
    S_bound, I_bound = _bounds(U, members, True, 300)
    assert bool(((got[1] - ref[1]).abs() <= S_bound).all()) and bool(((got[2] - ref[2]).abs() <= I_bound).all())
    assert torch.equal(got[3], ref[3])


class _CountOps(TorchDispatchMode):
    """Counts the aten ops that compute (views — reshapes, broadcasts — left out: PyTorch takes other
    view paths for a batch of one) dispatched inside the ``with`` block."""

    def __init__(self):
        super().__init__()
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += not func.is_view
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("size", [40, 300])  # under and over init_sample (sampled, then refined)
def test_tensor_ops_do_not_grow_with_the_number_of_clusters(size, seed):
    """B copies of one cluster (same members, same seed: the same draws and Lloyd iterations) take the
    very same number of tensor ops as one: every step is batched over the clusters, none loops over them."""
    g = torch.Generator().manual_seed(seed)
    U = _points(600, 8, torch.float32, g)
    m = torch.randperm(600, generator=g)[:size].sort().values
    counts = []
    for B in (1, 24):
        with _CountOps() as mode:
            two_means_batched.two_means_splits_batched(U, [m] * B, [seed] * B, 3, 30, 128, True)
        counts.append(mode.ops)
    assert counts[0] == counts[1], counts


def test_sides_are_a_lloyd_fixed_point_of_the_batched_step(seed):
    """A converged split is stable under one more ``two_means_step`` (batched backend), which also
    gives that split's sums."""
    g = torch.Generator().manual_seed(seed)
    U = _points(800, 10, torch.float64, g)
    members = [torch.arange(400), torch.arange(400, 800)]
    sides, sums, _, _ = ops.two_means_splits(U, members, [5, 6], backend="batched", max_iter=100)
    for b in range(2):
        side, again = ops.two_means_step(U, members[b], sums[b], backend="batched")
        assert torch.equal(side, sides[b])
        torch.testing.assert_close(again, sums[b], rtol=0, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_batched_step_equals_the_reference(dtype, seed):
    g = torch.Generator().manual_seed(seed)
    U = _points(2600, 40, dtype, g)
    members = torch.randperm(2600, generator=g)[:2100].sort().values
    S = torch.randn(2, 40, dtype=torch.float64, generator=g)
    side, sums = ops.two_means_step(U, members, S, backend="batched")
    side_ref, sums_ref = ops.two_means_step(U, members, S, backend="torch")
    assert torch.equal(side, side_ref)
    bound = accumulation_bound(U[members].double().abs().sum(0), 2100, torch.float64)
    assert bool(((sums - sums_ref).abs() <= bound).all())


def test_opcheck_with_the_batched_backend():
    g = torch.Generator().manual_seed(7)
    U = _points(200, 6, torch.float64, g)
    torch.library.opcheck(ops.spec("two_means_splits").custom_op,
                          (U, [torch.arange(200), torch.arange(10, 30), torch.tensor([100, 101])], [1, 2, 3], 2, 10,
                           16, True, "batched"),
                          test_utils=("test_schema", "test_faketensor"))
    torch.library.opcheck(ops.spec("two_means_step").custom_op,
                          (U, torch.arange(0, 200, 2), torch.randn(2, 6, dtype=torch.float64, generator=g), "batched"))


def test_batched_is_the_cuda_default_and_runs_on_the_cpu_when_asked():
    for op in ("two_means_splits", "two_means_step"):
        assert ops.spec(op).preference["cuda"][0] == "batched" and "batched" not in ops.spec(op).preference["cpu"]
        assert ops.kernel(op, "cpu", "batched")[0] == "batched"


# ------------------------------------------------------------------ bisecting k-means on the batched splits
def _bisect(X, K, backend, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "centroid_update has no 'batched' backend; using its default"
        return bisecting_spherical_kmeans(X, K, backend=backend, return_info=True, **kw)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", ["sequential", "fast"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_bisecting_on_batched_splits_equals_torch(mode, dtype, device, seed):
    """The same labels (cluster ids included: the same split sequence) and concepts as the torch
    backend, with clusters larger than init_sample (refined splits) and duplicate points (fallbacks)."""
    g = torch.Generator().manual_seed(seed)
    X, _, beta = pfv_like(700, 16, 1, dtype=dtype, generator=g)
    X[200:280] = X[199]  # 81 identical PFVs: a cluster far above the mean size 15, split by fallback
    X, beta = X.to(device), beta.to(device)
    kw = dict(beta=beta, seed=seed, n_init=2, init_sample=96, mode=mode)
    c_ref, l_ref, i_ref = _bisect(X, 48, "torch", **kw)
    c, l, info = _bisect(X, 48, "batched", **kw)
    assert info.backends["two_means"] == "batched" and i_ref.backends["two_means"] == "torch"
    assert torch.equal(l, l_ref)
    assert info.fallback_splits == i_ref.fallback_splits > 0 and info.rounds == i_ref.rounds
    tol = 1e-10 if dtype == torch.float64 else 1e-5  # the concept means: only the mean's sum order differs
    torch.testing.assert_close(c, c_ref, rtol=tol, atol=tol)
    assert abs(info.inertia - i_ref.inertia) <= tol * max(1.0, i_ref.inertia)  # centroid_update of U: its sum order


class _ThreadRanks:
    """``world`` ranks as threads of this process: ``all_reduce`` sums a tensor over them (rank order)."""

    def __init__(self, world: int):
        self.world, self.slots, self.barrier = world, [None] * world, threading.Barrier(world)

    def all_reduce(self, rank: int):
        def reduce(t: torch.Tensor) -> torch.Tensor:
            self.slots[rank] = t.clone()
            self.barrier.wait()
            out = self.slots[0].clone()
            for other in self.slots[1:]:
                out += other
            self.barrier.wait()  # every rank has read the slots before any writes the next ones
            return out
        return reduce


@pytest.mark.parametrize("mode", ["sequential", "fast"])
def test_sharded_bisecting_on_batched_splits_equals_single_process(mode, seed):
    """Two ranks (threads): small clusters split round-robin by the batched backend, clusters larger
    than init_sample refined data-parallel with its ``two_means_step``: the single-process labels."""
    g = torch.Generator().manual_seed(seed)
    X = clustered_points(900, 8, 12, generator=g)
    beta = torch.full((8,), 2.0)
    kw = dict(beta=beta, seed=seed, n_init=2, init_sample=150, mode=mode)
    _, l_single, _ = _bisect(X, 20, "torch", **kw)
    ranks, results, errors = _ThreadRanks(2), [None, None], []

    def run(rank):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                results[rank] = distributed_bisecting_kmeans(X, 20, rank=rank, world=2, backend="batched",
                                                             all_reduce=ranks.all_reduce(rank), return_info=True,
                                                             **kw)
        except Exception as e:  # surfaced below; a dead rank would leave the other at the barrier
            errors.append(e)
            ranks.barrier.abort()

    threads = [threading.Thread(target=run, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    (c0, l0, info0), (c1, l1, _) = results
    assert info0.sharded_splits >= 2 and info0.backends["two_means"] == "batched"
    assert torch.equal(l0, l1) and torch.equal(c0, c1)
    assert torch.equal(l0, l_single)
