"""``sparse_code``: Lasso / OMP coding of vectors on a concept dictionary (docs/design.md §1.4, paper §3.2.2).

Every PFV ``x`` of a layer is coded against the concepts ``V [K, C]`` (rows):

    u* = argmin_u ½‖(x − β) − Vᵀu‖² + λ‖u‖₁        (optionally u ≥ 0)

with ``λ = λ_rel·‖V(x − β)‖_∞`` by default (a fraction of λ_max, the smallest λ giving u = 0; for
``positive=True`` λ_max is ``max(V(x − β))₊``), so one setting fits every layer. OMP with a fixed
number of atoms is the fast greedy alternative.

Every backend solves the *Gram form* (see :mod:`gig_fast.ops.reference`): correlations
``c = V y`` come from one GEMM per chunk of vectors and the Gram matrix ``G = V Vᵀ`` from one per call;
the solvers then touch only the few concepts that matter:

* ``torch``  — batched FISTA over all K (the reference; slow, obviously right) and batched OMP;
* ``cpp``    — per vector (OpenMP over vectors): the Lasso by homotopy (LARS with the Lasso
  modification, SPAMS's algorithm) on a growing Cholesky factor that keeps ``Q = G[:, S] L⁻ᵀ``, so a step
  costs one new column of Q (16-lane float32 for float inputs); the codes are then recomputed from the
  support's normal equations in float64 and checked by their duality gap; above K = 2,048 the path runs
  on a working set of concepts grown by each round's KKT violators. Vectors the homotopy cannot
  finish (near-duplicate concepts — K = 8·C concepts in C = 32 dimensions have cosines up to 0.99998 —
  or a gap above tol) are solved again in float64 by working-set covariance-update coordinate descent
  with Newton (feature-sign search) steps on the support. OMP on the same growing factor
  (``csrc/sparse_code``); a float32 OMP call without the Gram matrix on a CPU with AVX-512 BF16 instead
  runs in residual form, each step's atoms found by a bf16 screen of ``q = V r`` whose few possible
  winners are re-scored in float64;
* ``triton`` — the same working-set scheme batched on the GPU: the full residual correlations
  ``q = c − G u`` are a ``sparse_reconstruct`` of the codes on ``G`` (G is symmetric), violators are a
  top-k, and one Triton kernel runs the coordinate descent on every vector's working set
  (``gig_fast/kernels/sparse_code.py``).

Convergence: a vector is done when its duality gap ``≤ tol·‖y‖²``; vectors that hit ``max_iter``
first are reported (``SparseCodeConvergenceWarning`` and ``info.gap``), never silently returned.
"""
from __future__ import annotations

import dataclasses
import math
import threading
import warnings

import torch

from .._extensions import has_cpp_extension
from . import checks as v
from .common import accumulation_dtype, cpu_matmul_nt, dense_to_padded
from .reference import lasso_gram_ref, omp_gram_ref
from .registry import OpSpec, register, resolve

__all__ = ["sparse_code", "SparseCodeInfo", "SparseCodeConvergenceWarning", "DEFAULT_LAM_REL", "forms_gram",
           "omp_screened"]

# Chosen on the demo network's 16 layers at K = 8·C (benchmarks/lambda_rule.py, docs/lambda_rule.md;
# 100 images, every position, λ_rel ∈ {0.02 … 0.5}). λ_rel = 0.1 is the smallest value of that grid
# that keeps the paper's sparsity — l0 ratio ≥ 0.99 (docs/design.md §1.4) — on every layer of C ≥ 128
# (0.992–0.996; the paper's ResNet-50 layers have C ≥ 256; at C = 64 it is 0.989–0.990 and at C = 32
# 0.980–0.984, where 0.99 would allow 2.6 concepts per PFV). Against the former 0.2 it lowers rel-L2
# at K = 8·C from 0.30–0.48 to 0.20–0.34 with 4–8 active concepts per PFV instead of 3–7, and gives
# the error's fall with K that the paper reports (Table 3): from K = 0.5·C to 8·C rel-L2 drops 18–31%
# (paper 13–29%; at 0.2 only 8–21%, layer4.2 0.522 → 0.479). At 0.05 layer3.x falls to 0.9897.
DEFAULT_LAM_REL = 0.1
DEFAULT_TOL = 1e-6
DEFAULT_MAX_ITER = 5000

IMPLEMENTED = ("torch", "cpp", "triton")
PREFERENCE = {"cpu": ("cpp", "torch"), "cuda": ("triton", "torch")}

# Gram matrices larger than this are not formed on the CPU (K = 32,768 in fp32 would be 4 GiB); the C++
# solver then computes the few entries it needs from V. (It was 512 MiB, which sent K = 16,384 in fp32 —
# ResNet-50's layer4 at K = 8·C — down the Gram-less route at any row count: 216 ms a row there against a
# 6.96 s Gram, one thread.)
CPU_GRAM_LIMIT_BYTES = 2 * 2**30
# A cpp Lasso call with few rows skips the K × K Gram matrix as well (it costs K²·C/2 once).
# Up to SCREENED_ABOVE concepts (the homotopy on every concept) a row then takes its G entries and
# residual correlations from V alone, a few passes over V per row: fewer than K / 512 rows. Measured
# (PFV-like rows on unit concepts, K = 8·C, one thread), the Gram's time against a row's without it:
# 31 / 3.1 ms at K = 2,048 (they meet at 10 rows).
GRAMLESS_LASSO_CONCEPTS_PER_ROW = 512
# Above it the screened homotopy runs every row's rounds in lockstep (each row's G_WW from its gathered
# working set, every row's residual correlations from one product per round): fewer than K / 32 rows.
# Measured the same way on an AMD Zen 4 host (Gram route / lockstep, one thread): K = 4,096 at 64, 128
# and 256 rows 119 / 75, 136 / 131, 167 / 260 ms; K = 8,192 at 128, 256 and 400 rows 835 / 392,
# 938 / 731, 1,058 / 1,123 ms (they meet near K / 32 and K / 22).
SCREENED_ABOVE = 2048  # the C++ solver's kScreenAbove
GRAMLESS_SCREENED_CONCEPTS_PER_ROW = 32
# A cpp OMP call skips it while rows × atoms < K / 2: its steps then run in lockstep, each step's Gram rows
# of every row's new atom from one product against V packed once (K·C per row and atom, against K²·C/2 for
# the Gram matrix). Measured on an AMD Zen 4 host (Gram route / lockstep, PFV-like rows on unit concepts):
# one thread, K = 8,192 (C = 1,024, 59 atoms) at 25, 50 and 100 rows 919 / 472, 930 / 789, 1,009 /
# 1,453 ms; K = 16,384 (C = 2,048, 60 atoms) at 32 and 64 rows 6.49 / 1.97 s and 6.59 / 3.85 s; two
# threads, K = 8,192 at 50 and 70 rows 530 / 431 and 508 / 541 ms, K = 16,384 at 64 rows 3.42 / 2.49 s.
GRAMLESS_OMP_CONCEPTS_PER_ATOM = 2
# On CPUs with AVX-512 BF16 a float32 call's lockstep steps find their atoms by a bf16 screen of q = V r
# instead (sparse_code/omp_screened.inc: half the products' time, no Q columns), so the route pays up to
# rows × atoms < K. Measured on an AMD Zen 4 host (Gram route / screened, PFV-like rows on unit concepts):
# one thread, K = 4,096 (C = 512, 35 atoms) at 60, 120 and 180 rows 123 / 64, 135 / 128, 149 / 201 ms;
# K = 8,192 (59 atoms) at 100, 140 and 200 rows 828 / 684, 871 / 898, 997 / 1,331 ms; two threads at K =
# 8,192 488 / 400, 478 / 519, 522 / 735 ms.
GRAMLESS_SCREENED_OMP_CONCEPTS_PER_ATOM = 1
# Rows of X per solver chunk: bounds the [chunk, K] correlation buffer.
CHUNK_ELEMENTS = 2**24


class SparseCodeConvergenceWarning(UserWarning):
    """Some vectors reached ``max_iter`` before their duality gap fell below ``tol·‖y‖²``."""


@dataclasses.dataclass
class SparseCodeInfo:
    """Diagnostics of one :func:`sparse_code` call (all tensors ``[N]`` over the flattened rows).

    Attributes:
        method, backend: what ran.
        lam: the absolute λ of every row (0 for OMP).
        gap: Lasso duality gap ``P − D ≥ 0`` (an upper bound of the objective's distance to the optimum);
            for OMP the squared residual norm ``‖y − Vᵀu‖²``.
        rel_gap: ``gap / ‖y‖²`` (0 for a zero vector).
        iterations: FISTA steps (torch), homotopy steps plus any coordinate-descent sweeps (cpp: full and
            non-zero-only sweeps both count), coordinate-descent sweeps over a working set (triton); OMP:
            atoms chosen.
        converged: every row reached ``tol`` (always True for OMP).
        n_unconverged: rows that hit ``max_iter`` first.
        tol, max_iter: the settings used.
    """
    method: str
    backend: str
    lam: torch.Tensor
    gap: torch.Tensor
    rel_gap: torch.Tensor
    iterations: torch.Tensor
    converged: bool
    n_unconverged: int
    tol: float
    max_iter: int

    @property
    def max_rel_gap(self) -> float:
        return float(self.rel_gap.max()) if self.rel_gap.numel() else 0.0


# ----------------------------------------------------------------------------------------- backends
# Lasso solvers: fn(c [n, K], G [K, K] or None, Y [n, C], V [K, C], y2 [n], lam [n], positive, max_iter, tol)
#   -> (idx [n, s], val [n, s], gap [n], iterations [n]); G is None only where the backend accepts it.
# OMP solvers:   fn(c, G, Y, V, n_nonzero) -> (idx, val, steps [n]).

def _lasso_torch(c, G, Y, V, y2, lam, positive, max_iter, tol):
    u, gap, iters = lasso_gram_ref(c, G, y2, lam, positive, max_iter, tol)
    idx, val = dense_to_padded(u)
    return idx, val, gap, iters


def _omp_torch(c, G, Y, V, n_nonzero):
    u, steps = omp_gram_ref(c, G, n_nonzero)
    idx, val = dense_to_padded(u)
    return idx, val, steps


def _empty_if_none(G, like):
    return like.new_empty(0) if G is None else G


def _lasso_cpp(c, G, Y, V, y2, lam, positive, max_iter, tol):
    return torch.ops.gig_fast_cpp.sparse_code_lasso(c, _empty_if_none(G, c), Y, V, y2, lam, positive, max_iter, tol)


def _omp_cpp(c, G, Y, V, n_nonzero):
    return torch.ops.gig_fast_cpp.sparse_code_omp(c, _empty_if_none(G, c), Y, V, n_nonzero)


def _lasso_triton(c, G, Y, V, y2, lam, positive, max_iter, tol):
    from gig_fast.kernels import sparse_code as tk
    return tk.lasso_working_set(c, G, y2, lam, positive, max_iter, tol)


def _omp_triton(c, G, Y, V, n_nonzero):
    from gig_fast.kernels import sparse_code as tk
    return tk.omp_batched(c, G, n_nonzero)


LASSO_IMPLS = {"torch": _lasso_torch, "cpp": _lasso_cpp, "triton": _lasso_triton}
OMP_IMPLS = {"torch": _omp_torch, "cpp": _omp_cpp, "triton": _omp_triton}
# Backends that can work without the Gram matrix (computing its few needed entries from V).
GRAMLESS = {"cpp"}


# ------------------------------------------------------------------------------------ the driver
# Each thread keeps its last CPU Gram buffer of at most this size between calls (K ≤ 8,192 in fp32): the
# pipeline codes chunk after chunk on one dictionary, and a fresh K × K buffer's first-touch page faults
# were a third of the Gram's time (22 of 68 ms at K = 4,096; ~100 of 450 ms at K = 8,192; fp32, one thread).
GRAM_BUFFER_LIMIT_BYTES = 256 * 2**20
_gram_buffer = threading.local()


def forms_gram(V: torch.Tensor, method: str, rows: int, backend: str, atoms: int | None = None) -> bool:
    """Whether a ``sparse_code`` call coding ``rows`` vectors on ``V [K, C]`` by ``method`` on ``backend``
    (OMP with ``atoms`` atoms per row, default ``sparse_code``'s) forms the ``K × K`` Gram matrix (``K²``
    elements of V's dtype). The cpp backend on the CPU does without it over ``cpu_gram_limit_bytes``
    (2 GiB), for a Lasso call of fewer than K / 512 rows (K / 32 above 2,048 concepts, where the screened
    rounds run in lockstep) and for an OMP call of rows × atoms below K / 2 (its steps in lockstep; below K
    where they are screened in bf16, :func:`omp_screened`), taking the entries it needs from V."""
    K = V.shape[0]
    limit = SPEC.defaults["cpu_gram_limit_bytes"]  # read per call: tests lower it to force the Gram-less path
    if method == "lasso":
        per_row = GRAMLESS_SCREENED_CONCEPTS_PER_ROW if K > SCREENED_ABOVE else GRAMLESS_LASSO_CONCEPTS_PER_ROW
        few_rows = rows * per_row < K
    else:
        atoms = default_atoms(K) if atoms is None else min(atoms, K)
        screened = backend == "cpp" and omp_screened(V)
        few_rows = rows * atoms * (GRAMLESS_SCREENED_OMP_CONCEPTS_PER_ATOM if screened else
                                   GRAMLESS_OMP_CONCEPTS_PER_ATOM) < K
    return not (backend in GRAMLESS and V.device.type == "cpu" and (K * K * V.element_size() > limit or few_rows))


def omp_screened(V: torch.Tensor) -> bool:
    """Whether the cpp backend codes OMP on ``V`` without a Gram matrix by the bf16-screened route: float32
    concepts on a CPU with AVX-512 BF16 (unless ``GIG_FAST_OMP_SCREEN=0``)."""
    return (V.dtype == torch.float32 and V.device.type == "cpu" and has_cpp_extension()
            and bool(torch.ops.gig_fast_cpp.sparse_code_omp_screened()))


def default_atoms(K: int) -> int:
    """OMP's atoms per row when ``n_nonzero`` is not given: 1 % of the K concepts, at least one."""
    return max(1, K // 100)


def _gram(V: torch.Tensor, backend: str, method: str, rows: int, atoms: int) -> torch.Tensor | None:
    """``G = V Vᵀ`` for a call coding ``rows`` vectors (OMP: ``atoms`` each), or None where the backend does
    better without it (:func:`forms_gram`)."""
    K = V.shape[0]
    if not forms_gram(V, method, rows, backend, atoms):
        return None
    if V.device.type != "cpu":
        return V @ V.T  # the GPU solvers need no exactly symmetric copy
    if K * K * V.element_size() > GRAM_BUFFER_LIMIT_BYTES:
        return cpu_matmul_nt(V)
    buf = getattr(_gram_buffer, "tensor", None)
    if buf is None or buf.shape != (K, K) or buf.dtype != V.dtype:
        buf = _gram_buffer.tensor = torch.empty(K, K, dtype=V.dtype, device=V.device)
    # our AVX-512 Gram where it applies (a quarter to a third of torch's time, fp32); the buffer is only
    # read by this call's solver
    return cpu_matmul_nt(V, out=buf)


def _lambda(c: torch.Tensor, lam: float, relative: bool, positive: bool) -> torch.Tensor:
    if not relative:
        return torch.full((c.shape[0],), lam, dtype=c.dtype, device=c.device)
    lam_max = c.amax(1).clamp_min(0) if positive else c.abs().amax(1)
    return lam * lam_max


def _pad_cat(parts: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    s = max((p[0].shape[1] for p in parts), default=0)
    idx = torch.cat([torch.nn.functional.pad(i, (0, s - i.shape[1]), value=-1) for i, _ in parts])
    val = torch.cat([torch.nn.functional.pad(x, (0, s - x.shape[1]), value=0.0) for _, x in parts])
    return idx, val


def _solve(Y: torch.Tensor, V: torch.Tensor, lam: float, relative: bool, method: str, positive: bool,
           max_iter: int, tol: float, n_nonzero: int, backend: str):
    """Chunked driver: ``Y [N, C]`` centred rows in the compute dtype → padded codes + diagnostics."""
    N, K = Y.shape[0], V.shape[0]
    G = _gram(V, backend, method, N, n_nonzero)
    chunk = max(1, CHUNK_ELEMENTS // max(K, 1))
    codes, lams, gaps, iters = [], [], [], []
    for n0 in range(0, N, chunk):
        y = Y[n0:n0 + chunk]
        c = cpu_matmul_nt(y, V)
        # ‖y‖², the stopping bar's scale: in float64 for the C++ solvers (whose state is float64)
        y2 = y.double().square().sum(1) if backend == "cpp" else (y * y).sum(1)
        if method == "lasso":
            lam_vec = _lambda(c, lam, relative, positive).to(y2.dtype)
            idx, val, gap, it = LASSO_IMPLS[backend](c.contiguous(), G, y.contiguous(), V, y2, lam_vec,
                                                      positive, max_iter, tol)
        else:
            lam_vec = torch.zeros_like(y2)
            idx, val, it = OMP_IMPLS[backend](c.contiguous(), G, y.contiguous(), V, n_nonzero)
            gap = _omp_residual(c, y2, idx, val)
        codes.append((idx, val))
        lams.append(lam_vec.to(Y.dtype))
        gaps.append(gap.to(Y.dtype))
        iters.append(it.to(torch.int64))
    idx, val = _pad_cat(codes) if codes else (Y.new_zeros(0, 0, dtype=torch.int64), Y.new_zeros(0, 0))
    cat = lambda xs, dt: torch.cat(xs) if xs else torch.zeros(0, dtype=dt, device=Y.device)  # noqa: E731
    return idx, val, cat(lams, Y.dtype), cat(gaps, Y.dtype), cat(iters, torch.int64)


def _omp_residual(c, y2, idx, val):
    """``‖y − Vᵀu‖² = ‖y‖² − cᵀu`` (OMP's reported error; float64 sums): u is the least-squares fit on
    its support, so the residual r is orthogonal to the support's concepts and ‖r‖² = yᵀr = ‖y‖² − cᵀu.
    (Forming uᵀGu from a gather of G_SS per row took 9–16 ms of a 2,000-row call.)"""
    w = torch.where(idx >= 0, val.double(), 0)
    cu = (c.gather(1, idx.clamp_min(0)).double() * w).sum(1)
    return (y2.double() - cu).clamp_min(0).to(y2.dtype)


@torch.library.custom_op("gig_fast::sparse_code", mutates_args=())
def _sparse_code_op(Y: torch.Tensor, V: torch.Tensor, lam: float, relative: bool, method: str, positive: bool,
                    max_iter: int, tol: float, n_nonzero: int, backend: str
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _solve(Y, V, lam, relative, method, positive, max_iter, tol, n_nonzero, backend)


@_sparse_code_op.register_fake
def _(Y, V, lam, relative, method, positive, max_iter, tol, n_nonzero, backend):
    s = torch.library.get_ctx().new_dynamic_size()  # the largest active count is data-dependent
    N = Y.shape[0]
    return (Y.new_empty(N, s, dtype=torch.int64), Y.new_empty(N, s), Y.new_empty(N), Y.new_empty(N),
            Y.new_empty(N, dtype=torch.int64))


# The bare kernels are the Lasso solvers (signature above); the OMP ones are ``OMP_IMPLS``.
SPEC = register(OpSpec("sparse_code", IMPLEMENTED, PREFERENCE, LASSO_IMPLS, _sparse_code_op,
                       defaults={"lam_rel": DEFAULT_LAM_REL, "tol": DEFAULT_TOL, "max_iter": DEFAULT_MAX_ITER,
                                 "cpu_gram_limit_bytes": CPU_GRAM_LIMIT_BYTES}))


def _check_args(X, V, bias, lam, method, lam_mode, positive, max_iter, tol, n_nonzero):
    v.check_tensor("V", V, 2, v.FLOAT_DTYPES)
    v.check_tensor("X", X, None, v.FLOAT_DTYPES, V.device)
    if X.dim() < 1 or X.shape[-1] != V.shape[1]:
        raise ValueError(f"X {tuple(X.shape)} must end in C={V.shape[1]} channels like V [K, C]")
    if V.shape[0] == 0:
        raise ValueError("V has no concepts (K = 0)")
    v.check_same_dtype(X=X, V=V, bias=bias)
    if bias is not None:
        v.check_tensor("bias", bias, 1, None, V.device)
        if bias.shape[0] != V.shape[1]:
            raise ValueError(f"bias has {bias.shape[0]} entries but V has C={V.shape[1]} channels")
    v.check_finite(X=X, V=V, bias=bias)  # one host sync for the three
    if method not in ("lasso", "omp"):
        raise ValueError(f"method must be 'lasso' or 'omp', got {method!r}")
    if lam_mode not in ("relative", "absolute"):
        raise ValueError(f"lam_mode must be 'relative' or 'absolute', got {lam_mode!r}")
    if not isinstance(lam, (int, float)) or isinstance(lam, bool) or not math.isfinite(lam) or lam < 0:
        raise ValueError(f"lam must be a finite number >= 0, got {lam!r}")
    if method == "lasso" and lam == 0:
        raise ValueError("lam = 0 is least squares, not a sparse code; use lam > 0 (or method='omp')")
    if not isinstance(max_iter, int) or max_iter < 1:
        raise ValueError(f"max_iter must be a positive int, got {max_iter!r}")
    if not isinstance(tol, (int, float)) or not tol > 0:
        raise ValueError(f"tol must be > 0, got {tol!r}")
    if method == "omp":
        if positive:
            raise ValueError("positive=True is supported by method='lasso' only")
        if not isinstance(n_nonzero, int) or isinstance(n_nonzero, bool) or n_nonzero < 1:
            raise ValueError(f"n_nonzero (OMP atoms) must be a positive int, got {n_nonzero!r}")


def _empty_codes(lead, X, method, backend, tol, max_iter, return_info):
    """The codes of vectors with C = 0 channels: ``idx``/``val`` ``[..., 0]`` (and zero diagnostics)."""
    idx = torch.zeros(tuple(lead) + (0,), dtype=torch.int64, device=X.device)
    val = torch.zeros(tuple(lead) + (0,), dtype=X.dtype, device=X.device)
    if not return_info:
        return idx, val
    n = math.prod(lead)
    zero = torch.zeros(n, dtype=accumulation_dtype(X.dtype), device=X.device)
    info = SparseCodeInfo(method=method, backend=backend, lam=zero, gap=zero, rel_gap=zero,
                          iterations=torch.zeros(n, dtype=torch.int64, device=X.device), converged=True,
                          n_unconverged=0, tol=tol, max_iter=max_iter)
    return idx, val, info


def sparse_code(X: torch.Tensor, V: torch.Tensor, *, lam: float | None = None, method: str = "lasso",
                bias: torch.Tensor | None = None, positive: bool = False, max_iter: int = DEFAULT_MAX_ITER,
                tol: float = DEFAULT_TOL, lam_mode: str = "relative", n_nonzero: int | None = None,
                backend: str | None = None, return_info: bool = False):
    """Sparse codes of the rows of ``X`` on the concepts ``V`` (docs/design.md §1.4).

    Lasso: ``u = argmin ½‖(x − β) − Vᵀu‖² + λ‖u‖₁`` per row. OMP: ``n_nonzero`` greedy atoms,
    least-squares coefficients (scikit-learn's ``orthogonal_mp_gram`` rules).

    Args:
        X: ``[..., C]`` vectors (PFVs); leading dims are flattened into N. fp32/fp64/fp16/bf16 (half types
            are solved in fp32; the ``cpp`` Lasso follows its path in the input's precision, solves its
            codes and bounds their duality gap in fp64, and finishes in fp64 what misses ``tol``).
        V: ``[K, C]`` concepts (rows), X's dtype. Need not be normalised; duplicates and K < C are fine.
        lam: λ (Lasso only). ``lam_mode="relative"`` (default): the fraction of λ_max,
            ``λ = lam·‖V(x − β)‖_∞`` per row (``lam ≥ 1`` gives empty codes); ``"absolute"``: λ itself.
            Default :data:`DEFAULT_LAM_REL` (l0 ratio ≥ 0.99 at K = 8C on the demo's layers of C ≥ 128).
        method: ``"lasso"`` or ``"omp"``.
        bias: ``[C]`` β subtracted from every row first (the BN shift), or None.
        positive: constrain the Lasso codes to ``u ≥ 0``.
        max_iter: iteration cap (FISTA steps for ``torch``, homotopy steps plus coordinate-descent sweeps
            for ``cpp``, sweeps for ``triton``); rows that hit it before ``tol`` raise a
            :class:`SparseCodeConvergenceWarning`.
        tol: stop a row when its duality gap ``≤ tol·‖x − β‖²``.
        n_nonzero: OMP atoms per row (default ``max(1, K // 100)``).
        backend: force ``"torch"``, ``"cpp"`` or ``"triton"`` (default: the fastest for the device).
        return_info: also return a :class:`SparseCodeInfo`.

    Returns:
        ``(idx, val)``: ``idx [..., s]`` int64 concept indices sorted increasingly, −1 = padding;
        ``val [..., s]`` coefficients in X's dtype, 0 at padding; ``s`` = the largest active count of the
        batch (0 when every code is empty). With ``return_info``: ``(idx, val, info)``.
    """
    if lam is None:
        lam = DEFAULT_LAM_REL
    if isinstance(lam, torch.Tensor) and lam.numel() == 1:
        lam = float(lam)
    K = V.shape[0] if isinstance(V, torch.Tensor) and V.dim() == 2 else 0
    if n_nonzero is None:
        n_nonzero = default_atoms(K)
    _check_args(X, V, bias, lam, method, lam_mode, positive, max_iter, tol, n_nonzero)
    name = resolve("sparse_code", IMPLEMENTED, PREFERENCE, V.device, backend)
    # Every backend works in the input's precision (half types in float32). The cpp Lasso's homotopy
    # runs on float32 correlations and Gram matrix for float32 inputs (16 lanes per AVX-512 instruction);
    # each code is then recomputed in float64 from the support's normal equations, and its duality gap —
    # for the rows and concepts themselves, the float32 rounding of G and c bounded (csrc/sparse_code) —
    # decides; rows above tol are solved by coordinate descent on a float64 copy (from float32 G and c
    # alone, rows on near-duplicate concepts — cosines up to 0.99998 at K = 8·C — met a duality-gap floor
    # above tol·‖y‖²: 24 of the demo's 19,600 layer1.0 PFVs at λ_rel = 0.05).
    compute = accumulation_dtype(X.dtype)
    lead = X.shape[:-1]
    if X.shape[-1] == 0:  # C = 0: every centred vector is zero, its code empty
        return _empty_codes(lead, X, method, name, float(tol), int(max_iter), return_info)
    Y = X.reshape(-1, X.shape[-1]).to(compute)
    if bias is not None:
        Y = Y - bias.to(compute)
    idx, val, lam_vec, gap, iters = _sparse_code_op(
        Y.contiguous(), V.to(compute).contiguous(), float(lam), lam_mode == "relative", method, bool(positive),
        int(max_iter), float(tol), int(min(n_nonzero, K)), name)
    val = val.to(X.dtype)
    y2 = (Y * Y).sum(1)
    rel_gap = torch.where(y2 > 0, gap / y2.clamp_min(torch.finfo(y2.dtype).tiny), torch.zeros_like(gap))
    # the solvers test gap ≤ tol·‖y‖² before gap and ‖y‖² are rounded to the compute dtype: allow that rounding
    unconverged = int((rel_gap > tol * (1 + 4 * torch.finfo(gap.dtype).eps)).sum()) if method == "lasso" else 0
    if unconverged:
        warnings.warn(
            f"sparse_code: {unconverged} of {Y.shape[0]} vectors reached max_iter={max_iter} before the duality "
            f"gap fell below tol={tol:g}·‖x − β‖² (largest relative gap {float(rel_gap.max()):.3g}); "
            "raise max_iter or tol, or see info.gap", SparseCodeConvergenceWarning, stacklevel=2)
    s = idx.shape[1]
    idx, val = idx.reshape(tuple(lead) + (s,)), val.reshape(tuple(lead) + (s,))
    if not return_info:
        return idx, val
    info = SparseCodeInfo(method=method, backend=name, lam=lam_vec, gap=gap, rel_gap=rel_gap, iterations=iters,
                          converged=unconverged == 0, n_unconverged=unconverged, tol=float(tol),
                          max_iter=int(max_iter))
    return idx, val, info
