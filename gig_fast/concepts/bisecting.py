"""Concept extraction: bisecting spherical k-means on the PFVs of one layer (docs/design.md §1.3, paper §3.2.1).

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
``j``, which the 2-means splits get for free from their side sums.

The heavy work is the ops of :mod:`gig_fast.ops`: ``two_means_splits`` (whole 2-means splits: sample,
initialisations, Lloyd, refinement, fallback; algorithm and random draws in ``csrc/two_means/two_means.h``)
and ``centroid_update`` (the final concept means). Their inputs are validated once here and the
chosen backend's bare kernels are called in the loop. On the ``cpp`` backend (the CPU default) the
splits of a round are one C++ call, run in parallel: per-split dispatch from Python, not arithmetic,
was the cost of the 2,047 small splits of a layer. On the ``batched`` backend (the CUDA default) the
splits of a round are segments of one concatenation, each Lloyd iteration a fixed number of tensor ops
over all of them. The ``torch`` backend is the reference: the same algorithm with the same random
draws, so all three give the same concepts up to float rounding.

Determinism: the random draws of a split depend only on ``seed`` and on the cluster being split (its
size and first member), not on when it is split, so the same seed gives the same concepts, and the
fast mode splits a cluster exactly as the sequential mode does whenever both split it.

Degenerate inputs: ``K > N`` is refused. A cluster whose 2-means leaves one side empty (all points
identical, or all zero after centring) is split by member order instead — first ⌈n/2⌉ members vs the
rest — which leaves its inertia unchanged; so ``K = N`` works and ends with singletons, and no cluster
is ever empty.
"""
from __future__ import annotations

import torch

from .core import (Kernels, apply_splits, check_inputs, concepts_from_members, next_batch, split_batch,
                   unit_rows)
from ..ops.common import accumulation_dtype

__all__ = ["bisecting_spherical_kmeans"]


def prepare_points(X, K, beta, n_init, max_iter, init_sample, mode, backend):
    """Checked inputs → ``(Xc [N, C] = X − β in the accumulation dtype, U = its unit rows, Kernels)``
    (the start of the single-process and the sharded bisecting k-means)."""
    check_inputs(X, K, beta, n_init, max_iter, mode)
    if not isinstance(init_sample, int) or init_sample < 2:
        raise ValueError(f"init_sample must be an int >= 2, got {init_sample!r}")
    acc = accumulation_dtype(X.dtype)
    Xc = X.to(acc) - (beta.to(acc) if beta is not None else 0)
    return Xc, unit_rows(Xc).contiguous(), Kernels(X.device, backend)


def bisecting_spherical_kmeans(X: torch.Tensor, K: int, *, beta: torch.Tensor | None = None, seed: int = 0,
                               n_init: int = 3, max_iter: int = 30, init_sample: int = 1024,
                               mode: str = "sequential",
                               backend: str | None = None, return_info: bool = False):
    """Concept vectors of one layer by bisecting spherical k-means (docs/design.md §1.3).

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
    N = X.shape[0]
    Xc, U, kern = prepare_points(X, K, beta, n_init, max_iter, init_sample, mode, backend)

    members: list[torch.Tensor] = [torch.arange(N, device=X.device)]  # cluster id -> sorted member indices
    heap = [(-N, 0)]  # (−size, id): the largest first, ties to the lower id
    rounds = fallbacks = 0
    while len(members) < K:
        batch = next_batch(heap, mode, K - len(members))
        rounds += 1
        done = split_batch(U, members, batch, kern, seed, n_init, max_iter, init_sample)
        fallbacks += sum(int(fell_back) for _, _, fell_back in done)
        apply_splits(members, heap, done)

    return concepts_from_members(X, Xc, U, members, kern, K, return_info, rounds, fallbacks, mode)


