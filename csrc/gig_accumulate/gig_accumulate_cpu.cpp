// CPU kernel of gig_accumulate (formula in gig_accumulate.h). Positions are split across OpenMP threads
// with at::parallel_for; per (t, p) the weighted alpha-sum is formed in a thread-local row (contiguous,
// `omp simd`), then dotted with the active concept rows of p.
#include "gig_accumulate/gig_accumulate.h"

#include <ATen/Parallel.h>
#include <cstdlib>
#include <string_view>
#include <vector>

#include "common.h"

#if GIG_HAVE_AVX2_PATH && defined(__GNUC__) && !defined(__clang__)
#define GIG_ACCUMULATE_VECTOR_KERNELS 1
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#include "gig_accumulate/accumulate_avx2.h"  // called where the CPU has AVX2 and FMA
#pragma GCC pop_options
#pragma GCC push_options
#pragma GCC target("avx512f,avx2,fma")
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"  // GCC 12's own AVX-512 intrinsics (their "undefined" operands)
#include "gig_accumulate/accumulate_avx512.h"  // its functions only: called where the CPU has AVX-512F
#pragma GCC diagnostic pop
#pragma GCC pop_options
#else
#define GIG_ACCUMULATE_VECTOR_KERNELS 0
#endif

namespace gig_fast {
namespace {

template <typename scalar_t>
void accumulate_rows(const scalar_t* grads, const acc_t<scalar_t>* w, const int64_t* idx,
                     const acc_t<scalar_t>* val, const acc_t<scalar_t>* V, acc_t<scalar_t>* out,
                     int64_t T, int64_t m, int64_t P, int64_t s, int64_t C) {
  using acc = acc_t<scalar_t>;
  at::parallel_for(0, P, 8, [&](int64_t begin, int64_t end) {
    std::vector<acc> g(C);
    for (int64_t p = begin; p < end; ++p) {
      for (int64_t t = 0; t < T; ++t) {
        acc* gr = g.data();
        std::fill(g.begin(), g.end(), acc(0));
        for (int64_t k = 0; k < m; ++k) {
          const acc wk = w[k];
          const scalar_t* src = grads + ((t * m + k) * P + p) * C;
#pragma omp simd
          for (int64_t c = 0; c < C; ++c) gr[c] += wk * static_cast<acc>(src[c]);
        }
        acc* o = out + (t * P + p) * s;
        for (int64_t j = 0; j < s; ++j) {
          const int64_t q = idx[p * s + j];
          if (q < 0) {
            o[j] = acc(0);
            continue;
          }
          const acc* v = V + q * C;
          acc dot = 0;
#pragma omp simd reduction(+ : dot)
          for (int64_t c = 0; c < C; ++c) dot += gr[c] * v[c];
          o[j] = val[p * s + j] * dot;
        }
      }
    }
  });
}

// The vector kernels take fp32 gradients: accumulate_avx512.h with C a multiple of 16 on CPUs with
// AVX-512F, else accumulate_avx2.h with C a multiple of 8 on CPUs with AVX2 and FMA. GIG_FAST_ACCUMULATE_ISA
// (read at each call) caps the choice: "generic" keeps the generic kernel, "avx2" the AVX2 kernel on an
// AVX-512 CPU, so one machine tests every kernel it can run.
enum class AccumulateIsa { kGeneric, kAvx2, kAvx512 };

AccumulateIsa accumulate_isa(at::ScalarType dtype, int64_t C) {
#if GIG_ACCUMULATE_VECTOR_KERNELS
  static const bool avx2 = cpu_has_avx2() && __builtin_cpu_supports("fma");
  static const bool avx512 = avx2 && __builtin_cpu_supports("avx512f");
  const char* cap_env = std::getenv("GIG_FAST_ACCUMULATE_ISA");
  const std::string_view cap = cap_env ? cap_env : "";
  if (dtype != at::kFloat || !avx2 || cap == "generic") return AccumulateIsa::kGeneric;
  if (avx512 && C % 16 == 0 && cap != "avx2") return AccumulateIsa::kAvx512;
  return C % 8 == 0 ? AccumulateIsa::kAvx2 : AccumulateIsa::kGeneric;
#else
  (void)dtype;
  (void)C;
  return AccumulateIsa::kGeneric;
#endif
}

}  // namespace

at::Tensor gig_accumulate_cpu(const at::Tensor& grads, const at::Tensor& weights, const at::Tensor& idx,
                              const at::Tensor& val, const at::Tensor& V) {
  check_gig_accumulate_inputs(grads, weights, idx, val, V, c10::DeviceType::CPU);
  const int64_t T = grads.size(0), m = grads.size(1), P = grads.size(2), C = grads.size(3), s = idx.size(1);
  const auto acc_type = grads.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  auto g = grads.contiguous();
  auto w = weights.to(acc_type).contiguous();
  auto vl = val.to(acc_type).contiguous();
  auto Vc = V.to(acc_type).contiguous();
  auto ix = idx.contiguous();
  auto out = at::empty({T, P, s}, grads.options().dtype(acc_type));
  if (out.numel() == 0) return out;
#if GIG_ACCUMULATE_VECTOR_KERNELS
  const AccumulateIsa isa = accumulate_isa(g.scalar_type(), C);
  if (isa != AccumulateIsa::kGeneric) {
    const float *gp = g.data_ptr<float>(), *wp = w.data_ptr<float>(), *vp = vl.data_ptr<float>(), *Vp = Vc.data_ptr<float>();
    const int64_t* ip = ix.data_ptr<int64_t>();
    float* op = out.data_ptr<float>();
    at::parallel_for(0, P, 8, [&](int64_t begin, int64_t end) {
      if (isa == AccumulateIsa::kAvx512)
        accumulate512::accumulate_positions(gp, wp, ip, vp, Vp, op, T, m, P, s, C, begin, end);
      else
        accumulate256::accumulate_positions(gp, wp, ip, vp, Vp, op, T, m, P, s, C, begin, end);
    });
    return out;
  }
#endif
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grads.scalar_type(), "gig_accumulate_cpu", [&] {
    using acc = acc_t<scalar_t>;
    accumulate_rows<scalar_t>(g.data_ptr<scalar_t>(), w.data_ptr<acc>(), ix.data_ptr<int64_t>(),
                              vl.data_ptr<acc>(), Vc.data_ptr<acc>(), out.data_ptr<acc>(), T, m, P, s, C);
  });
  return out;
}

TORCH_LIBRARY_FRAGMENT(gig_fast_cpp, m) {
  m.def("gig_accumulate(Tensor grads, Tensor weights, Tensor idx, Tensor val, Tensor V) -> Tensor",
        &gig_accumulate_cpu);
}

}  // namespace gig_fast
