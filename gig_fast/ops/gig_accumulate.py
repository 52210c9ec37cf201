"""``gig_accumulate``: the fused quadrature sum and active-concept projection of GIG (docs/design.md §1.5).

``attr[..., p, j] = val[p,j]·⟨Σ_k weights[k]·grads[..., k, p, :], V[idx[p,j]]⟩`` — one pass over the
α-gradients, touching only the active concepts of each position (paper Eq. 4 with the integral
replaced by the quadrature rule whose weights are given).

Backends: ``torch`` (reference), ``cpp`` (C++/OpenMP), ``triton``, ``cuda``; formulas and kernel layout
in ``csrc/gig_accumulate/gig_accumulate.h``.
"""
from __future__ import annotations

import torch

from . import checks as v
from .common import accumulation_dtype
from .reference import gig_accumulate_ref
from .registry import OpSpec, register, resolve

__all__ = ["gig_accumulate"]


def _cpp(grads, weights, idx, val, V):
    return torch.ops.gig_fast_cpp.gig_accumulate(grads, weights, idx, val, V)


def _cuda(grads, weights, idx, val, V):
    return torch.ops.gig_fast_cuda.gig_accumulate(grads, weights, idx, val, V)


def _triton(grads, weights, idx, val, V):
    from gig_fast.kernels import gig_accumulate as tk
    return tk.gig_accumulate(grads, weights, idx, val, V)


IMPLEMENTED = ("torch", "cpp", "triton", "cuda")
PREFERENCE = {"cpu": ("cpp", "torch"), "cuda": ("cuda", "triton", "torch")}
IMPLS = {"torch": gig_accumulate_ref, "cpp": _cpp, "triton": _triton, "cuda": _cuda}
# backend → fn(grads [T, m, P, C], weights [m], idx [P, s], val [P, s], V [K, C]) -> [T, P, s]


@torch.library.custom_op("gig_fast::gig_accumulate", mutates_args=())
def _gig_accumulate_op(grads: torch.Tensor, weights: torch.Tensor, idx: torch.Tensor, val: torch.Tensor,
                       V: torch.Tensor, backend: str) -> torch.Tensor:
    if idx.shape[1] == 0 or grads.shape[1] == 0:  # no active code, or no node: nothing to launch
        return gig_accumulate_ref(grads, weights, idx, val, V)
    return IMPLS[backend](grads, weights, idx, val, V)


@_gig_accumulate_op.register_fake
def _(grads, weights, idx, val, V, backend):
    acc = accumulation_dtype(grads.dtype)
    return grads.new_empty(grads.shape[0], idx.shape[0], idx.shape[1], dtype=acc)


SPEC = register(OpSpec("gig_accumulate", IMPLEMENTED, PREFERENCE, IMPLS, _gig_accumulate_op))


def gig_accumulate(grads: torch.Tensor, weights: torch.Tensor, idx: torch.Tensor, val: torch.Tensor,
                   V: torch.Tensor, *, backend: str | None = None) -> torch.Tensor:
    """Weighted α-sum of gradients projected onto the active concepts.

    Args:
        grads: ``[m, P, C]`` or ``[T, m, P, C]`` (T targets) gradients at the m quadrature nodes.
        weights: ``[m]`` quadrature weights.
        idx, val: ``[P, s]`` padded codes of the source layer.
        V: ``[K, C]`` concepts.
        backend: force one backend for this call (default: the fastest for the device).

    Returns:
        ``[P, s]`` (or ``[T, P, s]``) float32 attributions (float64 for float64 grads), 0 at padding
        (padding never reads V).

    Raises:
        ValueError: bad shapes, dtypes or indices, or a NaN/Inf in ``grads``, ``weights``, ``val`` or ``V``.
    """
    v.check_tensor("V", V, 2, v.FLOAT_DTYPES)
    v.check_tensor("grads", grads, None, v.FLOAT_DTYPES, V.device)
    if grads.dim() not in (3, 4):
        raise ValueError(f"grads must be [m, P, C] or [T, m, P, C], got shape {tuple(grads.shape)}")
    v.check_tensor("weights", weights, 1, v.FLOAT_DTYPES, V.device)
    v.check_tensor("idx", idx, 2, (torch.int64,), V.device)
    v.check_tensor("val", val, 2, v.FLOAT_DTYPES, V.device)
    multi = grads.dim() == 4
    g4 = grads if multi else grads.unsqueeze(0)
    T, m, P, C = g4.shape
    if weights.shape[0] != m:
        raise ValueError(f"weights has {weights.shape[0]} entries but grads has m={m} quadrature nodes")
    if idx.shape[0] != P:
        raise ValueError(f"idx has P={idx.shape[0]} rows but grads has P={P} positions")
    if V.shape[1] != C:
        raise ValueError(f"V has C={V.shape[1]} channels but grads has C={C}")
    # index range and the finiteness of every float input: one host sync
    v.check_codes(idx, val, V.shape[0], V.device, grads=grads, weights=weights, V=V)
    name = resolve("gig_accumulate", IMPLEMENTED, PREFERENCE, V.device, backend)
    out = _gig_accumulate_op(g4.contiguous(), weights.contiguous(), idx.contiguous(), val.contiguous(),
                             V.contiguous(), name)
    return out if multi else out[0]
