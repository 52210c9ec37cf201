// CPU kernel of spherical_assign (formula in spherical_assign.h).
//
// Two paths, chosen by K only (so a given problem always takes the same one):
//  * K <= kDirectMaxK (the 2-means splits of the bisecting extractor): rows are split across OpenMP
//    threads; each row is read once and its K dot products (and its norm) are accumulated together
//    in one pass over C. This case is memory-bound, so one pass over X is the whole cost.
//  * larger K: row blocks are spread over the threads; each block is normalised into an fp32/fp64
//    scratch tile and multiplied with one tile of unit centroids at a time by at::mm (BLAS, on the
//    owning thread), then each row folds the tile into its running best. Scratch per thread is
//    [kRowBlock, C] + [kRowBlock, kColTile], never N x K.
//    On AVX2+FMA CPUs the fp32 accumulation (fp32/fp16/bf16 inputs) instead runs our own blocked GEMM
//    with the argmax fused into its epilogue (fused_argmax_avx2.h): nothing but the running best leaves
//    the registers. One thread, 20,000 x 256 against 2,048 centroids (CPU time, loaded 2-core machine):
//    91 GFLOP/s against 70 for at::mm + scan (MKL) and 80 for faiss's IndexFlatIP search.
#include "spherical_assign/spherical_assign.h"

#include <ATen/Parallel.h>
#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

#include "common.h"

#if GIG_HAVE_AVX2_PATH && defined(__GNUC__) && !defined(__clang__)
#define GIG_FUSED_ARGMAX 1
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#include "spherical_assign/fused_argmax_avx2.h"  // its functions only: called where cpu has AVX2 and FMA
#pragma GCC pop_options
#else
#define GIG_FUSED_ARGMAX 0
#endif

namespace gig_fast {
namespace {

constexpr int64_t kDirectMaxK = 8;
constexpr int64_t kRowBlock = 256;
constexpr int64_t kColTile = 1024;
constexpr int64_t kMinTaskWork = int64_t(1) << 18;  // multiply-adds per thread below which we stay serial

// Same guard as the reference: rows are divided by max(|x|, 1e-12), so zero rows stay zero.
template <typename acc>
acc inv_norm(acc sq) {
  return acc(1) / std::max(static_cast<acc>(std::sqrt(sq)), static_cast<acc>(1e-12));
}

// The row r[0..C) (already in the accumulation dtype) scaled by the power of two that brings its largest
// |entry| `amax` into [0.5, 1) when `amax` lies outside [2^-30, 2^30], as scale_extreme_rows does for a
// whole tensor (spherical_assign.h); returns its new squared norm, or `sq` when the row is in range. Done
// per row, inside the pass that reads it: checking X first would cost a second read of X (measured: 50% of
// the op's time at K = 2, 50000 x 256 fp32, where the op is memory-bound).
template <typename acc>
acc rescale_if_extreme(acc* r, int64_t C, acc amax, acc sq) {
  const acc bound = static_cast<acc>(1 << 30);
  if (amax <= bound && !(amax > 0 && amax < 1 / bound)) return sq;
  int e = 0;
  std::frexp(static_cast<double>(amax), &e);                         // amax = f·2^e, f in [0.5, 1)
  const double lo = std::ldexp(1.0, -e / 2), hi = std::ldexp(1.0, -e - (-e / 2));  // 2^-e in two factors
  acc s = 0;
  for (int64_t c = 0; c < C; ++c) {
    r[c] = static_cast<acc>(static_cast<double>(r[c]) * lo * hi);  // exact: a power of two
    s += r[c] * r[c];
  }
  return s;
}

// Row x[0..C) into r in the accumulation dtype (rescaled where extreme); returns 1/|r| (0-safe).
template <typename scalar_t>
acc_t<scalar_t> load_row(const scalar_t* x, int64_t C, acc_t<scalar_t>* r) {
  using acc = acc_t<scalar_t>;
  acc sq = 0, amax = 0;
#pragma omp simd reduction(+ : sq) reduction(max : amax)
  for (int64_t c = 0; c < C; ++c) {
    r[c] = static_cast<acc>(x[c]);
    sq += r[c] * r[c];
    amax = std::max(amax, std::abs(r[c]));
  }
  return inv_norm(rescale_if_extreme(r, C, amax, sq));
}

// Unit rows of `centroids` in the accumulation dtype: [K, C].
at::Tensor unit_rows(const at::Tensor& t, at::ScalarType acc_type) {
  auto a = t.to(acc_type).contiguous();
  auto n = a.norm(2, {1}, /*keepdim=*/true).clamp_min(1e-12);
  return a.div(n).contiguous();
}

template <typename scalar_t>
void assign_direct(const scalar_t* X, const acc_t<scalar_t>* Cn, int64_t N, int64_t K, int64_t C,
                   int64_t* labels, acc_t<scalar_t>* best) {
  using acc = acc_t<scalar_t>;
  // Threads only for enough work: a fork/join costs more than a small cluster's whole pass, and far
  // more on a loaded machine, where a descheduled thread stalls the barrier.
  const int64_t grain = std::max<int64_t>(64, kMinTaskWork / std::max<int64_t>(1, C * (K + 1)));
  at::parallel_for(0, N, grain, [&](int64_t begin, int64_t end) {
    std::vector<acc> row(C);
    for (int64_t n = begin; n < end; ++n) {
      acc* r = row.data();
      const acc inv = load_row(X + n * C, C, r);
      acc top = 0;
      int64_t arg = 0;
      for (int64_t k = 0; k < K; ++k) {
        const acc* ck = Cn + k * C;
        acc dot = 0;
#pragma omp simd reduction(+ : dot)
        for (int64_t c = 0; c < C; ++c) dot += r[c] * ck[c];
        const acc cosv = dot * inv;
        if (k == 0 || cosv > top) {  // strict: ties keep the smaller k
          top = cosv;
          arg = k;
        }
      }
      labels[n] = arg;
      best[n] = top;
    }
  });
}

// Rows r0..r0+rows of X as unit rows (rescaled where extreme, zero rows kept zero) into out [rows, C].
template <typename scalar_t>
void unit_block(const scalar_t* Xp, int64_t r0, int64_t rows, int64_t C, acc_t<scalar_t>* out) {
  using acc = acc_t<scalar_t>;
  for (int64_t i = 0; i < rows; ++i) {
    acc* o = out + i * C;
    const acc inv = load_row(Xp + (r0 + i) * C, C, o);
    for (int64_t c = 0; c < C; ++c) o[c] *= inv;
  }
}

#if GIG_FUSED_ARGMAX
// The fused fp32 path (fused_argmax_avx2.h): the centroids packed once, then each thread's rows in blocks
// of kBlockRows, in passes of pass_cols(C) centroids. Cn: unit centroids fp32 [K, C].
template <typename scalar_t>
void assign_fused(const scalar_t* Xp, int64_t N, int64_t C, const float* Cn, int64_t K, int64_t* labels,
                  float* best) {
  namespace fa = fused_argmax;
  const int64_t panels = (K + fa::kNr - 1) / fa::kNr;
  std::vector<float> packed(static_cast<size_t>(panels * fa::kNr * C));
  fa::pack_panels(Cn, K, C, fa::kNr, packed.data());
  const int64_t pass = fa::pass_cols(C);
  // one contiguous range of rows per thread, as the tiled path: enough rows for a thread to pay off
  const int64_t grain = std::max<int64_t>(fa::kBlockRows, kMinTaskWork / std::max<int64_t>(1, C * K));
  at::parallel_for(0, N, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> rows_buf(static_cast<size_t>(fa::kBlockRows * C)), pack((rows_buf.size()) + fa::kMr * C);
    std::vector<float> partial(C > fa::kKc ? fa::kBlockRows * fa::kTileCols : 0);
    std::vector<fa::LaneBest> lanes(fa::kBlockRows);
    for (int64_t k0 = 0; k0 < K; k0 += pass) {
      for (int64_t r0 = begin; r0 < end; r0 += fa::kBlockRows) {
        const int64_t rows = std::min(fa::kBlockRows, end - r0);
        unit_block<scalar_t>(Xp, r0, rows, C, rows_buf.data());
        fa::pack_panels(rows_buf.data(), rows, C, fa::kMr, pack.data());
        fa::reset(lanes.data(), rows);
        fa::fold_pass(pack.data(), rows, packed.data(), panels, k0, std::min(pass, K - k0), C,
                      partial.empty() ? nullptr : partial.data(), lanes.data());
        fa::merge_pass(lanes.data(), rows, k0 == 0, best + r0, labels + r0);
      }
    }
  });
}
#endif

template <typename scalar_t>
void assign_tiled(const at::Tensor& X, const at::Tensor& Cn, int64_t* labels, acc_t<scalar_t>* best) {
  using acc = acc_t<scalar_t>;
  const int64_t N = X.size(0), C = X.size(1), K = Cn.size(0);
  const scalar_t* Xp = X.data_ptr<scalar_t>();
  const int64_t blocks = (N + kRowBlock - 1) / kRowBlock;
  // One parallel region over row blocks (a fork/join per tile costs a lot on a busy machine); each
  // thread owns its scratch, and at::mm inside the region runs on that thread alone.
  at::parallel_for(0, blocks, 1, [&](int64_t b_begin, int64_t b_end) {
    auto xb = at::empty({std::min(N, kRowBlock), C}, Cn.options());
    acc* xbp = xb.data_ptr<acc>();
    for (int64_t b = b_begin; b < b_end; ++b) {
      const int64_t r0 = b * kRowBlock, rows = std::min(kRowBlock, N - r0);
      unit_block<scalar_t>(Xp, r0, rows, C, xbp);
      for (int64_t i = 0; i < rows; ++i) {
        labels[r0 + i] = 0;
        best[r0 + i] = -std::numeric_limits<acc>::infinity();
      }
      auto xrows = xb.narrow(0, 0, rows);
      for (int64_t k0 = 0; k0 < K; k0 += kColTile) {
        const int64_t cols = std::min(kColTile, K - k0);
        auto scores = at::mm(xrows, Cn.narrow(0, k0, cols).t()).contiguous();  // [rows, cols]
        const acc* s = scores.data_ptr<acc>();
        for (int64_t i = 0; i < rows; ++i) {
          const acc* si = s + i * cols;
          acc top = best[r0 + i];
          int64_t arg = labels[r0 + i];
          for (int64_t j = 0; j < cols; ++j)
            if (si[j] > top) {  // strict: ties keep the smaller k (earlier tiles hold smaller k)
              top = si[j];
              arg = k0 + j;
            }
          best[r0 + i] = top;
          labels[r0 + i] = arg;
        }
      }
    }
  });
}

}  // namespace

// The fused path needs FMA as well as AVX2 (every AVX2 CPU has it; checked all the same).
static bool use_fused_argmax() {
#if GIG_FUSED_ARGMAX
  static const bool fma = __builtin_cpu_supports("fma");
  return cpu_has_avx2() && fma;
#else
  return false;
#endif
}

std::tuple<at::Tensor, at::Tensor> spherical_assign_cpu(const at::Tensor& X_in, const at::Tensor& centroids_in) {
  check_spherical_assign_inputs(X_in, centroids_in, c10::DeviceType::CPU);
  // scale-free (see spherical_assign.h): the centroids are brought into range here, each row of X as the
  // kernels read it (rescale_if_extreme)
  const at::Tensor& X = X_in;
  const at::Tensor centroids = scale_extreme_rows(centroids_in);
  const int64_t N = X.size(0), C = X.size(1), K = centroids.size(0);
  const auto acc_type = X.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  auto labels = at::empty({N}, X.options().dtype(at::kLong));
  auto best = at::empty({N}, X.options().dtype(acc_type));
  if (N == 0) return {labels, best};
  auto Cn = unit_rows(centroids, acc_type);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, X.scalar_type(), "spherical_assign_cpu", [&] {
    using acc = acc_t<scalar_t>;
    if (K <= kDirectMaxK || C == 0) {
      assign_direct<scalar_t>(X.data_ptr<scalar_t>(), Cn.data_ptr<acc>(), N, K, C, labels.data_ptr<int64_t>(),
                              best.data_ptr<acc>());
      return;
    }
#if GIG_FUSED_ARGMAX
    if constexpr (std::is_same_v<acc, float>) {
      if (use_fused_argmax()) {
        assign_fused<scalar_t>(X.data_ptr<scalar_t>(), N, C, Cn.data_ptr<float>(), K, labels.data_ptr<int64_t>(),
                               best.data_ptr<float>());
        return;
      }
    }
#endif
      assign_tiled<scalar_t>(X, Cn, labels.data_ptr<int64_t>(), best.data_ptr<acc>());
  });
  return {labels, best};
}

TORCH_LIBRARY_FRAGMENT(gig_fast_cpp, m) {
  m.def("spherical_assign(Tensor X, Tensor centroids) -> (Tensor, Tensor)", &spherical_assign_cpu);
}

}  // namespace gig_fast
