// sparse_code: Lasso and OMP coding of vectors on a concept dictionary (docs/design.md §1.4, paper §3.2.2).
//
// Every solver works on the Gram form of one vector y (a centred PFV x − beta) against concepts V [K, C]:
//   c = V y (correlations, [K]),  G = V V^T ([K, K]),  q = c − G u = V (y − V^T u)  (residual correlations)
//   Lasso:  min_u  ½‖y − V^T u‖² + lam ‖u‖₁   (optionally u ≥ 0)
//   gap:    P = ½‖r‖² + lam‖u‖₁ with ‖r‖² = ‖y‖² − c·u − u·q;  s = min(1, lam / ‖q‖_∞)  (max(q)₊ if u ≥ 0)
//           D = s (‖y‖² − c·u) − ½ s² ‖r‖²;   a vector is done when P − D ≤ tol·‖y‖².
//
// Lasso (per vector, OpenMP over vectors): the homotopy (LARS with the Lasso modification, SPAMS's
// algorithm) on the correlations c and Gram matrix G given in T (float32 for float inputs): from λ_max
// the support grows (a concept joins when its |q_k| reaches the shrinking λ) and shrinks (a code that
// reaches 0 leaves) one event per step, on a growing Cholesky factor of G_SS that also keeps
// Q = G[:, S] L⁻ᵀ, so each step costs K·|S| (the new column of Q) in 16-lane float32. At λ the codes are
// recomputed from the support's normal equations in double, G_SS u = c_S − λ s_S, and the vector's
// duality gap decides: ≤ tol·‖y‖² is the answer. The gap is that of y and V themselves — for float32 G
// and c the residual, its norm and the support's correlations in double from V and y, and every other
// concept's correlation from q = c − G u plus the float32 products' worst-case rounding bound (only those
// that bound cannot keep within λ recomputed in double) — so it bounds the codes' distance to the optimum
// (active_set_solvers.inc, certified_gap). Above K = 2,048 concepts the homotopy is screened: it runs on
// a working set W — the 128 concepts of largest |c_k|, then the largest KKT violators of each round's
// codes (|q_k| > lam outside W, q in double over all K, at least 128 and |W|/2 added) — until no concept
// outside W violates, so a step costs |W|·|S|. A concept already past ±lam joins at once, and a final
// support that misses a violator gains it (with its correlation's sign; up to 4) before the fallback.
// Vectors the homotopy cannot
// finish — a joining concept numerically in the span of the support (near-duplicate concepts), the step
// cap, or a gap above tol (float32 rounding on a nearly singular G_SS) — are solved again by coordinate
// descent on the exact problem (Y and V in double, G entries from V): covariance-update coordinate
// descent on a working set W that starts empty; each outer round recomputes the full q from the support
// (K·C), stops on the duality gap, and otherwise adds the largest KKT violators (|q_k| > lam outside W; at
// least 8, doubling W) and runs CD sweeps on W — a dense |W|×|W| copy of G_WW — until W's own gap falls
// below a quarter of the outer gap, cycling glmnet-style: one full sweep of W, then up to 20 sweeps over
// its non-zero codes only, with Newton steps on the support when they stall. Zero atoms (G_kk = 0) never
// enter a code. max_iter caps the homotopy's steps and the CD sweeps together.
//
// OMP (per vector): the atom with the largest |q_k| joins (first index on ties), the factor grows by one
// atom (the new column of Q, K·|S|) and q loses one term, q ← q − Q[:, n] z_n with z = L⁻¹ c_S; the codes
// u_S = L⁻ᵀ z at the end. A vector stops early like scikit-learn's orthogonal_mp_gram when q_k² < eps or
// the new pivot ≤ eps. Q and q in T, L and z in double.
//
// gram may be empty (a dictionary too large for K×K, or a call of few vectors: a Lasso call of fewer than
// K/512 up to K = 2,048, K/32 above, an OMP call of vectors × atoms < K/2): above K = 2,048 the Lasso then
// runs every vector's screened rounds in lockstep (each vector's G_WW from its gathered rows of V, every
// vector's q from one product per round: active_set_solvers.inc, lasso_lockstep), OMP every vector's steps
// in lockstep (each step's Gram rows of the new atoms from one product against V packed once:
// omp_lockstep; for float32 on CPUs with AVX-512 BF16 in residual form instead, each step's atoms from a
// bf16 screen of q = V r re-scored in double: omp_screened.inc, an OMP call of vectors × atoms < K);
// otherwise the Lasso takes G entries as dot products of V rows and q = V (y − V^T u) from Y. Shapes: corr [N, K], gram [K, K] or [0], Y [N, C], V [K, C],
// y2 [N] (‖y‖², fp64), lam [N] (absolute); corr, gram, Y and V in one float dtype (fp32 or fp64; the
// Lasso's fallback forms its fp64 copy of V itself, when a row needs it). Returns padded codes idx [N, s]
// int64 (−1 padding, sorted increasingly), val [N, s] (0 at padding, V's dtype), and per
// vector the duality gap and homotopy steps plus CD sweeps (Lasso) or atoms chosen (OMP).
// GIG_FAST_LASSO_FALLBACK=0 (read per call, for tests) runs the homotopy alone; GIG_FAST_OMP_LOCKSTEP_BYTES
// (read per call, for tests) sets the OMP lockstep groups' budget of Q columns (1 GiB); GIG_FAST_OMP_SCREEN=0
// (read per call) keeps float32 OMP on the lockstep route where the bf16-screened one would run.
#pragma once
#include <ATen/core/Tensor.h>
#include <tuple>

namespace gig_fast {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> sparse_code_lasso_cpu(
    const at::Tensor& corr, const at::Tensor& gram, const at::Tensor& Y, const at::Tensor& V, const at::Tensor& y2,
    const at::Tensor& lam, bool positive, int64_t max_iter, double tol);

std::tuple<at::Tensor, at::Tensor, at::Tensor> sparse_code_omp_cpu(
    const at::Tensor& corr, const at::Tensor& gram, const at::Tensor& Y, const at::Tensor& V, int64_t n_nonzero);

}  // namespace gig_fast
