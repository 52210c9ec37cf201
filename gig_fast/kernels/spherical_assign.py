"""Triton kernels of ``spherical_assign`` (formula in ``csrc/spherical_assign/spherical_assign.h``).

``labels[n] = argmax_k cos(X[n], centroids[k])`` (ties → smaller k), never materialising ``N×K``.

Two passes:

1. ``_top2_kernel`` — a program per block of ``BLOCK_N`` rows walks the centroids in tiles of
   ``BLOCK_K``; each tile's scores come from ``tl.dot`` over ``C`` in chunks of ``BLOCK_C`` and are
   scaled by the inverse norms of the rows and centroids. Each row keeps a running top-2
   ``(best1, idx1, best2, idx2)``. For fp32/fp16/bf16 inputs the tiles are fed to the tensor cores
   in bf16 (``LOW_PRECISION``), the scores therefore carry an error of order 1e-3·|cos|.
2. ``_rescore_kernel`` — the two candidates of every row are re-scored exactly in fp32 (fp64 for
   fp64 input) and the larger wins (ties → smaller k). A label is then wrong only when the true best
   centroid is not among the low-precision top-2, which needs two bf16 errors larger than the gap to
   the third candidate: on random unit vectors labels agree with a float64 argmax far above 99.99%.
   fp64 inputs are scored in exact-fp32 ``tl.dot`` (no bf16) and re-scored in fp64.

Under ``TRITON_INTERPRET=1`` (CPU tests) the bf16 products are emulated as bf16-rounded operands
multiplied in fp32 — the same numbers the tensor cores produce — because the interpreter's bf16
``tl.dot`` returns garbage in Triton 3.8.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..ops.common import accumulation_dtype, scale_extreme_rows


@triton.jit
def _top2_kernel(X_ptr, C_ptr, xinv_ptr, cinv_ptr, i1_ptr, i2_ptr, N, K, C,
                 LOW_PRECISION: tl.constexpr, EMULATE_BF16: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 BLOCK_C: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    rows64 = rows.to(tl.int64)
    xinv = tl.load(xinv_ptr + rows, mask=row_ok, other=0.0)
    neg_inf = float("-inf")
    b1 = tl.full((BLOCK_N,), neg_inf, tl.float32)
    b2 = tl.full((BLOCK_N,), neg_inf, tl.float32)
    i1 = tl.zeros((BLOCK_N,), tl.int32)
    i2 = tl.zeros((BLOCK_N,), tl.int32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < K
        acc = tl.zeros((BLOCK_N, BLOCK_K), tl.float32)
        for c0 in range(0, C, BLOCK_C):
            cs = c0 + tl.arange(0, BLOCK_C)
            c_ok = cs < C
            x = tl.load(X_ptr + rows64[:, None] * C + cs[None, :], mask=row_ok[:, None] & c_ok[None, :], other=0.0)
            cT = tl.load(C_ptr + ks.to(tl.int64)[None, :] * C + cs[:, None], mask=k_ok[None, :] & c_ok[:, None],
                         other=0.0)
            if LOW_PRECISION and EMULATE_BF16:  # same products, exact in fp32 (interpreter's bf16 dot is broken)
                acc += tl.dot(x.to(tl.bfloat16).to(tl.float32), cT.to(tl.bfloat16).to(tl.float32),
                              input_precision="ieee")
            elif LOW_PRECISION:
                acc += tl.dot(x.to(tl.bfloat16), cT.to(tl.bfloat16))
            else:
                acc += tl.dot(x.to(tl.float32), cT.to(tl.float32), input_precision="ieee")
        cinv = tl.load(cinv_ptr + ks, mask=k_ok, other=0.0)
        s = acc * xinv[:, None] * cinv[None, :]
        s = tl.where(k_ok[None, :], s, neg_inf)
        # tile top-2: the max (first index on ties), then the max of the rest
        t1 = tl.max(s, axis=1)
        j1 = tl.argmax(s, axis=1, tie_break_left=True)
        rest = tl.where(tl.arange(0, BLOCK_K)[None, :] == j1[:, None], neg_inf, s)
        t2 = tl.max(rest, axis=1)
        j2 = tl.argmax(rest, axis=1, tie_break_left=True)
        j1 = j1 + k0
        j2 = j2 + k0
        # merge with the running top-2; earlier tiles hold smaller k, so they win ties (strict >)
        new_top = t1 > b1
        keep_old1 = b1 >= t2  # second when the tile wins: the old best or the tile's second
        sec_a = tl.where(keep_old1, b1, t2)
        sec_ai = tl.where(keep_old1, i1, j2)
        keep_old2 = b2 >= t1  # second when the old best stays: the old second or the tile's best
        sec_b = tl.where(keep_old2, b2, t1)
        sec_bi = tl.where(keep_old2, i2, j1)
        b2 = tl.where(new_top, sec_a, sec_b)
        i2 = tl.where(new_top, sec_ai, sec_bi)
        b1 = tl.where(new_top, t1, b1)
        i1 = tl.where(new_top, j1, i1)
    i2 = tl.where(b2 == neg_inf, i1, i2)  # K == 1: the only candidate twice
    tl.store(i1_ptr + rows, i1.to(tl.int64), mask=row_ok)
    tl.store(i2_ptr + rows, i2.to(tl.int64), mask=row_ok)


@triton.jit
def _rescore_kernel(X_ptr, C_ptr, xinv_ptr, cinv_ptr, i1_ptr, i2_ptr, labels_ptr, best_ptr, N, C,
                    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    rows64 = rows.to(tl.int64)
    k1 = tl.load(i1_ptr + rows, mask=row_ok, other=0)
    k2 = tl.load(i2_ptr + rows, mask=row_ok, other=0)
    acc_ty = best_ptr.dtype.element_ty
    d1 = tl.zeros((BLOCK_N,), acc_ty)
    d2 = tl.zeros((BLOCK_N,), acc_ty)
    for c0 in range(0, C, BLOCK_C):
        cs = c0 + tl.arange(0, BLOCK_C)
        m = row_ok[:, None] & (cs < C)[None, :]
        x = tl.load(X_ptr + rows64[:, None] * C + cs[None, :], mask=m, other=0.0).to(acc_ty)
        c1 = tl.load(C_ptr + k1[:, None] * C + cs[None, :], mask=m, other=0.0).to(acc_ty)
        c2 = tl.load(C_ptr + k2[:, None] * C + cs[None, :], mask=m, other=0.0).to(acc_ty)
        d1 += tl.sum(x * c1, axis=1)
        d2 += tl.sum(x * c2, axis=1)
    xinv = tl.load(xinv_ptr + rows, mask=row_ok, other=0.0).to(acc_ty)
    s1 = d1 * xinv * tl.load(cinv_ptr + k1, mask=row_ok, other=0.0).to(acc_ty)
    s2 = d2 * xinv * tl.load(cinv_ptr + k2, mask=row_ok, other=0.0).to(acc_ty)
    take2 = (s2 > s1) | ((s2 == s1) & (k2 < k1))
    tl.store(labels_ptr + rows, tl.where(take2, k2, k1), mask=row_ok)
    tl.store(best_ptr + rows, tl.where(take2, s2, s1), mask=row_ok)


def _inverse_norms(t: torch.Tensor, acc: torch.dtype) -> torch.Tensor:
    """``1 / max(|row|, 1e-12)`` per row, as the reference normalises (zero rows stay zero)."""
    if t.dtype == torch.float64:
        return (1.0 / torch.linalg.vector_norm(t, dim=1).clamp_min(1e-12)).to(acc)
    return 1.0 / torch.linalg.vector_norm(t, dim=1, dtype=acc).clamp_min(1e-12)


def spherical_assign(X: torch.Tensor, centroids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """X ``[N, C]``, centroids ``[K, C]`` (contiguous, same dtype) → ``(labels int64 [N], best [N])``."""
    N, C = X.shape
    K = centroids.shape[0]
    acc = accumulation_dtype(X.dtype)
    labels = torch.empty(N, dtype=torch.int64, device=X.device)
    best = torch.empty(N, dtype=acc, device=X.device)
    if N == 0:
        return labels, best
    # scale-free as every backend: rows of extreme scale (≳ 1e9 or ≲ 1e-9, denormals included) are
    # first scaled by a power of two (exact), else their norms or bf16 products overflow or underflow
    X, centroids = scale_extreme_rows(X), scale_extreme_rows(centroids)
    xinv = _inverse_norms(X, torch.float32)
    cinv = _inverse_norms(centroids, torch.float32)
    i1 = torch.empty(N, dtype=torch.int64, device=X.device)
    i2 = torch.empty_like(i1)
    low = X.dtype != torch.float64
    on_gpu = X.device.type == "cuda"
    Xs, Cs = X, centroids
    if on_gpu:
        # The top-2 pass reads its operands once per tile of the other side: convert them once to the
        # dtype the tensor cores consume (bf16; fp32 for fp64 input), halving the bytes and the shared
        # memory per pipeline stage. The re-score below still reads the original X and centroids.
        op_dtype = torch.bfloat16 if low else torch.float32
        Xs, Cs = X.to(op_dtype), centroids.to(op_dtype)
        BLOCK_N, BLOCK_K, BLOCK_C = 128, 128, (64 if low else 32)
        launch = {"num_warps": 8, "num_stages": 3}
    else:
        BLOCK_N, BLOCK_K, BLOCK_C = 16, 16, 16
        launch = {}
    _top2_kernel[(triton.cdiv(N, BLOCK_N),)](
        Xs, Cs, xinv, cinv, i1, i2, N, K, C, LOW_PRECISION=low, EMULATE_BF16=not on_gpu,
        BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, BLOCK_C=BLOCK_C, **launch)
    xinv_acc = xinv if acc == torch.float32 else _inverse_norms(X, acc)
    cinv_acc = cinv if acc == torch.float32 else _inverse_norms(centroids, acc)
    RB, RC = (32, 128) if on_gpu else (16, 16)
    _rescore_kernel[(triton.cdiv(N, RB),)](X, centroids, xinv_acc, cinv_acc, i1, i2, labels, best, N, C,
                                           BLOCK_N=RB, BLOCK_C=RC)
    return labels, best
