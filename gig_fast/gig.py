"""The GIG engine: Generalized Integrated Gradients from the concepts of layer a to a target of layer b.

docs/design.md §1.5 / paper Eq. 4–7. With the codes ``(idx, val)`` of layer a, its concepts ``V`` and its BN
shift ``β``, the path is ``X(α) = β + α·U V`` (at α = 1 the reconstruction, at α = 0 "no concept").
For a target ``T`` on ``Ω = F_ab(X(α))``::

    GIG(q|p → T) = u_pq · Σ_k w_k ⟨∇_X T(F_ab(X(α_k)))_p , v_q⟩

over the m nodes/weights of a quadrature rule on [0, 1]. Completeness:
``Σ_{p,q} GIG = T(F_ab(X(1))) − T(F_ab(X(0)))`` up to quadrature error; every result carries the gap
(``delta``).

How it is fast: all m α-points of a chunk of images run through ``F_ab`` as one batch — one forward
shared by every target, then one backward per target over the rows that carry a weight (with several
targets, the path's ends and the refinement's boundaries go through a forward without a graph); ``batch_size``
bounds the rows per batch, so memory does not grow with m; the weighted α-sum of the gradients and its projection onto only the
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

from .ops import checks, kernel
from .ops.common import accumulation_dtype

__all__ = ["gig", "GIGResult", "ConceptTarget", "ClassTarget", "quadrature", "RULES", "tf32_allowed"]

# Named regions of a gig() call in a torch.profiler trace (benchmarks/profile_gig.py sums them); a
# record_function costs about a microsecond without a profiler, against milliseconds per F_ab pass.
_region = torch.profiler.record_function


@contextlib.contextmanager
def tf32_allowed(allowed: bool):
    """cuDNN convolutions and CUDA matmuls in TF32 (``allowed``) or IEEE float32 inside the block; the
    process-wide flags are restored after it. No effect on the CPU or on bf16/fp16 work."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = allowed
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


RULES = ("gausslegendre", "riemann_left", "riemann_right", "riemann_middle", "trapezoid")


@dataclass(frozen=True)
class ConceptTarget:
    """``T(Ω) = Σ_i ⟨Ω_i, v/‖v‖⟩``: the projection of every position of layer b on a concept, summed.

    Args:
        vector: ``[C_b]`` the target concept ``v_t`` of layer b (any norm but zero), the same for every
            image; or ``[B, C_b]``, one concept per image (e.g. each image's own strongest concept of
            layer b, as in an image's graph), like a :class:`ClassTarget` with one class per image.
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


@dataclass(frozen=True)
class _CheckedClass(ClassTarget):
    """A validated :class:`ClassTarget` with its largest class index (a Python int), so that each
    evaluation checks the range against F_ab's output without reading the device (one read-back per
    α-batch and target before: a stall of the GPU queue between the forward and its backward)."""
    top: int = -1


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
        steps: ``[B]`` int64, the nodes each image's attributions used (``m`` unless refined).
        refined: ``[B]`` bool, the images whose result comes from the adaptive refinement (``tolerance``).
    """
    per_position: torch.Tensor
    per_concept: torch.Tensor
    delta: torch.Tensor
    value_at_input: torch.Tensor
    value_at_baseline: torch.Tensor
    nodes: torch.Tensor
    weights: torch.Tensor
    steps: torch.Tensor
    refined: torch.Tensor

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
        if not isinstance(vec, torch.Tensor) or vec.dim() not in (1, 2) or (vec.dim() == 2 and vec.shape[0] != B):
            raise ValueError(f"ConceptTarget.vector must be [C_b] or [B={B}, C_b], got "
                             f"{tuple(vec.shape) if isinstance(vec, torch.Tensor) else type(vec).__name__}")
        if not vec.is_floating_point() or vec.numel() and any(torch.stack(  # one read-back for both
                [~torch.isfinite(vec).all(), (vec.norm(dim=-1) == 0).any() & (B > 0)]).tolist()):
            raise ValueError("ConceptTarget.vector must be finite, non-zero float vector(s)")
        return ConceptTarget(vec.to(device))
    if isinstance(target, ClassTarget):
        index = target.index
        if isinstance(index, torch.Tensor):
            if index.dtype not in (torch.int64, torch.int32) or index.shape != (B,):
                raise ValueError(f"ClassTarget.index as a tensor must be int64 [B={B}], got "
                                 f"{index.dtype} {tuple(index.shape)}")
            low, top = torch.stack([index.min(), index.max()]).tolist() if B else (0, -1)  # one read-back
            if low < 0:
                raise ValueError(f"ClassTarget.index holds {low}; class indices are >= 0")
            return _CheckedClass(index.to(device=device, dtype=torch.int64), bool(target.probability), top)
        if isinstance(index, bool) or not isinstance(index, (int, np.integer)) or index < 0:
            raise ValueError(f"ClassTarget.index must be a non-negative int or an int64 tensor [B], got {index!r}")
        return _CheckedClass(int(index), bool(target.probability), int(index))
    raise ValueError(f"target must be a ConceptTarget, a ClassTarget or a list of them, got {type(target).__name__}")


def _evaluate(target: Target, out: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
    """``T`` on each row of ``out`` (``[n, C_b, ...]`` or logits ``[n, n_classes]``); ``image [n]`` says which
    image each row belongs to (for per-image class indices). Returns ``[n]``."""
    if isinstance(target, ConceptTarget):
        vec = target.vector
        if out.dim() < 2 or out.shape[1] != vec.shape[-1]:
            raise ValueError(f"ConceptTarget.vector has C_b={vec.shape[-1]} entries but F_ab's output has shape "
                             f"{tuple(out.shape)} (channels on dim 1)")
        unit = (vec / vec.norm(dim=-1, keepdim=True)).to(out.dtype)
        if unit.dim() == 1:
            per_pos = torch.einsum("nc...,c->n...", out, unit)
        else:  # one concept per image: row i of out belongs to image[i]
            per_pos = torch.einsum("nc...,nc->n...", out, unit[image])
        return per_pos.reshape(out.shape[0], -1).sum(1)
    if out.dim() != 2:
        raise ValueError(f"ClassTarget needs logits [n, n_classes] from F_ab, got shape {tuple(out.shape)}")
    if out.shape[0] and target.top >= out.shape[1]:  # a _CheckedClass (from _check_target)
        raise ValueError(f"ClassTarget.index {target.top} is out of range for {out.shape[1]} classes")
    scores = torch.softmax(out, dim=1) if target.probability else out
    if not isinstance(target.index, torch.Tensor):
        return scores[:, target.index]
    return scores.gather(1, target.index[image][:, None])[:, 0]


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
    if isinstance(f_ab, torch.nn.Module):  # e.g. make_f_ab's slices: its weights must match the path
        weight = next((w for w in f_ab.parameters() if w.is_floating_point()), None)
        if weight is not None and (weight.dtype != V.dtype or weight.device != V.device):
            raise ValueError(f"f_ab's parameters are {weight.dtype} on {weight.device} but V is {V.dtype} on "
                             f"{V.device}: the path X(α) is built in V's dtype and device")
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

@dataclass
class _Pass:
    """What every evaluation of F_ab in one :func:`gig` call shares."""
    f_ab: Callable[[torch.Tensor], torch.Tensor]
    H: int
    W: int
    V: torch.Tensor
    beta: torch.Tensor
    targets: list
    backend: str | None
    batch_size: int | None
    low_precision: object  # a torch.autocast context, or a null context
    acc: torch.dtype       # accumulation dtype of the attributions and targets
    # gig_accumulate's bare kernel: the inputs were validated once per call (see _accumulate)
    accumulate: Callable[..., torch.Tensor]


def gig(f_ab: Callable[[torch.Tensor], torch.Tensor], codes: tuple[torch.Tensor, torch.Tensor],
        V: torch.Tensor, beta: torch.Tensor, target: Union[Target, Sequence[Target]], *, steps: int = 32,
        rule: str = "gausslegendre", tolerance: float | None = 0.01, max_steps: int | None = None,
        batch_size: int | None = None, backend: str | None = None, spatial: tuple[int, int] | None = None,
        autocast: torch.dtype | None = None, tf32: bool = False) -> GIGResult:
    """Generalized Integrated Gradients from the concepts of layer a to ``target`` (docs/design.md §1.5).

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
        tolerance: completeness bar. An image whose ``|delta|`` exceeds ``tolerance·|T(X(1)) − T(X(0))|``
            (plus a rounding floor of a few ulps of the precision f_ab runs in, so under ``autocast`` it
            rarely triggers) for some target is integrated again by an adaptive composite
            rule (the same rule on subintervals, bisected where their exact local completeness gap is
            largest: see :func:`_refine`) until it is within the bar or uses ``max_steps`` nodes; it keeps
            whichever result is more complete, and ``GIGResult.steps`` says how many nodes each image
            used. ReLU kinks along the path are what a fixed rule misses. None: the plain m-node rule
            for every image (what Captum computes).
        max_steps: most nodes of an adaptive rule (default ``8·steps``).
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
        tf32: let f_ab's float32 convolutions and matmuls use TF32 tensor cores on the GPU. Off by
            default, whatever the global flags say: PyTorch lets cuDNN convolutions use TF32 by default
            (``torch.backends.cudnn.allow_tf32``), which rounds their inputs to 10 mantissa bits and put
            gig and Captum 2e-3 to 1.3e-2 apart on an H200. The flags are set for the
            duration of the call and restored after it (they are process-wide: do not run another
            TF32-sensitive computation on another thread meanwhile).

    Returns:
        :class:`GIGResult`; with a list of targets each field has a leading ``[T]`` axis. B = 0 images
        give empty fields (f_ab is not called).

    Raises:
        ValueError: bad arguments; a NaN/Inf in ``val``, ``V`` or ``beta`` (checked once per call, before
        any work); NaN/Inf results, which then come from f_ab.
    """
    H, W = _check_inputs(f_ab, codes, V, beta, steps, batch_size, spatial)
    if autocast not in (None, torch.bfloat16, torch.float16):
        raise ValueError(f"autocast must be None, torch.bfloat16 or torch.float16, got {autocast!r}")
    if not isinstance(tf32, bool):
        raise ValueError(f"tf32 must be True or False, got {tf32!r}")
    _check_refinement(tolerance, max_steps)
    max_steps = 8 * int(steps) if max_steps is None else int(max_steps)
    idx, val = codes
    # attributions are not differentiable through the engine: cut any graph the caller's tensors carry
    idx, val, V, beta = idx.contiguous(), val.detach().contiguous(), V.detach().contiguous(), beta.detach()
    B, P, s = idx.shape
    K = V.shape[0]
    # the codes' index range and the finiteness of val, V and β: checked once here (one host sync); the
    # loops below call the ops' bare kernels
    with _region("gig.check"):
        checks.check_codes(idx.reshape(B * P, s), val.reshape(B * P, s), K, V.device, V=V, beta=beta)
    single = isinstance(target, (ConceptTarget, ClassTarget))
    targets = [target] if single else list(target) if isinstance(target, (list, tuple)) else None
    if not targets:
        raise ValueError("target must be a ConceptTarget, a ClassTarget or a non-empty list of them")
    with _region("gig.check"):
        targets = [_check_target(t, B, V.device) for t in targets]
    T = len(targets)
    acc = accumulation_dtype(V.dtype)
    low_precision = (torch.autocast(V.device.type, dtype=autocast) if autocast is not None
                     else contextlib.nullcontext())
    run = _Pass(f_ab, H, W, V, beta, targets, backend, batch_size, low_precision, acc,
                kernel("gig_accumulate", V.device, backend)[1])
    nodes64, weights64 = quadrature(rule, steps)
    with tf32_allowed(tf32):
        attr, value_1, value_0, steps_used, refined = _attribute(run, idx, val, nodes64, weights64, rule, tolerance,
                                                                 max_steps, autocast)

    with _region("gig.finish"):
        per_concept = torch.zeros(T, B, K, dtype=acc, device=V.device)
        active = idx >= 0
        per_concept.scatter_add_(2, idx.clamp_min(0).reshape(1, B, P * s).expand(T, B, P * s),
                                 torch.where(active, attr, torch.zeros((), dtype=acc, device=V.device)).reshape(T, B, P * s))
        delta = attr.sum(dim=(2, 3)) - (value_1 - value_0)
        _check_results(attr, value_1, value_0)
    result = GIGResult(attr, per_concept, delta, value_1, value_0, nodes64, weights64, steps_used, refined)
    if single:
        for name in ("per_position", "per_concept", "delta", "value_at_input", "value_at_baseline"):
            setattr(result, name, getattr(result, name)[0])
    return result


def _attribute(run: _Pass, idx, val, nodes64, weights64, rule, tolerance, max_steps, autocast):
    """The engine behind :func:`gig` on validated inputs (codes ``[B, P, s]``): the fixed rule for every
    image, then the adaptive refinement of the incomplete ones. Returns ``attr [T, B, P, s]``,
    ``T(X(1))``, ``T(X(0))`` ``[T, B]``, the nodes used ``[B]`` and the refined flags ``[B]``."""
    V, acc, T, steps = run.V, run.acc, len(run.targets), nodes64.shape[0]
    B, P, s = idx.shape
    C = V.shape[1]
    if B == 0:  # no image: nothing goes through f_ab
        UV = V.new_zeros(0, P, C)
        attr, value_1, value_0 = (torch.zeros(T, 0, P, s, dtype=acc, device=V.device),
                                  torch.zeros(T, 0, dtype=acc, device=V.device), torch.zeros(T, 0, dtype=acc, device=V.device))
    else:
        with torch.no_grad(), _region("gig.reconstruct"):  # U V of every position, once; the path rescales it
            UV = _reconstruct(idx.reshape(B * P, s), val.reshape(B * P, s), V, run.backend).reshape(B, P, C)
        attr, value_1, value_0 = _integrate(run, UV, idx, val, nodes64, weights64)
    steps_used = torch.full((B,), steps, dtype=torch.int64, device=V.device)
    refined = torch.zeros(B, dtype=torch.bool, device=V.device)
    if tolerance is None:
        return attr, value_1, value_0, steps_used, refined
    with _region("gig.refine"):
        eps = torch.finfo(autocast or acc).eps
        excess = (attr.sum((2, 3)) - (value_1 - value_0)).abs() / _bar(attr, value_1, value_0, tolerance, eps)
        fixed_excess = excess.amax(0).tolist()  # [B] worst target per image: the one read-back
        flagged = [b for b, e in enumerate(fixed_excess) if e > 1]
        n_start = max(1, steps // _SUB_NODES)  # an adaptive rule starts with as many nodes as the fixed one
        ends = {b: (value_0[:, b], value_1[:, b]) for b in flagged}  # T(X(0)), T(X(1)): known, not re-evaluated
        for b, (a, v1, v0, used, worst) in _refine(run, UV, idx, val, ends, rule, tolerance, eps, n_start,
                                                   max_steps).items():
            if worst < fixed_excess[b]:  # keep whichever is more complete
                attr[:, b], value_1[:, b], value_0[:, b], steps_used[b], refined[b] = a, v1, v0, used, True
    return attr, value_1, value_0, steps_used, refined


def _reconstruct(idx: torch.Tensor, val: torch.Tensor, V: torch.Tensor, backend: str | None) -> torch.Tensor:
    """``U V`` ``[P, C]`` of the codes ``[P, s]`` by sparse_reconstruct's bare kernel (inputs validated)."""
    if idx.shape[1] == 0:
        return V.new_zeros(idx.shape[0], V.shape[1])
    return kernel("sparse_reconstruct", V.device, backend)[1](idx, val, V, None)


def _accumulate(run: _Pass, grads: torch.Tensor, weights: torch.Tensor, idx: torch.Tensor, val: torch.Tensor
                ) -> torch.Tensor:
    """gig_accumulate's bare kernel: ``grads [T, m, P, C]``, ``weights [m]``, codes ``[P, s]`` → ``[T, P, s]``."""
    if idx.shape[1] == 0 or grads.shape[1] == 0:
        return torch.zeros(grads.shape[0], idx.shape[0], idx.shape[1], dtype=run.acc, device=grads.device)
    with _region("gig.accumulate"):
        return run.accumulate(grads.contiguous(), weights.contiguous(), idx.contiguous(), val.contiguous(), run.V)


def _check_results(attr: torch.Tensor, value_1: torch.Tensor, value_0: torch.Tensor) -> None:
    """The inputs were finite, so a NaN/Inf here comes from f_ab: one host sync, a message that says so."""
    try:
        checks.check_finite(attributions=attr, target_at_input=value_1, target_at_baseline=value_0)
    except ValueError as e:
        raise ValueError(f"GIG is not finite although the codes, V and beta are: f_ab gives NaN/Inf on the path "
                         f"X(α) = β + α·U V (check the model's weights, or the autocast range) — {e}") from None


def _through_f_ab(run: _Pass, path: torch.Tensor, image: torch.Tensor, n_grad: int):
    """F_ab on path rows ``path [n, P, C]`` (row i belongs to image ``image[i]``, for per-image classes);
    the first ``n_grad`` rows need the targets' gradients, the rest only F_ab's output.

    Returns F_ab's output ``[n, ...]`` (detached, in the path's dtype) and ``[T, n_grad, P, C]`` the
    gradient of each target (summed over rows) with respect to the first ``n_grad`` rows (None if 0):
    one forward for every target, then one backward per target through the kept graph — the targets
    share the path, so replicating it T times would redo T−1 identical forwards. With several targets
    the rows without a gradient (the path's ends, the refinement's subinterval boundaries) run in a
    forward of their own without a graph, else each of the T backwards carries them too (ResNet-50,
    96 px, B = 2, T = 5, the 16-node rule: 1.35× faster apart at layer3.5 → layer4.0, 1.01× at
    layer1.2 → layer2.0; with the refinement 1.13× and 1.06×); with one target the extra small forward
    costs more than it saves (0.85× at layer3.5 → logits), so they ride along. F_ab gets the path as a channels-last view (no copy), so
    its gradient comes back in ``gig_accumulate``'s layout.
    """
    n, P, C = path.shape
    leaf = path.reshape(n, run.H, run.W, C).permute(0, 3, 1, 2)
    T = len(run.targets)
    apart = n_grad < n and (n_grad == 0 or T > 1)  # the rows without a gradient in a forward of their own
    if apart:
        with torch.no_grad(), run.low_precision, _region("gig.forward"):
            rest = run.f_ab(leaf[n_grad:]).to(leaf.dtype)
        if n_grad == 0:
            return rest, None
    n_graph = n_grad if apart else n
    leaf = leaf[:n_graph].detach().requires_grad_(True)
    # one target: its gradient is the result as it is (channels-last from the convolutions, so the view
    # below is free); several: one buffer, each gradient copied in as it comes
    grads = torch.empty(T, n_grad, P, C, dtype=leaf.dtype, device=leaf.device) if T > 1 else None
    with torch.enable_grad():
        with run.low_precision, _region("gig.forward"):
            out = run.f_ab(leaf)
        out = out.to(leaf.dtype)  # targets in full precision (a no-op without autocast)
        for t, tgt in enumerate(run.targets):
            with _region("gig.targets"):
                value = _evaluate(tgt, out, image[:n_graph]).sum()
            with _region("gig.backward"):
                (grad,) = torch.autograd.grad(value, leaf, retain_graph=t < T - 1)
                grad = grad[:n_grad].permute(0, 2, 3, 1).reshape(n_grad, P, C)
                if T == 1:
                    grads = grad[None]
                else:
                    grads[t] = grad
    out = out.detach()
    return (torch.cat([out, rest]) if apart else out), grads


def _values(run: _Pass, out: torch.Tensor, image: torch.Tensor, rows: slice) -> torch.Tensor:
    """``[T, len(rows)]`` every target on the given rows of F_ab's output (only those are evaluated)."""
    with torch.no_grad(), _region("gig.targets"):
        return torch.stack([_evaluate(t, out[rows], image[rows]).to(run.acc) for t in run.targets])


def _integrate(run: _Pass, UV, idx, val, nodes64, weights64):
    """The m-node rule for every image at once (``UV [B, P, C]``, codes ``[B, P, s]``, float64 nodes and
    weights ``[m]``). Returns ``attr [T, B, P, s]``, ``T(X(1))`` and ``T(X(0))`` ``[T, B]``.

    The endpoints X(1) and X(0) are two extra nodes of weight 0 (α = 1, then α = 0) in the same chunks;
    with several targets :func:`_through_f_ab` runs them in a forward without a graph, so the T backwards
    carry only the m weighted nodes.
    """
    V = run.V
    B, P, C = UV.shape
    s, T, m = idx.shape[2], len(run.targets), nodes64.shape[0]
    nodes = torch.cat([nodes64, nodes64.new_tensor([1.0, 0.0])]).to(device=V.device, dtype=V.dtype)
    weights = torch.cat([weights64, weights64.new_zeros(2)]).to(device=V.device, dtype=run.acc)
    attr = torch.zeros(T, B, P, s, dtype=run.acc, device=V.device)
    ends = torch.empty(T, 2, B, dtype=run.acc, device=V.device)  # [T, (α = 1, α = 0), B]
    for b0, b1, k0, k1 in _chunks(B, m + 2, run.batch_size):
        nb, mk = b1 - b0, k1 - k0
        with _region("gig.path"):
            # β + α·UV in one pass (a product, then a sum, wrote [mk, nb, P, C] twice: 8% of the call at
            # layer1.2 → layer2.0, B = 32 on the CPU)
            path = torch.addcmul(run.beta, nodes[k0:k1, None, None, None], UV[b0:b1]).reshape(mk * nb, P, C)  # rows (k, b)
            image = torch.arange(b0, b1, device=V.device).repeat(mk)
        mg = max(0, min(k1, m) - k0)  # the chunk's nodes with a weight (the endpoints come last)
        out, grads = _through_f_ab(run, path, image, n_grad=mg * nb)
        for k in range(max(k0, m), k1):  # the endpoint nodes of this chunk
            ends[:, k - m, b0:b1] = _values(run, out, image, slice((k - k0) * nb, (k - k0 + 1) * nb))
        if grads is not None:
            part = _accumulate(run, grads.reshape(T, mg, nb * P, C), weights[k0:k0 + mg],
                               idx[b0:b1].reshape(nb * P, s), val[b0:b1].reshape(nb * P, s))
            attr[:, b0:b1] += part.reshape(T, nb, P, s)
    return attr, ends[:, 0], ends[:, 1]


# ---------------------------------------------------------------------------------- adaptive refinement

_SUB_NODES = 4           # nodes of the rule on each subinterval of an adaptive rule
_MIN_WIDTH = 2.0 ** -20  # subintervals narrower than this are not bisected
_MAX_ROUNDS = 40


def _check_refinement(tolerance, max_steps) -> None:
    if tolerance is not None and (isinstance(tolerance, bool) or not isinstance(tolerance, (int, float))
                                  or not tolerance > 0):
        raise ValueError(f"tolerance must be None or a positive float, got {tolerance!r}")
    if max_steps is not None and (isinstance(max_steps, bool) or not isinstance(max_steps, (int, np.integer))
                                  or max_steps < _SUB_NODES):
        raise ValueError(f"max_steps must be None or an int >= {_SUB_NODES}, got {max_steps!r}")


def _bar(attr, value_1, value_0, tolerance, eps):
    """The completeness bar ``tolerance·|T(X(1)) − T(X(0))|`` plus a rounding floor (a few ulps of the
    magnitudes summed, so a target that barely changes is not refined forever). ``attr [T, n, P, s]``,
    values ``[T, n]``; returns ``[T, n]``."""
    floor = 4 * eps * (attr.abs().sum((2, 3)) + value_1.abs() + value_0.abs())
    return (tolerance * (value_1 - value_0).abs() + floor).clamp_min(torch.finfo(attr.dtype).tiny)


def _refine(run: _Pass, UV, idx, val, ends, rule, tolerance, eps, n_start, max_steps):
    """Adaptive composite rules for the images ``ends`` names (indices into ``UV [B, P, C]`` and the codes),
    each with its targets at the path's ends ``(T(X(0)), T(X(1)))`` (``[T]`` each, from the fixed rule's
    pass: two rows per image that the first round does not evaluate again).

    [0, 1] is cut into ``n_start`` subintervals, each integrated by ``rule`` with :data:`_SUB_NODES` nodes,
    and T is evaluated at every subinterval boundary, so each subinterval has an exact completeness check:
    its attributions must sum to ``T(X(hi)) − T(X(lo))``. Rounds bisect the subintervals with the largest
    local gaps (where ReLUs switch along the path) until an image's whole gap is within the bar or its
    rule has ``max_steps`` nodes; only the new halves are evaluated, all images in one batch.

    Returns ``{image: (attr [T, P, s], T(X(1)) [T], T(X(0)) [T], nodes used, excess)}`` where ``excess``
    is the worst target's ``|delta|`` over its :func:`_bar` (≤ 1: complete).
    """
    images = list(ends)
    pieces = {b: {} for b in images}  # image → {(lo, hi): attributions [T, P, s]}
    value = {b: {0.0: v0.clone(), 1.0: v1.clone()} for b, (v0, v1) in ends.items()}  # image → {α: T(X(α)) [T]}
    pending = [(b, i / n_start, (i + 1) / n_start if i + 1 < n_start else 1.0)
               for b in images for i in range(n_start)]
    result = {}
    for _ in range(_MAX_ROUNDS):
        if not pending:
            break
        points = sorted({(b, a) for b, lo, hi in pending for a in (lo, hi)} - {(b, a) for b in images for a in value[b]})
        got, vals = _integrate_pieces(run, UV, idx, val, pending, points, rule)
        for (b, lo, hi), a in zip(pending, got):
            pieces[b][(lo, hi)] = a
        for (b, a), v in zip(points, vals.unbind(1)):
            value[b][a] = v
        touched, pending = sorted({b for b, _, _ in pending}), []
        for b in touched:
            order = sorted(pieces[b])
            local = torch.stack([pieces[b][p].sum((1, 2)) - (value[b][p[1]] - value[b][p[0]]) for p in order])  # [n, T]
            attr = torch.stack([pieces[b][p] for p in order]).sum(0)
            v1, v0 = value[b][1.0], value[b][0.0]
            bar = _bar(attr[:, None], v1[:, None], v0[:, None], tolerance, eps)[:, 0]  # [T]
            # the decisions below read these few numbers many times: one read-back per image and round
            host = torch.cat([local, bar[None]]).cpu()
            local, bar = host[:-1], host[-1]
            excess = float((local.sum(0).abs() / bar).max())
            result[b] = (attr, v1, v0, len(order) * _SUB_NODES, excess)
            room = (max_steps - len(order) * _SUB_NODES) // _SUB_NODES  # bisections that still fit
            for lo, hi in (_worst(order, local, bar, room) if excess > 1 else []):
                del pieces[b][(lo, hi)]
                mid = 0.5 * (lo + hi)
                pending += [(b, lo, mid), (b, mid, hi)]
    return result


def _worst(order, local, bar, room):
    """The fewest subintervals, worst first, whose local gaps ``local [n, T]`` leave less than half of
    ``bar [T]`` for every target if they were closed; at most ``room`` of them (host tensors: no read-backs)."""
    badness = (local.abs() / bar).amax(1)
    rest = local.abs().sum(0)
    chosen = []
    for i in torch.argsort(badness, descending=True).tolist():
        if len(chosen) >= room or bool((rest <= 0.5 * bar).all()):
            break
        lo, hi = order[i]
        if hi - lo >= _MIN_WIDTH:
            chosen.append((lo, hi))
            rest = rest - local[i].abs()
    return chosen


def _integrate_pieces(run: _Pass, UV, idx, val, pieces, points, rule):
    """The rule with :data:`_SUB_NODES` nodes on each piece ``(image, lo, hi)``, and T at each point
    ``(image, α)``; pieces of different images share the batches (``batch_size`` rows at most).

    Returns ``[n_pieces, T, P, s]`` the attributions of each piece and ``[T, n_points]`` the values.
    """
    V = run.V
    P, C = UV.shape[1:]
    s, T, q = idx.shape[2], len(run.targets), _SUB_NODES
    base_nodes, base_weights = quadrature(rule, q)
    lo = torch.tensor([p[1] for p in pieces], dtype=torch.float64)
    width = torch.tensor([p[2] for p in pieces], dtype=torch.float64) - lo
    alpha = torch.cat([(lo[:, None] + width[:, None] * base_nodes).reshape(-1),
                       torch.tensor([a for _, a in points], dtype=torch.float64)]).to(V.device, V.dtype)
    weight = (width[:, None] * base_weights).reshape(-1).to(V.device, run.acc)
    image = torch.tensor([p[0] for p in pieces for _ in range(q)] + [b for b, _ in points], device=V.device)
    n_grad = len(pieces) * q  # rows before this one carry a weight; the point rows after it do not
    attr = torch.zeros(len(pieces), T, P, s, dtype=run.acc, device=V.device)
    values = torch.empty(T, len(points), dtype=run.acc, device=V.device)
    step = run.batch_size or len(alpha)
    for r0 in range(0, len(alpha), step):
        r1 = min(len(alpha), r0 + step)
        path = torch.addcmul(run.beta, alpha[r0:r1, None, None], UV[image[r0:r1]])  # [n, P, C]
        out, grads = _through_f_ab(run, path, image[r0:r1], n_grad=max(0, min(r1, n_grad) - r0))
        if r1 > n_grad:
            first = max(r0, n_grad)
            values[:, first - n_grad:r1 - n_grad] = _values(run, out, image[r0:r1], slice(first - r0, r1 - r0))
        if grads is None:
            continue
        for i in range(r0 // q, (min(r1, n_grad) - 1) // q + 1):  # the pieces with rows in this batch
            g0, g1 = max(r0, i * q), min(r1, (i + 1) * q)
            b = pieces[i][0]
            attr[i] += _accumulate(run, grads[:, g0 - r0:g1 - r0], weight[g0:g1], idx[b], val[b])
    return attr, values
