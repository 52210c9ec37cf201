"""Validation metrics as pure functions (paper §4.2, App. D/I/J; docs/design.md §1.7).

Curves are evaluated on a uniform grid over the fraction of concepts edited, x ∈ [0, 1]; the AUC is
the trapezoid rule on that grid. Codes are the padded sparse codes of the pipeline: ``idx [P, s]``
int64 with −1 padding, ``val [P, s]``; positions row-major (``p = h·W + w``).
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from ..ops.common import dense_to_padded  # re-exported: the baselines pad their dense codes with it

__all__ = ["auc", "step_counts", "curve_grid", "edit_codes", "edited_inputs", "concept_curve", "class_score",
           "label_hits", "max_projection", "reconstruction_quality", "top_overlap", "dense_to_padded",
           "interpolate_at", "MATCHED_ACTIVE"]

MODES = ("deletion", "insertion")


def auc(curve, x=None) -> np.ndarray:
    """Area under ``curve [..., S+1]`` (trapezoid rule) sampled at ``x [S+1]`` (increasing, from 0 to 1;
    None: uniform on [0, 1]).

    A single sample (S = 0) has the area of that constant value.
    """
    y = np.asarray(curve, dtype=np.float64)
    if y.shape[-1] == 1:
        return y[..., 0]
    if x is None:
        return np.trapezoid(y, dx=1.0 / (y.shape[-1] - 1), axis=-1)
    x = np.asarray(x, dtype=np.float64)
    if x.shape != y.shape[-1:] or np.any(np.diff(x) <= 0) or x[0] != 0 or x[-1] != 1:
        raise ValueError(f"x must increase from 0 to 1 with one value per curve sample, got {x.tolist()[:5]}… "
                         f"({x.size} values for {y.shape[-1]} samples)")
    return np.trapezoid(y, x=x, axis=-1)


def step_counts(n: int, steps: int) -> np.ndarray:
    """``[S+1]`` numbers of concepts edited at each step: round(linspace(0, n, S+1)), S = min(steps, n).

    Uniform in the fraction edited, so every curve lives on the same x grid; ``n = 0`` gives ``[0]``.
    """
    if n < 0 or steps < 1:
        raise ValueError(f"need n ≥ 0 and steps ≥ 1, got n={n}, steps={steps}")
    s = min(steps, n)
    return np.rint(np.linspace(0, n, s + 1)).astype(np.int64) if s else np.zeros(1, np.int64)


def curve_grid(K: int, top: int, top_steps: int, steps: int) -> np.ndarray:
    """Numbers of concepts edited along a C-Deletion / C-Insertion curve over all ``K`` concepts.

    The union of :func:`step_counts` ``(top, top_steps)`` (every concept of the first ``top``, so the
    top-``top`` curve is a sub-curve) and ``(K, steps)`` (uniform in the fraction of all K): the curve
    starts one concept at a time, where the class score changes most, and reaches ``K`` (none / all left).

    Returns:
        ``[G]`` increasing int64 counts from 0 to K.
    """
    if not 0 <= top <= K:
        raise ValueError(f"need 0 ≤ top ≤ K, got top={top}, K={K}")
    return np.union1d(step_counts(top, top_steps), step_counts(K, steps)).astype(np.int64)


def edit_codes(idx: torch.Tensor, val: torch.Tensor, order: torch.Tensor, counts, mode: str) -> torch.Tensor:
    """Code values after removing / keeping the first ``counts[k]`` concepts of ``order``.

    Args:
        idx: ``[P, s]`` concept indices (−1 = padding); val: ``[P, s]`` coefficients.
        order: ``[n]`` concept ids in editing order (most important first).
        counts: ``[S+1]`` how many of ``order`` are edited at each step.
        mode: ``"deletion"`` (set the edited concepts' coefficients to 0 everywhere) or
            ``"insertion"`` (keep only the edited concepts: start from the baseline β, add them).

    Returns:
        ``[S+1, P, s]`` edited coefficients (same dtype as ``val``).
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    order = torch.as_tensor(order, dtype=torch.long, device=idx.device)
    K = int(max(idx.max().item() if idx.numel() else -1, order.max().item() if order.numel() else -1)) + 1
    big = order.numel() + 1
    rank = torch.full((max(K, 1),), big, dtype=torch.long, device=idx.device)
    rank[order] = torch.arange(order.numel(), device=idx.device)
    r = torch.where(idx >= 0, rank[idx.clamp_min(0)], torch.full_like(idx, big))
    c = torch.as_tensor(np.asarray(counts), dtype=torch.long, device=idx.device).view(-1, *([1] * idx.dim()))
    edited = r.unsqueeze(0) < c  # [S+1, P, s]
    keep = ~edited if mode == "deletion" else edited
    return val.unsqueeze(0) * keep.to(val.dtype)


def edited_inputs(idx, val, V, bias, order, counts, mode, spatial) -> torch.Tensor:
    """``[S+1, C, H, W]`` reconstructions ``Σ_q u_pq v_q + bias`` of the edited codes (see :func:`edit_codes`)."""
    from ..ops import sparse_reconstruct

    vals = edit_codes(idx, val, order, counts, mode)
    S1 = vals.shape[0]
    X = sparse_reconstruct(idx.unsqueeze(0).expand(S1, -1, -1).contiguous(), vals.to(V.dtype), V, bias)
    H, W = spatial
    return X.reshape(S1, H, W, -1).permute(0, 3, 1, 2).contiguous()


@torch.no_grad()
def concept_curve(rest: Callable, idx, val, V, bias, order, counts, mode: str, score: Callable,
                  spatial: tuple[int, int]) -> np.ndarray:
    """One image's C-Deletion / C-Insertion curve ``[S+1]``.

    Args:
        rest: the network after the layer, ``[n, C, H, W] → output`` (``F_ab`` or to the logits).
        idx, val: ``[P, s]`` the image's codes at the layer; V: ``[K, C]``; bias: ``[C]`` (β or a decoder bias).
        order: ``[n]`` concept ids, most important first; counts: ``[S+1]`` (:func:`step_counts`).
        score: ``output [S+1, …] → [S+1]`` (e.g. :func:`class_score`, :func:`max_projection`).
        spatial: ``(H, W)`` of the layer.
    """
    X = edited_inputs(idx, val, V, bias, order, counts, mode, spatial)
    return score(rest(X)).detach().double().cpu().numpy()


def class_score(logits: torch.Tensor, cls: int, probability: bool = True) -> torch.Tensor:
    """``[n]`` softmax probability (paper Eq. 7, the default) or logit of class ``cls`` from ``logits [n, n_classes]``."""
    return torch.softmax(logits, dim=1)[:, cls] if probability else logits[:, cls]


def label_hits(logits: torch.Tensor, cls: int) -> torch.Tensor:
    """``[n]`` 1.0 where the predicted class (argmax of ``logits [n, n_classes]``) is ``cls``, else 0.0.

    The mean over images of this is the accuracy that the paper's C-Deletion / C-Insertion curves plot."""
    return (logits.argmax(dim=1) == cls).to(torch.float64)


def max_projection(out: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``[n]`` max over positions of ⟨Ω_p, v/‖v‖⟩ for layer outputs ``out [n, C, H, W]`` and a concept ``v [C]``."""
    proj = torch.einsum("nchw,c->nhw", out, v.to(out.dtype) / v.norm().clamp_min(1e-30))
    return proj.flatten(1).max(dim=1).values


def reconstruction_quality(X: torch.Tensor, X_hat: torch.Tensor, nnz: torch.Tensor, K: int) -> dict:
    """Paper Table 1: mean relative L2 ``‖x − x̂‖/‖x‖`` and mean l0 ratio ``1 − nnz/K`` over rows, and
    ``active``, the mean number of non-zero coefficients per row.

    Args:
        X, X_hat: ``[N, C]`` PFVs and reconstructions; nnz: ``[N]`` non-zero coefficients per row; K: concepts.
    """
    rel = (X - X_hat).norm(dim=1) / X.norm(dim=1).clamp_min(1e-12)
    l0 = 1.0 - nnz.double() / K
    return {"rel_l2": float(rel.double().mean()), "l0_ratio": float(l0.mean()), "active": float(nnz.double().mean()),
            "pfvs": int(X.shape[0]), "K": int(K)}


def top_overlap(a, b, k: int) -> float:
    """Share of the top-``k`` entries of score vector ``a [K]`` that are also in the top-``k`` of ``b [K]``."""
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape or k < 1:
        raise ValueError(f"need equal shapes and k ≥ 1, got {a.shape}, {b.shape}, k={k}")
    k = min(k, a.size)
    ta = set(np.argsort(-a, kind="stable")[:k].tolist())
    tb = set(np.argsort(-b, kind="stable")[:k].tolist())
    return len(ta & tb) / k


MATCHED_ACTIVE = (2, 3, 4, 6, 8, 12, 16)  # active concepts per PFV at which the sparsity–error curves are read


def interpolate_at(x_query, x, y) -> np.ndarray:
    """``y`` at ``x_query`` by linear interpolation in ``log(x)`` over the sorted samples ``(x [n], y [n])``
    (NaN outside their range): a sparsity–error curve read at a given number of active concepts."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    q = np.atleast_1d(np.asarray(x_query, dtype=np.float64))
    keep = np.isfinite(x) & np.isfinite(y) & (x > 0)
    x, y = x[keep], y[keep]
    if x.size == 0:
        return np.full(q.shape, np.nan)
    order = np.argsort(x, kind="stable")
    x, y = x[order], y[order]
    out = np.interp(np.log(np.maximum(q, 1e-300)), np.log(x), y)
    out[(q < x[0]) | (q > x[-1])] = np.nan
    return out
