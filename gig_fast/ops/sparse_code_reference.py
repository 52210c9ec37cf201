"""Pure-PyTorch reference solvers of ``sparse_code`` (the ``torch`` backend and the oracle of the tests).

Both work on the *Gram form* of the problem, shared by every backend: for centred vectors
``y = x − β`` (rows of ``Y [N, C]``) and concepts ``V [K, C]``,

* correlations ``c = V y``            (``corr [N, K]``),
* Gram matrix  ``G = V Vᵀ``           (``[K, K]``),
* Lasso (DESIGN.md §1.4, paper §3.2.2):  ``min_u ½‖y − Vᵀu‖² + λ‖u‖₁``
  ``= ½‖y‖² − cᵀu + ½uᵀGu + λ‖u‖₁``.

Lasso is solved by batched FISTA with adaptive (gradient) restart, stopped by the duality gap, which
every backend computes the same way from ``q = c − G u = V r`` (``r = y − Vᵀu``):

* primal ``P = ½‖r‖² + λ‖u‖₁`` with ``‖r‖² = ‖y‖² − cᵀu − uᵀq``;
* dual point ``θ = s·r``, ``s = min(1, λ / ‖q‖_∞)`` (``max(q)₊`` instead of ``‖q‖_∞`` when ``u ≥ 0``);
* dual ``D = ½‖y‖² − ½‖y − θ‖² = s(‖y‖² − cᵀu) − ½s²‖r‖²``; ``gap = P − D ≥ 0``.

A row is converged when ``gap ≤ tol·‖y‖²``. OMP (fixed number of atoms, atoms selected by the largest
``|q|`` like scikit-learn's ``orthogonal_mp_gram``) re-solves the normal equations on the support at
every step with ``torch.linalg.solve``: slow, obviously right.
"""
from __future__ import annotations

import torch

__all__ = ["lasso_gram_ref", "omp_gram_ref", "duality_gap", "dense_to_padded"]


def duality_gap(c: torch.Tensor, q: torch.Tensor, u: torch.Tensor, y2: torch.Tensor, lam: torch.Tensor,
                positive: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Primal objective and duality gap per row.

    Args:
        c: ``[N, K]`` correlations ``V y``; q: ``[N, K]`` residual correlations ``c − G u``;
        u: ``[N, K]`` codes; y2: ``[N]`` ``‖y‖²``; lam: ``[N]`` absolute λ.

    Returns:
        ``(primal [N], gap [N])``.
    """
    cu = (c * u).sum(1)
    r2 = (y2 - cu - (u * q).sum(1)).clamp_min(0)
    qmax = q.amax(1).clamp_min(0) if positive else q.abs().amax(1)
    s = torch.where(qmax > lam, lam / qmax.clamp_min(torch.finfo(q.dtype).tiny), torch.ones_like(qmax))
    primal = 0.5 * r2 + lam * u.abs().sum(1)
    dual = s * (y2 - cu) - 0.5 * s * s * r2
    return primal, (primal - dual).clamp_min(0)


def _soft(z: torch.Tensor, t: torch.Tensor, positive: bool) -> torch.Tensor:
    return (z - t).clamp_min(0) if positive else torch.sign(z) * (z.abs() - t).clamp_min(0)


def lasso_gram_ref(c: torch.Tensor, G: torch.Tensor, y2: torch.Tensor, lam: torch.Tensor, positive: bool,
                   max_iter: int, tol: float, check_every: int = 10
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Batched FISTA (proximal gradient with momentum and adaptive restart) on the Gram form.

    Args:
        c: ``[N, K]`` correlations; G: ``[K, K]`` Gram matrix; y2: ``[N]``; lam: ``[N]`` absolute λ.
        positive: constrain ``u ≥ 0``. max_iter: iterations at most. tol: stop at ``gap ≤ tol·‖y‖²``.

    Returns:
        ``(u [N, K] dense codes, gap [N], iterations [N] int64)``.
    """
    N, K = c.shape
    u = torch.zeros_like(c)
    z = u.clone()
    t = torch.ones(N, 1, dtype=c.dtype, device=c.device)
    iters = torch.zeros(N, dtype=torch.int64, device=c.device)
    gap = torch.zeros(N, dtype=c.dtype, device=c.device)
    if N == 0 or K == 0:
        return u, gap, iters
    # Lipschitz constant of the smooth part: the largest eigenvalue of G (0 only for an all-zero V)
    L = float(torch.linalg.eigvalsh(G.double()).amax().clamp_min(1e-30)) * (1 + 1e-6)
    thr = (lam / L)[:, None]
    active = torch.ones(N, dtype=torch.bool, device=c.device)
    for it in range(max_iter):
        if it % check_every == 0:
            _, gap = duality_gap(c, c - u @ G, u, y2, lam, positive)
            active = gap > tol * y2
            if not bool(active.any()):
                break
        grad = z @ G - c
        u_new = _soft(z - grad / L, thr, positive)
        # gradient restart (O'Donoghue & Candès): drop the momentum when it points uphill
        restart = ((z - u_new) * (u_new - u)).sum(1, keepdim=True) > 0
        t = torch.where(restart, torch.ones_like(t), t)
        t_new = (1 + torch.sqrt(1 + 4 * t * t)) / 2
        z_new = u_new + ((t - 1) / t_new) * (u_new - u)
        keep = active[:, None]
        u = torch.where(keep, u_new, u)
        z = torch.where(keep, z_new, z)
        t = torch.where(keep, t_new, t)
        iters += active.to(torch.int64)
    _, gap = duality_gap(c, c - u @ G, u, y2, lam, positive)
    return u, gap, iters


def omp_gram_ref(c: torch.Tensor, G: torch.Tensor, n_nonzero: int, residual_corr=None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Batched orthogonal matching pursuit on the Gram form (scikit-learn's ``orthogonal_mp_gram`` rules).

    Each step adds the atom with the largest ``|q_k|`` (first index on ties) and re-fits the support by
    least squares. A row stops early, like scikit-learn, when the best ``q_k² < eps`` or the new atom is
    numerically in the span of the chosen ones (Cholesky pivot ``≤ eps``), ``eps`` of the dtype.

    Args:
        c: ``[N, K]`` correlations; G: ``[K, K]``; n_nonzero: atoms per row at most.
        residual_corr: ``(support [N, n], coef [N, n]) -> q [N, K]`` = ``c − Σ_t coef_t G[support_t]``;
            default: a dense ``u @ G`` (the GPU backend passes a sparse one).

    Returns:
        ``(u [N, K] dense codes, steps [N] int64 atoms chosen)``.
    """
    N, K = c.shape
    eps = torch.finfo(c.dtype).eps
    chosen = torch.zeros(N, K, dtype=torch.bool, device=c.device)
    support = torch.zeros(N, 0, dtype=torch.int64, device=c.device)
    slot_ok = torch.zeros(N, 0, dtype=torch.bool, device=c.device)  # False: a stopped row's dummy slot
    alive = torch.ones(N, dtype=torch.bool, device=c.device)
    rows = torch.arange(N, device=c.device)

    def normal_matrix(sup, ok):
        # G_SS with the dummy slots replaced by identity rows/columns, so every system stays regular
        pair = ok[:, :, None] & ok[:, None, :]
        eye = torch.eye(sup.shape[1], dtype=c.dtype, device=c.device).expand(N, -1, -1)
        return torch.where(pair, G[sup[:, :, None], sup[:, None, :]], eye)

    if residual_corr is None:
        residual_corr = lambda sup, w: c - torch.zeros_like(c).scatter_add_(1, sup, w) @ G  # noqa: E731
    coef_ok = torch.zeros(N, 0, dtype=c.dtype, device=c.device)
    for n in range(min(n_nonzero, K)):
        q = residual_corr(support, coef_ok) if n else c
        score = torch.where(chosen, torch.full_like(q, -1.0), q.abs())
        j = score.argmax(1)
        best = score[rows, j]
        # the pivot of the Cholesky factor of G_SS when j joins S: G_jj − G_jSᵀ G_SS⁻¹ G_Sj
        pivot = G[j, j]
        if n:
            Gsj = torch.where(slot_ok, G[support, j[:, None]], 0)
            w = torch.linalg.solve(normal_matrix(support, slot_ok), Gsj.unsqueeze(-1)).squeeze(-1)
            pivot = pivot - (Gsj * w).sum(1)
        alive = alive & (best * best >= eps) & (pivot > eps)
        if not bool(alive.any()):
            break
        support = torch.cat([support, j[:, None]], 1)
        slot_ok = torch.cat([slot_ok, alive[:, None]], 1)
        chosen[rows[alive], j[alive]] = True
        rhs = torch.where(slot_ok, c.gather(1, support), 0)
        coef = torch.linalg.solve(normal_matrix(support, slot_ok), rhs.unsqueeze(-1)).squeeze(-1)
        coef_ok = torch.where(slot_ok, coef, 0)
    u = torch.zeros_like(c).scatter_add_(1, support, coef_ok)
    return u, slot_ok.sum(1)


def dense_to_padded(u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense codes ``[N, K]`` → padded ``(idx [N, s] int64, −1 padding, sorted; val [N, s], 0 at padding)``."""
    nz = u != 0
    s = int(nz.sum(1).max()) if u.numel() else 0
    # stable sort puts the non-zeros first, in increasing concept index
    order = torch.sort((~nz).to(torch.int8), dim=1, stable=True).indices[:, :s]
    keep = torch.gather(nz, 1, order)
    idx = torch.where(keep, order, torch.full_like(order, -1))
    val = torch.where(keep, torch.gather(u, 1, order), torch.zeros((), dtype=u.dtype, device=u.device))
    return idx, val
