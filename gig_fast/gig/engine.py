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

from ..ops import checks, kernel
from ..ops.common import accumulation_dtype

__all__ = ["gig", "GIGResult", "ConceptTarget", "ClassTarget", "quadrature", "RULES", "ADAPTIVE", "tf32_allowed"]

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


RULES = ("gausslegendre", "riemann_left", "riemann_right", "riemann_middle", "trapezoid")  # the fixed rules
ADAPTIVE = "adaptive"  # the rule whose nodes adapt to each image (see gig's ``rule``)


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
    if rule == ADAPTIVE:
        raise ValueError("the adaptive rule has no fixed nodes: each image's come from gig(); choose one of "
                         f"{RULES}")
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
        steps: number m of quadrature nodes of a fixed rule; for the adaptive rule, of its starting grid
            (equally spaced, both ends included, ``steps >= 2``).
        rule: ``"adaptive"`` or one of the fixed rules :data:`RULES`. The adaptive rule (what stage 4
            runs) gives each image its own nodes: the composite trapezoid rule on a grid that starts with
            ``steps`` nodes and is bisected, round by round, where the exact completeness gap of a
            subinterval is largest (T is evaluated at every node, so each subinterval has one), until
            every target is within ``tolerance`` or the image has ``max_steps`` nodes. Smooth stretches
            of the path cost few nodes and the ReLU switches along it get them (:func:`_adaptive`).
        tolerance: completeness bar: ``|delta| <= tolerance·|T(X(1)) − T(X(0))|`` (plus a rounding floor
            of a few ulps of the precision f_ab runs in, so under ``autocast`` it rarely triggers). With
            the adaptive rule, where it stops; with a fixed rule, an image that misses it for some target
            is integrated again by the adaptive rule (from :data:`_START_NODES` nodes) and keeps whichever
            result is more complete. ``GIGResult.steps`` says how many nodes each image used. None: the
            plain m-node fixed rule for every image (what Captum computes).
        max_steps: most nodes of an image's adaptive rule (default 128, or ``8·steps`` if larger).
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
    _check_refinement(rule, steps, tolerance, max_steps)
    max_steps = max(_ADAPTIVE_MAX, 8 * int(steps)) if max_steps is None else int(max_steps)
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
    # the adaptive rule reports its starting grid (each image's own nodes are not kept)
    nodes64, weights64 = quadrature("trapezoid" if rule == ADAPTIVE else rule, steps)
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
    """The engine behind :func:`gig` on validated inputs (codes ``[B, P, s]``): the adaptive rule for every
    image, or a fixed rule for every image and then the adaptive rule for the incomplete ones. Returns
    ``attr [T, B, P, s]``, ``T(X(1))``, ``T(X(0))`` ``[T, B]``, the nodes used ``[B]`` and the refined
    flags ``[B]`` (the images whose result needed more nodes than the rule started with)."""
    V, acc, T, steps = run.V, run.acc, len(run.targets), nodes64.shape[0]
    B, P, s = idx.shape
    C = V.shape[1]
    attr = torch.zeros(T, B, P, s, dtype=acc, device=V.device)
    value_1, value_0 = torch.zeros(T, B, dtype=acc, device=V.device), torch.zeros(T, B, dtype=acc, device=V.device)
    steps_used = torch.full((B,), steps, dtype=torch.int64, device=V.device)
    refined = torch.zeros(B, dtype=torch.bool, device=V.device)
    if B == 0:  # no image: nothing goes through f_ab
        return attr, value_1, value_0, steps_used, refined
    with torch.no_grad(), _region("gig.reconstruct"):  # U V of every position, once; the path rescales it
        UV = _reconstruct(idx.reshape(B * P, s), val.reshape(B * P, s), V, run.backend).reshape(B, P, C)
    eps = torch.finfo(autocast or acc).eps
    if rule == ADAPTIVE:
        with _region("gig.adaptive"):
            for b, (a, v1, v0, used, _) in _adaptive(run, UV, idx, val, list(range(B)), steps, max_steps,
                                                     tolerance, eps).items():
                attr[:, b], value_1[:, b], value_0[:, b], steps_used[b], refined[b] = a, v1, v0, used, used > steps
        return attr, value_1, value_0, steps_used, refined
    attr, value_1, value_0 = _integrate(run, UV, idx, val, nodes64, weights64)
    if tolerance is None:
        return attr, value_1, value_0, steps_used, refined
    with _region("gig.refine"):
        excess = (attr.sum((2, 3)) - (value_1 - value_0)).abs() / _bar(attr, value_1, value_0, tolerance, eps)
        fixed_excess = excess.amax(0).tolist()  # [B] worst target per image: the one read-back
        flagged = [b for b, e in enumerate(fixed_excess) if e > 1]
        start = min(_START_NODES, max_steps)
        for b, (a, v1, v0, used, worst) in _adaptive(run, UV, idx, val, flagged, start, max_steps, tolerance,
                                                     eps).items():
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


# ---------------------------------------------------------------------------------- adaptive rule

_START_NODES = 5         # nodes of the adaptive rule's starting grid when it refines a fixed rule's image
_ADAPTIVE_MAX = 128      # the adaptive rule's default most nodes per image
_MIN_WIDTH = 2.0 ** -20  # subintervals narrower than this are not bisected
_MAX_ROUNDS = 40


def _check_refinement(rule, steps, tolerance, max_steps) -> None:
    if tolerance is not None and (isinstance(tolerance, bool) or not isinstance(tolerance, (int, float))
                                  or not tolerance > 0):
        raise ValueError(f"tolerance must be None or a positive float, got {tolerance!r}")
    if max_steps is not None and (isinstance(max_steps, bool) or not isinstance(max_steps, (int, np.integer))
                                  or max_steps < 2):
        raise ValueError(f"max_steps must be None or an int >= 2, got {max_steps!r}")
    if rule == ADAPTIVE:
        if tolerance is None:
            raise ValueError("the adaptive rule refines until the completeness bar: it needs a tolerance "
                             "(e.g. 0.01); for a fixed rule pass rule='gausslegendre'")
        if steps < 2:
            raise ValueError(f"the adaptive rule starts from a grid of steps >= 2 nodes (both ends), got {steps}")
        if max_steps is not None and max_steps < steps:
            raise ValueError(f"max_steps={max_steps} is below the adaptive rule's starting grid of steps={steps} nodes")
    elif rule not in RULES:
        raise ValueError(f"unknown quadrature rule {rule!r}; choose one of {(ADAPTIVE,) + RULES}")


def _bar(attr, value_1, value_0, tolerance, eps):
    """The completeness bar ``tolerance·|T(X(1)) − T(X(0))|`` plus a rounding floor (a few ulps of the
    magnitudes summed, so a target that barely changes is not refined forever). ``attr [T, n, P, s]``,
    values ``[T, n]``; returns ``[T, n]``."""
    floor = 4 * eps * (attr.abs().sum((2, 3)) + value_1.abs() + value_0.abs())
    return (tolerance * (value_1 - value_0).abs() + floor).clamp_min(torch.finfo(attr.dtype).tiny)


@dataclass
class _Grid:
    """One image's nodes in the adaptive rule: ``alpha`` sorted, and per node (host, float64) the targets
    ``value [T]`` = T(X(α)), their α-derivatives ``slope [T]`` = ⟨∇T, U V⟩ and ``size [T]`` = Σ|attributions
    of the node|, and (on the device) its attributions ``proj [T, P, s]`` at weight 1."""
    alpha: list
    value: dict
    slope: dict
    size: dict
    proj: dict

    def weights(self) -> torch.Tensor:
        """Trapezoid weights of the sorted nodes ``[n]`` (float64): half of each neighbouring width."""
        h = torch.tensor(self.alpha, dtype=torch.float64).diff()
        w = torch.zeros(len(self.alpha), dtype=torch.float64)
        w[1:] += h / 2
        w[:-1] += h / 2
        return w

    def local_gaps(self) -> torch.Tensor:
        """``[n − 1, T]``: each subinterval's trapezoid sum of the slopes minus T's exact change over it."""
        a = torch.tensor(self.alpha, dtype=torch.float64)
        slope = torch.stack([self.slope[x] for x in self.alpha])
        value = torch.stack([self.value[x] for x in self.alpha])
        return a.diff()[:, None] * (slope[1:] + slope[:-1]) / 2 - value.diff(dim=0)


def _adaptive(run: _Pass, UV, idx, val, images: list, start: int, max_steps: int, tolerance, eps):
    """The adaptive rule for the given images (indices into ``UV [B, P, C]`` and the codes).

    Each image starts from ``start`` equally spaced nodes on [0, 1] (both ends included) and the composite
    trapezoid rule on them. Every node is a full evaluation — T(X(α)) from the forward, ∇T from the
    backward — so each subinterval carries an exact completeness check: the trapezoid sum of the
    α-derivatives ⟨∇T, U V⟩ at its ends against T's change over it. Along the path F_ab is piecewise
    linear between ReLU switches, so T is linear and the check is exact to rounding on a subinterval
    without a switch; where switches lie, the gap is large. Rounds bisect the subintervals with the
    largest gaps (:func:`_choose`) until each target's total gap is within the bar or the image has
    ``max_steps`` nodes. A bisection costs one node: the new midpoint; every earlier node is kept with a
    new weight (the nodes are nested, unlike a Gauss rule's). All images' new nodes of a round share the
    batches through F_ab.

    Measured on ResNet-50 at 96 px (8 images × 5 concept targets, offline on 1,025 nodes per image):
    starting from 5 nodes, every pair within 1 % with 19 / 72 / 61 nodes per image on average at
    layer3.5 → logits / → layer4.0 / layer1.2 → layer2.0, where one fixed Gauss–Legendre rule for all
    images needs 128 / > 256 / > 128 nodes for the same share.

    Returns ``{image: (attr [T, P, s], T(X(1)) [T], T(X(0)) [T], nodes used, excess)}`` where ``excess``
    is the worst target's ``|delta|`` over its :func:`_bar` (≤ 1: complete).
    """
    grids = {b: _Grid([], {}, {}, {}, {}) for b in images}
    pending = [(b, k / (start - 1)) for b in images for k in range(start)]
    result = {}
    for _ in range(_MAX_ROUNDS):
        if not pending:
            break
        _evaluate_nodes(run, UV, idx, val, pending, grids)
        touched, pending = sorted({b for b, _ in pending}), []
        for b in touched:
            grid = grids[b]
            grid.alpha.sort()
            local = grid.local_gaps()                       # [n − 1, T]
            v1, v0 = grid.value[1.0], grid.value[0.0]
            w = grid.weights()
            size = (w[:, None] * torch.stack([grid.size[x] for x in grid.alpha])).sum(0)
            bar = (tolerance * (v1 - v0).abs() + 4 * eps * (size + v1.abs() + v0.abs())).clamp_min(1e-300)
            excess = float((local.sum(0).abs() / bar).max())
            result[b] = excess
            if excess > 1:
                room = max_steps - len(grid.alpha)
                pending += [(b, 0.5 * (lo + hi)) for lo, hi in _choose(grid.alpha, local, bar, room)]
    out = {}
    for b in images:
        grid = grids[b]
        w = grid.weights().to(device=run.V.device, dtype=run.acc)
        attr = torch.einsum("n,ntps->tps", w, torch.stack([grid.proj[x] for x in grid.alpha]))
        v1 = grid.value[1.0].to(device=run.V.device, dtype=run.acc)
        v0 = grid.value[0.0].to(device=run.V.device, dtype=run.acc)
        out[b] = (attr, v1, v0, len(grid.alpha), result[b])
    return out


def _choose(alpha, local, bar, room):
    """The fewest subintervals ``(lo, hi)`` of the sorted nodes ``alpha``, worst first, whose local gaps
    ``local [n − 1, T]`` leave less than half of ``bar [T]`` for every target if they were closed; at most
    ``room`` of them (host tensors: no read-backs)."""
    badness = (local.abs() / bar).amax(1)
    rest = local.abs().sum(0)
    chosen = []
    for i in torch.argsort(badness, descending=True).tolist():
        if len(chosen) >= room or bool((rest <= 0.5 * bar).all()):
            break
        lo, hi = alpha[i], alpha[i + 1]
        if hi - lo >= _MIN_WIDTH:
            chosen.append((lo, hi))
            rest = rest - local[i].abs()
    return chosen


def _evaluate_nodes(run: _Pass, UV, idx, val, nodes, grids) -> None:
    """Every node ``(image, α)`` through F_ab (``batch_size`` rows at most per batch, images mixed), its
    targets' values, α-derivatives and attributions at weight 1 stored in ``grids[image]``.

    The attributions of all rows of a batch are one ``gig_accumulate`` call: the rows' positions stacked
    (``[n·P]`` positions, one node of weight 1), each with its own image's codes."""
    V = run.V
    P, C = UV.shape[1:]
    s, T = idx.shape[2], len(run.targets)
    image_all = torch.tensor([b for b, _ in nodes], device=V.device)
    alpha_all = torch.tensor([a for _, a in nodes], dtype=torch.float64).to(V.device, V.dtype)
    one = torch.ones(1, dtype=run.acc, device=V.device)
    step = run.batch_size or len(nodes)
    for r0 in range(0, len(nodes), step):
        r1 = min(len(nodes), r0 + step)
        image, n = image_all[r0:r1], r1 - r0
        with _region("gig.path"):
            path = torch.addcmul(run.beta, alpha_all[r0:r1, None, None], UV[image])  # [n, P, C]
        out, grads = _through_f_ab(run, path, image, n_grad=n)
        values = _values(run, out, image, slice(0, n))                                 # [T, n]
        proj = _accumulate(run, grads.reshape(T, 1, n * P, C), one, idx[image].reshape(n * P, s),
                           val[image].reshape(n * P, s)).reshape(T, n, P, s)
        # the few numbers the rounds decide on, in one read-back: [3, T, n]
        host = torch.stack([values, proj.sum((2, 3)), proj.abs().sum((2, 3))]).to(torch.float64).cpu()
        for i, (b, a) in enumerate(nodes[r0:r1]):
            grid = grids[b]
            grid.alpha.append(a)
            grid.value[a], grid.slope[a], grid.size[a] = host[0, :, i], host[1, :, i], host[2, :, i]
            grid.proj[a] = proj[:, i]
