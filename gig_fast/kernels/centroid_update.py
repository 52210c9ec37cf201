"""Triton kernels of ``centroid_update`` (formula in ``csrc/centroid_update/centroid_update.h``).

``sums[k] = Σ_{n: labels[n]=k} X[n]``, ``counts[k] = #{n: labels[n]=k}``; deterministic (no atomics):

* few clusters (K ≤ 64, e.g. the 2-means splits): a program per (chunk of ``CHUNK_ROWS`` rows, block
  of channels) multiplies the one-hot label matrix of its rows with their features
  (``onehotᵀ [K_PAD, R] @ X [R, BLOCK_C]`` in exact fp32 ``tl.dot``), rows in order; the per-chunk
  partials ``[chunks, K, C]`` are then summed in chunk order. Every SM works even when all points fall
  in two clusters.
* many clusters: rows stably sorted by label, then a program per (cluster, block of channels) sums its
  segment in sorted order.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..ops.common import accumulation_dtype

_SMALL_K = 64


@triton.jit
def _chunk_partials_kernel(X_ptr, labels_ptr, part_ptr, N, C, K,
                           CHUNK_ROWS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
                           K_PAD: tl.constexpr):
    chunk = tl.program_id(0)
    cs = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = cs < C
    ks = tl.arange(0, K_PAD)
    acc = tl.zeros((K_PAD, BLOCK_C), tl.float32)
    for r0 in range(0, CHUNK_ROWS, BLOCK_R):
        rows = chunk * CHUNK_ROWS + r0 + tl.arange(0, BLOCK_R)
        r_ok = rows < N
        lab = tl.load(labels_ptr + rows, mask=r_ok, other=-1)
        onehot_t = (ks[:, None] == lab[None, :]).to(tl.float32)  # [K_PAD, BLOCK_R]
        x = tl.load(X_ptr + rows.to(tl.int64)[:, None] * C + cs[None, :], mask=r_ok[:, None] & c_ok[None, :],
                    other=0.0).to(tl.float32)
        acc += tl.dot(onehot_t, x, input_precision="ieee")
    out = part_ptr + chunk.to(tl.int64) * K * C + ks[:, None] * C + cs[None, :]
    tl.store(out, acc, mask=(ks < K)[:, None] & c_ok[None, :])


@triton.jit
def _segment_sum_kernel(X_ptr, order_ptr, start_ptr, sums_ptr, C, BLOCK_C: tl.constexpr):
    k = tl.program_id(0)
    cs = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = cs < C
    lo = tl.load(start_ptr + k)
    hi = tl.load(start_ptr + k + 1)
    acc = tl.zeros((BLOCK_C,), sums_ptr.dtype.element_ty)
    for i in range(lo, hi):
        n = tl.load(order_ptr + i)
        acc += tl.load(X_ptr + n * C + cs, mask=c_ok, other=0.0).to(sums_ptr.dtype.element_ty)
    tl.store(sums_ptr + k.to(tl.int64) * C + cs, acc, mask=c_ok)


def centroid_update(X: torch.Tensor, labels: torch.Tensor, K: int) -> tuple[torch.Tensor, torch.Tensor]:
    """X ``[N, C]``, labels int64 ``[N]`` in ``[0, K)`` → ``(sums [K, C] fp32 (fp64 for fp64), counts [K])``."""
    N, C = X.shape
    acc = accumulation_dtype(X.dtype)
    counts = torch.bincount(labels, minlength=K)
    sums = torch.zeros(K, C, dtype=acc, device=X.device)
    if N == 0 or C == 0:
        return sums, counts
    on_gpu = X.device.type == "cuda"
    BLOCK_C = min(128 if on_gpu else 32, triton.next_power_of_2(C))
    if K <= _SMALL_K and acc == torch.float32:
        CHUNK_ROWS, BLOCK_R = (1024, 64) if on_gpu else (64, 16)
        K_PAD = max(16, triton.next_power_of_2(K))
        chunks = triton.cdiv(N, CHUNK_ROWS)
        part = torch.empty(chunks, K, C, dtype=acc, device=X.device)
        _chunk_partials_kernel[(chunks, triton.cdiv(C, BLOCK_C))](
            X, labels, part, N, C, K, CHUNK_ROWS=CHUNK_ROWS, BLOCK_R=BLOCK_R, BLOCK_C=BLOCK_C, K_PAD=K_PAD)
        return part.sum(0), counts  # a fixed-shape reduction: same order every run
    # fp64, or many clusters: stable sort by label, one segment sum per (cluster, channel block)
    keys, order = torch.sort(labels, stable=True)
    start = torch.searchsorted(keys, torch.arange(K + 1, device=X.device, dtype=keys.dtype))
    _segment_sum_kernel[(K, triton.cdiv(C, BLOCK_C))](X, order, start, sums, C, BLOCK_C=BLOCK_C)
    return sums, counts
