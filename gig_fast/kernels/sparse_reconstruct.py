"""Triton kernels of ``sparse_reconstruct`` (formulas in ``csrc/sparse_reconstruct/sparse_reconstruct.h``).

forward:  a program per (block of rows, block of channels); the s codes of the rows are walked one
          column at a time and the concept rows gathered from V, accumulating in float32.
grad_val: a program per (block of rows, block of code columns); dot products over C in chunks.
grad_V:   entries stably sorted by concept (torch.sort), then a program per (concept, channel block)
          sums its segment in sorted order: deterministic, no atomics.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

# On a GPU the forward kernel is tuned per (C, s) among a few tile shapes; the interpreter (tests on
# the CPU) uses the first one only.
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
_FORWARD_CONFIGS = [
    triton.Config({"BLOCK_P": 16, "BLOCK_C": 256}, num_warps=4),
    triton.Config({"BLOCK_P": 8, "BLOCK_C": 512}, num_warps=8),
    triton.Config({"BLOCK_P": 4, "BLOCK_C": 1024}, num_warps=8),
    triton.Config({"BLOCK_P": 32, "BLOCK_C": 128}, num_warps=4),
    triton.Config({"BLOCK_P": 16, "BLOCK_C": 512}, num_warps=8),
]


def _tuned(configs, key):
    """``triton.autotune`` on a GPU; the first config alone under the interpreter."""
    return triton.autotune(configs=configs[:1] if _INTERPRET else configs, key=key)


@_tuned(_FORWARD_CONFIGS, key=["C", "s"])
@triton.jit
def _forward_kernel(idx_ptr, val_ptr, V_ptr, bias_ptr, out_ptr, P, s, C,
                    HAS_BIAS: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    pid_p = tl.program_id(0)
    pid_c = tl.program_id(1)
    rows = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    row_ok = rows < P
    col_ok = cols < C
    if HAS_BIAS:
        b = tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
        acc = tl.zeros((BLOCK_P, BLOCK_C), dtype=tl.float32) + b[None, :]
    else:
        acc = tl.zeros((BLOCK_P, BLOCK_C), dtype=tl.float32)
    for j in range(0, s):
        k = tl.load(idx_ptr + rows.to(tl.int64) * s + j, mask=row_ok, other=-1)
        w = tl.load(val_ptr + rows.to(tl.int64) * s + j, mask=row_ok, other=0.0).to(tl.float32)
        active = k >= 0
        w = tl.where(active, w, 0.0)
        k_safe = tl.where(active, k, 0)
        v = tl.load(V_ptr + k_safe[:, None] * C + cols[None, :],
                    mask=active[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
        acc += w[:, None] * v
    out_offs = rows.to(tl.int64)[:, None] * C + cols[None, :]
    tl.store(out_ptr + out_offs, acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _grad_val_kernel(grad_ptr, idx_ptr, V_ptr, grad_val_ptr, P, s, C,
                     BLOCK_P: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr):
    pid_p = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    js = pid_s * BLOCK_S + tl.arange(0, BLOCK_S)
    ok = (rows < P)[:, None] & (js < s)[None, :]
    code_offs = rows.to(tl.int64)[:, None] * s + js[None, :]
    k = tl.load(idx_ptr + code_offs, mask=ok, other=-1)
    active = k >= 0
    k_safe = tl.where(active, k, 0)
    acc = tl.zeros((BLOCK_P, BLOCK_S), dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        col_ok = cols < C
        g = tl.load(grad_ptr + rows.to(tl.int64)[:, None] * C + cols[None, :],
                    mask=(rows < P)[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
        v = tl.load(V_ptr + k_safe[:, :, None] * C + cols[None, None, :],
                    mask=active[:, :, None] & col_ok[None, None, :], other=0.0).to(tl.float32)
        acc += tl.sum(v * g[:, None, :], axis=2)
    tl.store(grad_val_ptr + code_offs, acc.to(grad_val_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _grad_V_kernel(grad_ptr, val_ptr, order_ptr, start_ptr, grad_V_ptr, s, C, BLOCK_C: tl.constexpr):
    k = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_ok = cols < C
    lo = tl.load(start_ptr + k)
    hi = tl.load(start_ptr + k + 1)
    acc = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for i in range(lo, hi):
        e = tl.load(order_ptr + i)
        w = tl.load(val_ptr + e).to(tl.float32)
        g = tl.load(grad_ptr + (e // s) * C + cols, mask=col_ok, other=0.0).to(tl.float32)
        acc += w * g
    tl.store(grad_V_ptr + k.to(tl.int64) * C + cols, acc.to(grad_V_ptr.dtype.element_ty), mask=col_ok)


def _block_c(C: int) -> int:
    return min(256, triton.next_power_of_2(max(C, 16)))


def sparse_reconstruct_forward(idx: torch.Tensor, val: torch.Tensor, V: torch.Tensor,
                               bias: torch.Tensor | None) -> torch.Tensor:
    """idx/val ``[P, s]``, V ``[K, C]``, bias ``[C]`` or None → ``[P, C]`` in V's dtype."""
    P, s = idx.shape
    C = V.shape[1]
    out = torch.empty(P, C, dtype=V.dtype, device=V.device)
    if P == 0 or C == 0:
        return out
    grid = lambda meta: (triton.cdiv(P, meta["BLOCK_P"]), triton.cdiv(C, meta["BLOCK_C"]))  # noqa: E731
    _forward_kernel[grid](idx, val, V, bias if bias is not None else V, out, P, s, C, HAS_BIAS=bias is not None)
    return out


def sorted_segments(idx: torch.Tensor, K: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Entries of ``idx [P, s]`` stably sorted by concept.

    Returns ``(order [E], start [K+1])``: the flat entries of concept k are ``order[start[k]:start[k+1]]``
    in increasing (p, j) order; padding (−1) sorts before ``start[0]`` and is never visited.
    """
    keys, order = torch.sort(idx.reshape(-1), stable=True)
    start = torch.searchsorted(keys, torch.arange(K + 1, device=idx.device, dtype=keys.dtype))
    return order, start


def sparse_reconstruct_backward(grad_out: torch.Tensor, idx: torch.Tensor, val: torch.Tensor, V: torch.Tensor,
                                need_val: bool, need_V: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """→ ``(grad_val [P, s], grad_V [K, C])``; an unneeded gradient is returned as zeros."""
    P, s = idx.shape
    K, C = V.shape
    grad = grad_out.to(V.dtype).contiguous()
    grad_val = torch.zeros_like(val)
    grad_V = torch.zeros_like(V)
    if P == 0 or s == 0 or C == 0:
        return grad_val, grad_V
    if need_val:
        BLOCK_P, BLOCK_S, BLOCK_C = 16, min(16, triton.next_power_of_2(s)), 64
        grid = (triton.cdiv(P, BLOCK_P), triton.cdiv(s, BLOCK_S))
        _grad_val_kernel[grid](grad, idx, V, grad_val, P, s, C, BLOCK_P=BLOCK_P, BLOCK_S=BLOCK_S, BLOCK_C=BLOCK_C)
    if need_V and K > 0:
        order, start = sorted_segments(idx, K)
        BLOCK_C = _block_c(C)
        _grad_V_kernel[(K, triton.cdiv(C, BLOCK_C))](grad, val, order, start, grad_V, s, C, BLOCK_C=BLOCK_C)
    return grad_val, grad_V
