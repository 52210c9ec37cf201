"""Pure-PyTorch references of the ops (the ``torch`` backend).

They run on any device and are the oracle of every test: short, obviously correct, accumulating in
float32 (float64 stays float64). They may use more memory than the kernels, never a different formula.
Shapes follow DESIGN.md §3: padded sparse codes are ``idx [P, s]`` (int64, −1 = padding) and
``val [P, s]`` (0 at padding); ``V [K, C]`` holds one concept per row.
"""
from __future__ import annotations

import torch

__all__ = [
    "accumulation_dtype",
    "sparse_reconstruct_ref",
    "sparse_reconstruct_backward_ref",
    "spherical_assign_ref",
    "centroid_update_ref",
    "gig_accumulate_ref",
    "segment_sum",
]


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; everything else accumulates in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def sparse_reconstruct_ref(idx: torch.Tensor, val: torch.Tensor, V: torch.Tensor,
                           bias: torch.Tensor | None = None) -> torch.Tensor:
    """``X̃[p] = bias + Σ_j val[p,j]·V[idx[p,j]]`` (padding ignored).

    Args: idx ``[P, s]``, val ``[P, s]``, V ``[K, C]``, bias ``[C]`` or None.
    Returns: ``[P, C]`` in V's dtype.
    """
    acc = accumulation_dtype(V.dtype)
    P, s = idx.shape
    out = torch.zeros(P, V.shape[1], dtype=acc, device=V.device)
    if bias is not None:
        out += bias.to(acc)
    active = idx >= 0
    weights = torch.where(active, val.to(acc), torch.zeros((), dtype=acc, device=val.device))
    safe = idx.clamp_min(0)
    Vacc = V.to(acc)
    for j in range(s):  # one column of codes at a time keeps the memory at [P, C]
        out += weights[:, j, None] * Vacc[safe[:, j]]
    return out.to(V.dtype)


def sparse_reconstruct_backward_ref(grad_out: torch.Tensor, idx: torch.Tensor, val: torch.Tensor,
                                    V: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of :func:`sparse_reconstruct_ref` w.r.t. ``val`` and ``V``.

    ``grad_val[p,j] = ⟨grad_out[p], V[idx[p,j]]⟩`` at active entries (0 at padding);
    ``grad_V[k] = Σ_{(p,j): idx[p,j]=k} val[p,j]·grad_out[p]``.
    Returns: ``(grad_val [P, s] in val's dtype, grad_V [K, C] in V's dtype)``.
    """
    acc = accumulation_dtype(V.dtype)
    active = idx >= 0
    g = grad_out.to(acc)
    safe = idx.clamp_min(0)
    Vacc = V.to(acc)
    grad_val = torch.zeros(idx.shape, dtype=acc, device=V.device)
    for j in range(idx.shape[1]):
        grad_val[:, j] = (g * Vacc[safe[:, j]]).sum(1)
    grad_val = torch.where(active, grad_val, torch.zeros((), dtype=acc, device=V.device))
    rows, cols = active.nonzero(as_tuple=True)
    contrib = val[rows, cols].to(acc)[:, None] * g[rows]
    grad_V = segment_sum(contrib, idx[rows, cols], V.shape[0])
    return grad_val.to(val.dtype), grad_V.to(V.dtype)


def segment_sum(values: torch.Tensor, keys: torch.Tensor, K: int) -> torch.Tensor:
    """``out[k] = Σ_{i: keys[i]=k} values[i]`` in a fixed order, so the result is bit-reproducible.

    Args: values ``[E, C]``, keys int64 ``[E]`` in ``[0, K)``. Returns ``[K, C]`` in values' dtype.
    On CUDA ``index_add_`` sums with float atomics (run-to-run differences); there the entries are
    stably sorted by key and reduced per segment instead.
    """
    out = torch.zeros(K, values.shape[1], dtype=values.dtype, device=values.device)
    if values.device.type != "cuda":
        return out.index_add_(0, keys, values)
    order = torch.argsort(keys, stable=True)
    counts = torch.bincount(keys, minlength=K)
    used = counts > 0
    if bool(used.any()):
        out[used] = torch.segment_reduce(values[order], "sum", lengths=counts[used], axis=0)
    return out


def _unit_rows(x: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Rows scaled to unit length; an all-zero row stays zero (its cosine with anything is 0)."""
    return x / x.norm(dim=1, keepdim=True).clamp_min(eps)


def spherical_assign_ref(X: torch.Tensor, centroids: torch.Tensor, chunk: int = 4096
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """``labels[n] = argmax_k cos(X[n], centroids[k])`` with ties to the smaller k.

    Args: X ``[N, C]``, centroids ``[K, C]``.
    Returns: ``(labels int64 [N], best cosine [N] float32, float64 for float64 input)``.
    The reference scores ``chunk`` rows at a time, so it never holds all of ``N×K`` either.
    """
    acc = accumulation_dtype(X.dtype)
    Cn = _unit_rows(centroids.to(acc))
    labels = torch.empty(X.shape[0], dtype=torch.int64, device=X.device)
    best = torch.empty(X.shape[0], dtype=acc, device=X.device)
    for start in range(0, X.shape[0], chunk):
        scores = _unit_rows(X[start:start + chunk].to(acc)) @ Cn.T
        best[start:start + chunk], labels[start:start + chunk] = scores.max(dim=1)
    # torch.max returns the first maximal index on CPU and CUDA: ties go to the smaller k.
    return labels, best


def centroid_update_ref(X: torch.Tensor, labels: torch.Tensor, K: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-cluster sums and counts.

    Args: X ``[N, C]``, labels int64 ``[N]`` in ``[0, K)``, K.
    Returns: ``(sums [K, C] float32 (float64 for float64 input), counts int64 [K])``.
    """
    acc = accumulation_dtype(X.dtype)
    return segment_sum(X.to(acc), labels, K), torch.bincount(labels, minlength=K)


def gig_accumulate_ref(grads: torch.Tensor, weights: torch.Tensor, idx: torch.Tensor, val: torch.Tensor,
                       V: torch.Tensor) -> torch.Tensor:
    """``attr[..., p, j] = val[p,j]·⟨Σ_k weights[k]·grads[..., k, p, :], V[idx[p,j]]⟩`` (0 at padding).

    Args: grads ``[m, P, C]`` or ``[T, m, P, C]``, weights ``[m]``, idx/val ``[P, s]``, V ``[K, C]``.
    Returns: ``[P, s]`` or ``[T, P, s]`` float32 (float64 for float64 grads).
    """
    acc = accumulation_dtype(grads.dtype)
    g = torch.einsum("m,...mpc->...pc", weights.to(acc), grads.to(acc))  # [(T,) P, C]
    active = idx >= 0
    safe = idx.clamp_min(0)
    Vacc = V.to(acc)
    attr = torch.zeros(g.shape[:-1] + (idx.shape[1],), dtype=acc, device=grads.device)
    for j in range(idx.shape[1]):
        attr[..., j] = (g * Vacc[safe[:, j]]).sum(-1)
    return torch.where(active, attr * val.to(acc), torch.zeros((), dtype=acc, device=grads.device))
