"""Helpers that every backend of the ops shares (the reference included): the accumulation dtype,
the rescaling of rows of extreme magnitude before a cosine, and dense codes turned into padded ones.

They live apart from :mod:`gig_fast.ops.reference` (the test oracle) so that production code — the op
layer, the kernels, the GIG engine, the concept extractor — never imports the oracle.
"""
from __future__ import annotations

import torch

__all__ = ["accumulation_dtype", "scale_extreme_rows", "SAFE_ROW_EXPONENT", "dense_to_padded"]


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; everything else accumulates in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# Cosine is scale-free, but the squares of an fp32 row with entries ≳ 1e19 overflow (its norm becomes inf
# and every cosine 0) and those of a denormal row underflow. So rows whose largest |entry| lies outside
# [2^-30, 2^30] (≈ 1e-9 … 1e9) are first scaled by the power of two that brings it into [0.5, 1): exact, so every other
# row is scored bit for bit as before. Every backend does the same (the C++ host code in
# csrc/spherical_assign/spherical_assign.h, the Triton wrapper through this function).
SAFE_ROW_EXPONENT = 30


def scale_extreme_rows(t: torch.Tensor) -> torch.Tensor:
    """``t [N, C]`` with every row whose largest |entry| lies outside ``[2^-30, 2^30]`` multiplied by the
    power of two that brings it into ``[0.5, 1)``; ``t`` itself when there is none (one host sync)."""
    if t.numel() == 0:
        return t
    m = torch.linalg.vector_norm(t, float("inf"), dim=1).double()
    bound = 2.0 ** SAFE_ROW_EXPONENT
    bad = (m > bound) | ((m < 1.0 / bound) & (m > 0))
    if not bool(bad.any()):
        return t
    e = torch.frexp(m[bad]).exponent.double()[:, None]  # m = mantissa·2^e, mantissa in [0.5, 1)
    half = torch.floor(-e / 2)  # two factors: 2^±1074 (a float64 denormal row) is out of float64's range
    rows = t[bad].double() * torch.exp2(half) * torch.exp2(-e - half)
    out = t.clone()
    out[bad] = rows.to(t.dtype)
    return out


def dense_to_padded(u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense codes ``[N, K]`` → padded ``(idx [N, s] int64, −1 padding, sorted; val [N, s], 0 at padding)``."""
    nz = u != 0
    s = int(nz.sum(1).max()) if u.numel() else 0
    # stable sort puts the non-zeros first, in increasing concept index
    order = torch.sort((~nz).to(torch.int8), dim=1, stable=True).indices[:, :s]
    keep = torch.gather(nz, 1, order)
    idx = torch.where(keep, order, torch.full_like(order, -1))
    val = torch.where(keep, torch.gather(u, 1, order), torch.zeros((), dtype=u.dtype, device=u.device))
    return idx, val
