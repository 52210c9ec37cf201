// sparse_code: Lasso and OMP coding of vectors on a concept dictionary (docs/design.md §1.4, paper §3.2.2).
//
// Every solver works on the Gram form of one vector y (a centred PFV x − beta) against concepts V [K, C]:
//   c = V y (correlations, [K]),  G = V V^T ([K, K]),  q = c − G u = V (y − V^T u)  (residual correlations)
//   Lasso:  min_u  ½‖y − V^T u‖² + lam ‖u‖₁   (optionally u ≥ 0)
//   gap:    P = ½‖r‖² + lam‖u‖₁ with ‖r‖² = ‖y‖² − c·u − u·q;  s = min(1, lam / ‖q‖_∞)  (max(q)₊ if u ≥ 0)
//           D = s (‖y‖² − c·u) − ½ s² ‖r‖²;   a vector is done when P − D ≤ tol·‖y‖².
//
// Lasso (per vector, OpenMP over vectors): covariance-update coordinate descent on a working set W.
// W starts empty; each outer round recomputes the full q from the support (K·|supp| with G), stops on
// the duality gap, and otherwise adds the largest KKT violators (|q_k| > lam outside W; at least 8,
// doubling W) and runs CD sweeps on W — a dense |W|×|W| copy of G_WW — until W's own gap falls below a
// quarter of the outer gap, cycling glmnet-style: one full sweep of W, then up to 20 sweeps over its
// non-zero codes only. Zero atoms (G_kk = 0) never enter a code. max_iter caps the CD sweeps.
//
// OMP (per vector): the atom with the largest |q_k| joins (first index on ties), the Cholesky factor of
// G_SS grows by one row (forward substitution), u_S = G_SS⁻¹ c_S by two triangular solves; a vector
// stops early like scikit-learn's orthogonal_mp_gram when q_k² < eps or the new pivot ≤ eps.
//
// gram may be empty (a dictionary too large for K×K): the solvers then take G entries as dot products
// of V rows and q = V (y − V^T u) from Y. Shapes: corr [N, K], gram [K, K] or [0], Y [N, C], V [K, C],
// y2 [N] (‖y‖²), lam [N] (absolute); all one float dtype (fp32 or fp64), accumulation in double.
// Returns padded codes idx [N, s] int64 (−1 padding, sorted increasingly), val [N, s] (0 at padding),
// and per vector the duality gap and CD sweeps (Lasso) or atoms chosen (OMP).
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
