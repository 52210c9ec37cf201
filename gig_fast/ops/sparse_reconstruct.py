"""``sparse_reconstruct``: the active-concept 1×1 conv, ``X̃[p] = bias + Σ_j val[p,j]·V[idx[p,j]]``.

GIG rebuilds the source layer from its concept codes at every α-point, and validation does it once per
removed or inserted concept, so this op runs millions of times with ~99.5% of each code row zero.
Backends: ``torch`` (reference), ``cpp``, ``triton``, ``cuda``; all accumulate in float32.

Autograd: ``grad_val`` is the sampled dense-dense product ⟨dX̃[p], V[idx[p,j]]⟩ at the active entries;
``grad_V`` is a segment sum over the entries sorted by concept (no float atomics in the compiled
backends, so two runs give bit-identical gradients); ``grad_bias = Σ_p dX̃[p]``.
"""
from __future__ import annotations

from typing import Optional

import torch

from . import checks as v
from .registry import OpSpec, register, resolve
from .reference import sparse_reconstruct_backward_ref, sparse_reconstruct_ref

__all__ = ["sparse_reconstruct"]

IMPLEMENTED = ("torch", "cpp", "triton", "cuda")
PREFERENCE = {"cpu": ("cpp", "torch"), "cuda": ("cuda", "triton", "torch")}


def _forward(backend: str):
    if backend == "cpp":
        return torch.ops.gig_fast_cpp.sparse_reconstruct_forward
    if backend == "cuda":
        return torch.ops.gig_fast_cuda.sparse_reconstruct_forward
    if backend == "triton":
        from gig_fast.kernels import sparse_reconstruct as tk
        return tk.sparse_reconstruct_forward
    return sparse_reconstruct_ref


def _backward(backend: str):
    """``(grad_out, idx, val, V, need_val, need_V) -> (grad_val, grad_V)``; unneeded ones may be empty."""
    if backend == "cpp":
        return torch.ops.gig_fast_cpp.sparse_reconstruct_backward
    if backend == "cuda":
        return torch.ops.gig_fast_cuda.sparse_reconstruct_backward
    if backend == "triton":
        from gig_fast.kernels import sparse_reconstruct as tk
        return tk.sparse_reconstruct_backward
    return lambda g, idx, val, V, need_val, need_V: sparse_reconstruct_backward_ref(g, idx, val, V)


@torch.library.custom_op("gig_fast::sparse_reconstruct", mutates_args=())
def _sparse_reconstruct_op(idx: torch.Tensor, val: torch.Tensor, V: torch.Tensor,
                           bias: Optional[torch.Tensor], backend: str) -> torch.Tensor:
    if idx.shape[1] == 0:  # no active entry anywhere: every row is the bias
        return sparse_reconstruct_ref(idx, val, V, bias)
    return _forward(backend)(idx, val, V, bias)


@_sparse_reconstruct_op.register_fake
def _(idx, val, V, bias, backend):
    return V.new_empty(idx.shape[0], V.shape[1])


@torch.library.custom_op("gig_fast::sparse_reconstruct_backward", mutates_args=())
def _sparse_reconstruct_backward_op(grad_out: torch.Tensor, idx: torch.Tensor, val: torch.Tensor,
                                    V: torch.Tensor, backend: str, need_val: bool, need_V: bool
                                    ) -> tuple[torch.Tensor, torch.Tensor]:
    if idx.shape[1] == 0:
        return torch.zeros_like(val), torch.zeros_like(V)
    grad_val, grad_V = _backward(backend)(grad_out.contiguous(), idx, val, V, need_val, need_V)
    # custom ops may not return aliases of inputs nor None: always hand back fresh tensors
    return (grad_val if need_val else torch.zeros_like(val)), (grad_V if need_V else torch.zeros_like(V))


@_sparse_reconstruct_backward_op.register_fake
def _(grad_out, idx, val, V, backend, need_val, need_V):
    return torch.empty_like(val), torch.empty_like(V)


def _setup_context(ctx, inputs, output):
    idx, val, V, bias, backend = inputs
    ctx.save_for_backward(idx, val, V)
    ctx.backend = backend
    ctx.bias_dtype = None if bias is None else bias.dtype


def _backward_fn(ctx, grad_out):
    idx, val, V = ctx.saved_tensors
    need_val, need_V, need_bias = ctx.needs_input_grad[1], ctx.needs_input_grad[2], ctx.needs_input_grad[3]
    grad_val = grad_V = grad_bias = None
    if need_val or need_V:
        gv, gV = _sparse_reconstruct_backward_op(grad_out, idx, val, V, ctx.backend, need_val, need_V)
        grad_val = gv if need_val else None
        grad_V = gV if need_V else None
    if need_bias:
        grad_bias = grad_out.sum(0, dtype=torch.float32 if grad_out.dtype != torch.float64 else None)
        grad_bias = grad_bias.to(ctx.bias_dtype)
    return None, grad_val, grad_V, grad_bias, None


_sparse_reconstruct_op.register_autograd(_backward_fn, setup_context=_setup_context)


def _bare_forward(backend: str):
    """The forward of ``backend``, looked up when called (the extensions load lazily)."""
    return lambda idx, val, V, bias: _forward(backend)(idx, val, V, bias)


# The bare kernels are the forwards (``(idx [P, s], val [P, s], V [K, C], bias [C] or None) -> [P, C]``);
# the backward op is ``torch.ops.gig_fast.sparse_reconstruct_backward``.
SPEC = register(OpSpec("sparse_reconstruct", IMPLEMENTED, PREFERENCE, {b: _bare_forward(b) for b in IMPLEMENTED},
                       _sparse_reconstruct_op))


def sparse_reconstruct(idx: torch.Tensor, val: torch.Tensor, V: torch.Tensor,
                       bias: torch.Tensor | None = None, *, backend: str | None = None) -> torch.Tensor:
    """Rebuild dense vectors from padded sparse concept codes.

    Args:
        idx: ``[..., s]`` int64 concept indices, −1 = padding.
        val: ``[..., s]`` coefficients (float32, float16, bfloat16 or float64), 0 at padding.
        V: ``[K, C]`` concept vectors (rows), same dtype as ``val``.
        bias: ``[C]`` added to every row (the BN shift β), same dtype, or None.
        backend: force one backend for this call (default: the fastest for the device).

    Returns:
        ``[..., C]`` in V's dtype; a row whose entries are all padding equals ``bias`` (or 0), also
        when K = 0. Padding never reads V.

    Raises:
        ValueError: bad shapes, dtypes or indices, or a NaN/Inf in ``val``, ``V`` or ``bias``.
    """
    v.check_tensor("V", V, 2, v.FLOAT_DTYPES)
    if not isinstance(idx, torch.Tensor) or not isinstance(val, torch.Tensor) or idx.dim() < 1:
        raise ValueError("idx and val must be tensors of shape [..., s]")
    lead = idx.shape[:-1]
    idx2 = v.flatten_leading(idx, 1) if idx.dim() > 1 else idx.reshape(1, -1)
    val2 = v.flatten_leading(val, 1) if val.dim() > 1 else val.reshape(1, -1)
    v.check_tensor("idx", idx2, 2, (torch.int64,), V.device)
    v.check_tensor("val", val2, 2, v.FLOAT_DTYPES, V.device)
    if bias is not None:
        v.check_tensor("bias", bias, 1, None, V.device)
        if bias.shape[0] != V.shape[1]:
            raise ValueError(f"bias has {bias.shape[0]} entries but V has C={V.shape[1]} channels")
    v.check_same_dtype(V=V, val=val2, bias=bias)
    name = resolve("sparse_reconstruct", IMPLEMENTED, PREFERENCE, V.device, backend)
    # Finiteness of val, V and bias on every backend, with the index range in the same host sync; the C++
    # forward checks the index range in its own pass over idx (a ValueError naming the index): the
    # min/max scan cost more than the forward on a loaded 2-core CPU.
    v.check_codes(idx2, val2, V.shape[0], V.device, index_range=name != "cpp", V=V, bias=bias)
    out = _sparse_reconstruct_op(idx2.contiguous(), val2.contiguous(), V.contiguous(),
                                 None if bias is None else bias.contiguous(), name)
    return out.reshape(tuple(lead) + (V.shape[1],))
