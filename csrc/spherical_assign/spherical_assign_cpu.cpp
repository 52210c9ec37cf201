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
//    On AVX-512 CPUs the same scheme runs with 512-bit registers (fused_argmax_avx512.h).
//    On CPUs with AVX-512 BF16 the centroids are screened in bf16 at twice the multiply-adds per
//    instruction and the few that can still win re-scored in fp32 (screen_argmax_avx512bf16.h): the
//    same labels and best cosines as the fp32 kernels, bit for bit.
#include "spherical_assign/spherical_assign.h"

#include <ATen/Parallel.h>
#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <sys/mman.h>
#include <type_traits>
#include <vector>

#include "common.h"

#if GIG_HAVE_AVX2_PATH && defined(__GNUC__) && !defined(__clang__)
#define GIG_FUSED_ARGMAX 1
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#include "spherical_assign/fused_argmax_avx2.h"  // its functions only: called where cpu has AVX2 and FMA
#pragma GCC pop_options
#pragma GCC push_options
#pragma GCC target("avx512f,avx2,fma")
#include "spherical_assign/fused_argmax_avx512.h"  // its functions only: called where cpu has AVX-512F
#pragma GCC pop_options
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bf16,avx2,fma")
#include "spherical_assign/screen_argmax_avx512bf16.h"  // its functions only: called where cpu has AVX-512 BF16
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

// Row x[0..C) into r in the accumulation dtype (rescaled where extreme); returns 1/|r| (0-safe). Not
// inlined: every path then has the same machine code, so the same summation order of |r|², and the
// bf16-screened kernel re-makes the unit rows the fp32 kernels packed bit for bit.
template <typename scalar_t>
__attribute__((noinline)) acc_t<scalar_t> load_row(const scalar_t* x, int64_t C, acc_t<scalar_t>* r) {
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
// The two fused kernels behind one interface (their functions are compiled for their ISA; these
// forwarders are not, so they call rather than inline them: one call per row block and pass).
template <typename NS_LaneBest, int64_t Mr, int64_t Nr, int64_t BlockRows, int64_t TileCols>
struct FusedTraits {
  using LaneBest = NS_LaneBest;
  static constexpr int64_t kMr = Mr, kNr = Nr, kBlockRows = BlockRows, kTileCols = TileCols;
};
struct Avx2Kernel : FusedTraits<fused_argmax::LaneBest, fused_argmax::kMr, fused_argmax::kNr,
                                fused_argmax::kBlockRows, fused_argmax::kTileCols> {
  static constexpr int64_t kKc = fused_argmax::kKc;
  static void pack(const float* s, int64_t n, int64_t C, int64_t w, float* o) { fused_argmax::pack_panels(s, n, C, w, o); }
  static void reset(LaneBest* b, int64_t rows) { fused_argmax::reset(b, rows); }
  static void fold_pass(const float* ap, int64_t rows, const float* bp, int64_t all, int64_t k0, int64_t count,
                        int64_t C, float* partial, LaneBest* lanes) {
    fused_argmax::fold_pass(ap, rows, bp, all, k0, count, C, partial, lanes);
  }
  static void merge_pass(const LaneBest* l, int64_t rows, bool first, float* best, int64_t* label) {
    fused_argmax::merge_pass(l, rows, first, best, label);
  }
};
struct Avx512Kernel : FusedTraits<fused_argmax512::LaneBest, fused_argmax512::kMr, fused_argmax512::kNr,
                                  fused_argmax512::kBlockRows, fused_argmax512::kTileCols> {
  static constexpr int64_t kKc = fused_argmax512::kKc;
  static void pack(const float* s, int64_t n, int64_t C, int64_t w, float* o) { fused_argmax512::pack_panels(s, n, C, w, o); }
  static void reset(LaneBest* b, int64_t rows) { fused_argmax512::reset(b, rows); }
  static void fold_pass(const float* ap, int64_t rows, const float* bp, int64_t all, int64_t k0, int64_t count,
                        int64_t C, float* partial, LaneBest* lanes) {
    fused_argmax512::fold_pass(ap, rows, bp, all, k0, count, C, partial, lanes);
  }
  static void merge_pass(const LaneBest* l, int64_t rows, bool first, float* best, int64_t* label) {
    fused_argmax512::merge_pass(l, rows, first, best, label);
  }
};

// Packed centroids per pass over a thread's rows: 2 MiB stay in a (shared) L3, so a dictionary larger than
// the L3 (C = 2048, K = 16384: 128 MiB) is read from memory once per pass rather than once per row block.
constexpr int64_t kPassBytes = int64_t(2) << 20;
// Packed unit rows per thread kept across all passes: 4 MiB (at C = 2048, 512 rows). Each row is
// normalised and packed once per call; repacking it once per pass cost 64 repacks per row at C = 2048
// (K = 16384, 256 centroids per pass), about a fifth of the call.
constexpr int64_t kSuperBytes = int64_t(4) << 20;

// The fused fp32 path: the centroids packed once, then each thread's rows in super blocks (packed once,
// in row blocks of kBlockRows), each folded against every pass of pass centroids. Cn: unit centroids fp32
// [K, C].
struct FreeDeleter {
  void operator()(void* p) const { std::free(p); }
};
// An uninitialised buffer of n entries (every entry gets written) in 2 MiB-aligned memory marked for
// transparent huge pages where the kernel offers them: the centroid pack is 128 MiB at K = 16384,
// C = 2048, and first-touching it in 4 KiB pages (32,768 faults) cost about half of packing it.
template <typename T = float>
std::unique_ptr<T[], FreeDeleter> huge_page_buffer(size_t n) {
  constexpr size_t kHuge = size_t(2) << 20;
  const size_t bytes = std::max<size_t>(1, (n * sizeof(T) + kHuge - 1) / kHuge) * kHuge;
  void* p = std::aligned_alloc(kHuge, bytes);
  TORCH_CHECK(p != nullptr, "spherical_assign: out of memory for the packed centroids (", bytes, " bytes)");
#ifdef MADV_HUGEPAGE
  madvise(p, bytes, MADV_HUGEPAGE);  // advice only: without it the pages are 4 KiB
#endif
  return std::unique_ptr<T[], FreeDeleter>(static_cast<T*>(p));
}

// The centroids `cents` [K, C] as unit rows (each brought into range and normalised as load_row does for a
// row of X), packed as Kern::pack packs them (panels of Kern::kNr, zero past K) into `out`: one read of
// the centroids and one write of the pack, split over the threads by panel. (Scaling, normalising and
// packing them as three tensor passes and a serial pack took 266 ms of a call at K = 16384, C = 2048 on
// one thread: twice the GEMM of 500 rows.)
template <typename Kern, typename scalar_t>
void pack_unit_centroids(const scalar_t* cents, int64_t K, int64_t C, float* out) {
  constexpr int64_t Nr = Kern::kNr;
  const int64_t panels = (K + Nr - 1) / Nr;
  at::parallel_for(0, panels, std::max<int64_t>(1, (int64_t(1) << 16) / std::max<int64_t>(1, Nr * C)),
                   [&](int64_t q0, int64_t q1) {
    std::vector<float> unit(static_cast<size_t>(Nr * C));
    for (int64_t q = q0; q < q1; ++q) {
      const int64_t rows = std::min(Nr, K - q * Nr);
      unit_block<scalar_t>(cents, q * Nr, rows, C, unit.data());
      std::fill(unit.begin() + rows * C, unit.end(), 0.f);
      for (int64_t c0 = 0; c0 < C; c0 += Kern::kKc) {
        const int64_t kc = std::min(Kern::kKc, C - c0);
        float* o = out + c0 * panels * Nr + q * kc * Nr;
        for (int64_t c = 0; c < kc; ++c)
          for (int64_t j = 0; j < Nr; ++j) o[c * Nr + j] = unit[j * C + c0 + c];
      }
    }
  });
}

template <typename Kern, typename scalar_t>
void assign_fused(const scalar_t* Xp, int64_t N, int64_t C, const scalar_t* cents, int64_t K, int64_t* labels,
                  float* best) {
  constexpr int64_t B = Kern::kBlockRows, Mr = Kern::kMr, Nr = Kern::kNr;
  const int64_t panels = (K + Nr - 1) / Nr;
  auto packed = huge_page_buffer(static_cast<size_t>(panels * Nr * C));
  pack_unit_centroids<Kern, scalar_t>(cents, K, C, packed.get());
  const int64_t pass = std::max<int64_t>(Nr, kPassBytes / (4 * std::max<int64_t>(C, 1)) / Nr * Nr);
  const int64_t block_floats = (B + Mr - 1) / Mr * Mr * C;  // one packed row block
  const int64_t super = std::max<int64_t>(B, kSuperBytes / (4 * std::max<int64_t>(C, 1)) / B * B);
  // one contiguous range of rows per thread, as the tiled path: enough rows for a thread to pay off
  const int64_t grain = std::max<int64_t>(B, kMinTaskWork / std::max<int64_t>(1, C * K));
  at::parallel_for(0, N, grain, [&](int64_t begin, int64_t end) {
    const int64_t blocks = (std::min(super, end - begin) + B - 1) / B;
    std::vector<float> rows_buf(static_cast<size_t>(B * C)), pack(static_cast<size_t>(blocks * block_floats));
    std::vector<float> partial(C > Kern::kKc ? B * Kern::kTileCols : 0);
    std::vector<typename Kern::LaneBest> lanes(B);
    for (int64_t s0 = begin; s0 < end; s0 += super) {
      const int64_t s1 = std::min(end, s0 + super);
      for (int64_t r0 = s0; r0 < s1; r0 += B) {
        const int64_t rows = std::min(B, s1 - r0);
        unit_block<scalar_t>(Xp, r0, rows, C, rows_buf.data());
        Kern::pack(rows_buf.data(), rows, C, Mr, pack.data() + (r0 - s0) / B * block_floats);
      }
      for (int64_t k0 = 0; k0 < K; k0 += pass) {
        for (int64_t r0 = s0; r0 < s1; r0 += B) {
          const int64_t rows = std::min(B, s1 - r0);
          Kern::reset(lanes.data(), rows);
          Kern::fold_pass(pack.data() + (r0 - s0) / B * block_floats, rows, packed.get(), panels, k0,
                          std::min(pass, K - k0), C, partial.empty() ? nullptr : partial.data(), lanes.data());
          Kern::merge_pass(lanes.data(), rows, k0 == 0, best + r0, labels + r0);
        }
      }
    }
  });
}

// The bf16-screened path (screen_argmax_avx512bf16.h): the centroids' unit rows packed as bf16 pairs once;
// each thread's rows in super blocks as for assign_fused, screened against every pass of centroids, then
// each row's candidates re-scored from their fp32 unit rows. Rows whose candidates overflow
// (labels[r] = -1 meanwhile) are scored afterwards by the fp32 kernel.
template <typename scalar_t>
void assign_screened(const scalar_t* Xp, int64_t N, int64_t C, const scalar_t* cents, int64_t K, int64_t* labels,
                     float* best) {
  namespace sb = screen_bf16;
  constexpr int64_t B = sb::kBlockRows, Mr = sb::kMr, Nr = sb::kNr;
  const int64_t Cp = sb::pairs_of(C), panels = (K + Nr - 1) / Nr;
  auto packed = huge_page_buffer<uint32_t>(static_cast<size_t>(panels * Nr * Cp));
  at::parallel_for(0, panels, std::max<int64_t>(1, (int64_t(1) << 16) / std::max<int64_t>(1, Nr * C)),
                   [&](int64_t q0, int64_t q1) {
    std::vector<float> unit(static_cast<size_t>(Nr * C));
    for (int64_t q = q0; q < q1; ++q) {
      unit_block<scalar_t>(cents, q * Nr, std::min(Nr, K - q * Nr), C, unit.data());
      sb::pack_pair_panels(unit.data(), K, C, Nr, q, q + 1, packed.get());
    }
  });
  // a candidate's unit row, as the fp32 kernels pack it (re-made per candidate: a few per row, where a
  // table of all K would be K·C floats to write per call, 128 MiB at K = 16384, C = 2048)
  const auto unit_row = [&](int32_t k, float* out) { unit_block<scalar_t>(cents, k, 1, C, out); };
  const float margin = 2 * sb::screen_error(C);
  const int64_t pass = std::max<int64_t>(Nr, kPassBytes / (4 * Cp) / Nr * Nr);
  const int64_t block_words = (B + Mr - 1) / Mr * Mr * Cp;  // one packed row block
  const int64_t super = std::max<int64_t>(B, kSuperBytes / (4 * C) / B * B);
  const int64_t grain = std::max<int64_t>(B, kMinTaskWork / std::max<int64_t>(1, C * K));
  at::parallel_for(0, N, grain, [&](int64_t begin, int64_t end) {
    const int64_t span = std::min(super, end - begin), blocks = (span + B - 1) / B;
    std::vector<float> rows_buf(static_cast<size_t>(span * C)), tile(static_cast<size_t>(B * sb::kTileCols));
    std::vector<uint32_t> pack(static_cast<size_t>(blocks * block_words));
    std::vector<float> partial(Cp > sb::kKp ? B * sb::kTileCols : 0);
    std::vector<sb::Screen> screens(static_cast<size_t>(span));
    std::vector<float> scratch(static_cast<size_t>(4 * C));
    for (int64_t s0 = begin; s0 < end; s0 += super) {
      const int64_t s1 = std::min(end, s0 + super);
      for (int64_t r0 = s0; r0 < s1; r0 += B) {
        const int64_t rows = std::min(B, s1 - r0);
        float* unit_rows = rows_buf.data() + (r0 - s0) * C;
        unit_block<scalar_t>(Xp, r0, rows, C, unit_rows);
        sb::pack_pair_panels(unit_rows, rows, C, Mr, 0, (rows + Mr - 1) / Mr, pack.data() + (r0 - s0) / B * block_words);
      }
      sb::reset(screens.data(), s1 - s0);
      for (int64_t k0 = 0; k0 < K; k0 += pass)
        for (int64_t r0 = s0; r0 < s1; r0 += B)
          sb::screen_pass(pack.data() + (r0 - s0) / B * block_words, std::min(B, s1 - r0), packed.get(), panels, k0,
                          std::min(pass, K - k0), C, margin, partial.empty() ? nullptr : partial.data(), tile.data(),
                          screens.data() + (r0 - s0));
      for (int64_t r = s0; r < s1; ++r)
        if (!sb::finish(screens[r - s0], rows_buf.data() + (r - s0) * C, C, margin, unit_row, scratch.data(), best + r,
                        labels + r))
          labels[r] = -1;
    }
  });
  std::vector<int64_t> crowded;  // rows with more than kCandidates centroids within 2e of their best
  for (int64_t r = 0; r < N; ++r)
    if (labels[r] < 0) crowded.push_back(r);
  if (crowded.empty()) return;
  std::vector<scalar_t> sub(crowded.size() * C);
  for (size_t i = 0; i < crowded.size(); ++i) std::copy_n(Xp + crowded[i] * C, C, sub.data() + i * C);
  std::vector<int64_t> sub_labels(crowded.size());
  std::vector<float> sub_best(crowded.size());
  assign_fused<Avx512Kernel, scalar_t>(sub.data(), static_cast<int64_t>(crowded.size()), C, cents, K,
                                       sub_labels.data(), sub_best.data());
  for (size_t i = 0; i < crowded.size(); ++i) labels[crowded[i]] = sub_labels[i], best[crowded[i]] = sub_best[i];
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
// GIG_FAST_ASSIGN_ISA (read at each call) caps the kernel: "avx512" keeps AVX-512 BF16 CPUs on the fp32
// AVX-512 kernel, "avx2" AVX-512 CPUs on the AVX2 kernel, "blas" any CPU on at::mm + scan; so one machine
// tests every path.
enum class FusedIsa { kNone, kAvx2, kAvx512, kAvx512Bf16 };
static FusedIsa fused_isa() {
#if GIG_FUSED_ARGMAX
  static const bool fma = __builtin_cpu_supports("fma"), avx512 = __builtin_cpu_supports("avx512f"),
                    bf16 = avx512 && __builtin_cpu_supports("avx512bf16");
  FusedIsa isa = !(cpu_has_avx2() && fma) ? FusedIsa::kNone
                 : bf16                   ? FusedIsa::kAvx512Bf16
                 : avx512                 ? FusedIsa::kAvx512
                                          : FusedIsa::kAvx2;
  if (const char* cap = std::getenv("GIG_FAST_ASSIGN_ISA")) {
    if (std::strcmp(cap, "blas") == 0) isa = FusedIsa::kNone;
    else if (std::strcmp(cap, "avx2") == 0 && isa != FusedIsa::kNone) isa = FusedIsa::kAvx2;
    else if (std::strcmp(cap, "avx512") == 0 && isa == FusedIsa::kAvx512Bf16) isa = FusedIsa::kAvx512;
  }
  return isa;
#else
  return FusedIsa::kNone;
#endif
}

std::tuple<at::Tensor, at::Tensor> spherical_assign_cpu(const at::Tensor& X_in, const at::Tensor& centroids_in) {
  check_spherical_assign_inputs(X_in, centroids_in, c10::DeviceType::CPU);
  // scale-free (see spherical_assign.h): the centroids are brought into range here, each row of X as the
  // kernels read it (rescale_if_extreme)
  const at::Tensor& X = X_in;
  const int64_t N = X.size(0), C = X.size(1), K = centroids_in.size(0);
  const auto acc_type = X.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  auto labels = at::empty({N}, X.options().dtype(at::kLong));
  auto best = at::empty({N}, X.options().dtype(acc_type));
  if (N == 0) return {labels, best};
  // the fused kernels bring each centroid into range and normalise it as they pack it (pack_unit_centroids)
  const FusedIsa isa = acc_type == at::kFloat && K > kDirectMaxK && C > 0 ? fused_isa() : FusedIsa::kNone;
  const at::Tensor centroids = isa == FusedIsa::kNone ? scale_extreme_rows(centroids_in) : centroids_in;
  const at::Tensor Cn = isa == FusedIsa::kNone ? unit_rows(centroids, acc_type) : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, X.scalar_type(), "spherical_assign_cpu", [&] {
    using acc = acc_t<scalar_t>;
#if GIG_FUSED_ARGMAX
    if constexpr (std::is_same_v<acc, float>) {
      if (isa == FusedIsa::kAvx512Bf16) {
        assign_screened<scalar_t>(X.data_ptr<scalar_t>(), N, C, centroids.data_ptr<scalar_t>(), K,
                                  labels.data_ptr<int64_t>(), best.data_ptr<float>());
        return;
      }
      if (isa == FusedIsa::kAvx512) {
        assign_fused<Avx512Kernel, scalar_t>(X.data_ptr<scalar_t>(), N, C, centroids.data_ptr<scalar_t>(), K,
                                             labels.data_ptr<int64_t>(), best.data_ptr<float>());
        return;
      }
      if (isa == FusedIsa::kAvx2) {
        assign_fused<Avx2Kernel, scalar_t>(X.data_ptr<scalar_t>(), N, C, centroids.data_ptr<scalar_t>(), K,
                                           labels.data_ptr<int64_t>(), best.data_ptr<float>());
        return;
      }
    }
#endif
    if (K <= kDirectMaxK || C == 0) {
      assign_direct<scalar_t>(X.data_ptr<scalar_t>(), Cn.data_ptr<acc>(), N, K, C, labels.data_ptr<int64_t>(),
                              best.data_ptr<acc>());
      return;
    }
      assign_tiled<scalar_t>(X, Cn, labels.data_ptr<int64_t>(), best.data_ptr<acc>());
  });
  return {labels, best};
}

TORCH_LIBRARY_FRAGMENT(gig_fast_cpp, m) {
  m.def("spherical_assign(Tensor X, Tensor centroids) -> (Tensor, Tensor)", &spherical_assign_cpu);
}

}  // namespace gig_fast
