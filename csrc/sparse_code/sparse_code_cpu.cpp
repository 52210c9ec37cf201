// CPU solvers of sparse_code (algorithms and formulas in sparse_code.h). One vector per task, OpenMP
// dynamic scheduling over vectors (their costs differ a lot). The active-set solvers keep their
// per-concept vectors (Q, q, a) in the input dtype and every small solve in double; coordinate descent
// keeps all its state in double.
#include "sparse_code/sparse_code.h"

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/mm.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <string_view>
#include <type_traits>
#include <utility>
#include <vector>

#include "common.h"
#include "matmul_nt/matmul_nt.h"

#if GIG_HAVE_AVX2_PATH && defined(__GNUC__) && !defined(__clang__)
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bf16,avx512vl,avx512dq,avx2,fma")
#include "spherical_assign/screen_argmax_avx512bf16.h"  // its functions only: called where cpu has AVX-512 BF16
#pragma GCC pop_options
#endif

namespace gig_fast {
namespace {

struct Code {
  std::vector<std::pair<int64_t, double>> entries;  // (concept, coefficient), sorted by concept
  double gap = 0;
  int64_t iterations = 0;
};

// The solvers, compiled for three instruction sets: the baseline x86-64 the wheel targets, AVX2 (4
// doubles per instruction in the Gram-row updates and dot products that are most of the coordinate
// descent's time; measured 1.2-1.9x against the baseline build on 300 vectors, C=256, K=2048) and
// AVX-512 (16 floats per instruction in the Q columns and correlation updates of the active-set solvers),
// chosen per call by the CPU (cpu_has_avx2, cpu_has_avx512 below; GIG_FAST_CPU_ISA=baseline keeps the
// baseline build).
namespace base {
#include "sparse_code/sparse_code_solvers.inc"
#include "sparse_code/active_set_solvers.inc"
}  // namespace base

#if GIG_HAVE_AVX2_PATH && defined(__GNUC__) && !defined(__clang__)
#define GIG_SPARSE_CODE_SIMD 1
#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace avx2 {
#include "sparse_code/sparse_code_solvers.inc"
#include "sparse_code/active_set_solvers.inc"
}  // namespace avx2
#pragma GCC pop_options
#pragma GCC push_options
#pragma GCC target("avx512f,avx512vl,avx512dq,avx2,fma,prefer-vector-width=512")
namespace avx512 {
#include "sparse_code/sparse_code_solvers.inc"
#include "sparse_code/active_set_solvers.inc"
}  // namespace avx512
#pragma GCC pop_options
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bf16,avx512vl,avx512dq,avx2,fma,prefer-vector-width=512")
namespace bf16 {
using avx512::back_substitute;
using avx512::first_argmax;
using avx512::forward_entry;
#include "sparse_code/omp_screened.inc"
}  // namespace bf16
#pragma GCC pop_options
#else
#define GIG_SPARSE_CODE_SIMD 0
#endif

bool cpu_has_avx512() {
#if GIG_SPARSE_CODE_SIMD
  static const bool has = cpu_has_avx2() && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
                          __builtin_cpu_supports("avx512dq");
  return has;
#else
  return false;
#endif
}

// Whether a float32 OMP call without a Gram matrix runs the bf16-screened residual route (omp_screened.inc):
// on CPUs with AVX-512 BF16, unless GIG_FAST_OMP_SCREEN=0 (read per call; for tests and comparisons),
// which keeps the float32 lockstep route every other CPU runs.
bool omp_screened_route() {
#if GIG_SPARSE_CODE_SIMD
  static const bool has = cpu_has_avx512() && __builtin_cpu_supports("avx512bf16");
  const char* env = std::getenv("GIG_FAST_OMP_SCREEN");
  return has && !(env && std::string_view(env) == "0");
#else
  return false;
#endif
}

// One vector's Lasso code by the homotopy, on the build this CPU runs best (G: the stored Gram matrix
// or nullptr); `done` false where the vector needs lasso_exact_code.
template <typename T>
Code lasso_homotopy_code(const T* G, const T* V, const double* vnorm, int64_t K, int64_t C, const T* c, const T* y,
                         double y2, double lam, bool positive, int64_t max_iter, double tol, bool& done) {
#if GIG_SPARSE_CODE_SIMD
  if (cpu_has_avx512())
    return avx512::lasso_homotopy<T>(avx512::Gram<T>{G, V, K, C}, vnorm, c, y, y2, lam, positive, max_iter, tol,
                                  done);
  if (cpu_has_avx2())
    return avx2::lasso_homotopy<T>(avx2::Gram<T>{G, V, K, C}, vnorm, c, y, y2, lam, positive, max_iter, tol,
                                  done);
#endif
  return base::lasso_homotopy<T>(base::Gram<T>{G, V, K, C}, vnorm, c, y, y2, lam, positive, max_iter, tol,
                                  done);
}

// A whole call's Lasso codes by lockstep rounds without a Gram matrix (lasso_lockstep), same build choice.
template <typename T>
void lasso_lockstep_codes(const at::Tensor& V, const double* vnorm, const T* corr, const T* Y, const double* y2,
                          const double* lam, bool positive, int64_t max_iter, double tol, std::vector<Code>& codes,
                          std::vector<char>& done) {
#if GIG_SPARSE_CODE_SIMD
  if (cpu_has_avx512())
    return avx512::lasso_lockstep<T>(V, vnorm, corr, Y, y2, lam, positive, max_iter, tol, codes, done);
  if (cpu_has_avx2())
    return avx2::lasso_lockstep<T>(V, vnorm, corr, Y, y2, lam, positive, max_iter, tol, codes, done);
#endif
  base::lasso_lockstep<T>(V, vnorm, corr, Y, y2, lam, positive, max_iter, tol, codes, done);
}

// The same vector by coordinate descent on the exact problem (V64, y in double).
Code lasso_exact_code(const double* V64, int64_t K, int64_t C, const double* y, double y2, double lam, bool positive,
                      int64_t max_iter, double tol, int64_t steps) {
#if GIG_SPARSE_CODE_SIMD
  if (cpu_has_avx512())
    return avx512::lasso_exact(avx512::Gram<double>{nullptr, V64, K, C}, y, y2, lam, positive, max_iter, tol, steps);
  if (cpu_has_avx2())
    return avx2::lasso_exact(avx2::Gram<double>{nullptr, V64, K, C}, y, y2, lam, positive, max_iter, tol, steps);
#endif
  return base::lasso_exact(base::Gram<double>{nullptr, V64, K, C}, y, y2, lam, positive, max_iter, tol, steps);
}

// A whole call's OMP codes without a Gram matrix, in lockstep steps (omp_lockstep), same build choice.
template <typename T>
void omp_lockstep_codes(const at::Tensor& V, const T* corr, int64_t n_nonzero, std::vector<Code>& codes) {
  // GIG_FAST_OMP_LOCKSTEP_BYTES (read per call; for tests): the groups' budget, so that a small call splits
  const char* env = std::getenv("GIG_FAST_OMP_LOCKSTEP_BYTES");
  const int64_t bytes = env ? std::max<int64_t>(1, std::atoll(env)) : base::kOmpLockstepBytes;
#if GIG_SPARSE_CODE_SIMD
  if (cpu_has_avx512()) return avx512::omp_lockstep<T>(V, corr, n_nonzero, bytes, codes);
  if (cpu_has_avx2()) return avx2::omp_lockstep<T>(V, corr, n_nonzero, bytes, codes);
#endif
  base::omp_lockstep<T>(V, corr, n_nonzero, bytes, codes);
}

template <typename T>
Code omp_code(const T* G, const T* V, int64_t K, int64_t C, const T* c, int64_t n_nonzero) {
#if GIG_SPARSE_CODE_SIMD
  if (cpu_has_avx512()) return avx512::omp_one<T>(avx512::Gram<T>{G, V, K, C}, c, n_nonzero);
  if (cpu_has_avx2()) return avx2::omp_one<T>(avx2::Gram<T>{G, V, K, C}, c, n_nonzero);
#endif
  return base::omp_one<T>(base::Gram<T>{G, V, K, C}, c, n_nonzero);
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
  const double* y2p = y2d.data_ptr<double>();
  const double* lp = lamd.data_ptr<double>();
  // GIG_FAST_LASSO_FALLBACK=0 (read per call; for tests): the homotopy alone, no coordinate descent
  const char* fb = std::getenv("GIG_FAST_LASSO_FALLBACK");
  const bool fallback = !(fb && std::string_view(fb) == "0");
  std::vector<Code> codes(N);
  std::vector<char> done(N);
  AT_DISPATCH_FLOATING_TYPES(V.scalar_type(), "sparse_code_lasso_cpu", [&] {
    const scalar_t* gp = gram.numel() ? gram.data_ptr<scalar_t>() : nullptr;
    const scalar_t* vp = V.data_ptr<scalar_t>();
    const scalar_t* cp = corr.data_ptr<scalar_t>();
    const scalar_t* yp = Y.data_ptr<scalar_t>();
    // without a Gram matrix, a screened problem runs in lockstep rounds (lasso_lockstep)
    const bool lockstep = !gp && K > base::kScreenAbove;
    // float32 G and c, or the lockstep rounds' float32 correlations: the concepts' norms, for the gap's
    // bound on their rounding (certified_gap)
    std::vector<double> vnorm;
    if ((gp && !std::is_same_v<scalar_t, double>) || lockstep) {
      vnorm.resize(K);
      at::parallel_for(0, K, 256, [&](int64_t k0, int64_t k1) {
        for (int64_t k = k0; k < k1; ++k) {
          const scalar_t* v = vp + k * C;
          double s = 0;
          for (int64_t t = 0; t < C; ++t) s += static_cast<double>(v[t]) * static_cast<double>(v[t]);
          vnorm[k] = std::sqrt(s);
        }
      });
    }
    const double* np = vnorm.empty() ? nullptr : vnorm.data();
    if (lockstep) {
      lasso_lockstep_codes<scalar_t>(V, np, cp, yp, y2p, lp, positive, max_iter, tol, codes, done);
    } else {
      for_each_vector(N, [&](int64_t n) {
        bool ok;
        codes[n] = lasso_homotopy_code(gp, vp, np, K, C, cp + n * K, yp + n * C, y2p[n], lp[n], positive,
                                       max_iter, tol, ok);
        done[n] = ok;
      });
    }
    std::vector<int64_t> left;
    for (int64_t n = 0; n < N; ++n)
      if (!done[n]) left.push_back(n);
    if (!fallback || left.empty()) return;
    // the exact problem, formed only when some vector needs it (a float64 copy of V: 16 MiB at K = 4,096,
    // C = 512, 6 ms of page faults per call)
    const at::Tensor V64 = V.to(at::kDouble).contiguous();
    const double* v64 = V64.data_ptr<double>();
    for_each_vector(static_cast<int64_t>(left.size()), [&](int64_t i) {
      const int64_t n = left[i];
      static thread_local std::vector<double> y;
      y.assign(yp + n * C, yp + (n + 1) * C);
      codes[n] = lasso_exact_code(v64, K, C, y.data(), y2p[n], lp[n], positive, max_iter, tol, codes[n].iterations);
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
    const scalar_t* gp = gram.numel() ? gram.data_ptr<scalar_t>() : nullptr;
    const scalar_t* vp = V.data_ptr<scalar_t>();
    const scalar_t* cp = corr.data_ptr<scalar_t>();
    if (gp) {
      for_each_vector(N, [&](int64_t n) { codes[n] = omp_code(gp, vp, K, C, cp + n * K, n_nonzero); });
      return;
    }
#if GIG_SPARSE_CODE_SIMD
    // (a dispatch lambda is no template: both branches of `if constexpr` compile, hence the casts)
    if (std::is_same_v<scalar_t, float> && omp_screened_route()) {
      bf16::omp_screened(reinterpret_cast<const float*>(vp), K, C, Y.data_ptr<float>(),
                         reinterpret_cast<const float*>(cp), N, n_nonzero, at::get_num_threads(), codes);
      return;
    }
#endif
    omp_lockstep_codes<scalar_t>(V, cp, n_nonzero, codes);
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
  // whether a float32 OMP call without a Gram matrix takes the bf16-screened route here (the Python side's
  // choice of route depends on it: sparse_code.py, forms_gram)
  m.def("sparse_code_omp_screened() -> bool", [] { return omp_screened_route(); });
}

}  // namespace gig_fast
