"""The split machinery shared by the single-process and the distributed bisecting k-means.

Algorithm and determinism: see :mod:`gig_fast.concepts.bisecting`. Inside the ``concepts`` package these
names are public; outside it, use the package's ``__all__``.
"""
from __future__ import annotations

import contextlib
import heapq
from dataclasses import dataclass, field

import torch

from .. import ops
from ..ops import checks as v

__all__ = ["BisectingInfo", "cosine_inertia", "MODES", "Kernels", "unit_rows", "split_seed", "check_inputs",
           "split_batch", "apply_split", "apply_splits", "next_batch", "concepts_from_members", "threads_for"]

MODES = ("sequential", "fast")  # see bisecting_spherical_kmeans(mode=…)


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
        backends: the backends used for the 2-means splits (``two_means``: ``cpp`` — one fused C++ call
            per round —, ``batched`` — a round's splits as segments of batched tensor ops, the CUDA
            default — or ``torch``, the reference) and the concept means (``centroid_update``).
        sharded_splits: splits whose refinement ran data-parallel over several ranks (0 in one process).
    """
    inertia: float
    sizes: torch.Tensor
    splits: int
    rounds: int
    fallback_splits: int
    mode: str
    backends: dict = field(default_factory=dict)
    sharded_splits: int = 0


class Kernels:
    """The bare kernels of one device/backend, resolved once (inputs are validated by the caller): the
    2-means splits and steps (``gig_fast.ops.two_means_*``) and the concept means (``centroid_update``)."""

    def __init__(self, device: torch.device, backend: str | None):
        self.split_name, self.splits = ops.kernel("two_means_splits", device, backend)
        _, self.step = ops.kernel("two_means_step", device, self.split_name)
        self.update_name, self.update = ops.kernel("centroid_update", device, backend)


def unit_rows(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)


def cosine_inertia(X: torch.Tensor, labels: torch.Tensor, K: int, beta: torch.Tensor | None = None) -> float:
    """``Σ_n (1 − cos(x'_n, c_{labels n}))`` with ``x' = (x − β)/‖x − β‖`` and ``c_j`` the mean direction of
    cluster ``j`` — the objective of spherical k-means; use it to compare any two partitions of X.

    Args: X ``[N, C]``, labels int64 ``[N]`` in ``[0, K)``, K, beta ``[C]`` or None.
    """
    acc = torch.float64
    Xc = X.to(acc) - (0 if beta is None else beta.to(acc))
    U = unit_rows(Xc)
    sums = torch.zeros(K, X.shape[1], dtype=acc, device=X.device).index_add_(0, labels, U)
    counts = torch.bincount(labels, minlength=K).to(acc)
    return float((counts - sums.norm(dim=1)).sum())


WHOLE_BATCH_BACKENDS = ("cpp", "batched")  # their two_means_splits take a round's clusters in one call

PARALLEL_MIN_ELEMS = 1 << 22  # a cluster smaller than this (points × channels) is split on one thread


@contextlib.contextmanager
def threads_for(elems: int, device: torch.device):
    """One CPU thread for small clusters: each OpenMP fork/join of the ops and of the gathers costs more
    than a small cluster's whole pass, and far more on a loaded machine, where a descheduled thread
    stalls every barrier (measured: 5x slower bisecting on two busy cores)."""
    if device.type != "cpu" or elems >= PARALLEL_MIN_ELEMS or torch.get_num_threads() == 1:
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def split_seed(seed: int, first: int, size: int) -> int:
    """The random seed of one split: a function of the seed and of the cluster (its first member and its
    size) only, not of the split order (so fast and sequential mode split a cluster identically)."""
    return (seed * 1_000_003 + first * 7_919 + size) % (2**63 - 1)


def check_inputs(X, K, beta, n_init, max_iter, mode):
    v.check_tensor("X", X, 2, v.FLOAT_DTYPES)
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
    v.check_finite(X=X, beta=beta)  # one host sync for both
    if not isinstance(n_init, int) or n_init < 1:
        raise ValueError(f"n_init must be a positive int, got {n_init!r}")
    if not isinstance(max_iter, int) or max_iter < 1:
        raise ValueError(f"max_iter must be a positive int, got {max_iter!r}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")


def split_batch(U: torch.Tensor, members: list, batch: list, kern: Kernels, seed: int, n_init: int,
                max_iter: int, init_sample: int) -> list[tuple[int, torch.Tensor, bool]]:
    """2-means splits of the clusters ``batch`` (``(−size, id)`` pairs): ``(id, side int64 [n], fell_back)``
    each. The cpp backend splits them all in one C++ call (in parallel when there are several), the
    batched backend all at once as segments (a fixed number of tensor ops per Lloyd iteration: the GPU
    route); the torch reference splits one cluster at a time (small ones on one thread, see
    :func:`threads_for`)."""
    # the first members of the batch in one host transfer (one sync on a GPU, not one per cluster)
    firsts = torch.stack([members[cid][0] for _, cid in batch]).tolist() if batch else []
    seeds = [split_seed(seed, first, -neg_size) for (neg_size, _), first in zip(batch, firsts)]
    if kern.split_name in WHOLE_BATCH_BACKENDS:
        # cpp parallelises over the clusters itself; the batched ops are small for small rounds
        rows = sum(-neg_size for neg_size, _ in batch) if kern.split_name == "batched" else 0
        with threads_for(rows * U.shape[1], U.device) if rows else contextlib.nullcontext():
            sides, _, _, fell_back = kern.splits(U, [members[cid] for _, cid in batch], seeds, n_init, max_iter,
                                                 init_sample, True)
        return [(cid, side, fell) for (_, cid), side, fell in zip(batch, sides, fell_back.tolist())]
    out = []
    for (neg_size, cid), s in zip(batch, seeds):
        with threads_for(-neg_size * U.shape[1], U.device):
            sides, _, _, fell_back = kern.splits(U, [members[cid]], [s], n_init, max_iter, init_sample, True)
        out.append((cid, sides[0], bool(fell_back[0])))
    return out


def apply_split(members: list, heap: list, cid: int, side: torch.Tensor) -> None:
    """Cluster ``cid`` keeps its ``side == 0`` members; the ``side == 1`` ones become a new last cluster."""
    idx = members[cid]
    left, right = idx[side == 0], idx[side == 1]
    members[cid] = left
    members.append(right)
    heapq.heappush(heap, (-left.shape[0], cid))
    heapq.heappush(heap, (-right.shape[0], len(members) - 1))


def apply_splits(members: list, heap: list, done: list[tuple[int, torch.Tensor, bool]]) -> None:
    """:func:`apply_split` for every ``(id, side, fell_back)`` of a round, in that order, with one
    stable sort of the round's members by (cluster, side) instead of two mask selections (two host
    syncs on a GPU) per cluster: the same member lists, cluster ids and heap."""
    if len(done) <= 1:
        for cid, side, _ in done:
            apply_split(members, heap, cid, side)
        return
    idx = torch.cat([members[cid] for cid, _, _ in done])
    sizes = torch.tensor([members[cid].shape[0] for cid, _, _ in done], device=idx.device)
    key = 2 * torch.repeat_interleave(torch.arange(len(done), device=idx.device), sizes) + torch.cat(
        [side for _, side, _ in done])
    counts = torch.bincount(key, minlength=2 * len(done)).tolist()
    pieces = idx[torch.argsort(key, stable=True)].split(counts)  # member order kept within each side
    for j, (cid, _, _) in enumerate(done):
        left, right = pieces[2 * j], pieces[2 * j + 1]
        members[cid] = left
        members.append(right)
        heapq.heappush(heap, (-left.shape[0], cid))
        heapq.heappush(heap, (-right.shape[0], len(members) - 1))


def next_batch(heap: list, mode: str, budget: int) -> list[tuple[int, int]]:
    """The clusters split in the next round: the largest (``sequential``), or every cluster at least half
    the largest's size, at most ``budget`` of them (``fast``)."""
    if mode == "sequential":
        return [heapq.heappop(heap)]
    largest = -heap[0][0]
    batch = []
    while heap and len(batch) < budget and -heap[0][0] * 2 >= largest:
        batch.append(heapq.heappop(heap))
    return batch


def concepts_from_members(X, Xc, U, members, kern, K, return_info, rounds, fallbacks, mode, sharded_splits=0):
    """Labels ``[N]`` from the member lists, concepts ``[K, C]`` = cluster means of the centred ``Xc``
    (and the :class:`BisectingInfo` with ``return_info``)."""
    labels = torch.empty(X.shape[0], dtype=torch.int64, device=X.device)
    sizes = torch.tensor([idx.shape[0] for idx in members], device=X.device)
    labels[torch.cat(members)] = torch.repeat_interleave(torch.arange(len(members), device=X.device), sizes)
    sums, counts = kern.update(Xc.contiguous(), labels, K)
    concepts = (sums / counts.clamp_min(1).to(sums.dtype)[:, None]).to(X.dtype)
    if not return_info:
        return concepts, labels
    usums, _ = kern.update(U, labels, K)
    info = BisectingInfo(inertia=float((counts.to(usums.dtype) - usums.norm(dim=1)).sum()), sizes=counts,
                         splits=K - 1, rounds=rounds, fallback_splits=fallbacks, mode=mode,
                         backends={"two_means": kern.split_name, "centroid_update": kern.update_name},
                         sharded_splits=sharded_splits)
    return concepts, labels, info

