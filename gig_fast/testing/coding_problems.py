"""Input builders and objective checks shared by the tests and the benchmark of ``sparse_code``.

``pfv_like`` imitates what the pipeline codes: pre-activation PFVs of a CNN block are non-negative-ish
and strongly correlated (a few latent directions plus a common offset), and the concepts are centred
PFV-like vectors of the same layer, so the dictionary is coherent (far from the orthogonal random case).
"""
from __future__ import annotations

import numpy as np
import torch

__all__ = ["random_problem", "pfv_like", "lasso_objective", "dense_codes", "sklearn_lasso_objective",
           "sklearn_omp_supports"]


def random_problem(N: int, C: int, K: int, dtype=torch.float64, device="cpu", generator=None):
    """Gaussian vectors ``X [N, C]`` and a Gaussian dictionary ``V [K, C]`` (rows scaled to unit norm)."""
    X = torch.randn(N, C, dtype=dtype, device=device, generator=generator)
    V = torch.randn(K, C, dtype=dtype, device=device, generator=generator)
    V = V / V.norm(dim=1, keepdim=True)
    return X, V


def pfv_like(N: int, C: int, K: int, dtype=torch.float32, device="cpu", generator=None, rank: int | None = None):
    """PFV-like data: ``(X [N, C], V [K, C], beta [C])``.

    Vectors are ``relu(z A + 0.4 + 0.3ε) + beta`` with ``z`` of rank ``max(4, C // 16)``: non-negative
    after the shift, correlated across channels. Concepts are other such vectors, centred by ``beta``
    (the paper keeps cluster means of ``x − β``, which look alike).
    """
    r = rank or max(4, C // 16)
    g = generator
    A = torch.randn(r, C, generator=g) / r ** 0.5
    beta = 0.1 * torch.randn(C, generator=g)

    def sample(n):
        z = torch.randn(n, r, generator=g)
        return torch.relu(z @ A + 0.4 + 0.3 * torch.randn(n, C, generator=g)) + beta

    X = sample(N)
    V = sample(K) - beta
    return X.to(dtype=dtype, device=device), V.to(dtype=dtype, device=device), beta.to(dtype=dtype, device=device)


def dense_codes(idx: torch.Tensor, val: torch.Tensor, K: int) -> torch.Tensor:
    """Padded ``(idx [N, s], val [N, s])`` → dense ``[N, K]`` (float64)."""
    idx2, val2 = idx.reshape(-1, idx.shape[-1]), val.reshape(-1, val.shape[-1]).double()
    ok = idx2 >= 0
    return torch.zeros(idx2.shape[0], K, dtype=torch.float64).scatter_add_(
        1, idx2.clamp_min(0).cpu(), torch.where(ok, val2, 0).cpu())


def lasso_objective(Y: np.ndarray, V: np.ndarray, U: np.ndarray, lam: np.ndarray) -> np.ndarray:
    """``½‖y − Vᵀu‖² + λ‖u‖₁`` per row, in float64. Y ``[N, C]`` (centred), U ``[N, K]``, lam ``[N]``."""
    R = Y - U @ V
    return 0.5 * (R * R).sum(1) + lam * np.abs(U).sum(1)


def sklearn_lasso_objective(Y: np.ndarray, V: np.ndarray, lam: np.ndarray, positive: bool = False) -> np.ndarray:
    """Objective of scikit-learn's converged ``Lasso`` per row (alpha = λ/C: sklearn divides the squared
    loss by n_samples = C)."""
    from sklearn.linear_model import Lasso

    C = Y.shape[1]
    out = np.empty(Y.shape[0])
    for n in range(Y.shape[0]):
        m = Lasso(alpha=float(lam[n]) / C, fit_intercept=False, tol=1e-12, max_iter=1_000_000, positive=positive)
        m.fit(V.T, Y[n])
        out[n] = lasso_objective(Y[n:n + 1], V, m.coef_[None, :], lam[n:n + 1])[0]
    return out


def sklearn_omp_supports(Y: np.ndarray, V: np.ndarray, n_nonzero: int) -> list[set]:
    """Supports chosen by scikit-learn's ``sparse_encode(algorithm="omp")`` (Gram-based OMP)."""
    import warnings

    from sklearn.decomposition import sparse_encode

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # sklearn's "stopped early" notice
        code = sparse_encode(Y, V, algorithm="omp", n_nonzero_coefs=n_nonzero)
    return [set(np.flatnonzero(row).tolist()) for row in code]
