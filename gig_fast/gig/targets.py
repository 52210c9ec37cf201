"""The targets ``T`` of a GIG call (paper Eq. 7), their checks, and ``T`` on rows of F_ab's output."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Union

import numpy as np
import torch


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


@dataclass(frozen=True)
class _CheckedConcept(ConceptTarget):
    """A validated :class:`ConceptTarget` with its unit vector(s) ``unit`` (``[C_b]`` or ``[B, C_b]``),
    normalised once per call instead of at every evaluation."""
    unit: torch.Tensor | None = None


def check_target(target, B: int, device: torch.device) -> Target:
    """``target`` checked for ``B`` images and moved to ``device`` (a :class:`ClassTarget` comes back as a
    :class:`_CheckedClass`, which :func:`evaluate_target` needs, a :class:`ConceptTarget` as a
    :class:`_CheckedConcept`); a named ValueError for a bad one."""
    if isinstance(target, ConceptTarget):
        vec = target.vector
        if not isinstance(vec, torch.Tensor) or vec.dim() not in (1, 2) or (vec.dim() == 2 and vec.shape[0] != B):
            raise ValueError(f"ConceptTarget.vector must be [C_b] or [B={B}, C_b], got "
                             f"{tuple(vec.shape) if isinstance(vec, torch.Tensor) else type(vec).__name__}")
        if not vec.is_floating_point() or vec.numel() and any(torch.stack(  # one read-back for both
                [~torch.isfinite(vec).all(), (vec.norm(dim=-1) == 0).any() & (B > 0)]).tolist()):
            raise ValueError("ConceptTarget.vector must be finite, non-zero float vector(s)")
        vec = vec.to(device)
        return _CheckedConcept(vec, vec / vec.norm(dim=-1, keepdim=True))
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


def evaluate_target(target: Target, out: torch.Tensor, image: torch.Tensor,
                    position_sums: torch.Tensor | None = None) -> torch.Tensor:
    """``T`` on each row of ``out`` (``[n, C_b, ...]`` or logits ``[n, n_classes]``); ``image [n]`` says which
    image each row belongs to (for per-image class indices). ``position_sums [n, C_b]``: ``out`` summed over
    its positions, when the caller has it (one sum for all concept targets). Returns ``[n]``."""
    if isinstance(target, ConceptTarget):
        check_concept_output(target, out)
        if position_sums is None:
            position_sums = out.reshape(out.shape[0], out.shape[1], -1).sum(2)
        # T is linear: Σ_i ⟨Ω_i, u⟩ = ⟨Σ_i Ω_i, u⟩, one sum over the positions for every target
        return (position_sums * _unit_rows(target, out, image)).sum(1)
    if out.dim() != 2:
        raise ValueError(f"ClassTarget needs logits [n, n_classes] from F_ab, got shape {tuple(out.shape)}")
    if out.shape[0] and target.top >= out.shape[1]:  # a _CheckedClass (from check_target)
        raise ValueError(f"ClassTarget.index {target.top} is out of range for {out.shape[1]} classes")
    scores = torch.softmax(out, dim=1) if target.probability else out
    if not isinstance(target.index, torch.Tensor):
        return scores[:, target.index]
    return scores.gather(1, target.index[image][:, None])[:, 0]


def output_gradient(target: Target, out: torch.Tensor, image: torch.Tensor) -> torch.Tensor | None:
    """The gradient of ``Σ_rows T`` with respect to F_ab's output ``out [n, C_b, ...]`` for a concept target:
    T is linear in the output, so it is the target's unit vector at every position (a broadcast view, no
    copy); the backward starts from it and skips T's own small graph. None for a class target (its softmax
    goes through autograd)."""
    if not isinstance(target, ConceptTarget):
        return None
    check_concept_output(target, out)
    rows = _unit_rows(target, out, image)                                   # [n, C_b]
    return rows.reshape(*rows.shape, *([1] * (out.dim() - 2))).expand(out.shape)


def check_concept_output(target: ConceptTarget, out: torch.Tensor) -> None:
    """A named ValueError unless F_ab's output ``out`` has the target's ``C_b`` channels on dim 1."""
    if out.dim() < 2 or out.shape[1] != target.vector.shape[-1]:
        raise ValueError(f"ConceptTarget.vector has C_b={target.vector.shape[-1]} entries but F_ab's output has "
                         f"shape {tuple(out.shape)} (channels on dim 1)")


def _unit_rows(target: ConceptTarget, out: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
    """``[n, C_b]`` the unit concept of each row of ``out`` (row i belongs to image ``image[i]``)."""
    vec = target.vector
    unit = (target.unit if isinstance(target, _CheckedConcept) else vec / vec.norm(dim=-1, keepdim=True)).to(out.dtype)
    return unit.expand(out.shape[0], -1) if unit.dim() == 1 else unit[image]
