"""Correctness checks of the benchmark suite: a route is timed only after its result passed one.

Each returns the figures it measured (kept in the benchmark's ``extra_info`` and in the results rows)
and raises AssertionError, with those figures, when the result is wrong.
"""
from __future__ import annotations

import torch


def unit_roundoff(dtype: torch.dtype) -> float:
    """Half the machine epsilon: the relative error of one rounding in ``dtype``."""
    return torch.finfo(dtype).eps / 2


def check_sums(got: torch.Tensor, want: torch.Tensor, magnitude: torch.Tensor, dtype: torch.dtype,
               terms: int, what: str, acc: torch.dtype | None = None) -> dict:
    """Sums of ``terms`` products accumulated in ``acc`` (default fp32, fp64 for fp64) and stored in ``dtype``.

    ``want``: the float64 result on the same inputs; ``magnitude``: the same sums of absolute values
    (Σ|a·b|). Bound per entry (a standard recursive-summation bound, doubled):
    ``|got − want| ≤ 2·(u_out·|want| + terms·u_acc·magnitude)``. Outside routes that may accumulate in
    the input's own precision pass ``acc=dtype``.
    """
    acc = acc or (torch.float64 if dtype == torch.float64 else torch.float32)
    got64, want64, mag64 = got.double(), want.double(), magnitude.double()
    bound = 2 * (unit_roundoff(dtype) * want64.abs() + terms * unit_roundoff(acc) * mag64) + 1e-300
    excess = float(((got64 - want64).abs() / bound).max()) if got.numel() else 0.0
    err = float((got64 - want64).abs().max()) if got.numel() else 0.0
    assert excess <= 1.0, f"{what}: error {err:.3e} is {excess:.2f}x the bound of {dtype} summation of {terms} terms"
    return {"max_abs_err": err, "err_over_bound": excess}


def check_relative(got: torch.Tensor, want: torch.Tensor, rtol: float, what: str, key: str = "rel_err") -> dict:
    """``max|got − want| / max|want| ≤ rtol`` (errors measured against the largest entry)."""
    got64, want64 = got.double(), want.double()
    rel = float((got64 - want64).abs().max() / want64.abs().max().clamp_min(1e-300)) if got.numel() else 0.0
    assert rel <= rtol, f"{what}: relative error {rel:.3e} > {rtol:g}"
    return {key: rel}
