"""``centroid_update``: per-cluster sums and counts (the k-means update step).

Deterministic on every backend (a fixed summation order, no float atomics), and fast when all points
fall in two clusters, the 2-means case of the bisecting extractor (docs/design.md §1.3).
"""
from __future__ import annotations

import torch

from . import checks as v
from .common import accumulation_dtype
from .reference import centroid_update_ref
from .registry import OpSpec, register, resolve

__all__ = ["centroid_update"]

IMPLEMENTED = ("torch", "cpp", "triton", "cuda")
PREFERENCE = {"cpu": ("cpp", "torch"), "cuda": ("cuda", "triton", "torch")}


def _cpp(X: torch.Tensor, labels: torch.Tensor, K: int):
    return torch.ops.gig_fast_cpp.centroid_update(X, labels, K)


def _cuda(X: torch.Tensor, labels: torch.Tensor, K: int):
    return torch.ops.gig_fast_cuda.centroid_update(X, labels, K)


def _triton(X: torch.Tensor, labels: torch.Tensor, K: int):
    from gig_fast.kernels import centroid_update as tk
    return tk.centroid_update(X, labels, K)


# backend → fn(X [N, C], labels [N], K) -> (sums [K, C], counts [K]); the callables assume validated
# inputs (the k-means loops of gig_fast.concepts call them through gig_fast.ops.kernel).
IMPLS = {"torch": centroid_update_ref, "cpp": _cpp, "triton": _triton, "cuda": _cuda}


@torch.library.custom_op("gig_fast::centroid_update", mutates_args=())
def _centroid_update_op(X: torch.Tensor, labels: torch.Tensor, K: int, backend: str
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    sums, counts = IMPLS[backend](X, labels, K)
    return sums, counts


@_centroid_update_op.register_fake
def _(X, labels, K, backend):
    acc = accumulation_dtype(X.dtype)
    return X.new_empty(K, X.shape[1], dtype=acc), X.new_empty(K, dtype=torch.int64)


SPEC = register(OpSpec("centroid_update", IMPLEMENTED, PREFERENCE, IMPLS, _centroid_update_op))


def centroid_update(X: torch.Tensor, labels: torch.Tensor, K: int, *, backend: str | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum and count the points of each cluster.

    Args:
        X: ``[N, C]`` points.
        labels: int64 ``[N]`` in ``[0, K)``.
        K: number of clusters (≥ 1).

    Returns:
        ``(sums [K, C] float32 (float64 for float64 X), counts int64 [K])``.
    """
    v.check_tensor("X", X, 2, v.FLOAT_DTYPES)
    v.check_tensor("labels", labels, 1, (torch.int64,), X.device)
    if labels.shape[0] != X.shape[0]:
        raise ValueError(f"labels has {labels.shape[0]} entries but X has N={X.shape[0]} rows")
    if isinstance(K, bool) or not isinstance(K, int) or K < 1:
        raise ValueError(f"K must be a positive int, got {K!r}")
    if labels.numel():
        lo, hi = int(labels.min()), int(labels.max())
        if lo < 0 or hi >= K:
            raise ValueError(f"labels must lie in [0, {K}), found {lo if lo < 0 else hi}")
    v.check_finite(X=X)
    name = resolve("centroid_update", IMPLEMENTED, PREFERENCE, X.device, backend)
    return _centroid_update_op(X.contiguous(), labels.contiguous(), K, name)
