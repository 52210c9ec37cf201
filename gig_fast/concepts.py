"""Concept extraction: bisecting spherical k-means on the PFVs of one layer (DESIGN.md §1.3, paper §3.2.1).

Given ``N`` sampled PFVs ``X [N, C]`` and the layer's BN shift ``β [C]``:

1. centre and normalise: ``x' = (x − β)/‖x − β‖`` (a zero ``x − β`` stays the zero vector);
2. start from one cluster and repeatedly split the largest one (by count; ties → the lower cluster id)
   with spherical 2-means — unit centroids, cosine assignment, ``n_init`` k-means++-style
   initialisations, keep the one of lowest cosine inertia — until there are ``K`` clusters (a cluster
   larger than ``init_sample`` points compares its initialisations on a random subsample of that size
   and refines only the best on all its points);
3. concept ``v_j`` = mean of the *centred raw* vectors ``x − β`` of cluster ``j`` (not the unit centroid).

Cosine inertia of a partition: ``Σ_n (1 − cos(x'_n, c_{label n}))`` with ``c_j`` the mean direction of
cluster ``j``; it equals ``Σ_j (n_j − ‖S_j‖)`` where ``S_j`` is the sum of the unit vectors of cluster
``j``, which is what the 2-means loop gets for free from ``centroid_update``.

The heavy work is the ops of :mod:`gig_fast.ops`: ``spherical_assign`` (the 2-means assignment) and
``centroid_update`` (the 2-means update, the segmented update of fast mode and the final concept
means). Their inputs are validated once here and the chosen backend's kernels are called directly in
the loops (the per-call checks would otherwise cost more than the work on small clusters). On the
``cpp`` backend (the CPU default) a whole split — sample, initialisations, Lloyd, refinement, fallback —
is one C++ call (``csrc/two_means``: the same algorithm with its own random generator, so its concepts
differ from the ``torch`` backend's by the random draws), and the splits of a fast-mode round run in
parallel: per-split dispatch from Python, not arithmetic, was the cost of the 2,047 small splits.

Determinism: the random draws of a split depend only on ``seed`` and on the cluster being split (its
size and first member), not on when it is split, so the same seed gives the same concepts, and the
fast mode splits a cluster exactly as the sequential mode does whenever both split it.

Degenerate inputs: ``K > N`` is refused. A cluster whose 2-means leaves one side empty (all points
identical, or all zero after centring) is split by member order instead — first ⌈n/2⌉ members vs the
rest — which leaves its inertia unchanged; so ``K = N`` works and ends with singletons, and no cluster
is ever empty.
"""
from __future__ import annotations

import contextlib
import heapq
from dataclasses import dataclass, field

import torch

from .ops import _validate as v
import sys

from .ops import centroid_update as _cu_public  # noqa: F401  (the public ops; imports their modules)
from .ops import spherical_assign as _sa_public  # noqa: F401
from .ops._backend import resolve

__all__ = ["bisecting_spherical_kmeans", "BisectingInfo", "cosine_inertia"]

MODES = ("sequential", "fast")


@dataclass
class BisectingInfo:
    """Diagnostics of one bisecting run (``return_info=True``).

    Attributes:
        inertia: cosine inertia ``Σ_n (1 − cos(x'_n, c_label))`` of the final partition.
        sizes: int64 ``[K]`` cluster sizes (they sum to N).
        splits: number of 2-means splits performed (K − 1).
        rounds: number of rounds (= splits in sequential mode; fewer in fast mode).
        fallback_splits: splits made by member order because 2-means could not separate the points.
        mode: "sequential" or "fast".
        backends: the backends used for ``spherical_assign`` and ``centroid_update``, and ``splits``:
            "cpp fused" (one C++ call per split) or "ops" (the Python loop over those ops).
    """
    inertia: float
    sizes: torch.Tensor
    splits: int
    rounds: int
    fallback_splits: int
    mode: str
    backends: dict = field(default_factory=dict)


_sa_mod = sys.modules["gig_fast.ops.spherical_assign"]  # the op modules (their names are shadowed by
_cu_mod = sys.modules["gig_fast.ops.centroid_update"]  # the functions in gig_fast.ops)


class _Kernels:
    """The two ops' kernels for one device/backend, resolved once (inputs were validated by the caller)."""

    def __init__(self, device: torch.device, backend: str | None):
        self.assign_name = resolve("spherical_assign", _sa_mod.IMPLEMENTED, _sa_mod.PREFERENCE, device, backend)
        self.update_name = resolve("centroid_update", _cu_mod.IMPLEMENTED, _cu_mod.PREFERENCE, device, backend)
        self.assign = _sa_mod.IMPLS[self.assign_name]
        self.update = _cu_mod.IMPLS[self.update_name]
        # on the cpp backend a whole split is one C++ call (csrc/two_means): same algorithm, its own RNG
        self.fused = self.assign_name == "cpp" and self.update_name == "cpp" and device.type == "cpu"


def _unit_rows(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)


def cosine_inertia(X: torch.Tensor, labels: torch.Tensor, K: int, beta: torch.Tensor | None = None) -> float:
    """``Σ_n (1 − cos(x'_n, c_{labels n}))`` with ``x' = (x − β)/‖x − β‖`` and ``c_j`` the mean direction of
    cluster ``j`` — the objective of spherical k-means; use it to compare any two partitions of X.

    Args: X ``[N, C]``, labels int64 ``[N]`` in ``[0, K)``, K, beta ``[C]`` or None.
    """
    acc = torch.float64
    Xc = X.to(acc) - (0 if beta is None else beta.to(acc))
    U = _unit_rows(Xc)
    sums = torch.zeros(K, X.shape[1], dtype=acc, device=X.device).index_add_(0, labels, U)
    counts = torch.bincount(labels, minlength=K).to(acc)
    return float((counts - sums.norm(dim=1)).sum())


_PARALLEL_MIN_ELEMS = 1 << 22  # a cluster smaller than this (points × channels) is split on one thread


@contextlib.contextmanager
def _threads_for(elems: int, device: torch.device):
    """One CPU thread for small clusters: each OpenMP fork/join of the ops and of the gathers costs more
    than a small cluster's whole pass, and far more on a loaded machine, where a descheduled thread
    stalls every barrier (measured: 5x slower bisecting on two busy cores)."""
    if device.type != "cpu" or elems >= _PARALLEL_MIN_ELEMS or torch.get_num_threads() == 1:
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _split_seed(seed: int, first: int, size: int) -> int:
    """The random seed of one split: a function of the seed and of the cluster (its first member and its
    size) only, not of the split order."""
    return (seed * 1_000_003 + first * 7_919 + size) % (2**63 - 1)


def _split_generator(seed: int, first: int, size: int) -> torch.Generator:
    """The RNG of one split of the PyTorch path (see :func:`_split_seed`)."""
    g = torch.Generator()
    g.manual_seed(_split_seed(seed, first, size))
    return g


def _init_pair(Us: torch.Tensor, gen: torch.Generator, kern: _Kernels) -> torch.Tensor:
    """Two starting centroids ``[2, C]`` for spherical 2-means, k-means++ style: a random point, then a
    point drawn with probability ∝ its cosine distance ``1 − cos`` to the first."""
    n = Us.shape[0]
    first = int(torch.randint(n, (1,), generator=gen))
    _, cos = kern.assign(Us, Us[first:first + 1])  # cosine to the first point (spherical_assign, K = 1)
    dist = (1.0 - cos.to(torch.float64).cpu()).clamp_min(0)
    if float(dist.sum()) > 0:
        second = int(torch.multinomial(dist, 1, generator=gen))
    else:  # every point has the first one's direction: any other point
        second = (first + 1 + int(torch.randint(max(n - 1, 1), (1,), generator=gen))) % n
    return Us[[first, second]]


def _lloyd(Us: torch.Tensor, centroids: torch.Tensor, kern: _Kernels, max_iter: int
           ) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Spherical 2-means iterations from ``centroids [2, C]`` until the labels stop changing.

    Returns ``(side int64 [n], sums [2, C], inertia)``, the sums being those of the returned sides
    (so ``inertia = n − ‖S_0‖ − ‖S_1‖`` is exact for that partition).
    """
    side = None
    for _ in range(max_iter):
        new_side, _ = kern.assign(Us, centroids)  # the spherical_assign op (K = 2)
        sums, _ = kern.update(Us, new_side, 2)  # the centroid_update op
        converged = side is not None and torch.equal(new_side, side)
        side = new_side
        if converged:
            break
        centroids = sums.to(Us.dtype)  # cosine ignores length: the sums are the mean directions
    return side, sums, Us.shape[0] - float(sums.norm(dim=1).sum())


def _two_means(Us: torch.Tensor, kern: _Kernels, gen: torch.Generator, n_init: int, max_iter: int,
               init_sample: int) -> tuple[torch.Tensor, float, bool]:
    """Spherical 2-means of the unit rows ``Us [n, C]`` (n ≥ 2): the best of ``n_init`` initialisations.

    When ``n > init_sample`` the initialisations are run to convergence on a random subsample of
    ``init_sample`` points and only the best one is refined on the whole cluster.

    Returns ``(side int64 [n] in {0, 1}, inertia, fell_back)``; both sides non-empty; ``fell_back``
    says the points could not be separated and were split by member order.
    """
    n = Us.shape[0]
    if n > init_sample:
        pick = torch.randperm(n, generator=gen)[:init_sample].sort().values.to(Us.device)
        sample = Us[pick]
    else:
        sample = Us
    best = None
    for _ in range(n_init):
        side, sums, inertia = _lloyd(sample, _init_pair(sample, gen, kern), kern, max_iter)
        if best is None or inertia < best[2] - 1e-9 * n:
            best = (side, sums, inertia)
    side, sums, inertia = best if sample is Us else _lloyd(Us, best[1].to(Us.dtype), kern, max_iter)
    size1 = int(side.sum())
    if size1 == 0 or size1 == n:  # inseparable (duplicates / zero vectors): split by member order
        side = (torch.arange(n, device=Us.device) >= (n + 1) // 2).to(torch.int64)
        sums, _ = kern.update(Us, side, 2)
        return side, n - float(sums.norm(dim=1).sum()), True
    return side, inertia, False


def _check_inputs(X, K, beta, n_init, max_iter, mode):
    v.check_tensor("X", X, 2, v.FLOAT_DTYPES)
    v.check_finite("X", X)
    N = X.shape[0]
    if isinstance(K, bool) or not isinstance(K, int) or K < 1:
        raise ValueError(f"K must be a positive int, got {K!r}")
    if N == 0:
        raise ValueError("X has no rows (N = 0)")
    if K > N:
        raise ValueError(f"K={K} clusters requested but X has only N={N} points; K must be <= N")
    if beta is not None:
        v.check_tensor("beta", beta, 1, v.FLOAT_DTYPES, X.device)
        if beta.shape[0] != X.shape[1]:
            raise ValueError(f"beta has {beta.shape[0]} entries but X has C={X.shape[1]} channels")
        v.check_finite("beta", beta)
    if not isinstance(n_init, int) or n_init < 1:
        raise ValueError(f"n_init must be a positive int, got {n_init!r}")
    if not isinstance(max_iter, int) or max_iter < 1:
        raise ValueError(f"max_iter must be a positive int, got {max_iter!r}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")


def bisecting_spherical_kmeans(X: torch.Tensor, K: int, *, beta: torch.Tensor | None = None, seed: int = 0,
                               n_init: int = 3, max_iter: int = 30, init_sample: int = 1024,
                               mode: str = "sequential",
                               backend: str | None = None, return_info: bool = False):
    """Concept vectors of one layer by bisecting spherical k-means (DESIGN.md §1.3).

    Args:
        X: ``[N, C]`` PFVs (raw, before centring), any float dtype.
        K: number of concepts, ``1 ≤ K ≤ N`` (the pipeline's default is ``8·C``).
        beta: ``[C]`` BN shift β subtracted before clustering (None = 0).
        seed: random seed; the same seed gives the same concepts.
        n_init: initialisations per 2-means split (the lowest cosine inertia is kept).
        max_iter: Lloyd iterations per initialisation (it stops earlier once labels are stable).
        init_sample: clusters larger than this choose among their ``n_init`` initialisations on a
            random subsample of this many points, then refine the best on all their points.
        mode: ``"sequential"`` — the reference: one split at a time, always the largest cluster;
            ``"fast"`` — each round splits every cluster at least half as large as the largest (as
            many as the budget K allows, largest first); splits are identical to the sequential
            ones for the same cluster, only the set of split clusters may differ near the end.
        backend: force the backend of the ops (default: the fastest for X's device).
        return_info: also return a :class:`BisectingInfo`.

    Returns:
        ``(concepts [K, C] in X's dtype, labels int64 [N])`` — concept ``j`` is the mean of ``x − β``
        over the points with ``labels == j`` — and the info when ``return_info``.
    """
    _check_inputs(X, K, beta, n_init, max_iter, mode)
    if not isinstance(init_sample, int) or init_sample < 2:
        raise ValueError(f"init_sample must be an int >= 2, got {init_sample!r}")
    N = X.shape[0]
    acc = torch.float64 if X.dtype == torch.float64 else torch.float32
    kern = _Kernels(X.device, backend)
    Xc = X.to(acc) - (beta.to(acc) if beta is not None else 0)
    U = _unit_rows(Xc).contiguous()

    members: list[torch.Tensor] = [torch.arange(N, device=X.device)]  # cluster id -> sorted member indices
    heap = [(-N, 0)]  # (−size, id): the largest first, ties to the lower id
    rounds = fallbacks = 0
    while len(members) < K:
        batch = _next_batch(heap, mode, K - len(members))
        rounds += 1
        for cid, side, fell_back in _split_batch(U, members, batch, kern, seed, n_init, max_iter, init_sample):
            fallbacks += int(fell_back)
            _apply_split(members, heap, cid, side)

    return _concepts_from_members(X, Xc, U, members, kern, K, return_info, rounds, fallbacks, mode)


def _split_batch(U: torch.Tensor, members: list, batch: list, kern: _Kernels, seed: int, n_init: int,
                 max_iter: int, init_sample: int) -> list[tuple[int, torch.Tensor, bool]]:
    """2-means splits of the clusters ``batch`` (``(−size, id)`` pairs): ``(id, side int64 [n], fell_back)``
    each. The cpp backend splits them all in one C++ call (in parallel when there are several); the
    other backends run :func:`_two_means` on each."""
    if kern.fused:
        seeds = [_split_seed(seed, int(members[cid][0]), -neg_size) for neg_size, cid in batch]
        sides, _, _, fell_back = torch.ops.gig_fast_cpp.two_means_splits(
            U, [members[cid] for _, cid in batch], seeds, n_init, max_iter, init_sample, True)
        return [(cid, side, fell) for (_, cid), side, fell in zip(batch, sides, fell_back.tolist())]
    out = []
    for neg_size, cid in batch:
        idx = members[cid]
        gen = _split_generator(seed, int(idx[0]), -neg_size)
        with _threads_for(-neg_size * U.shape[1], U.device):
            side, _, fell_back = _two_means(U[idx], kern, gen, n_init, max_iter, init_sample)
        out.append((cid, side, fell_back))
    return out


def _apply_split(members: list, heap: list, cid: int, side: torch.Tensor) -> None:
    """Cluster ``cid`` keeps its ``side == 0`` members; the ``side == 1`` ones become a new last cluster."""
    idx = members[cid]
    left, right = idx[side == 0], idx[side == 1]
    members[cid] = left
    members.append(right)
    heapq.heappush(heap, (-left.shape[0], cid))
    heapq.heappush(heap, (-right.shape[0], len(members) - 1))


def _next_batch(heap: list, mode: str, budget: int) -> list[tuple[int, int]]:
    """The clusters split in the next round: the largest (``sequential``), or every cluster at least half
    the largest's size, at most ``budget`` of them (``fast``)."""
    if mode == "sequential":
        return [heapq.heappop(heap)]
    largest = -heap[0][0]
    batch = []
    while heap and len(batch) < budget and -heap[0][0] * 2 >= largest:
        batch.append(heapq.heappop(heap))
    return batch


def _concepts_from_members(X, Xc, U, members, kern, K, return_info, rounds, fallbacks, mode):
    """Labels ``[N]`` from the member lists, concepts ``[K, C]`` = cluster means of the centred ``Xc``
    (and the :class:`BisectingInfo` with ``return_info``)."""
    labels = torch.empty(X.shape[0], dtype=torch.int64, device=X.device)
    for cid, idx in enumerate(members):
        labels[idx] = cid
    sums, counts = kern.update(Xc.contiguous(), labels, K)
    concepts = (sums / counts.clamp_min(1).to(sums.dtype)[:, None]).to(X.dtype)
    if not return_info:
        return concepts, labels
    usums, _ = kern.update(U, labels, K)
    info = BisectingInfo(inertia=float((counts.to(usums.dtype) - usums.norm(dim=1)).sum()), sizes=counts,
                         splits=K - 1, rounds=rounds, fallback_splits=fallbacks, mode=mode,
                         backends={"spherical_assign": kern.assign_name, "centroid_update": kern.update_name,
                                   "splits": "cpp fused" if kern.fused else "ops"})
    return concepts, labels, info

