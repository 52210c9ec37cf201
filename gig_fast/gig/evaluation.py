"""Evaluating F_ab on rows of the path, shared by the fixed rule (:mod:`gig_fast.gig.engine`) and the
adaptive rule (:mod:`gig_fast.gig.adaptive`): what one call's passes share (:class:`Pass`), one forward and
the targets' backwards (:func:`through_f_ab`), the targets' values, the weighted projection onto the
active concepts (:func:`accumulate`), the profiler's named regions and the TF32 switch."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable

import torch

from .head import BatchedHead, Unsupported
from .tail import TailAdjoints
from .targets import ConceptTarget, check_concept_output, evaluate_target, output_gradient

# Named regions of a gig() call in a torch.profiler trace (benchmarks/profile_gig.py sums them); a
# record_function costs about a microsecond without a profiler, against milliseconds per F_ab pass.
region = torch.profiler.record_function


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


@dataclass
class Pass:
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
    # gig_accumulate's bare kernel: the inputs were validated once per call (see accumulate)
    accumulate: Callable[..., torch.Tensor]
    # concept targets through an F_ab with an affine tail: the backwards start before it (gig_fast.gig.tail)
    tail: TailAdjoints | None = None
    # the head before the tail with its T backwards as one (gig_fast.gig.head); None: autograd's
    batched: BatchedHead | None = None


def accumulate(run: Pass, grads: torch.Tensor, weights: torch.Tensor, idx: torch.Tensor, val: torch.Tensor
               ) -> torch.Tensor:
    """gig_accumulate's bare kernel: ``grads [T, m, P, C]``, ``weights [m]``, codes ``[P, s]`` → ``[T, P, s]``."""
    if idx.shape[1] == 0 or grads.shape[1] == 0:
        return torch.zeros(grads.shape[0], idx.shape[0], idx.shape[1], dtype=run.acc, device=grads.device)
    with region("gig.accumulate"):
        return run.accumulate(grads.contiguous(), weights.contiguous(), idx.contiguous(), val.contiguous(), run.V)


def through_f_ab(run: Pass, path: torch.Tensor, image: torch.Tensor, n_grad: int, consume: Callable,
                 align: int = 1) -> torch.Tensor:
    """F_ab on path rows ``path [n, P, C]`` (row i belongs to image ``image[i]``, for per-image classes);
    the first ``n_grad`` rows need the targets' gradients, the rest only F_ab's output.

    Returns F_ab's output ``[n, ...]`` (detached, in the path's dtype). The gradient of each target
    (summed over rows) with respect to the first ``n_grad`` rows goes to ``consume(grads, r0, r1)``,
    ``grads [T, r1 − r0, P, C]`` for rows r0:r1: all rows at once, or with the batched head in blocks
    (not straddling a multiple of ``align`` rows unless whole multiples; :meth:`BatchedHead.backward`).
    One forward for every target, then one backward per target through the kept graph — the targets
    share the path, so replicating it T times would redo T−1 identical forwards. With several targets
    the rows without a gradient (the path's ends, the refinement's subinterval boundaries) run in a
    forward of their own without a graph, else each of the T backwards carries them too (ResNet-50,
    96 px, B = 2, T = 5, the 16-node rule: 1.35× faster apart at layer3.5 → layer4.0, 1.01× at
    layer1.2 → layer2.0; with the refinement 1.13× and 1.06×); with one target the extra small forward
    costs more than it saves (0.85× at layer3.5 → logits), so they ride along. F_ab gets the path as a channels-last view (no copy), so
    its gradient comes back in ``gig_accumulate``'s layout. With concept targets and an F_ab whose last
    layers are affine (``run.tail``), the backwards start at those layers' inputs with each target's
    gradient there, computed once per call (:mod:`gig_fast.gig.tail`).
    """
    n, P, C = path.shape
    leaf = path.reshape(n, run.H, run.W, C).permute(0, 3, 1, 2)
    if run.batched is not None:
        try:
            return _through_batched_head(run, leaf, image, n_grad, consume, align)
        except Unsupported:  # an operation seen only at run time (a broadcasting sum): autograd from now on
            run.batched = None
    T = len(run.targets)
    apart = n_grad < n and (n_grad == 0 or T > 1)  # the rows without a gradient in a forward of their own
    if apart:
        with torch.no_grad(), run.low_precision, region("gig.forward"):
            rest = run.f_ab(leaf[n_grad:]).to(leaf.dtype)
        if n_grad == 0:
            return rest
    n_graph = n_grad if apart else n
    leaf = leaf[:n_graph].detach().requires_grad_(True)
    # one target: its gradient is the result as it is (channels-last from the convolutions, so the view
    # below is free); several: one buffer, each gradient copied in as it comes
    grads = torch.empty(T, n_grad, P, C, dtype=leaf.dtype, device=leaf.device) if T > 1 else None
    with torch.enable_grad():
        with run.low_precision, region("gig.forward"):
            if run.tail is None:
                out = run.f_ab(leaf)
            else:  # the tail's graph is not kept: no backward goes through it
                boundary = run.tail.split.head(leaf)
                with torch.no_grad():
                    out = run.tail.split.tail(*boundary)
        out = out.to(leaf.dtype)  # targets in full precision (a no-op without autocast)
        for t, tgt in enumerate(run.targets):
            with region("gig.targets"):
                # a concept: T is linear, the backward starts at the tail's boundary with its gradient
                # there, or at the output with the unit concept at every position; a class: through its
                # softmax
                if run.tail is not None:
                    check_concept_output(tgt, out)
                    value, seed = boundary, run.tail.seeds(t, boundary, image[:n_graph])
                else:
                    seed = output_gradient(tgt, out, image[:n_graph])
                    value = out if seed is not None else evaluate_target(tgt, out, image[:n_graph]).sum()
            with region("gig.backward"):
                (grad,) = torch.autograd.grad(value, leaf, seed, retain_graph=t < T - 1)
                grad = grad[:n_grad].permute(0, 2, 3, 1).reshape(n_grad, P, C)
                if T == 1:
                    grads = grad[None]
                else:
                    grads[t] = grad
    consume(grads, 0, n_grad)
    out = out.detach()
    return torch.cat([out, rest]) if apart else out


def _through_batched_head(run: Pass, leaf: torch.Tensor, image: torch.Tensor, n_grad: int, consume: Callable,
                          align: int) -> torch.Tensor:
    """:func:`through_f_ab` with the head's T backwards as one (:class:`BatchedHead`): the forward without
    autograd (all rows at once, the tail after it), then the T gradients of the first ``n_grad`` rows."""
    with region("gig.forward"):
        boundary, saved = run.batched.forward(leaf)
        with torch.no_grad():
            out = run.tail.split.tail(*boundary)
    for tgt in run.targets:
        check_concept_output(tgt, out)
    if n_grad > 0:
        with region("gig.backward"):
            run.batched.backward(saved, lambda r0, r1: run.tail.stacked_seeds(boundary, image[r0:r1]),
                                 len(run.targets), n_grad, consume, align)
    return out


def target_values(run: Pass, out: torch.Tensor, image: torch.Tensor, rows: slice) -> torch.Tensor:
    """``[T, len(rows)]`` every target on the given rows of F_ab's output (only those are evaluated)."""
    with torch.no_grad(), region("gig.targets"):
        out, image = out[rows], image[rows]
        sums = None  # F_ab's output summed over positions, once for every concept target
        if out.dim() >= 2 and any(isinstance(t, ConceptTarget) for t in run.targets):
            sums = out.reshape(out.shape[0], out.shape[1], -1).sum(2)
        return torch.stack([evaluate_target(t, out, image, sums).to(run.acc) for t in run.targets])
