"""GPU solvers of ``sparse_code`` (formulas in ``csrc/sparse_code/sparse_code.h``).

Lasso, batched working-set coordinate descent on the Gram form; every vector keeps a working set W
(at most ``cap`` concepts, stored compactly at the front of ``widx [N, cap]``, −1 padding):

1. full residual correlations ``q = c − G u`` — a ``sparse_reconstruct`` of the codes on the rows of
   the symmetric ``G`` (touches |W| rows of G per vector, not K);
2. duality gap per vector (float64) and the stop test ``gap ≤ tol·‖y‖²``;
3. W grows by the largest KKT violators (``|q_k| − λ > 0`` outside W; one ``topk``), at least 8 and
   doubling, like the C++ solver;
4. ``_cd_kernel``: one program per vector runs cyclic coordinate-descent sweeps on its working set —
   a gathered row of G per coordinate, covariance updates of ``q_W``, soft-thresholding — until W's
   own gap is below a quarter of the outer gap (or ``tol`` when no violator is left).

Nothing here is dense over K except the correlations' GEMM (done by the caller) and the O(N·K)
gap/violator scans. OMP: the batched reference algorithm with the residual correlations computed
sparsely by ``sparse_reconstruct`` on G (no custom kernel: its cost is the argmax scans and a batched
small solve per step).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..ops.common import dense_to_padded
from ..ops.common import omp_gram as omp_gram_ref  # the OMP loop every backend shares, not the oracle
from .sparse_reconstruct import sparse_reconstruct_forward

MIN_GROW = 8
INNER_SWEEPS = 64  # sweeps per kernel launch at most: the outer loop re-syncs q and re-checks the gap


@triton.jit
def _cd_kernel(widx_ptr, u_ptr, q_ptr, c_ptr, G_ptr, y2_ptr, lam_ptr, target_ptr, sweeps_ptr,
               K, cap, max_sweeps, POSITIVE: tl.constexpr, BLOCK_W: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_W)
    in_cap = offs < cap
    widx = tl.load(widx_ptr + row * cap + offs, mask=in_cap, other=-1)
    valid = widx >= 0
    w_safe = tl.where(valid, widx, 0)
    u = tl.load(u_ptr + row * cap + offs, mask=in_cap, other=0.0)
    qW = tl.load(q_ptr + row * K + w_safe, mask=valid, other=0.0)
    cW = tl.load(c_ptr + row * K + w_safe, mask=valid, other=0.0)
    diag = tl.load(G_ptr + w_safe * K + w_safe, mask=valid, other=0.0)
    y2 = tl.load(y2_ptr + row)
    lam = tl.load(lam_ptr + row)
    target = tl.load(target_ptr + row)
    n_w = tl.sum(valid.to(tl.int32), axis=0)
    done = tl.load(sweeps_ptr + row)
    n = tl.zeros((), dtype=tl.int32)  # a tensor, not a Python int: it is carried through the while loop
    gap = _gap(u, qW, cW, y2, lam, valid, POSITIVE)
    # at least one sweep for a vector that is still running (target < inf), so every launch makes progress
    while ((gap > target) | ((n == 0) & (target < 1e300))) & (n < max_sweeps):
        for j in range(0, n_w):
            sel = offs == j
            k = tl.sum(tl.where(sel, w_safe, 0), axis=0)
            d = tl.sum(tl.where(sel, diag, 0.0), axis=0)
            if d > 0:
                uj = tl.sum(tl.where(sel, u, 0.0), axis=0)
                qj = tl.sum(tl.where(sel, qW, 0.0), axis=0)
                z = uj + qj / d
                t = lam / d
                if POSITIVE:
                    nu = tl.maximum(z - t, 0.0)
                else:
                    nu = tl.where(z > t, z - t, tl.where(z < -t, z + t, 0.0))
                delta = nu - uj
                if delta != 0:
                    g = tl.load(G_ptr + k * K + w_safe, mask=valid, other=0.0)
                    qW = qW - delta * g
                    u = tl.where(sel, nu, u)
        n += 1
        gap = _gap(u, qW, cW, y2, lam, valid, POSITIVE)
    tl.store(u_ptr + row * cap + offs, u, mask=in_cap)
    tl.store(sweeps_ptr + row, done + n)


@triton.jit
def _gap(u, qW, cW, y2, lam, valid, POSITIVE: tl.constexpr):
    """Duality gap of the working-set subproblem (sparse_code.h), reductions in float64."""
    u64 = u.to(tl.float64)
    q64 = qW.to(tl.float64)
    cu = tl.sum(cW.to(tl.float64) * u64, axis=0)
    uq = tl.sum(u64 * q64, axis=0)
    l1 = tl.sum(tl.abs(u64), axis=0)
    if POSITIVE:
        score = tl.where(valid, q64, 0.0)
    else:
        score = tl.where(valid, tl.abs(q64), 0.0)
    qmax = tl.maximum(tl.max(score, axis=0), 0.0)
    lam64 = lam.to(tl.float64)
    r2 = tl.maximum(y2.to(tl.float64) - cu - uq, 0.0)
    s = tl.where(qmax > lam64, lam64 / tl.maximum(qmax, 1e-300), 1.0)
    primal = 0.5 * r2 + lam64 * l1
    dual = s * (y2.to(tl.float64) - cu) - 0.5 * s * s * r2
    return tl.maximum(primal - dual, 0.0)


def _residual_corr(c: torch.Tensor, G: torch.Tensor, widx: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """``q = c − Σ_t u_t G[widx_t]`` ``[N, K]``: sparse_reconstruct on G's rows (G = Gᵀ)."""
    if u.shape[1] == 0:
        return c.clone()
    if G.dtype == torch.float64:  # sparse_reconstruct accumulates in fp32; keep fp64 exact (tests, CPU)
        dense = torch.zeros_like(c).scatter_add_(1, widx.clamp_min(0), torch.where(widx >= 0, u, 0))
        return c - dense @ G
    # the Triton kernel itself, not the public op: the op layer imports this module (no import cycle)
    return c - sparse_reconstruct_forward(widx.contiguous(), u.to(G.dtype).contiguous(), G.contiguous(), None)


def _outer_gap(c, q, widx, u, y2, lam, positive):
    """float64 duality gap per vector from the exact ``q`` of every concept."""
    ok = widx >= 0
    safe = widx.clamp_min(0)
    u64 = torch.where(ok, u, 0).double()
    cu = (c.gather(1, safe).double() * u64).sum(1)
    uq = (q.gather(1, safe).double() * u64).sum(1)
    l1 = u64.abs().sum(1)
    qmax = (q.amax(1).clamp_min(0) if positive else q.abs().amax(1)).double()
    lam64, y264 = lam.double(), y2.double()
    r2 = (y264 - cu - uq).clamp_min(0)
    s = torch.where(qmax > lam64, lam64 / qmax.clamp_min(1e-300), torch.ones_like(qmax))
    primal = 0.5 * r2 + lam64 * l1
    return (primal - (s * (y264 - cu) - 0.5 * s * s * r2)).clamp_min(0)


def _grow(widx, u, q, lam, positive, zero_atom, todo):
    """Append each unfinished vector's largest KKT violators to its working set (compact, −1 padded)."""
    N, K = q.shape
    score = (q if positive else q.abs()) - lam[:, None]
    score = score.masked_fill(zero_atom[None, :], float("-inf"))
    ok = widx >= 0
    # padding slots point at a spare column K, so they cannot clear a real member's flag
    in_ws = torch.zeros(N, K + 1, dtype=torch.bool, device=q.device)
    in_ws.scatter_(1, torch.where(ok, widx, K), True)
    in_ws = in_ws[:, :K]
    score = score.masked_fill(in_ws | ~todo[:, None], float("-inf"))
    n_in = ok.sum(1)
    want = torch.clamp(n_in, min=MIN_GROW)
    kmax = int(min(K, int(want.max())))
    top, cand = torch.topk(score, kmax, dim=1)
    rank = torch.arange(kmax, device=q.device)[None, :]
    take = (top > 0) & (rank < want[:, None])
    n_new = take.sum(1)
    need = int((n_in + n_new).max())
    cap = widx.shape[1]
    if need > cap:
        grow = max(need, 2 * cap) - cap
        widx = torch.nn.functional.pad(widx, (0, grow), value=-1)
        u = torch.nn.functional.pad(u, (0, grow), value=0.0)
    # new atoms go to slots n_in, n_in + 1, … (take is a prefix of the sorted candidates); the others
    # are written to a spare column that is dropped
    width = widx.shape[1]
    slot = torch.where(take, n_in[:, None] + rank, torch.full_like(rank, width))
    spare = torch.nn.functional.pad(widx, (0, 1), value=-1)
    widx = spare.scatter(1, slot, torch.where(take, cand, -1))[:, :width].contiguous()
    return widx, u, n_new


def lasso_working_set(c: torch.Tensor, G: torch.Tensor, y2: torch.Tensor, lam: torch.Tensor, positive: bool,
                      max_iter: int, tol: float):
    """Batched working-set Lasso (module docstring).

    Args:
        c: ``[N, K]`` correlations ``V y``; G: ``[K, K]`` Gram matrix; y2: ``[N]`` ``‖y‖²``;
        lam: ``[N]`` absolute λ; positive: ``u ≥ 0``; max_iter: CD sweeps at most; tol: relative gap.

    Returns:
        ``(idx [N, s], val [N, s], gap [N] float64→c.dtype, sweeps [N] int64)``.
    """
    N, K = c.shape
    dev = c.device
    widx = torch.full((N, 0), -1, dtype=torch.int64, device=dev)
    u = torch.zeros(N, 0, dtype=c.dtype, device=dev)
    sweeps = torch.zeros(N, dtype=torch.int64, device=dev)
    zero_atom = torch.diagonal(G) <= 0
    q = c
    tol_abs = tol * y2.double()
    while True:
        gap = _outer_gap(c, q, widx, u, y2, lam, positive)
        todo = (gap > tol_abs) & (sweeps < max_iter)
        if not bool(todo.any()):
            break
        widx, u, n_new = _grow(widx, u, q, lam, positive, zero_atom, todo)
        target = torch.where(n_new > 0, torch.maximum(0.25 * gap, 0.5 * tol_abs), 0.5 * tol_abs)
        target = torch.where(todo, target, torch.full_like(target, float("inf")))
        cap = widx.shape[1]
        budget = int(min(INNER_SWEEPS, max_iter - int(sweeps[todo].min())))
        _cd_kernel[(N,)](widx, u, q.contiguous(), c, G, y2, lam, target.to(torch.float64), sweeps,
                         K, cap, max(budget, 1), POSITIVE=bool(positive),
                         BLOCK_W=max(16, triton.next_power_of_2(cap)))
        q = _residual_corr(c, G, widx, u)
    dense = torch.zeros_like(c).scatter_add_(1, widx.clamp_min(0), torch.where(widx >= 0, u, 0))
    idx, val = dense_to_padded(dense)
    return idx, val, gap.to(c.dtype), sweeps


def omp_batched(c: torch.Tensor, G: torch.Tensor, n_nonzero: int):
    """Batched OMP (``omp_gram_ref``'s rules) with sparse residual correlations. Returns ``(idx, val, steps)``."""
    u, steps = omp_gram_ref(c, G, n_nonzero, residual_corr=lambda sup, w: _residual_corr(c, G, sup, w))
    idx, val = dense_to_padded(u)
    return idx, val, steps
