// CPU solvers of sparse_code (algorithms and formulas in sparse_code.h). One vector per task, OpenMP
// dynamic scheduling over vectors (their costs differ a lot); all per-vector state is in double.
#include "sparse_code/sparse_code.h"

#include <ATen/Parallel.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <utility>
#include <vector>

#include "common.h"

namespace gig_fast {
namespace {

// Access to the Gram matrix: stored (K×K), or computed from V where it would not fit.
template <typename T>
struct Gram {
  const T* G;  // nullptr: no stored Gram matrix
  const T* V;
  int64_t K, C;

  double entry(int64_t a, int64_t b) const {
    if (G) return static_cast<double>(G[a * K + b]);
    const T* va = V + a * C;
    const T* vb = V + b * C;
    double s = 0;
#pragma omp simd reduction(+ : s)
    for (int64_t i = 0; i < C; ++i) s += static_cast<double>(va[i]) * static_cast<double>(vb[i]);
    return s;
  }

  // q = c − Σ_a u_a G[a, :] over the support (G symmetric), or V (y − Σ_a u_a V_a) without G.
  void residual_corr(const T* c, const T* y, const std::vector<int64_t>& sup, const std::vector<double>& u,
                     double* q, std::vector<double>& buf) const {
    if (G) {
      for (int64_t k = 0; k < K; ++k) q[k] = static_cast<double>(c[k]);
      for (size_t t = 0; t < sup.size(); ++t) {
        const double ua = u[t];
        if (ua == 0) continue;
        const T* g = G + sup[t] * K;
#pragma omp simd
        for (int64_t k = 0; k < K; ++k) q[k] -= ua * static_cast<double>(g[k]);
      }
      return;
    }
    buf.assign(y, y + C);
    for (size_t t = 0; t < sup.size(); ++t) {
      const double ua = u[t];
      if (ua == 0) continue;
      const T* va = V + sup[t] * C;
      for (int64_t i = 0; i < C; ++i) buf[i] -= ua * static_cast<double>(va[i]);
    }
    for (int64_t k = 0; k < K; ++k) {
      const T* vk = V + k * C;
      double s = 0;
#pragma omp simd reduction(+ : s)
      for (int64_t i = 0; i < C; ++i) s += static_cast<double>(vk[i]) * buf[i];
      q[k] = s;
    }
  }
};

struct Code {
  std::vector<std::pair<int64_t, double>> entries;  // (concept, coefficient), sorted by concept
  double gap = 0;
  int64_t iterations = 0;
};

// Primal − dual of the Lasso from the support's (c_a, u_a, q_a), ‖y‖² and the dual scaling max.
double lasso_gap(double y2, double cu, double uq, double l1, double qmax, double lam) {
  const double r2 = std::max(0.0, y2 - cu - uq);
  const double s = qmax > lam ? lam / qmax : 1.0;
  const double primal = 0.5 * r2 + lam * l1;
  const double dual = s * (y2 - cu) - 0.5 * s * s * r2;
  return std::max(0.0, primal - dual);
}

inline double soft(double z, double t, bool positive) {
  if (positive) return z > t ? z - t : 0.0;
  return z > t ? z - t : (z < -t ? z + t : 0.0);
}

inline double violation_score(double q, bool positive) { return positive ? q : std::abs(q); }

// The working-set state of one vector: W, its codes, its residual correlations and G_WW.
struct WorkingSet {
  std::vector<int64_t> atoms;
  std::vector<double> u, q, cW, diag, gww;  // gww: |W|×cap row-major
  int64_t cap = 0;

  int64_t size() const { return static_cast<int64_t>(atoms.size()); }

  template <typename T>
  void add(const std::vector<int64_t>& extra, const Gram<T>& gram, const T* c, const double* q_full) {
    const int64_t m = size(), m2 = m + static_cast<int64_t>(extra.size());
    if (m2 > cap) {  // grow the G_WW buffer, keeping the old block
      const int64_t ncap = std::max<int64_t>(m2, 2 * cap);
      std::vector<double> g(static_cast<size_t>(ncap) * ncap, 0.0);
      for (int64_t i = 0; i < m; ++i)
        std::copy(gww.begin() + i * cap, gww.begin() + i * cap + m, g.begin() + i * ncap);
      gww.swap(g);
      cap = ncap;
    }
    for (int64_t k : extra) {
      atoms.push_back(k);
      u.push_back(0.0);
      q.push_back(q_full[k]);
      cW.push_back(static_cast<double>(c[k]));
    }
    for (int64_t i = 0; i < m2; ++i)
      for (int64_t j = std::max(m, i); j < m2; ++j) {
        const double g = gram.entry(atoms[i], atoms[j]);
        gww[i * cap + j] = g;
        gww[j * cap + i] = g;
      }
    diag.resize(m2);
    for (int64_t i = m; i < m2; ++i) diag[i] = gww[i * cap + i];
  }

  // One cyclic coordinate-descent sweep over the slots `order` of W (all of W when null), with
  // covariance updates of q over all of W.
  void sweep(double lam, bool positive, const std::vector<int64_t>* order = nullptr) {
    const int64_t m = size();
    const int64_t n = order ? static_cast<int64_t>(order->size()) : m;
    for (int64_t o = 0; o < n; ++o) {
      const int64_t i = order ? (*order)[o] : o;
      const double d = diag[i];
      if (!(d > 0)) continue;  // a zero concept: its code stays 0
      const double old = u[i];
      const double nu = soft(old + q[i] / d, lam / d, positive);
      const double delta = nu - old;
      if (delta == 0) continue;
      u[i] = nu;
      const double* row = gww.data() + i * cap;
#pragma omp simd
      for (int64_t t = 0; t < m; ++t) q[t] -= delta * row[t];
    }
  }

  // Duality gap of the subproblem on W, or on the slots `order` only (the codes outside are 0).
  double gap(double y2, double lam, bool positive, const std::vector<int64_t>* order = nullptr) const {
    double cu = 0, uq = 0, l1 = 0, qmax = 0;
    const int64_t n = order ? static_cast<int64_t>(order->size()) : size();
    for (int64_t o = 0; o < n; ++o) {
      const int64_t i = order ? (*order)[o] : o;
      cu += cW[i] * u[i];
      uq += u[i] * q[i];
      l1 += std::abs(u[i]);
      qmax = std::max(qmax, violation_score(q[i], positive));
    }
    return lasso_gap(y2, cu, uq, l1, qmax, lam);
  }
};

constexpr int kActiveSweeps = 20;  // sweeps over the non-zero codes between two full sweeps of W

template <typename T>
Code lasso_one(const Gram<T>& gram, const T* c, const T* y, double y2, double lam, bool positive, int64_t max_iter,
               double tol) {
  Code out;
  const int64_t K = gram.K;
  double lam_max = 0;
  for (int64_t k = 0; k < K; ++k) lam_max = std::max(lam_max, violation_score(static_cast<double>(c[k]), positive));
  if (!(y2 > 0) || lam_max <= lam) return out;  // u = 0 is optimal: the gap is exactly 0

  const double tol_abs = tol * y2;
  std::vector<double> q(K), buf;
  std::vector<char> in_ws(K, 0);
  std::vector<std::pair<double, int64_t>> cand;
  std::vector<int64_t> extra, active;
  WorkingSet ws;
  for (int64_t k = 0; k < K; ++k) q[k] = static_cast<double>(c[k]);
  double gap = 0;
  while (true) {
    // outer duality gap with the exact q of every concept
    double cu = 0, uq = 0, l1 = 0, qmax = 0;
    for (int64_t i = 0; i < ws.size(); ++i) {
      cu += ws.cW[i] * ws.u[i];
      uq += ws.u[i] * q[ws.atoms[i]];
      l1 += std::abs(ws.u[i]);
    }
    for (int64_t k = 0; k < K; ++k) qmax = std::max(qmax, violation_score(q[k], positive));
    gap = lasso_gap(y2, cu, uq, l1, qmax, lam);
    if (gap <= tol_abs || out.iterations >= max_iter) break;

    // grow W by the largest KKT violators outside it
    cand.clear();
    for (int64_t k = 0; k < K; ++k) {
      const double viol = violation_score(q[k], positive) - lam;
      if (!in_ws[k] && viol > 0 && gram.entry(k, k) > 0) cand.emplace_back(viol, k);
    }
    const int64_t n_add = std::min<int64_t>(static_cast<int64_t>(cand.size()), std::max<int64_t>(8, ws.size()));
    std::partial_sort(cand.begin(), cand.begin() + n_add, cand.end(),
                      [](const auto& a, const auto& b) { return a.first > b.first || (a.first == b.first && a.second < b.second); });
    extra.clear();
    for (int64_t i = 0; i < n_add; ++i) {
      extra.push_back(cand[i].second);
      in_ws[cand[i].second] = 1;
    }
    for (int64_t i = 0; i < ws.size(); ++i) ws.q[i] = q[ws.atoms[i]];  // drop the drift of the updates
    ws.add(extra, gram, c, q.data());
    // with nothing left outside W the outer gap is W's gap: solve W to tol; else to a share of the gap
    const double target = n_add ? std::max(0.25 * gap, 0.5 * tol_abs) : 0.5 * tol_abs;
    // glmnet-style cycling: a full sweep over W, then sweeps over its non-zero codes only until
    // their own gap is well below the target, then a full sweep again
    do {
      ws.sweep(lam, positive);
      ++out.iterations;
      if (ws.gap(y2, lam, positive) <= target) break;
      active.clear();
      for (int64_t i = 0; i < ws.size(); ++i)
        if (ws.u[i] != 0) active.push_back(i);
      for (int a = 0; a < kActiveSweeps && out.iterations < max_iter; ++a) {
        ws.sweep(lam, positive, &active);
        ++out.iterations;
        if (ws.gap(y2, lam, positive, &active) <= 0.25 * target) break;
      }
    } while (out.iterations < max_iter && ws.gap(y2, lam, positive) > target);
    gram.residual_corr(c, y, ws.atoms, ws.u, q.data(), buf);
  }
  out.gap = gap;
  for (int64_t i = 0; i < ws.size(); ++i)
    if (ws.u[i] != 0) out.entries.emplace_back(ws.atoms[i], ws.u[i]);
  std::sort(out.entries.begin(), out.entries.end());
  return out;
}

template <typename T>
Code omp_one(const Gram<T>& gram, const T* c, const T* y, int64_t n_nonzero) {
  Code out;
  const int64_t K = gram.K;
  const double eps = std::numeric_limits<T>::epsilon();  // scikit-learn's min_float for this dtype
  const int64_t n_max = std::min(n_nonzero, K);
  std::vector<double> q(K), L(static_cast<size_t>(n_max) * n_max, 0.0), z(n_max), u, buf;
  std::vector<int64_t> S;
  std::vector<char> chosen(K, 0);
  for (int64_t k = 0; k < K; ++k) q[k] = static_cast<double>(c[k]);
  for (int64_t n = 0; n < n_max; ++n) {
    int64_t j = -1;
    double best = -1;
    for (int64_t k = 0; k < K; ++k)
      if (!chosen[k] && std::abs(q[k]) > best) best = std::abs(q[k]), j = k;
    if (j < 0 || best * best < eps) break;
    // new Cholesky row: L[n, :n] = L⁻¹ G[S, j], pivot G_jj − ‖L[n, :n]‖²
    double* row = L.data() + n * n_max;
    double norm2 = 0;
    for (int64_t t = 0; t < n; ++t) {
      double s = gram.entry(S[t], j);
      for (int64_t i = 0; i < t; ++i) s -= L[t * n_max + i] * row[i];
      row[t] = s / L[t * n_max + t];
      norm2 += row[t] * row[t];
    }
    const double pivot = gram.entry(j, j) - norm2;
    if (pivot <= eps) break;  // j is (numerically) in the span of S
    row[n] = std::sqrt(pivot);
    S.push_back(j);
    chosen[j] = 1;
    ++out.iterations;
    // u_S = (L Lᵀ)⁻¹ c_S
    const int64_t m = n + 1;
    u.assign(m, 0.0);
    for (int64_t t = 0; t < m; ++t) {
      double s = static_cast<double>(c[S[t]]);
      for (int64_t i = 0; i < t; ++i) s -= L[t * n_max + i] * z[i];
      z[t] = s / L[t * n_max + t];
    }
    for (int64_t t = m - 1; t >= 0; --t) {
      double s = z[t];
      for (int64_t i = t + 1; i < m; ++i) s -= L[i * n_max + t] * u[i];
      u[t] = s / L[t * n_max + t];
    }
    if (m < n_max) gram.residual_corr(c, y, S, u, q.data(), buf);
  }
  for (size_t t = 0; t < S.size(); ++t)
    if (u[t] != 0) out.entries.emplace_back(S[t], u[t]);
  std::sort(out.entries.begin(), out.entries.end());
  return out;
}

void check_inputs(const at::Tensor& corr, const at::Tensor& gram, const at::Tensor& Y, const at::Tensor& V) {
  for (const at::Tensor* t : {&corr, &gram, &Y, &V}) {
    GIG_CHECK_CPU((*t));
    GIG_CHECK_CONTIGUOUS((*t));
    TORCH_CHECK(t->scalar_type() == V.scalar_type(), "sparse_code: all inputs must share V's dtype");
  }
  TORCH_CHECK(V.scalar_type() == at::kFloat || V.scalar_type() == at::kDouble, "sparse_code: fp32 or fp64 only");
  TORCH_CHECK(V.dim() == 2 && corr.dim() == 2 && Y.dim() == 2, "sparse_code: V [K, C], corr [N, K], Y [N, C]");
  const int64_t K = V.size(0), C = V.size(1), N = corr.size(0);
  TORCH_CHECK(corr.size(1) == K && Y.size(0) == N && Y.size(1) == C, "sparse_code: corr [N, K] and Y [N, C]");
  TORCH_CHECK(gram.numel() == 0 || (gram.dim() == 2 && gram.size(0) == K && gram.size(1) == K),
              "sparse_code: gram must be [K, K] or empty");
}

// Per-vector codes → padded (idx, val) plus per-vector gap and iteration count.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> pack(const std::vector<Code>& codes,
                                                                 const at::TensorOptions& opt) {
  const int64_t N = static_cast<int64_t>(codes.size());
  int64_t s = 0;
  for (const auto& cd : codes) s = std::max<int64_t>(s, static_cast<int64_t>(cd.entries.size()));
  auto idx = at::full({N, s}, -1, opt.dtype(at::kLong));
  auto val = at::zeros({N, s}, opt);
  auto gap = at::empty({N}, opt);
  auto iters = at::empty({N}, opt.dtype(at::kLong));
  AT_DISPATCH_FLOATING_TYPES(val.scalar_type(), "sparse_code_pack", [&] {
    int64_t* ip = idx.data_ptr<int64_t>();
    scalar_t* vp = val.data_ptr<scalar_t>();
    for (int64_t n = 0; n < N; ++n) {
      const auto& e = codes[n].entries;
      for (size_t j = 0; j < e.size(); ++j) {
        ip[n * s + j] = e[j].first;
        vp[n * s + j] = static_cast<scalar_t>(e[j].second);
      }
      gap.data_ptr<scalar_t>()[n] = static_cast<scalar_t>(codes[n].gap);
      iters.data_ptr<int64_t>()[n] = codes[n].iterations;
    }
  });
  return {idx, val, gap, iters};
}

template <typename F>
void for_each_vector(int64_t N, F&& f) {
  // dynamic scheduling: a vector's cost depends on its support size
#pragma omp parallel for schedule(dynamic, 1) num_threads(at::get_num_threads())
  for (int64_t n = 0; n < N; ++n) f(n);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> sparse_code_lasso_cpu(
    const at::Tensor& corr, const at::Tensor& gram, const at::Tensor& Y, const at::Tensor& V, const at::Tensor& y2,
    const at::Tensor& lam, bool positive, int64_t max_iter, double tol) {
  check_inputs(corr, gram, Y, V);
  const int64_t N = corr.size(0), K = V.size(0), C = V.size(1);
  TORCH_CHECK(y2.numel() == N && lam.numel() == N, "sparse_code: y2 and lam must be [N]");
  auto y2d = y2.to(at::kDouble).contiguous();
  auto lamd = lam.to(at::kDouble).contiguous();
  std::vector<Code> codes(N);
  AT_DISPATCH_FLOATING_TYPES(V.scalar_type(), "sparse_code_lasso_cpu", [&] {
    const Gram<scalar_t> g{gram.numel() ? gram.data_ptr<scalar_t>() : nullptr, V.data_ptr<scalar_t>(), K, C};
    const scalar_t* cp = corr.data_ptr<scalar_t>();
    const scalar_t* yp = Y.data_ptr<scalar_t>();
    const double* y2p = y2d.data_ptr<double>();
    const double* lp = lamd.data_ptr<double>();
    for_each_vector(N, [&](int64_t n) {
      codes[n] = lasso_one<scalar_t>(g, cp + n * K, yp + n * C, y2p[n], lp[n], positive, max_iter, tol);
    });
  });
  return pack(codes, V.options());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> sparse_code_omp_cpu(const at::Tensor& corr, const at::Tensor& gram,
                                                                    const at::Tensor& Y, const at::Tensor& V,
                                                                    int64_t n_nonzero) {
  check_inputs(corr, gram, Y, V);
  TORCH_CHECK(n_nonzero >= 1, "sparse_code: n_nonzero must be >= 1");
  const int64_t N = corr.size(0), K = V.size(0), C = V.size(1);
  std::vector<Code> codes(N);
  AT_DISPATCH_FLOATING_TYPES(V.scalar_type(), "sparse_code_omp_cpu", [&] {
    const Gram<scalar_t> g{gram.numel() ? gram.data_ptr<scalar_t>() : nullptr, V.data_ptr<scalar_t>(), K, C};
    const scalar_t* cp = corr.data_ptr<scalar_t>();
    const scalar_t* yp = Y.data_ptr<scalar_t>();
    for_each_vector(N, [&](int64_t n) { codes[n] = omp_one<scalar_t>(g, cp + n * K, yp + n * C, n_nonzero); });
  });
  auto [idx, val, gap, iters] = pack(codes, V.options());
  return {idx, val, iters};
}

TORCH_LIBRARY_FRAGMENT(gig_fast_cpp, m) {
  m.def("sparse_code_lasso(Tensor corr, Tensor gram, Tensor Y, Tensor V, Tensor y2, Tensor lam, bool positive, "
        "int max_iter, float tol) -> (Tensor, Tensor, Tensor, Tensor)",
        &sparse_code_lasso_cpu);
  m.def("sparse_code_omp(Tensor corr, Tensor gram, Tensor Y, Tensor V, int n_nonzero) -> (Tensor, Tensor, Tensor)",
        &sparse_code_omp_cpu);
}

}  // namespace gig_fast
