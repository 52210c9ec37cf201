"""F_ab's head with its T backward passes as one: a forward without autograd that keeps what the backward
reads (each ReLU's output), then every target's gradient at once, the targets stacked along the rows.

With the affine tail cut off (:mod:`gig_fast.gig.tail`), a node's T backward passes all start at the
head's output with seeds that differ only by target, and they go through the same ReLU masks and the same
convolutions. Autograd runs them one target at a time through a retained graph (a dozen operations each
and a copy of each gradient into a ``[T, rows, P, C]`` buffer). :class:`BatchedHead` walks the head's FX
graph instead: the ReLU masks applied to ``[T, m, ...]`` cotangents by broadcasting and in place, each
convolution's input gradient as one call on ``T·m`` rows, and the input's gradient handed on in
``gig_accumulate``'s layout, block of rows by block of rows, so the whole ``[T, m, P, C]`` gradient is
never formed. The operations are the ones autograd calls (``threshold_backward``,
``convolution_backward``), so the gradients equal autograd's to float rounding.

Measured on the demo network (Intel Xeon, 2 threads, the same nodes): 1.2–1.5× per ``gig()`` call where
calls are small or T is large (20 shared targets, 8 nodes, 50 images: 0.29 / 0.32 → 0.21 / 0.27 s in two
pairs), no change on the largest calls (400 rows of 5 targets), and stage 4 of ``gig-fast demo`` 1.19×
(medians of four runs each, alternated). Heads built of other operations (attention, normalisation over positions,
max-pooling) keep autograd: :meth:`BatchedHead.build` returns None for them, and ``gig()`` under
``autocast`` keeps autograd's casts.
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import Callable

import torch
from torch import fx, nn

_RELU = {torch.relu, torch.nn.functional.relu}
_ADD = {operator.add, torch.add}
_PASS_METHODS = {"clone", "contiguous"}
# the most bytes of one cotangent of a block of rows on the CPU: larger blocks ran slower per row, not
# faster (the demo network's 1×1 convolution 32 → 8 channels at 14 × 14, input gradient: 1.1 µs per row
# at 400–800 rows, 6.5 µs at 1,600 and more, where the result passes 32 MB, the size above which glibc
# serves every allocation from freshly mapped pages); on a GPU the caching allocator reuses its blocks,
# so the bound there only caps the memory that T·m rows of cotangents take
BLOCK_BYTES = 16 << 20
GPU_BLOCK_BYTES = 1 << 30


class Unsupported(Exception):
    """An operation of the head that the batched backward does not handle, found while running it."""


@dataclass
class _Step:
    """One node of the head: ``kind`` (what its forward and backward do), the indices of its tensor
    arguments among the steps, and its module (a convolution or batch norm) or None."""
    kind: str
    args: tuple
    module: nn.Module | None = None
    constant: float = 0.0


class BatchedHead:
    """The head of an :class:`~gig_fast.gig.tail.AffineTail` (input → boundary tensors) for the batched
    backward; build with :meth:`build`."""

    def __init__(self, steps: list, outputs: tuple):
        self.steps, self.outputs = steps, outputs

    @staticmethod
    def build(head: fx.GraphModule) -> "BatchedHead | None":
        """The head's steps, or None if one of its operations is not a convolution (zero padding), a ReLU,
        an eval-mode batch norm or dropout, an identity, a copy or a sum of two tensors."""
        position, steps, outputs = {}, [], None
        for node in head.graph.nodes:
            if node.op == "output":
                result = node.args[0]
                if not isinstance(result, tuple) or not all(isinstance(r, fx.Node) for r in result):
                    return None
                outputs = tuple(position[r] for r in result)
                continue
            step = _step(head, node, position)
            if step is None:
                return None
            position[node] = len(steps)
            steps.append(step)
        if not steps or steps[0].kind != "input" or sum(s.kind == "input" for s in steps) != 1:
            return None
        return BatchedHead(steps, outputs)

    def forward(self, x: torch.Tensor) -> tuple[tuple, list]:
        """The head on ``x [n, C, H, W]`` without autograd: its boundary tensors and what the backward
        reads (per step: the input itself, a ReLU's output or a convolution's input size; else None)."""
        values, saved = [], []
        with torch.no_grad():
            for step in self.steps:
                a = [values[i] for i in step.args]
                if step.kind == "input":
                    value = keep = x
                elif step.kind == "conv":
                    value, keep = step.module(a[0]), a[0].shape
                elif step.kind == "relu":
                    value = keep = torch.relu(a[0])
                elif step.kind == "add":
                    if a[0].shape != a[1].shape:
                        raise Unsupported(f"a sum of tensors of shapes {tuple(a[0].shape)} and {tuple(a[1].shape)}")
                    value, keep = a[0] + a[1], None
                elif step.kind == "scale":  # an eval-mode batch norm
                    value, keep = step.module(a[0]), None
                elif step.kind == "add_constant":
                    value, keep = a[0] + step.constant, None
                else:  # "pass": an identity or a copy (nothing here writes in place)
                    value, keep = a[0], None
                values.append(value)
                saved.append(keep)
        return tuple(values[i] for i in self.outputs), saved

    @torch.no_grad()  # the model's weights may require grad: no graph of the backward's own
    def backward(self, saved: list, seeds_of: Callable, T: int, m: int, consume: Callable, align: int = 1) -> None:
        """Every one of T targets' gradients at the input's first ``m`` rows, handed on block by block:
        ``seeds_of(r0, r1)`` gives the seeds of rows r0:r1, one ``[T, r1 − r0, ...]`` per boundary tensor
        (expanded views welcome), and ``consume(grads, r0, r1)`` takes ``grads [T, r1 − r0, P, C]``
        (channels last, as ``gig_accumulate`` reads it).

        A block's cotangents stay under :data:`BLOCK_BYTES` each (:data:`GPU_BLOCK_BYTES` off the CPU), and
        the whole ``[T, m, P, C]`` is never formed; blocks do not straddle a multiple of ``align`` unless
        they hold whole multiples of it (the fixed rule's rows are node-major, ``align`` images per node)."""
        x = saved[0]
        _, C, H, W = x.shape
        widest = max(math.prod(k.shape[1:] if isinstance(k, torch.Tensor) else k[1:]) for k in saved if k is not None)
        budget = BLOCK_BYTES if x.device.type == "cpu" else GPU_BLOCK_BYTES
        for r0, r1 in _blocks(m, max(1, budget // (T * widest * x.element_size())), align):
            g = self._backward_rows(saved, seeds_of(r0, r1), r0, r1)
            consume(g.expand(T, r1 - r0, C, H, W).permute(0, 1, 3, 4, 2).reshape(T, r1 - r0, H * W, C), r0, r1)

    def _backward_rows(self, saved: list, seeds: list, r0: int, r1: int) -> torch.Tensor:
        """The cotangent ``[T, r1 − r0, C, H, W]`` of the input's rows r0:r1 from the seeds of those rows."""
        T, m = seeds[0].shape[0], r1 - r0
        # each step's cotangent [T, m, ...] and whether it is a fresh tensor of ours (then the ops write in
        # place: a fresh result costs its allocation's page faults, 3× an in-place ReLU mask at 2,000 rows)
        cot, owned = [None] * len(self.steps), [False] * len(self.steps)

        def give(i, g, own):
            if cot[i] is None:
                cot[i], owned[i] = g, own
            elif owned[i]:
                cot[i].add_(g)
            elif own:
                cot[i], owned[i] = g.add_(cot[i]), True
            else:
                cot[i], owned[i] = cot[i] + g, True

        for i, seed in zip(self.outputs, seeds):
            give(i, seed, False)
        for i in range(len(self.steps) - 1, 0, -1):
            step, g, own = self.steps[i], cot[i], owned[i]
            if g is None:
                continue
            cot[i] = None  # freed as soon as it is passed on
            if step.kind == "relu":  # autograd's ReLU backward, in place where the cotangent is ours
                mask = saved[i][r0:r1]
                give(step.args[0], torch.ops.aten.threshold_backward.grad_input(g, mask, 0, grad_input=g) if own
                     else torch.ops.aten.threshold_backward(g, mask, 0), True)
            elif step.kind == "conv":
                give(step.args[0], _conv_input_gradient(step.module, g, saved[i], T, m), True)
            elif step.kind == "scale":
                scale = _bn_scale(step.module, g)
                give(step.args[0], g.mul_(scale) if own else g * scale, True)
            elif step.kind == "add":  # both operands get the same tensor: neither may write into it
                give(step.args[0], g, False)
                give(step.args[1], g, False)
            else:  # "pass", "add_constant"
                give(step.args[0], g, own)
        return cot[0]


def _blocks(m: int, rows: int, align: int):
    """Row ranges ``(r0, r1)`` covering 0:m, at most ``rows`` each: whole multiples of ``align`` rows when
    ``rows >= align``, else pieces of one ``align``-row group each."""
    if rows >= align:
        step = rows // align * align
        for r0 in range(0, m, step):
            yield r0, min(m, r0 + step)
        return
    for g0 in range(0, m, align):
        g1 = min(m, g0 + align)
        for r0 in range(g0, g1, rows):
            yield r0, min(g1, r0 + rows)


def _step(head: fx.GraphModule, node: fx.Node, position: dict) -> _Step | None:
    tensors = [a for a in node.args if isinstance(a, fx.Node)]
    # keyword arguments change what an operation does (a sum's alpha, an in-place ReLU), except F.relu's
    # default inplace=False, which FX records
    relu_default = node.target is torch.nn.functional.relu and dict(node.kwargs) == {"inplace": False}
    if any(a not in position for a in tensors) or (node.kwargs and not relu_default):
        return None
    args = tuple(position[a] for a in tensors)
    if node.op == "placeholder":
        return _Step("input", ())
    if node.op == "call_module":
        module = head.get_submodule(node.target)
        if len(node.args) != 1 or len(args) != 1:
            return None
        if isinstance(module, nn.Conv2d) and module.padding_mode == "zeros" and not isinstance(module.padding, str):
            return _Step("conv", args, module)
        if isinstance(module, nn.ReLU):
            return _Step("relu", args)
        if isinstance(module, nn.BatchNorm2d) and not module.training and module.running_var is not None:
            return _Step("scale", args, module)
        if isinstance(module, nn.Identity) or (isinstance(module, nn.Dropout) and not module.training):
            return _Step("pass", args)
        return None
    single = len(node.args) == 1 and len(args) == 1
    if node.op == "call_function" and node.target in _RELU and single:
        return _Step("relu", args)
    if node.op == "call_method" and node.target == "relu" and single:
        return _Step("relu", args)
    if node.op == "call_method" and node.target in _PASS_METHODS and single:
        return _Step("pass", args)
    is_add = (node.op == "call_function" and node.target in _ADD) or (node.op == "call_method" and node.target == "add")
    if is_add and len(node.args) == 2:
        constant = next((a for a in node.args if not isinstance(a, fx.Node)), None)
        if len(args) == 2:
            return _Step("add", args)
        if len(args) == 1 and isinstance(constant, (int, float)):
            return _Step("add_constant", args, constant=constant)
    return None


def _conv_input_gradient(conv: nn.Conv2d, g: torch.Tensor, input_size: torch.Size, T: int, m: int) -> torch.Tensor:
    """The convolution's input gradient for cotangents ``g [T, m, ...]`` as one call on ``T·m`` rows;
    the input's layout (channels last, as F_ab runs) is passed as strides, with no memory touched."""
    _, C, H, W = input_size
    rows = T * m
    if conv.kernel_size == (1, 1) and conv.stride == (1, 1) and conv.padding == (0, 0) and conv.groups == 1:
        # a 1×1 convolution of stride 1 on channels-last rows is one matrix product [rows·H·W, C_out] @
        # [C_out, C]: 1.25–1.9× faster than the convolution's backward at 640 rows on two cores of an Intel
        # Xeon (the demo network's 32 → 8 at 14 × 14 to 256 → 64 at 2 × 2), the same arithmetic
        cols = g.expand(T, m, *g.shape[2:]).permute(0, 1, 3, 4, 2).reshape(rows * H * W, -1)
        grad = cols @ conv.weight.reshape(conv.out_channels, C)
        return grad.reshape(T, m, H, W, C).permute(0, 1, 4, 2, 3)
    like = torch.empty_strided((rows, C, H, W), (H * W * C, 1, W * C, C), dtype=g.dtype, device=g.device)
    g4 = g.expand(T, m, *g.shape[2:]).reshape(rows, *g.shape[2:])
    grad = torch.ops.aten.convolution_backward(g4, like, conv.weight, None, conv.stride, conv.padding, conv.dilation,
                                               False, [0, 0], conv.groups, (True, False, False))[0]
    return grad.reshape(T, m, C, H, W)


def _bn_scale(bn: nn.BatchNorm2d, g: torch.Tensor) -> torch.Tensor:
    """An eval-mode batch norm's per-channel factor ``weight / sqrt(running_var + eps)`` shaped ``[C, 1, 1]``."""
    scale = torch.rsqrt(bn.running_var + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight
    return scale.to(g.dtype).reshape(-1, 1, 1)
