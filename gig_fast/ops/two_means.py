"""``two_means_splits`` / ``two_means_step``: the spherical 2-means splits of the bisecting concept
extractor (docs/design.md §1.3; the algorithm and its random draws are written out in ``csrc/two_means/two_means.h``).

A cluster is given by the sorted indices ``members [n]`` of its rows in the unit-row matrix ``U [N, C]``.
``two_means_splits`` splits a batch of clusters (sample, k-means++ initialisations, Lloyd, refinement on
the whole cluster, fallback by member order for inseparable points), each with its own seed;
``two_means_step`` is one Lloyd step from given side sums (the data-parallel refinement of the distributed
extractor is made of it). Backends: ``torch`` (the reference, :func:`gig_fast.ops.reference.two_means_splits_ref`:
the same algorithm and the same :class:`~gig_fast.ops.reference.SplitMix64` draws, so both backends give
the same partitions up to float rounding), ``cpp`` (one fused C++ call per batch, clusters in parallel:
per-split dispatch from Python, not arithmetic, was the cost of the 2,047 small splits of a layer) and
``batched`` (:mod:`gig_fast.kernels.two_means_batched`: pure PyTorch on any device, all clusters of a batch
at once as segments of one concatenation, a fixed number of tensor ops per Lloyd iteration — the
route on CUDA).
"""
from __future__ import annotations

import torch

from . import checks as v
from .reference import two_means_splits_ref, two_means_step_ref
from .registry import OpSpec, register, resolve
from ..kernels.two_means_batched import two_means_splits_batched, two_means_step_batched

__all__ = ["two_means_splits", "two_means_step"]

IMPLEMENTED = ("torch", "cpp", "batched")
# cuda: the batched splits first (the per-cluster reference is thousands of tiny launches per layer).
# cpu: the fused C++; batched is not a CPU default: a CPU op costs microseconds, not a launch and a sync,
# and one round of splits measured 0.73-0.83x the per-cluster reference there (N = 20,000, C = 64,
# B = 8 and 64 clusters, one thread, bench_kmeans side by side), the C++ 10-16x it.
PREFERENCE = {"cpu": ("cpp", "torch"), "cuda": ("batched", "torch")}


def _splits_cpp(U, members, seeds, n_init, max_iter, init_sample, refine):
    return torch.ops.gig_fast_cpp.two_means_splits(U, members, seeds, n_init, max_iter, init_sample, refine)


def _step_cpp(U, members, sums):
    return torch.ops.gig_fast_cpp.two_means_step(U, members, sums)


# backend → fn(U [N, C], members [int64 [n_b]], seeds [int], n_init, max_iter, init_sample, refine)
#   -> (sides, sums float64 [B, 2, C], inertia float64 [B], fell_back bool [B]); inputs validated.
SPLIT_IMPLS = {"torch": two_means_splits_ref, "cpp": _splits_cpp, "batched": two_means_splits_batched}
# backend → fn(U [N, C], members int64 [n], sums float64 [2, C]) -> (side int64 [n], sums float64 [2, C]).
STEP_IMPLS = {"torch": two_means_step_ref, "cpp": _step_cpp, "batched": two_means_step_batched}


@torch.library.custom_op("gig_fast::two_means_splits", mutates_args=())
def _two_means_splits_op(U: torch.Tensor, members: list[torch.Tensor], seeds: list[int], n_init: int,
                         max_iter: int, init_sample: int, refine: bool, backend: str
                         ) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor, torch.Tensor]:
    sides, sums, inertia, fell_back = SPLIT_IMPLS[backend](U, members, seeds, n_init, max_iter, init_sample, refine)
    if backend == "batched":  # its sides are views of one tensor; a custom op's outputs may not alias
        sides = [s.clone() for s in sides]
    return list(sides), sums, inertia, fell_back


@_two_means_splits_op.register_fake
def _(U, members, seeds, n_init, max_iter, init_sample, refine, backend):
    B, C = len(members), U.shape[1]
    sides = [m.new_empty(m.shape[0] if refine or m.shape[0] <= init_sample else init_sample) for m in members]
    return (sides, U.new_empty(B, 2, C, dtype=torch.float64), U.new_empty(B, dtype=torch.float64),
            U.new_empty(B, dtype=torch.bool))


@torch.library.custom_op("gig_fast::two_means_step", mutates_args=())
def _two_means_step_op(U: torch.Tensor, members: torch.Tensor, sums: torch.Tensor, backend: str
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    side, new_sums = STEP_IMPLS[backend](U, members, sums)
    return side, new_sums


@_two_means_step_op.register_fake
def _(U, members, sums, backend):
    return members.new_empty(members.shape[0]), sums.new_empty(2, U.shape[1])


SPLITS_SPEC = register(OpSpec("two_means_splits", IMPLEMENTED, PREFERENCE, SPLIT_IMPLS, _two_means_splits_op))
STEP_SPEC = register(OpSpec("two_means_step", IMPLEMENTED, PREFERENCE, STEP_IMPLS, _two_means_step_op))


def _check_unit_rows(U: torch.Tensor) -> None:
    v.check_tensor("U", U, 2, (torch.float32, torch.float64))
    if not U.is_contiguous():
        raise ValueError("U must be contiguous")


def _check_members(name: str, m, N: int, device: torch.device) -> None:
    v.check_tensor(name, m, 1, (torch.int64,), device)
    if m.shape[0] < 2:
        raise ValueError(f"{name} has {m.shape[0]} member(s); a cluster to split needs at least 2")
    lo, hi = int(m.min()), int(m.max())
    if lo < 0 or hi >= N:
        raise ValueError(f"{name} holds row {lo if lo < 0 else hi}; rows of U lie in [0, {N})")


def two_means_splits(U: torch.Tensor, members: list[torch.Tensor], seeds: list[int], *, n_init: int = 3,
                     max_iter: int = 30, init_sample: int = 1024, refine: bool = True,
                     backend: str | None = None
                     ) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor, torch.Tensor]:
    """Spherical 2-means splits of several clusters of unit rows.

    Args:
        U: ``[N, C]`` unit rows (float32 or float64, contiguous).
        members: one int64 ``[n_b]`` tensor of row indices per cluster (n_b ≥ 2).
        seeds: one non-negative int per cluster: its random draws depend on nothing else.
        n_init: initialisations per split (the lowest cosine inertia wins).
        max_iter: Lloyd steps per initialisation at most (it stops once no side changes).
        init_sample: a cluster larger than this picks its initialisation on a random sample of this many
            members, then refines it on all of them (``refine=False``: it stops after the sample).
        backend: ``"cpp"``, ``"batched"`` or ``"torch"`` (default: the fastest for U's device).

    Returns:
        ``(sides, sums, inertia, fell_back)``: ``sides[b]`` int64 ``[n_b]`` in {0, 1} (both non-empty),
        ``sums`` float64 ``[B, 2, C]`` of the rows on each side, ``inertia`` float64 ``[B]`` (cosine
        inertia ``n_b − |S0| − |S1|``), ``fell_back`` bool ``[B]`` (split by member order because
        2-means could not separate the points).
    """
    _check_unit_rows(U)
    if not isinstance(members, (list, tuple)) or not isinstance(seeds, (list, tuple)) or len(members) != len(seeds):
        raise ValueError("members and seeds must be lists of the same length (one seed per cluster)")
    for b, m in enumerate(members):
        _check_members(f"members[{b}]", m, U.shape[0], U.device)
    if any(not isinstance(s, int) or isinstance(s, bool) or s < 0 for s in seeds):
        raise ValueError(f"seeds must be non-negative ints, got {list(seeds)[:5]}…")
    for name, value, least in (("n_init", n_init, 1), ("max_iter", max_iter, 1), ("init_sample", init_sample, 2)):
        if not isinstance(value, int) or isinstance(value, bool) or value < least:
            raise ValueError(f"{name} must be an int >= {least}, got {value!r}")
    v.check_finite(U=U)
    name = resolve("two_means_splits", IMPLEMENTED, PREFERENCE, U.device, backend)
    return _two_means_splits_op(U, [m.contiguous() for m in members], list(seeds), n_init, max_iter, init_sample,
                                bool(refine), name)


def two_means_step(U: torch.Tensor, members: torch.Tensor, sums: torch.Tensor, *, backend: str | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """One spherical 2-means Lloyd step on the rows ``U[members]`` from the side sums ``sums``.

    Args: U ``[N, C]`` unit rows (float32/float64), members int64 ``[n]``, sums float64 ``[2, C]``.
    Returns: ``(side int64 [n], sums float64 [2, C])``: ``side[i] = [<x_i, S1/|S1| − S0/|S0|> > 0]``
    and the sums of the rows on each new side.
    """
    _check_unit_rows(U)
    v.check_tensor("members", members, 1, (torch.int64,), U.device)
    if members.numel():
        lo, hi = int(members.min()), int(members.max())
        if lo < 0 or hi >= U.shape[0]:
            raise ValueError(f"members holds row {lo if lo < 0 else hi}; rows of U lie in [0, {U.shape[0]})")
    v.check_tensor("sums", sums, 2, (torch.float64,), U.device)
    if tuple(sums.shape) != (2, U.shape[1]):
        raise ValueError(f"sums must be [2, C={U.shape[1]}], got {tuple(sums.shape)}")
    v.check_finite(U=U, sums=sums)
    name = resolve("two_means_step", IMPLEMENTED, PREFERENCE, U.device, backend)
    return _two_means_step_op(U, members.contiguous(), sums.contiguous(), name)
