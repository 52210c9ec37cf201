"""Input builders and checks shared by the k-means tests and ``benchmarks/bench_kmeans.py``."""
from __future__ import annotations

import torch

__all__ = ["random_unit", "clustered_points", "cosine_scores64", "label_quality"]


def random_unit(n: int, c: int, dtype=torch.float32, device="cpu", generator=None) -> torch.Tensor:
    """``[n, c]`` random directions (Gaussian rows scaled to unit length), cast to ``dtype``."""
    x = torch.randn(n, c, dtype=torch.float64, device=device, generator=generator)
    return (x / x.norm(dim=1, keepdim=True)).to(dtype)


def clustered_points(n: int, c: int, k: int, spread: float = 0.3, dtype=torch.float32, device="cpu",
                     generator=None) -> torch.Tensor:
    """``[n, c]`` points around ``k`` random directions (Gaussian noise of std ``spread/sqrt(c)``), plus an
    offset of 2 on every channel so that centring by ``beta = 2`` matters (PFV-like data)."""
    centres = random_unit(k, c, torch.float64, device, generator)
    pick = torch.randint(k, (n,), device=device, generator=generator)
    x = centres[pick] + spread / c ** 0.5 * torch.randn(n, c, dtype=torch.float64, device=device, generator=generator)
    return (x + 2.0).to(dtype)


def cosine_scores64(X: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Exact ``[N, K]`` cosines in float64 (tests only: materialises N×K)."""
    def unit(t):
        t = t.to(torch.float64)
        return t / t.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return unit(X) @ unit(centroids).T


def label_quality(X: torch.Tensor, centroids: torch.Tensor, labels: torch.Tensor, chunk: int = 8192) -> dict:
    """How far ``labels`` are from a float64 argmax: share of exact matches and the largest loss of cosine
    ``max_k cos − cos(label)`` over the rows, computed ``chunk`` rows at a time."""
    match, worst = 0, 0.0
    for s in range(0, X.shape[0], chunk):
        S = cosine_scores64(X[s:s + chunk], centroids)
        top, arg = S.max(dim=1)
        got = S.gather(1, labels[s:s + chunk, None].to(S.device)).squeeze(1)
        match += int((arg == labels[s:s + chunk].to(arg.device)).sum())
        worst = max(worst, float((top - got).max())) if S.shape[0] else worst
    return {"agreement": match / max(X.shape[0], 1), "worst_loss": worst}
