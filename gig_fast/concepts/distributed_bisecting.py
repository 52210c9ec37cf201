"""Bisecting spherical k-means over several processes (docs/design.md §1.3, §6): the same concepts as
:func:`gig_fast.concepts.bisecting_spherical_kmeans` with the same seed, the work shared by the ranks.

Every rank passes the same per-layer PFV sample ``X`` (the documented per-layer memory bound) and
runs the same split schedule; the work of each round is shared two ways:

* clusters larger than ``init_sample`` are split one after the other, *data-parallel*: the
  initialisations are chosen on the cluster's random subsample (identical on every rank), then the
  Lloyd refinement on the whole cluster gives each rank a contiguous slice of its members, whose
  float64 side sums (the ``two_means_step`` op, so the reduction order barely matters) and label
  changes are all-reduced;
* smaller clusters of a round (most splits; fast mode has many per round) are split whole, each by
  one rank (round-robin), and the resulting sides are exchanged with one all-reduce per round.

The random draws of a split depend only on (seed, cluster) as in the single-process code, and the
final concept means are computed from the shared labels exactly as there, so the labels and concepts
are identical to the single-process ones up to the rounding of the all-reduced refinement sums
(identical outright when no cluster exceeds ``init_sample``).
"""
from __future__ import annotations

from typing import Callable

import torch

from .bisecting import bisecting_spherical_kmeans, prepare_points
from .core import Kernels, apply_split, concepts_from_members, next_batch, split_batch, split_seed

__all__ = ["distributed_bisecting_kmeans"]

AllReduce = Callable[[torch.Tensor], torch.Tensor]  # sum over ranks → a new tensor


def _slice(n: int, rank: int, world: int) -> tuple[int, int]:
    """This rank's contiguous part ``[lo, hi)`` of ``n`` rows (sizes differ by at most one)."""
    return n * rank // world, n * (rank + 1) // world


def _lloyd_sharded(U: torch.Tensor, idx: torch.Tensor, sums: torch.Tensor, kern: Kernels, max_iter: int, rank: int,
                   world: int, reduce: AllReduce) -> torch.Tensor:
    """Lloyd on the cluster ``U[idx]`` from the fp64 side sums ``sums [2, C]``, its members shared by the
    ranks: each rank steps its slice (``two_means_step``), the sums and the number of changed sides are
    all-reduced, and the loop stops as the single-process one does (no side changed).

    Returns ``side int64 [n]`` on every rank.
    """
    n = idx.shape[0]
    lo, hi = _slice(n, rank, world)
    mine = idx[lo:hi].contiguous()
    side = None
    for _ in range(max_iter):
        new_side, part = kern.step(U, mine, sums)
        sums = reduce(part)
        changed = 1 if side is None else int((new_side != side).sum())
        converged = side is not None and int(reduce(torch.tensor([changed], dtype=torch.int64))) == 0
        side = new_side
        if converged:
            break
    full = torch.zeros(n, dtype=torch.int64, device=U.device)
    full[lo:hi] = side
    return reduce(full)  # every rank's slice → the whole side vector


def _two_means_sharded(U, idx, kern, seed, n_init, max_iter, init_sample, rank, world, reduce):
    """The split of a cluster ``U[idx]`` larger than ``init_sample``: the initialisations on its random
    sample (identical on every rank), then the refinement on the whole cluster data-parallel.
    Returns ``(side int64 [n], fell_back)``."""
    n = idx.shape[0]
    _, sums, _, _ = kern.splits(U, [idx], [split_seed(seed, int(idx[0]), n)], n_init, max_iter, init_sample, False)
    side = _lloyd_sharded(U, idx, sums[0], kern, max_iter, rank, world, reduce)
    size1 = int(side.sum())
    if size1 == 0 or size1 == n:  # inseparable: split by member order, as the single-process code does
        return (torch.arange(n, device=U.device) >= (n + 1) // 2).to(torch.int64), True
    return side, False


def _split_small(U, members, batch, kern, seed, n_init, max_iter, init_sample, rank, world, reduce):
    """Split the clusters of ``batch`` (all ≤ ``init_sample``) round-robin over the ranks and share the
    sides: ``{cluster id: (side, fell_back)}`` on every rank."""
    sizes = [members[cid].shape[0] for _, cid in batch]
    offsets = [0]
    for s in sizes:
        offsets.append(offsets[-1] + s)
    buf = torch.zeros(offsets[-1] + len(batch), dtype=torch.int64)  # sides, then one fallback flag each
    mine = [j for j in range(len(batch)) if j % world == rank]
    done = split_batch(U, members, [batch[j] for j in mine], kern, seed, n_init, max_iter, init_sample)
    if done:  # one device→host copy of this rank's sides (not one per cluster: a sync each on a GPU)
        sides = torch.cat([side for _, side, _ in done]).cpu().split([sizes[j] for j in mine])
        for j, side, (_, _, fell_back) in zip(mine, sides, done):
            buf[offsets[j]:offsets[j + 1]] = side
            buf[offsets[-1] + j] = int(fell_back)
    buf = reduce(buf)
    on_device = buf[:offsets[-1]].to(U.device)
    return {cid: (on_device[offsets[j]:offsets[j + 1]], bool(buf[offsets[-1] + j]))
            for j, (_, cid) in enumerate(batch)}


def distributed_bisecting_kmeans(X: torch.Tensor, K: int, *, rank: int, world: int, all_reduce: AllReduce,
                                 beta: torch.Tensor | None = None, seed: int = 0, n_init: int = 3,
                                 max_iter: int = 30, init_sample: int = 1024, mode: str = "sequential",
                                 backend: str | None = None, return_info: bool = False):
    """Bisecting spherical k-means run together by ``world`` processes (collective: every rank calls it
    with the same ``X``, ``K`` and options).

    Args:
        X, K, beta, seed, n_init, max_iter, init_sample, mode, backend, return_info: as in
            :func:`gig_fast.concepts.bisecting_spherical_kmeans`.
        rank, world: this process's rank and the number of processes.
        all_reduce: ``tensor → tensor`` summed over the ranks (e.g.
            :func:`gig_fast.pipeline.distributed.all_reduce`); it must return a new tensor.

    Returns:
        ``(concepts [K, C], labels int64 [N])`` (and a :class:`BisectingInfo`), the same on every rank
        and the same as the single-process function's (see the module docstring).
    """
    if world <= 1:
        return bisecting_spherical_kmeans(X, K, beta=beta, seed=seed, n_init=n_init, max_iter=max_iter,
                                          init_sample=init_sample, mode=mode, backend=backend,
                                          return_info=return_info)
    if not 0 <= rank < world:
        raise ValueError(f"rank must be in [0, {world}), got {rank}")
    N = X.shape[0]
    Xc, U, kern = prepare_points(X, K, beta, n_init, max_iter, init_sample, mode, backend)

    members: list[torch.Tensor] = [torch.arange(N, device=X.device)]
    heap = [(-N, 0)]
    rounds = fallbacks = sharded = 0
    while len(members) < K:
        batch = next_batch(heap, mode, K - len(members))
        rounds += 1
        small = [item for item in batch if -item[0] <= init_sample]
        splits = _split_small(U, members, small, kern, seed, n_init, max_iter, init_sample, rank, world,
                              all_reduce) if small else {}
        for neg_size, cid in batch:
            if cid not in splits:
                sharded += 1
                splits[cid] = _two_means_sharded(U, members[cid], kern, seed, n_init, max_iter, init_sample, rank,
                                                 world, all_reduce)
        for neg_size, cid in batch:  # apply in batch order: the same cluster ids as the single process
            side, fell_back = splits[cid]
            fallbacks += int(fell_back)
            apply_split(members, heap, cid, side)

    # the concept means from the shared labels, computed as the single-process code does (bit-identical)
    return concepts_from_members(X, Xc, U, members, kern, K, return_info, rounds, fallbacks, mode, sharded)
