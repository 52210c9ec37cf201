"""Helpers that every backend of the ops shares (the reference included): the accumulation dtype,
the rescaling of rows of extreme magnitude before a cosine, dense codes turned into padded ones, and the
batched OMP loop of ``sparse_code`` (the torch and Triton backends differ only in how they compute the
residual correlations), and the fp32 product ``a @ bᵀ`` / Gram ``a @ aᵀ`` of the CPU code paths
(:func:`cpu_matmul_nt`).

They live apart from :mod:`gig_fast.ops.reference` (the test oracle) so that production code — the op
layer, the kernels, the GIG engine, the concept extractor — never imports the oracle.
"""
from __future__ import annotations

import torch

from .. import _extensions as ext

__all__ = ["accumulation_dtype", "scale_extreme_rows", "SAFE_ROW_EXPONENT", "dense_to_padded", "omp_gram",
           "cpu_matmul_nt"]


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; everything else accumulates in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# Cosine is scale-free, but the squares of an fp32 row with entries ≳ 1e19 overflow (its norm becomes inf
# and every cosine 0) and those of a denormal row underflow. So rows whose largest |entry| lies outside
# [2^-30, 2^30] (≈ 1e-9 … 1e9) are first scaled by the power of two that brings it into [0.5, 1): exact, so every other
# row is scored bit for bit as before. Every backend does the same (the C++ host code in
# csrc/spherical_assign/spherical_assign.h, the Triton wrapper through this function).
SAFE_ROW_EXPONENT = 30


def scale_extreme_rows(t: torch.Tensor) -> torch.Tensor:
    """``t [N, C]`` with every row whose largest |entry| lies outside ``[2^-30, 2^30]`` multiplied by the
    power of two that brings it into ``[0.5, 1)``; ``t`` itself when there is none (one host sync)."""
    if t.numel() == 0:
        return t
    m = torch.linalg.vector_norm(t, float("inf"), dim=1).double()
    bound = 2.0 ** SAFE_ROW_EXPONENT
    bad = (m > bound) | ((m < 1.0 / bound) & (m > 0))
    if not bool(bad.any()):
        return t
    e = torch.frexp(m[bad]).exponent.double()[:, None]  # m = mantissa·2^e, mantissa in [0.5, 1)
    half = torch.floor(-e / 2)  # two factors: 2^±1074 (a float64 denormal row) is out of float64's range
    rows = t[bad].double() * torch.exp2(half) * torch.exp2(-e - half)
    out = t.clone()
    out[bad] = rows.to(t.dtype)
    return out


def cpu_matmul_nt(a: torch.Tensor, b: torch.Tensor | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """``a @ bᵀ`` ``[M, N]`` for ``a [M, C]`` and ``b [N, C]`` (one floating dtype); ``b=None``: the Gram
    ``a @ aᵀ`` ``[M, M]``, exactly symmetric (its upper triangle computed, the lower one a copy).

    On the CPU with the C++ extension built it runs ``torch.ops.gig_fast_cpp.matmul_nt``: for contiguous
    fp32 on an AVX-512 CPU our own blocked GEMM (csrc/matmul_nt/), where torch's and numpy's BLAS run
    AVX2 code (AMD Zen 5, one thread, benchmarks/bench_kmeans.py: 0.54-0.59 times the time of torch's
    ``a @ bᵀ`` and 0.65-0.68 times numpy's at the sparse coder's shapes; the Gram, which computes only
    the tiles on and above the diagonal, 0.25-0.37 times torch's); else ``at::mm``. Elsewhere (a GPU, no extension, inputs that need gradients) it
    is torch's ``a @ bᵀ``. Each entry is accumulated in the inputs' dtype (fp32 for fp32).
    ``GIG_FAST_MATMUL_ISA=blas`` keeps the extension on ``at::mm``. ``out``: a contiguous ``[M, N]`` tensor
    of a's dtype and device to write into (returned): a buffer kept between calls spares the page faults
    of a fresh one (22 ms of a 4,096 × 4,096 Gram's 68 on one thread).

    Raises:
        ValueError: an input that is not a 2-D floating tensor, dtypes or devices that differ, or a
            different C (dim 1).
    """
    for name, t in (("a", a), ("b", b)):
        if name == "b" and t is None:
            continue
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"cpu_matmul_nt: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 2:
            raise ValueError(f"cpu_matmul_nt: {name} must be 2-D ([rows, C]), got shape {tuple(t.shape)}")
        if not t.is_floating_point():
            raise ValueError(f"cpu_matmul_nt: {name} must be floating point, got {t.dtype}")
    gram = b is None
    b = a if gram else b
    if b.dtype != a.dtype or b.device != a.device:
        raise ValueError(f"cpu_matmul_nt: a ({a.dtype}, {a.device}) and b ({b.dtype}, {b.device}) must share "
                         "dtype and device")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"cpu_matmul_nt: a is [M, C] = {list(a.shape)} and b is [N, C] = {list(b.shape)}: "
                         "their C (dim 1) differ")
    needs_grad = torch.is_grad_enabled() and (a.requires_grad or b.requires_grad)
    if out is not None:
        got = (f"{list(out.shape)} {out.dtype} on {out.device}" if isinstance(out, torch.Tensor)
               else type(out).__name__)
        if not isinstance(out, torch.Tensor) or out.shape != (a.shape[0], b.shape[0]) or out.dtype != a.dtype \
                or out.device != a.device or not out.is_contiguous():
            raise ValueError(f"cpu_matmul_nt: out must be a contiguous [{a.shape[0]}, {b.shape[0]}] {a.dtype} tensor "
                             f"on {a.device}, got {got}")
    if a.device.type == "cpu" and not needs_grad and ext.has_cpp_extension():
        if out is None:
            return torch.ops.gig_fast_cpp.matmul_nt(a, b, gram)
        torch.ops.gig_fast_cpp.matmul_nt_out(a, b, gram, out)
        return out
    result = a @ b.T
    if gram:  # BLAS may round out[i, j] and out[j, i] differently: the upper triangle, copied down
        result = torch.triu(result) + torch.triu(result, 1).T
    return result if out is None else out.copy_(result)


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


def omp_gram(c: torch.Tensor, G: torch.Tensor, n_nonzero: int, residual_corr=None
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
