"""``spherical_assign``: cosine argmax of every point against the centroids (k-means assignment step).

``labels[n] = argmax_k cos(X[n], centroids[k])``, ties to the smaller k, never materialising ``N×K``.
Used by the bisecting spherical k-means of the concept extractor (docs/design.md §1.3).
"""
from __future__ import annotations

import torch

from . import checks as v
from .common import accumulation_dtype
from .reference import spherical_assign_ref
from .registry import OpSpec, register, resolve

__all__ = ["spherical_assign"]

IMPLEMENTED = ("torch", "cpp", "triton", "cuda")
# Triton first on the GPU: it scores in bf16 on tensor cores and re-scores the top-2 in fp32, while the
# CUDA kernel is a plain tiled fp32 kernel (exact but slower).
PREFERENCE = {"cpu": ("cpp", "torch"), "cuda": ("triton", "cuda", "torch")}


def _cpp(X: torch.Tensor, centroids: torch.Tensor):
    return torch.ops.gig_fast_cpp.spherical_assign(X, centroids)


def _cuda(X: torch.Tensor, centroids: torch.Tensor):
    return torch.ops.gig_fast_cuda.spherical_assign(X, centroids)


def _triton(X: torch.Tensor, centroids: torch.Tensor):
    from gig_fast.kernels import spherical_assign as tk
    return tk.spherical_assign(X, centroids)


# backend → fn(X [N, C] contiguous, centroids [K, C] contiguous) -> (labels int64 [N], best [N]); the
# callables assume validated inputs (the k-means loops of gig_fast.concepts call them through
# gig_fast.ops.kernel).
IMPLS = {"torch": spherical_assign_ref, "cpp": _cpp, "triton": _triton, "cuda": _cuda}


@torch.library.custom_op("gig_fast::spherical_assign", mutates_args=())
def _spherical_assign_op(X: torch.Tensor, centroids: torch.Tensor, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    labels, best = IMPLS[backend](X, centroids)
    return labels, best


@_spherical_assign_op.register_fake
def _(X, centroids, backend):
    acc = accumulation_dtype(X.dtype)
    return X.new_empty(X.shape[0], dtype=torch.int64), X.new_empty(X.shape[0], dtype=acc)


SPEC = register(OpSpec("spherical_assign", IMPLEMENTED, PREFERENCE, IMPLS, _spherical_assign_op))


def spherical_assign(X: torch.Tensor, centroids: torch.Tensor, *, backend: str | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest centroid by cosine similarity.

    Args:
        X: ``[..., C]`` points (any float dtype); leading dims are flattened into N.
        centroids: ``[K, C]`` (need not be unit length), same dtype as X.
        backend: force one backend for this call.

    Returns:
        ``(labels int64 [...], best cosine float32 [...])``; an all-zero point has cosine 0 with every
        centroid and goes to centroid 0 (so does every point when C = 0); an all-zero centroid scores 0.
        Cosine is scale-free on every backend: rows of any finite scale, denormal or near the dtype's
        largest value, get the labels of the same rows scaled to unit size.

    Raises:
        ValueError: bad shapes or dtypes, K = 0, or a NaN/Inf in ``X`` or ``centroids``.
    """
    v.check_tensor("centroids", centroids, 2, v.FLOAT_DTYPES)
    v.check_tensor("X", X, None, v.FLOAT_DTYPES, centroids.device)
    if X.dim() < 1 or X.shape[-1] != centroids.shape[1]:
        raise ValueError(f"X {tuple(X.shape)} must end in C={centroids.shape[1]} channels like centroids")
    if centroids.shape[0] == 0:
        raise ValueError("centroids is empty (K = 0)")
    v.check_same_dtype(X=X, centroids=centroids)
    v.check_finite(X=X, centroids=centroids)
    lead = X.shape[:-1]
    if X.shape[-1] == 0:  # C = 0: every point is the zero vector, cosine 0 with every centroid
        acc = accumulation_dtype(X.dtype)
        return (torch.zeros(lead, dtype=torch.int64, device=X.device), torch.zeros(lead, dtype=acc, device=X.device))
    X2 = X.reshape(-1, X.shape[-1]).contiguous()
    name = resolve("spherical_assign", IMPLEMENTED, PREFERENCE, X.device, backend)
    labels, best = _spherical_assign_op(X2, centroids.contiguous(), name)
    return labels.reshape(lead), best.reshape(lead)
