"""The entry point :func:`gig` and its result: the input checks, the fixed m-node rule over chunks of
images × nodes, and the adaptive rule for the images a fixed rule leaves incomplete."""
from __future__ import annotations

import contextlib
import functools
import math
from dataclasses import dataclass
from typing import Callable, Sequence, Union

import numpy as np
import torch

from ..ops import checks, kernel
from ..ops.common import accumulation_dtype
from .adaptive import ADAPTIVE_MAX, START_NODES, adaptive_rule, check_refinement, completeness_bar
from .evaluation import Pass, accumulate, region, target_values, tf32_allowed, through_f_ab
from .head import BatchedHead
from .rules import ADAPTIVE, quadrature
from .tail import TailAdjoints, split_affine_tail
from .targets import ClassTarget, ConceptTarget, Target, check_target

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
            of the path cost few nodes and the ReLU switches along it get them (:func:`adaptive_rule`).
        tolerance: completeness bar: ``|delta| <= tolerance·|T(X(1)) − T(X(0))|`` (plus a rounding floor
            of a few ulps of the precision f_ab runs in, so under ``autocast`` it rarely triggers). With
            the adaptive rule, where it stops; with a fixed rule, an image that misses it for some target
            is integrated again by the adaptive rule (from :data:`START_NODES` nodes) and keeps whichever
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
    check_refinement(rule, steps, tolerance, max_steps)
    max_steps = max(ADAPTIVE_MAX, 8 * int(steps)) if max_steps is None else int(max_steps)
    idx, val = codes
    # attributions are not differentiable through the engine: cut any graph the caller's tensors carry
    idx, val, V, beta = idx.contiguous(), val.detach().contiguous(), V.detach().contiguous(), beta.detach()
    B, P, s = idx.shape
    K = V.shape[0]
    # the codes' index range and the finiteness of val, V and β: checked once here (one host sync); the
    # loops below call the ops' bare kernels
    with region("gig.check"):
        checks.check_codes(idx.reshape(B * P, s), val.reshape(B * P, s), K, V.device, V=V, beta=beta)
    single = isinstance(target, (ConceptTarget, ClassTarget))
    targets = [target] if single else list(target) if isinstance(target, (list, tuple)) else None
    if not targets:
        raise ValueError("target must be a ConceptTarget, a ClassTarget or a non-empty list of them")
    with region("gig.check"):
        targets = [check_target(t, B, V.device) for t in targets]
    T = len(targets)
    acc = accumulation_dtype(V.dtype)
    low_precision = (torch.autocast(V.device.type, dtype=autocast) if autocast is not None
                     else contextlib.nullcontext())
    split = split_affine_tail(f_ab) if all(isinstance(t, ConceptTarget) for t in targets) else None
    run = Pass(f_ab, H, W, V, beta, targets, backend, batch_size, low_precision, acc,
                kernel("gig_accumulate", V.device, backend)[1],
                None if split is None else TailAdjoints(split, [t.unit for t in targets], V.dtype),
                # under autocast the backwards stay autograd's (its casts of the saved tensors)
                None if split is None or autocast is not None else BatchedHead.build(split.head))
    # the adaptive rule reports its starting grid (each image's own nodes are not kept)
    nodes64, weights64 = quadrature("trapezoid" if rule == ADAPTIVE else rule, steps)
    with tf32_allowed(tf32):
        attr, value_1, value_0, steps_used, refined = _attribute(run, idx, val, nodes64, weights64, rule, tolerance,
                                                                 max_steps, autocast)

    with region("gig.finish"):
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


def _attribute(run: Pass, idx, val, nodes64, weights64, rule, tolerance, max_steps, autocast):
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
    with torch.no_grad(), region("gig.reconstruct"):  # U V of every position, once; the path rescales it
        UV = _reconstruct(idx.reshape(B * P, s), val.reshape(B * P, s), V, run.backend).reshape(B, P, C)
    # the bar's rounding floor: a fixed rule's refinement is for what the precision F_ab runs in can
    # resolve (under autocast it rarely triggers); the adaptive rule has no other way to grow, so its
    # floor is the accumulation's (a bf16 run refines as a float32 one does, up to max_steps)
    eps = torch.finfo(acc if rule == ADAPTIVE else (autocast or acc)).eps
    if rule == ADAPTIVE:
        with region("gig.adaptive"):
            attr, value_1, value_0, used, _ = adaptive_rule(run, UV, idx, val, list(range(B)), steps, max_steps,
                                                            tolerance, eps)
        steps_used = torch.from_numpy(used).to(steps_used)
        return attr, value_1, value_0, steps_used, steps_used > steps
    attr, value_1, value_0 = _integrate(run, UV, idx, val, nodes64, weights64)
    if tolerance is None:
        return attr, value_1, value_0, steps_used, refined
    with region("gig.refine"):
        gap = (attr.sum((2, 3)) - (value_1 - value_0)).abs()
        excess = gap / completeness_bar(attr, value_1, value_0, tolerance, eps)
        fixed_excess = excess.amax(0).tolist()  # [B] worst target per image: the one read-back
        flagged = [b for b, e in enumerate(fixed_excess) if e > 1]
        start = min(START_NODES, max_steps)
        if not flagged:
            return attr, value_1, value_0, steps_used, refined
        a, v1, v0, used, worst = adaptive_rule(run, UV, idx, val, flagged, start, max_steps, tolerance, eps)
        better = worst < np.array([fixed_excess[b] for b in flagged])  # keep whichever is more complete
        keep = torch.tensor([b for b, k in zip(flagged, better) if k], dtype=torch.int64, device=attr.device)
        pick = torch.from_numpy(np.flatnonzero(better)).to(attr.device)
        attr[:, keep], value_1[:, keep], value_0[:, keep] = a[:, pick], v1[:, pick], v0[:, pick]
        steps_used[keep] = torch.from_numpy(used[better]).to(steps_used)
        refined[keep] = True
    return attr, value_1, value_0, steps_used, refined


def _reconstruct(idx: torch.Tensor, val: torch.Tensor, V: torch.Tensor, backend: str | None) -> torch.Tensor:
    """``U V`` ``[P, C]`` of the codes ``[P, s]`` by sparse_reconstruct's bare kernel (inputs validated)."""
    if idx.shape[1] == 0:
        return V.new_zeros(idx.shape[0], V.shape[1])
    return kernel("sparse_reconstruct", V.device, backend)[1](idx, val, V, None)


def _check_results(attr: torch.Tensor, value_1: torch.Tensor, value_0: torch.Tensor) -> None:
    """The inputs were finite, so a NaN/Inf here comes from f_ab: one host sync, a message that says so."""
    try:
        checks.check_finite(attributions=attr, target_at_input=value_1, target_at_baseline=value_0)
    except ValueError as e:
        raise ValueError(f"GIG is not finite although the codes, V and beta are: f_ab gives NaN/Inf on the path "
                         f"X(α) = β + α·U V (check the model's weights, or the autocast range) — {e}") from None


def _integrate(run: Pass, UV, idx, val, nodes64, weights64):
    """The m-node rule for every image at once (``UV [B, P, C]``, codes ``[B, P, s]``, float64 nodes and
    weights ``[m]``). Returns ``attr [T, B, P, s]``, ``T(X(1))`` and ``T(X(0))`` ``[T, B]``.

    The endpoints X(1) and X(0) are two extra nodes of weight 0 (α = 1, then α = 0) in the same chunks;
    with several targets :func:`through_f_ab` runs them in a forward without a graph, so the T backwards
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
        with region("gig.path"):
            # β + α·UV in one pass (a product, then a sum, wrote [mk, nb, P, C] twice: 8% of the call at
            # layer1.2 → layer2.0, B = 32 on the CPU)
            path = torch.addcmul(run.beta, nodes[k0:k1, None, None, None], UV[b0:b1]).reshape(mk * nb, P, C)  # rows (k, b)
            image = torch.arange(b0, b1, device=V.device).repeat(mk)
        mg = max(0, min(k1, m) - k0)  # the chunk's nodes with a weight (the endpoints come last)
        project = functools.partial(_project_rows, run, attr, weights[k0:k0 + mg], idx, val, b0, b1)
        out = through_f_ab(run, path, image, mg * nb, project, align=nb)
        for k in range(max(k0, m), k1):  # the endpoint nodes of this chunk
            ends[:, k - m, b0:b1] = target_values(run, out, image, slice((k - k0) * nb, (k - k0 + 1) * nb))
    return attr, ends[:, 0], ends[:, 1]


def _project_rows(run: Pass, attr, weights, idx, val, b0: int, b1: int, grads, r0: int, r1: int) -> None:
    """Rows r0:r1 of a chunk of images b0:b1 (rows node-major: row = node·nb + image − b0) projected with
    their nodes' ``weights`` and added to ``attr [T, B, P, s]``: whole nodes in one weighted call, or a
    piece of one node's images (:func:`through_f_ab` never hands rows that straddle two nodes otherwise)."""
    nb = b1 - b0
    T, _, P, C = grads.shape
    s = idx.shape[2]
    if r0 % nb == 0 and r1 % nb == 0:
        part = accumulate(run, grads.reshape(T, (r1 - r0) // nb, nb * P, C), weights[r0 // nb:r1 // nb],
                          idx[b0:b1].reshape(nb * P, s), val[b0:b1].reshape(nb * P, s))
        attr[:, b0:b1] += part.reshape(T, nb, P, s)
        return
    node, i0 = divmod(r0, nb)
    i1 = i0 + r1 - r0
    part = accumulate(run, grads.reshape(T, 1, (r1 - r0) * P, C), weights[node:node + 1],
                      idx[b0 + i0:b0 + i1].reshape(-1, s), val[b0 + i0:b0 + i1].reshape(-1, s))
    attr[:, b0 + i0:b0 + i1] += part.reshape(T, r1 - r0, P, s)
