"""The pipeline's entry points into the concept, coding and GIG engines (written in their own modules).

Kept in one place so the stages read clearly and tests can swap in small stand-ins.
"""
from __future__ import annotations

import torch

__all__ = ["bisecting_kmeans", "sparse_code", "gig", "concept_target", "class_target", "make_f_ab"]


def bisecting_kmeans(X: torch.Tensor, K: int, beta: torch.Tensor, seed: int, mode: str | None):
    """``gig_fast.concepts.bisecting_spherical_kmeans`` → ``(V [K, C], labels [N])``; under ``torchrun``
    (several ranks) its collective twin ``gig_fast.concepts_distributed.distributed_bisecting_kmeans``,
    which every rank calls with the same ``X`` and which returns the same concepts."""
    from ..concepts import bisecting_spherical_kmeans
    from . import distributed as dist

    kw = {"beta": beta, "seed": seed}
    if mode is not None:
        kw["mode"] = mode
    if dist.world() > 1:
        from ..concepts_distributed import distributed_bisecting_kmeans
        return distributed_bisecting_kmeans(X, K, rank=dist.rank(), world=dist.world(), all_reduce=dist.all_reduce,
                                            **kw)
    return bisecting_spherical_kmeans(X, K, **kw)


def sparse_code(X: torch.Tensor, V: torch.Tensor, lam: float, beta: torch.Tensor, method: str, positive: bool):
    """``gig_fast.ops.sparse_code`` → padded ``(idx [P, s], val [P, s])``."""
    from ..ops import sparse_code as op

    return op(X, V, lam=lam, method=method, bias=beta, positive=positive)


def gig(f_ab, codes, V, beta, target, steps: int, rule: str, batch_size, spatial, autocast=None, tolerance=0.01):
    """``gig_fast.gig.gig`` → GIGResult with ``.per_concept``, ``.delta`` and ``.steps`` (``spatial =
    (H_a, W_a)``, ``autocast`` a torch dtype or None, ``tolerance`` the refinement bar or None)."""
    from ..gig import gig as engine

    return engine(f_ab, codes, V, beta, target, steps=steps, rule=rule, batch_size=batch_size, spatial=spatial,
                  autocast=autocast, tolerance=tolerance)


def concept_target(vector: torch.Tensor):
    from ..gig import ConceptTarget

    return ConceptTarget(vector)


def class_target(index: int, probability: bool):
    from ..gig import ClassTarget

    return ClassTarget(index, probability=probability)


def make_f_ab(adapter, a: str, b: str | None):
    """``F_ab`` from the pre-activation of ``a`` to that of ``b`` (None: the logits): the adapter's FX
    slice (``gig_fast.slicing.make_f_ab``), so the prefix up to ``a`` is never recomputed."""
    return adapter.f_ab(a, b)
