"""Triton kernel of ``gig_accumulate`` (formula in ``csrc/gig_accumulate/gig_accumulate.h``).

``attr[t, p, j] = val[p, j]·⟨Σ_k weights[k]·grads[t, k, p, :], V[idx[p, j], :]⟩`` (0 at padding).

A program per (block of positions, block of code columns, target t): channels are walked in chunks;
per chunk the weighted α-sum of the gradient rows is formed in registers (the only large read, once per
program) and dotted with the gathered active concept rows. Accumulation in float32 (float64 for float64
gradients). When ``s`` exceeds one column block the α-sum is recomputed per column block — rare, since
``s`` is the active count of a sparse code (tens).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..ops.common import accumulation_dtype


@triton.jit
def _gig_accumulate_kernel(grads_ptr, w_ptr, idx_ptr, val_ptr, V_ptr, out_ptr, m, P, s, C,
                           IS_FP64: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_S: tl.constexpr,
                           BLOCK_C: tl.constexpr):
    pid_p = tl.program_id(0)
    pid_s = tl.program_id(1)
    t = tl.program_id(2).to(tl.int64)
    acc_ty = tl.float64 if IS_FP64 else tl.float32
    rows = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    js = pid_s * BLOCK_S + tl.arange(0, BLOCK_S)
    row_ok = rows < P
    ok = row_ok[:, None] & (js < s)[None, :]
    code_offs = rows.to(tl.int64)[:, None] * s + js[None, :]
    k_idx = tl.load(idx_ptr + code_offs, mask=ok, other=-1)
    active = k_idx >= 0
    k_safe = tl.where(active, k_idx, 0)
    acc = tl.zeros((BLOCK_P, BLOCK_S), dtype=acc_ty)
    for c0 in range(0, C, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        col_ok = cols < C
        g = tl.zeros((BLOCK_P, BLOCK_C), dtype=acc_ty)
        for k in range(0, m):
            wk = tl.load(w_ptr + k).to(acc_ty)
            base = ((t * m + k) * P + rows.to(tl.int64)) * C
            x = tl.load(grads_ptr + base[:, None] + cols[None, :], mask=row_ok[:, None] & col_ok[None, :],
                        other=0.0).to(acc_ty)
            g += wk * x
        v = tl.load(V_ptr + k_safe[:, :, None] * C + cols[None, None, :],
                    mask=active[:, :, None] & col_ok[None, None, :], other=0.0).to(acc_ty)
        acc += tl.sum(v * g[:, None, :], axis=2)
    u = tl.load(val_ptr + code_offs, mask=ok & active, other=0.0).to(acc_ty)
    out_offs = t * P * s + code_offs
    tl.store(out_ptr + out_offs, tl.where(active, acc * u, 0.0).to(out_ptr.dtype.element_ty), mask=ok)


def gig_accumulate(grads: torch.Tensor, weights: torch.Tensor, idx: torch.Tensor, val: torch.Tensor,
                   V: torch.Tensor) -> torch.Tensor:
    """grads ``[T, m, P, C]``, weights ``[m]``, idx/val ``[P, s]``, V ``[K, C]`` → ``[T, P, s]``
    (float32; float64 for float64 grads)."""
    T, m, P, C = grads.shape
    s = idx.shape[1]
    acc = accumulation_dtype(grads.dtype)
    out = torch.empty(T, P, s, dtype=acc, device=grads.device)
    if out.numel() == 0:
        return out
    grads = grads.contiguous()
    w = weights.to(acc).contiguous()
    val = val.to(acc).contiguous()
    V = V.to(acc).contiguous()
    BLOCK_S = min(32, triton.next_power_of_2(max(s, 1)))
    BLOCK_P = 16
    BLOCK_C = max(16, min(64, triton.next_power_of_2(C)) // max(1, BLOCK_S // 8))
    grid = (triton.cdiv(P, BLOCK_P), triton.cdiv(s, BLOCK_S), T)
    _gig_accumulate_kernel[grid](grads, w, idx.contiguous(), val, V, out, m, P, s, C,
                                 IS_FP64=acc == torch.float64, BLOCK_P=BLOCK_P, BLOCK_S=BLOCK_S, BLOCK_C=BLOCK_C)
    return out
