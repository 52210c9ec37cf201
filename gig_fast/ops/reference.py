"""Pure-PyTorch references of the ops (the ``torch`` backend).

They run on any device and are the oracle of every test: short, obviously correct, accumulating in
float32 (float64 stays float64). They may use more memory than the kernels, never a different formula.
Shapes follow docs/design.md §3: padded sparse codes are ``idx [P, s]`` (int64, −1 = padding) and
``val [P, s]`` (0 at padding); ``V [K, C]`` holds one concept per row. One section per op, in this file
only: sparse_reconstruct, spherical_assign, centroid_update, gig_accumulate, two_means (the 2-means splits
with the kernel's own random generator) and sparse_code (the Gram-form solvers).
"""
from __future__ import annotations

import torch

from .common import accumulation_dtype, omp_gram, scale_extreme_rows

__all__ = [
    "padded_rows",
    "sparse_reconstruct_ref",
    "sparse_reconstruct_backward_ref",
    "spherical_assign_ref",
    "centroid_update_ref",
    "gig_accumulate_ref",
    "segment_sum",
    "SplitMix64",
    "two_means_step_ref",
    "two_means_splits_ref",
    "duality_gap",
    "lasso_gram_ref",
    "omp_gram_ref",
]


def padded_rows(V: torch.Tensor, idx: torch.Tensor, acc: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``(Vz [K + 1, C], safe)``: V in ``acc`` with a zero row appended, and ``idx`` with its −1 padding
    pointing at that row, so ``Vz[safe]`` is ``V[idx]`` with zeros at padding.

    Padding never reads V: an inf or NaN in a concept that no code uses would otherwise turn into NaN
    in the rows that pad with it (0·inf), where the compiled backends skip padding altogether; and
    K = 0 (every entry padding) gives the bias, as in the compiled backends.
    """
    K, C = V.shape
    Vz = torch.cat([V.to(acc), torch.zeros(1, C, dtype=acc, device=V.device)])
    return Vz, torch.where(idx >= 0, idx, torch.full_like(idx, K))


def sparse_reconstruct_ref(idx: torch.Tensor, val: torch.Tensor, V: torch.Tensor,
                           bias: torch.Tensor | None = None) -> torch.Tensor:
    """``X̃[p] = bias + Σ_j val[p,j]·V[idx[p,j]]`` (padding ignored, never read).

    Args: idx ``[P, s]``, val ``[P, s]``, V ``[K, C]``, bias ``[C]`` or None.
    Returns: ``[P, C]`` in V's dtype.
    """
    acc = accumulation_dtype(V.dtype)
    P, s = idx.shape
    out = torch.zeros(P, V.shape[1], dtype=acc, device=V.device)
    if bias is not None:
        out += bias.to(acc)
    weights = torch.where(idx >= 0, val.to(acc), torch.zeros((), dtype=acc, device=val.device))
    Vz, safe = padded_rows(V, idx, acc)
    for j in range(s):  # one column of codes at a time keeps the memory at [P, C]
        out += weights[:, j, None] * Vz[safe[:, j]]
    return out.to(V.dtype)


def sparse_reconstruct_backward_ref(grad_out: torch.Tensor, idx: torch.Tensor, val: torch.Tensor,
                                    V: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of :func:`sparse_reconstruct_ref` w.r.t. ``val`` and ``V``.

    ``grad_val[p,j] = ⟨grad_out[p], V[idx[p,j]]⟩`` at active entries (0 at padding, V not read there);
    ``grad_V[k] = Σ_{(p,j): idx[p,j]=k} val[p,j]·grad_out[p]``.
    Returns: ``(grad_val [P, s] in val's dtype, grad_V [K, C] in V's dtype)``.
    """
    acc = accumulation_dtype(V.dtype)
    active = idx >= 0
    g = grad_out.to(acc)
    Vz, safe = padded_rows(V, idx, acc)
    grad_val = torch.zeros(idx.shape, dtype=acc, device=V.device)
    for j in range(idx.shape[1]):
        grad_val[:, j] = (g * Vz[safe[:, j]]).sum(1)
    rows, cols = active.nonzero(as_tuple=True)
    contrib = val[rows, cols].to(acc)[:, None] * g[rows]
    grad_V = segment_sum(contrib, idx[rows, cols], V.shape[0])
    return grad_val.to(val.dtype), grad_V.to(V.dtype)


def segment_sum(values: torch.Tensor, keys: torch.Tensor, K: int) -> torch.Tensor:
    """``out[k] = Σ_{i: keys[i]=k} values[i]`` in a fixed order, so the result is bit-reproducible.

    Args: values ``[E, C]``, keys int64 ``[E]`` in ``[0, K)``. Returns ``[K, C]`` in values' dtype.
    On CUDA ``index_add_`` sums with float atomics (run-to-run differences); there the entries are
    stably sorted by key and reduced per segment instead.
    """
    out = torch.zeros(K, values.shape[1], dtype=values.dtype, device=values.device)
    if values.device.type != "cuda":
        return out.index_add_(0, keys, values)
    order = torch.argsort(keys, stable=True)
    counts = torch.bincount(keys, minlength=K)
    used = counts > 0
    if bool(used.any()):
        out[used] = torch.segment_reduce(values[order], "sum", lengths=counts[used], axis=0)
    return out


def _unit_rows(x: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Rows scaled to unit length; an all-zero row stays zero (its cosine with anything is 0)."""
    return x / x.norm(dim=1, keepdim=True).clamp_min(eps)


def spherical_assign_ref(X: torch.Tensor, centroids: torch.Tensor, chunk: int = 4096
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """``labels[n] = argmax_k cos(X[n], centroids[k])`` with ties to the smaller k.

    Args: X ``[N, C]``, centroids ``[K, C]``.
    Returns: ``(labels int64 [N], best cosine [N] float32, float64 for float64 input)``.
    The reference scores ``chunk`` rows at a time, so it never holds all of ``N×K`` either. Rows of
    extreme scale are brought into range first (:func:`scale_extreme_rows`).
    """
    acc = accumulation_dtype(X.dtype)
    X, centroids = scale_extreme_rows(X), scale_extreme_rows(centroids)
    Cn = _unit_rows(centroids.to(acc))
    labels = torch.empty(X.shape[0], dtype=torch.int64, device=X.device)
    best = torch.empty(X.shape[0], dtype=acc, device=X.device)
    for start in range(0, X.shape[0], chunk):
        scores = _unit_rows(X[start:start + chunk].to(acc)) @ Cn.T
        best[start:start + chunk], labels[start:start + chunk] = scores.max(dim=1)
    # torch.max returns the first maximal index on CPU and CUDA: ties go to the smaller k.
    return labels, best


def centroid_update_ref(X: torch.Tensor, labels: torch.Tensor, K: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-cluster sums and counts.

    Args: X ``[N, C]``, labels int64 ``[N]`` in ``[0, K)``, K.
    Returns: ``(sums [K, C] float32 (float64 for float64 input), counts int64 [K])``.
    """
    acc = accumulation_dtype(X.dtype)
    return segment_sum(X.to(acc), labels, K), torch.bincount(labels, minlength=K)


def gig_accumulate_ref(grads: torch.Tensor, weights: torch.Tensor, idx: torch.Tensor, val: torch.Tensor,
                       V: torch.Tensor) -> torch.Tensor:
    """``attr[..., p, j] = val[p,j]·⟨Σ_k weights[k]·grads[..., k, p, :], V[idx[p,j]]⟩`` (0 at padding).

    Args: grads ``[m, P, C]`` or ``[T, m, P, C]``, weights ``[m]``, idx/val ``[P, s]``, V ``[K, C]``.
    Returns: ``[P, s]`` or ``[T, P, s]`` float32 (float64 for float64 grads).
    """
    acc = accumulation_dtype(grads.dtype)
    g = torch.einsum("m,...mpc->...pc", weights.to(acc), grads.to(acc))  # [(T,) P, C]
    Vz, safe = padded_rows(V, idx, acc)  # padding reads a zero row, never V
    attr = torch.zeros(g.shape[:-1] + (idx.shape[1],), dtype=acc, device=grads.device)
    for j in range(idx.shape[1]):
        attr[..., j] = (g * Vz[safe[:, j]]).sum(-1)
    return torch.where(idx >= 0, attr * val.to(acc), torch.zeros((), dtype=acc, device=grads.device))


# ------------------------------------------------------------------------------------ two_means
class SplitMix64:
    """The random generator of the 2-means splits (Steele, Lea, Flood 2014), bit-identical to the one in
    ``csrc/two_means``: the same seed gives the same draws in the reference and in the C++ kernel."""

    _MASK = (1 << 64) - 1

    def __init__(self, seed: int):
        self.state = int(seed) & self._MASK

    def next(self) -> int:
        self.state = (self.state + 0x9E3779B97F4A7C15) & self._MASK
        z = self.state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & self._MASK
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & self._MASK
        return z ^ (z >> 31)

    def uniform(self) -> float:
        """A double in [0, 1) from the top 53 bits."""
        return (self.next() >> 11) * 2.0 ** -53

    def index(self, n: int) -> int:
        """A uniform index in [0, n)."""
        return min(n - 1, int(self.uniform() * n))


def _side_sums(Ur: torch.Tensor, side: torch.Tensor) -> torch.Tensor:
    """``[2, C]`` float64 sums of the rows ``Ur [n, C]`` on each side (``side`` int64 ``[n]`` in {0, 1})."""
    return torch.zeros(2, Ur.shape[1], dtype=torch.float64, device=Ur.device).index_add_(0, side, Ur.double())


def two_means_step_ref(U: torch.Tensor, members: torch.Tensor, sums: torch.Tensor
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """One spherical 2-means Lloyd step on the rows ``U[members]`` from the side sums ``sums``.

    ``side[i] = 1`` iff ``<x_i, S1/|S1| − S0/|S0|> > 0`` (ties → 0; an empty side's term is 0), the
    direction cast to U's dtype as the kernel does; returns ``(side int64 [n], new sums float64 [2, C])``.

    Args: U ``[N, C]`` unit rows (float32/float64), members int64 ``[n]``, sums float64 ``[2, C]``.
    """
    norms = sums.norm(dim=1)
    inv = torch.where(norms > 0, 1.0 / norms.clamp_min(torch.finfo(torch.float64).tiny), torch.zeros_like(norms))
    w = (sums[1] * inv[1] - sums[0] * inv[0]).to(U.dtype)
    Ur = U[members]
    side = (Ur @ w > 0).to(torch.int64)
    return side, _side_sums(Ur, side)


def _lloyd_ref(Ur: torch.Tensor, S: torch.Tensor, max_iter: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Lloyd from the sums ``S [2, C]`` until no side changes (at most ``max_iter`` steps):
    ``(side [n], sums of those sides [2, C], cosine inertia n − |S0| − |S1|)``."""
    rows = torch.arange(Ur.shape[0], device=Ur.device)
    side = None
    for _ in range(max_iter):
        new_side, S = two_means_step_ref(Ur, rows, S)
        stable = side is not None and torch.equal(new_side, side)
        side = new_side
        if stable:
            break
    return side, S, Ur.shape[0] - float(S.norm(dim=1).sum())


def _init_pair_ref(Ur: torch.Tensor, rng: SplitMix64) -> torch.Tensor:
    """k-means++ start ``[2, C]`` float64: a uniform random row, then a row drawn with probability ∝ its
    cosine distance ``1 − <x, x_first>`` (any other row when every distance is 0)."""
    n = Ur.shape[0]
    first = rng.index(n)
    dist = (1.0 - (Ur @ Ur[first]).double()).clamp_min(0)
    second = (first + 1 + rng.index(max(n - 1, 1))) % n  # drawn in every case, as the kernel does
    total = float(dist.sum())
    if total > 0:
        u = rng.uniform() * total
        hit = int(torch.searchsorted(torch.cumsum(dist, 0), torch.tensor([u], dtype=torch.float64,
                                                                             device=dist.device), right=True))
        if hit < n:  # a row of distance 0 is never drawn
            second = hit
    return Ur[[first, second]].double()


def _split_one_ref(U: torch.Tensor, members: torch.Tensor, seed: int, n_init: int, max_iter: int,
                   init_sample: int, refine: bool) -> tuple[torch.Tensor, torch.Tensor, float, bool]:
    """One split of :func:`two_means_splits_ref`: ``(side [n_b], sums [2, C], inertia, fell_back)``."""
    n = members.shape[0]
    rng = SplitMix64(seed)
    sample = members
    if n > init_sample:  # a partial Fisher–Yates draw of init_sample members, kept in member order
        pos = list(range(n))
        for j in range(init_sample):
            r = j + rng.index(n - j)
            pos[j], pos[r] = pos[r], pos[j]
        sample = members[sorted(pos[:init_sample])]
    Us = U[sample]
    best = None
    for t in range(n_init):
        side, S, inertia = _lloyd_ref(Us, _init_pair_ref(Us, rng), max_iter)
        if t == 0 or inertia < best[2] - 1e-9 * n:
            best = (side, S, inertia)
    side, S, inertia = best
    if sample.shape[0] < n:
        if not refine:
            return side, S, inertia, False
        side, S, inertia = _lloyd_ref(U[members], S, max_iter)
    ones = int(side.sum())
    if ones == 0 or ones == n:  # inseparable (identical or zero rows): split by member order
        side = (torch.arange(n, device=U.device) >= (n + 1) // 2).to(torch.int64)
        S = _side_sums(U[members], side)
        return side, S, n - float(S.norm(dim=1).sum()), True
    return side, S, inertia, False


def two_means_splits_ref(U: torch.Tensor, members: list[torch.Tensor], seeds: list[int], n_init: int,
                         max_iter: int, init_sample: int, refine: bool
                         ) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor, torch.Tensor]:
    """Spherical 2-means splits of the clusters ``U[members[b]]``, the algorithm of ``csrc/two_means``
    (formulas in ``two_means.h``) with the same random draws (:class:`SplitMix64` seeded by ``seeds[b]``).

    Args: U ``[N, C]`` unit rows (float32/float64), members: int64 ``[n_b]`` sorted row indices (n_b ≥ 2).
    Returns: ``(sides [int64 [n_b]], sums float64 [B, 2, C], inertia float64 [B], fell_back bool [B])``;
    with ``refine=False`` a cluster larger than ``init_sample`` stops after its sample (its side has
    ``init_sample`` entries).
    """
    out = [_split_one_ref(U, m, s, n_init, max_iter, init_sample, refine) for m, s in zip(members, seeds)]
    dev, C = U.device, U.shape[1]
    sums = torch.stack([o[1] for o in out]) if out else torch.zeros(0, 2, C, dtype=torch.float64, device=dev)
    return ([o[0] for o in out], sums, torch.tensor([o[2] for o in out], dtype=torch.float64, device=dev),
            torch.tensor([o[3] for o in out], dtype=torch.bool, device=dev))

# ------------------------------------------------------------------------------------ sparse_code
# The reference solvers of ``sparse_code`` work on the *Gram form* of the problem, shared by every backend:
# for centred vectors ``y = x − β`` (rows of ``Y [N, C]``) and concepts ``V [K, C]``, correlations
# ``c = V y`` (``[N, K]``) and the Gram matrix ``G = V Vᵀ`` (``[K, K]``), the Lasso (docs/design.md §1.4, paper
# §3.2.2) ``min_u ½‖y − Vᵀu‖² + λ‖u‖₁ = ½‖y‖² − cᵀu + ½uᵀGu + λ‖u‖₁``. It is solved by batched FISTA with
# adaptive (gradient) restart, stopped by the duality gap, which every backend computes the same way from
# ``q = c − G u = V r`` (``r = y − Vᵀu``):
#   primal ``P = ½‖r‖² + λ‖u‖₁`` with ``‖r‖² = ‖y‖² − cᵀu − uᵀq``;
#   dual point ``θ = s·r``, ``s = min(1, λ / ‖q‖_∞)`` (``max(q)₊`` instead of ``‖q‖_∞`` when ``u ≥ 0``);
#   dual ``D = ½‖y‖² − ½‖y − θ‖² = s(‖y‖² − cᵀu) − ½s²‖r‖²``; ``gap = P − D ≥ 0``.
# A row is converged when ``gap ≤ tol·‖y‖²``. OMP (fixed number of atoms, atoms selected by the largest
# ``|q|`` like scikit-learn's ``orthogonal_mp_gram``) re-solves the normal equations on the support at
# every step with ``torch.linalg.solve``: slow, obviously right.

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


# OMP has one implementation, shared by the torch and Triton backends (the Triton one passes sparse
# residual correlations): :func:`gig_fast.ops.common.omp_gram`. The reference is that function.
omp_gram_ref = omp_gram
