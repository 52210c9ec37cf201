"""The GIG engine: Generalized Integrated Gradients from the concepts of layer a to a target of layer b.

DESIGN.md §1.5 / paper Eq. 4–7. With the codes ``(idx, val)`` of layer a, its concepts ``V`` and its BN
shift ``β``, the path is ``X(α) = β + α·U V`` (at α = 1 the reconstruction, at α = 0 "no concept").
For a target ``T`` on ``Ω = F_ab(X(α))``::

    GIG(q|p → T) = u_pq · Σ_k w_k ⟨∇_X T(F_ab(X(α_k)))_p , v_q⟩

over the m nodes/weights of a quadrature rule on [0, 1]. Completeness:
``Σ_{p,q} GIG = T(F_ab(X(1))) − T(F_ab(X(0)))`` up to quadrature error; every result carries the gap
(``delta``).

How it is fast: all m α-points of a chunk of images run through ``F_ab`` as one batch — one forward
shared by every target, then one backward per target (``batch_size`` bounds the rows per batch, so
memory does not grow with m); the weighted α-sum of the gradients and its projection onto only the
*active* concepts of each position are one fused op (:func:`gig_fast.ops.gig_accumulate`); the prefix
up to a is never run.
The path tensor is laid out ``[n, H_a, W_a, C_a]`` (channels-last) so the sparse reconstruction, the
gradients and ``gig_accumulate`` share one layout with no transposes; ``F_ab`` sees a
``[n, C_a, H_a, W_a]`` view of it.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Callable, Sequence, Union

import numpy as np
import torch

from .ops import gig_accumulate, sparse_reconstruct

__all__ = ["gig", "GIGResult", "ConceptTarget", "ClassTarget", "quadrature", "RULES"]

RULES = ("gausslegendre", "riemann_left", "riemann_right", "riemann_middle", "trapezoid")


@dataclass(frozen=True)
class ConceptTarget:
    """``T(Ω) = Σ_i ⟨Ω_i, v/‖v‖⟩``: the projection of every position of layer b on a concept, summed.

    Args:
        vector: ``[C_b]`` the target concept ``v_t`` of layer b (any norm but zero).
    """
    vector: torch.Tensor


@dataclass(frozen=True)
class ClassTarget:
    """The softmax probability of class ``index`` (paper Eq. 7), or its logit with ``probability=False``.

    Args:
        index: an int, or an int64 tensor ``[B]`` with one class per image.
        probability: softmax probability (default) or raw logit.
    """
    index: Union[int, torch.Tensor]
    probability: bool = True


Target = Union[ConceptTarget, ClassTarget]


@dataclass
class GIGResult:
    """GIG attributions of one call. With a list of T targets every field has a leading ``[T]`` axis.

    Attributes:
        per_position: ``[B, P_a, s]`` GIG(q|p → T) aligned with the codes (0 at padding).
        per_concept: ``[B, K_a]`` GIG(q → T), summed over positions.
        delta: ``[B]`` completeness gap Σ attributions − (T(X(1)) − T(X(0))).
        value_at_input: ``[B]`` T(F_ab(X(1))), the target at the reconstruction.
        value_at_baseline: ``[B]`` T(F_ab(X(0))), the target at the baseline β.
        nodes, weights: ``[m]`` the quadrature rule used (float64).
    """
    per_position: torch.Tensor
    per_concept: torch.Tensor
    delta: torch.Tensor
    value_at_input: torch.Tensor
    value_at_baseline: torch.Tensor
    nodes: torch.Tensor
    weights: torch.Tensor

    def relative_delta(self) -> torch.Tensor:
        """``|delta| / |T(X(1)) − T(X(0))|`` per image (the completeness check of the tests)."""
        return self.delta.abs() / (self.value_at_input - self.value_at_baseline).abs().clamp_min(1e-30)


def quadrature(rule: str, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Nodes and weights of a rule on [0, 1], float64 ``[steps]`` each; the weights sum to 1.

    ``gausslegendre`` (exact for polynomials of degree 2m−1), ``riemann_left/right/middle`` (nodes
    k/m, (k+1)/m, (k+½)/m, weights 1/m) and ``trapezoid`` (nodes k/(m−1), weights 1/(m−1) halved at the
    ends, m ≥ 2). Captum's ``riemann_trapezoid`` uses weights 1/m halved at the ends instead, which sum to
    (m−1)/m; ours integrate constants exactly.
    """
    if rule not in RULES:
        raise ValueError(f"unknown quadrature rule {rule!r}; choose one of {RULES}")
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
        raise ValueError(f"steps must be a positive int, got {steps!r}")
    m = int(steps)
    k = np.arange(m, dtype=np.float64)
    if rule == "gausslegendre":
        x, w = np.polynomial.legendre.leggauss(m)
        nodes, weights = 0.5 * (x + 1.0), 0.5 * w
    elif rule == "trapezoid":
        if m < 2:
            raise ValueError("the trapezoid rule needs steps >= 2")
        nodes = k / (m - 1)
        weights = np.full(m, 1.0 / (m - 1))
        weights[[0, -1]] *= 0.5
    else:
        offset = {"riemann_left": 0.0, "riemann_right": 1.0, "riemann_middle": 0.5}[rule]
        nodes, weights = (k + offset) / m, np.full(m, 1.0 / m)
    return torch.from_numpy(np.ascontiguousarray(nodes)), torch.from_numpy(np.ascontiguousarray(weights))


# ---------------------------------------------------------------------------------------------- targets

def _check_target(target, B: int, device: torch.device) -> Target:
    if isinstance(target, ConceptTarget):
        vec = target.vector
        if not isinstance(vec, torch.Tensor) or vec.dim() != 1:
            raise ValueError(f"ConceptTarget.vector must be a 1-D tensor [C_b], got "
                             f"{tuple(vec.shape) if isinstance(vec, torch.Tensor) else type(vec).__name__}")
        if not vec.is_floating_point() or not bool(torch.isfinite(vec).all()) or float(vec.norm()) == 0.0:
            raise ValueError("ConceptTarget.vector must be a finite, non-zero float vector")
        return ConceptTarget(vec.to(device))
    if isinstance(target, ClassTarget):
        index = target.index
        if isinstance(index, torch.Tensor):
            if index.dtype not in (torch.int64, torch.int32) or index.shape != (B,):
                raise ValueError(f"ClassTarget.index as a tensor must be int64 [B={B}], got "
                                 f"{index.dtype} {tuple(index.shape)}")
            if B and int(index.min()) < 0:
                raise ValueError(f"ClassTarget.index holds {int(index.min())}; class indices are >= 0")
            return ClassTarget(index.to(device=device, dtype=torch.int64), bool(target.probability))
        if isinstance(index, bool) or not isinstance(index, (int, np.integer)) or index < 0:
            raise ValueError(f"ClassTarget.index must be a non-negative int or an int64 tensor [B], got {index!r}")
        return ClassTarget(int(index), bool(target.probability))
    raise ValueError(f"target must be a ConceptTarget, a ClassTarget or a list of them, got {type(target).__name__}")


def _evaluate(target: Target, out: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
    """``T`` on each row of ``out`` (``[n, C_b, ...]`` or logits ``[n, n_classes]``); ``image [n]`` says which
    image each row belongs to (for per-image class indices). Returns ``[n]``."""
    if isinstance(target, ConceptTarget):
        vec = target.vector
        if out.dim() < 2 or out.shape[1] != vec.shape[0]:
            raise ValueError(f"ConceptTarget.vector has C_b={vec.shape[0]} entries but F_ab's output has shape "
                             f"{tuple(out.shape)} (channels on dim 1)")
        unit = (vec / vec.norm()).to(out.dtype)
        per_pos = torch.einsum("nc...,c->n...", out, unit)
        return per_pos.reshape(out.shape[0], -1).sum(1)
    if out.dim() != 2:
        raise ValueError(f"ClassTarget needs logits [n, n_classes] from F_ab, got shape {tuple(out.shape)}")
    index = target.index[image] if isinstance(target.index, torch.Tensor) else \
        torch.full((out.shape[0],), target.index, dtype=torch.int64, device=out.device)
    if out.shape[0] and int(index.max()) >= out.shape[1]:
        raise ValueError(f"ClassTarget.index {int(index.max())} is out of range for {out.shape[1]} classes")
    scores = torch.softmax(out, dim=1) if target.probability else out
    return scores.gather(1, index[:, None])[:, 0]


# ---------------------------------------------------------------------------------------------- inputs

def _check_inputs(f_ab, codes, V, beta, steps, batch_size, spatial):
    if not callable(f_ab):
        raise ValueError(f"f_ab must be callable (X^a [B, C_a, H_a, W_a] → X^b or logits), got {type(f_ab).__name__}")
    if not isinstance(codes, (tuple, list)) or len(codes) != 2:
        raise ValueError("codes must be a pair (idx, val) of tensors [B, P_a, s]")
    idx, val = codes
    for name, t in (("idx", idx), ("val", val), ("V", V), ("beta", beta)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if idx.dim() != 3 or idx.dtype != torch.int64:
        raise ValueError(f"idx must be int64 [B, P_a, s], got {idx.dtype} {tuple(idx.shape)}")
    if val.shape != idx.shape:
        raise ValueError(f"val {tuple(val.shape)} must have idx's shape {tuple(idx.shape)}")
    if V.dim() != 2 or not V.is_floating_point():
        raise ValueError(f"V must be a float tensor [K_a, C_a], got {V.dtype} {tuple(V.shape)}")
    if val.dtype != V.dtype or beta.dtype != V.dtype:
        raise ValueError(f"val ({val.dtype}), V ({V.dtype}) and beta ({beta.dtype}) must share one dtype")
    if beta.shape != (V.shape[1],):
        raise ValueError(f"beta must be [C_a={V.shape[1]}], got {tuple(beta.shape)}")
    for name, t in (("idx", idx), ("val", val), ("beta", beta)):
        if t.device != V.device:
            raise ValueError(f"{name} is on {t.device} but V is on {V.device}")
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
        raise ValueError(f"steps must be a positive int, got {steps!r}")
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer))
                                   or batch_size < 1):
        raise ValueError(f"batch_size must be None or a positive int, got {batch_size!r}")
    P = idx.shape[1]
    if spatial is None:
        side = math.isqrt(P)
        if side * side != P:
            raise ValueError(f"P_a={P} positions is not a square; pass spatial=(H_a, W_a)")
        return side, side
    if len(spatial) != 2 or int(spatial[0]) * int(spatial[1]) != P:
        raise ValueError(f"spatial={tuple(spatial)} does not multiply to P_a={P}")
    return int(spatial[0]), int(spatial[1])


def _chunks(B: int, m: int, batch_size: int | None):
    """Rectangles (images b0:b1) × (nodes k0:k1) with at most ``batch_size`` rows (images·nodes) each."""
    if batch_size is None or m * B <= batch_size:
        yield 0, B, 0, m
        return
    if m <= batch_size:
        nb = batch_size // m
        for b0 in range(0, B, nb):
            yield b0, min(B, b0 + nb), 0, m
        return
    for b0 in range(B):
        for k0 in range(0, m, batch_size):
            yield b0, b0 + 1, k0, min(m, k0 + batch_size)


# ---------------------------------------------------------------------------------------------- engine

def gig(f_ab: Callable[[torch.Tensor], torch.Tensor], codes: tuple[torch.Tensor, torch.Tensor],
        V: torch.Tensor, beta: torch.Tensor, target: Union[Target, Sequence[Target]], *, steps: int = 32,
        rule: str = "gausslegendre", batch_size: int | None = None, backend: str | None = None,
        spatial: tuple[int, int] | None = None, autocast: torch.dtype | None = None) -> GIGResult:
    """Generalized Integrated Gradients from the concepts of layer a to ``target`` (DESIGN.md §1.5).

    Args:
        f_ab: ``X^a [n, C_a, H_a, W_a] → X^b [n, C_b, H_b, W_b]`` or logits ``[n, n_classes]``
            (e.g. :func:`gig_fast.slicing.make_f_ab`; BNs in eval mode).
        codes: ``(idx, val)``, each ``[B, P_a, s]``: padded sparse codes of layer a, positions row-major
            (``p = h·W_a + w``), ``idx`` int64 with −1 padding.
        V: ``[K_a, C_a]`` concepts of layer a (rows), the dtype of ``val`` and of f_ab's parameters.
        beta: ``[C_a]`` BN shift of layer a (:func:`gig_fast.slicing.bn_shift`), the path's baseline.
        target: a :class:`ConceptTarget`, a :class:`ClassTarget`, or a list of them (computed together).
        steps: number m of quadrature nodes.
        rule: one of :data:`RULES`.
        batch_size: most rows (images × α-nodes) per forward through f_ab (the T gradients of a chunk
            are held together: T× its input's size); None = all at once. Results do not depend on it
            beyond float rounding.
        backend: force a backend for the ops (``sparse_reconstruct``, ``gig_accumulate``).
        spatial: ``(H_a, W_a)``; default: a square ``P_a``.
        autocast: ``torch.bfloat16`` or ``torch.float16`` runs f_ab's forward and backward under
            ``torch.autocast`` (tensor cores on GPUs); the path, the targets, the weighted gradient
            sum and the attributions stay in V's dtype. The endpoint values come from the same
            low-precision forward, so ``delta`` measures the completeness of what was computed; compare
            with a full-precision call before relying on it (the GPU benchmark reports both).

    Returns:
        :class:`GIGResult`; with a list of targets each field has a leading ``[T]`` axis.
    """
    H, W = _check_inputs(f_ab, codes, V, beta, steps, batch_size, spatial)
    if autocast not in (None, torch.bfloat16, torch.float16):
        raise ValueError(f"autocast must be None, torch.bfloat16 or torch.float16, got {autocast!r}")
    low_precision = (torch.autocast(V.device.type, dtype=autocast) if autocast is not None
                     else contextlib.nullcontext())
    idx, val = codes
    # attributions are not differentiable through the engine: cut any graph the caller's tensors carry
    val, V, beta = val.detach(), V.detach(), beta.detach()
    B, P, s = idx.shape
    K, C = V.shape
    single = isinstance(target, (ConceptTarget, ClassTarget))
    targets = [target] if single else list(target) if isinstance(target, (list, tuple)) else None
    if not targets:
        raise ValueError("target must be a ConceptTarget, a ClassTarget or a non-empty list of them")
    targets = [_check_target(t, B, V.device) for t in targets]
    T = len(targets)
    nodes64, weights64 = quadrature(rule, steps)
    acc = torch.float64 if V.dtype == torch.float64 else torch.float32
    nodes = nodes64.to(device=V.device, dtype=V.dtype)
    weights = weights64.to(device=V.device, dtype=acc)

    with torch.no_grad():  # U V of every position, once; the path only rescales it
        UV = sparse_reconstruct(idx.reshape(B * P, s), val.reshape(B * P, s), V, backend=backend)
        UV = UV.reshape(B, P, C)
    # The endpoints X(1) and X(0) ride along as two extra nodes of weight 0 (α = 1, then α = 0): one
    # forward through f_ab serves the integral and the completeness check; a separate forward of 2·B
    # rows costs far more than its share of the batch (on the CPU it is mostly weight traffic).
    all_nodes = torch.cat([nodes, nodes.new_tensor([1.0, 0.0])])
    all_weights = torch.cat([weights, weights.new_zeros(2)])
    endpoint_values = torch.empty(T, 2, B, dtype=acc, device=V.device)  # [T, (α = 1, α = 0), B]

    attr = torch.zeros(T, B, P, s, dtype=acc, device=V.device)
    for b0, b1, k0, k1 in _chunks(B, steps + 2, batch_size):
        nb, mk = b1 - b0, k1 - k0
        path = beta + all_nodes[k0:k1, None, None, None] * UV[b0:b1]  # [mk, nb, P, C]
        # f_ab gets the path as a channels-last view (no copy; its gradient has gig_accumulate's layout)
        leaf = path.reshape(mk * nb, H, W, C).permute(0, 3, 1, 2)
        image = torch.arange(b0, b1, device=V.device).repeat(mk)  # rows are (k, b), b fastest
        ends = [(k, k - steps) for k in range(max(k0, steps), k1)]  # (node, endpoint 0: α = 1 / 1: α = 0)
        if k0 >= steps:  # endpoints only: no gradient needed
            with torch.no_grad(), low_precision:
                out = f_ab(leaf)
            out = out.to(leaf.dtype)
            _record_endpoints(endpoint_values, targets, out, image, ends, k0, nb, b0, b1, acc)
            continue
        leaf = leaf.detach().requires_grad_(True)
        grads = torch.empty(T, mk, nb * P, C, dtype=leaf.dtype, device=leaf.device)
        with torch.enable_grad():
            # one forward for every target, then one backward per target through the kept graph: the
            # T targets share the α-path, so replicating it T times would redo T−1 identical forwards
            with low_precision:
                out = f_ab(leaf)
            out = out.to(leaf.dtype)  # targets in full precision (a no-op without autocast)
            _record_endpoints(endpoint_values, targets, out.detach(), image, ends, k0, nb, b0, b1, acc)
            for t, tgt in enumerate(targets):
                (grad,) = torch.autograd.grad(_evaluate(tgt, out, image).sum(), leaf, retain_graph=t < T - 1)
                grads[t] = grad.permute(0, 2, 3, 1).reshape(mk, nb * P, C)
        part = gig_accumulate(grads, all_weights[k0:k1], idx[b0:b1].reshape(nb * P, s),
                              val[b0:b1].reshape(nb * P, s), V, backend=backend)
        attr[:, b0:b1] += part.reshape(T, nb, P, s)
    value_1, value_0 = endpoint_values[:, 0], endpoint_values[:, 1]

    per_concept = torch.zeros(T, B, K, dtype=acc, device=V.device)
    active = idx >= 0
    per_concept.scatter_add_(2, idx.clamp_min(0).reshape(1, B, P * s).expand(T, B, P * s),
                             torch.where(active, attr, torch.zeros((), dtype=acc, device=V.device)).reshape(T, B, P * s))
    delta = attr.sum(dim=(2, 3)) - (value_1 - value_0)
    result = GIGResult(attr, per_concept, delta, value_1, value_0, nodes64, weights64)
    if single:
        for name in ("per_position", "per_concept", "delta", "value_at_input", "value_at_baseline"):
            setattr(result, name, getattr(result, name)[0])
    return result


def _record_endpoints(values, targets, out, image, ends, k0, nb, b0, b1, acc):
    """Store ``T(out)`` of the endpoint rows of a chunk in ``values [T, 2, B]``; ``ends`` lists the
    chunk's endpoint nodes as ``(node index, 0 for α = 1 / 1 for α = 0)``. Only those rows are evaluated."""
    with torch.no_grad():
        for k, which in ends:
            rows = slice((k - k0) * nb, (k - k0 + 1) * nb)
            for t, tgt in enumerate(targets):
                values[t, which, b0:b1] = _evaluate(tgt, out[rows], image[rows]).to(acc)
