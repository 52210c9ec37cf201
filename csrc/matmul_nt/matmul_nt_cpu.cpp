// CPU entry of matmul_nt (contract and paths in matmul_nt.h).
//
// The AVX-512 path: b packed once into 32-column panels (in parallel), then the work items — a row block
// of 96 rows × a column tile of 512 columns — spread over at::get_num_threads() threads by
// at::parallel_for; each thread packs the row block it works on (once per run of items on one block)
// and keeps its own partial-sum buffer. Symmetric: only the items that reach the diagonal or above it,
// and within them only such 12×32 tiles; each item's entries above the diagonal are then copied down.
#include "matmul_nt/matmul_nt.h"

#include <ATen/Parallel.h>
#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <vector>

#include "common.h"

#if GIG_HAVE_AVX2_PATH && defined(__GNUC__) && !defined(__clang__)
#define GIG_MATMUL_AVX512 1
#pragma GCC push_options
#pragma GCC target("avx512f,avx2,fma")
// GCC 12's own avx512fintrin.h trips -Wuninitialized in the shuffles of transpose16 (its "undefined"
// pass-through operand): not ours to fix, and nothing of ours is left uninitialised.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#include "matmul_nt/matmul_nt_avx512.h"  // its functions only: called where the CPU has AVX-512F
#pragma GCC diagnostic pop
#pragma GCC pop_options
#else
#define GIG_MATMUL_AVX512 0
#endif

namespace gig_fast {
namespace {

// Multiply-adds per thread below which a call stays on one thread: a fork/join on this loaded kind of
// machine costs tens of µs, about 2^21 multiply-adds of this kernel.
constexpr int64_t kMinTaskWork = int64_t(1) << 21;

// out [M, M] row-major: every entry below the diagonal set to its mirror above it, in 64×64 blocks so
// that the column reads of the upper triangle stay in cache.
template <typename scalar_t>
void mirror_lower(scalar_t* out, int64_t M) {
  constexpr int64_t kB = 64;
  const int64_t blocks = (M + kB - 1) / kB;
  at::parallel_for(0, blocks, std::max<int64_t>(1, kMinTaskWork / (kB * M)), [&](int64_t b0, int64_t b1) {
    for (int64_t rb = b0; rb < b1; ++rb)
      for (int64_t cb = 0; cb <= rb; ++cb)
        for (int64_t r = rb * kB; r < std::min(M, rb * kB + kB); ++r)
          for (int64_t c = cb * kB; c < std::min(r, cb * kB + kB); ++c) out[r * M + c] = out[c * M + r];
  });
}

#if GIG_MATMUL_AVX512
struct FreeDeleter {
  void operator()(float* p) const { std::free(p); }
};

// `n` uninitialised floats (each gets written), 64-byte aligned so that no panel load splits a cache line.
std::unique_ptr<float[], FreeDeleter> aligned_floats(size_t n) {
  const size_t bytes = std::max<size_t>(64, (n * sizeof(float) + 63) / 64 * 64);
  void* p = std::aligned_alloc(64, bytes);
  TORCH_CHECK(p != nullptr, "matmul_nt: out of memory for the packed b (", bytes, " bytes)");
  return std::unique_ptr<float[], FreeDeleter>(static_cast<float*>(p));
}

// b [N, C] packed in panels of kNr columns (fused_argmax512::pack_panel_range's layout), in parallel.
std::unique_ptr<float[], FreeDeleter> pack_columns(const float* b, int64_t N, int64_t C) {
  namespace k = matmul_nt512;
  const int64_t panels = (N + k::kNr - 1) / k::kNr;
  auto bp = aligned_floats(static_cast<size_t>(panels * k::kNr * C));
  at::parallel_for(0, panels, std::max<int64_t>(1, (int64_t(1) << 16) / (k::kNr * C)),
                   [&](int64_t q0, int64_t q1) { fused_argmax512::pack_panel_range(b, N, C, k::kNr, q0, q1, bp.get()); });
  return bp;
}

// a [M, C] times the packed b (pack_columns) into out [M, N].
void matmul_nt_avx512_packed(const float* a, int64_t M, const float* bp, int64_t N, int64_t C, bool symmetric,
                             float* out) {
  namespace k = matmul_nt512;
  const int64_t panels = (N + k::kNr - 1) / k::kNr;
  const int64_t row_blocks = (M + k::kBlockRows - 1) / k::kBlockRows, tiles = (N + k::kTileCols - 1) / k::kTileCols;
  std::vector<int64_t> items;  // row block · tiles + column tile, row-block-major: a thread's run shares blocks
  items.reserve(static_cast<size_t>(row_blocks * tiles));
  for (int64_t rb = 0; rb < row_blocks; ++rb)
    // symmetric: the first tile holding a column ≥ the block's first row
    for (int64_t t = symmetric ? rb * k::kBlockRows / k::kTileCols : 0; t < tiles; ++t) items.push_back(rb * tiles + t);
  const int64_t item_work = k::kBlockRows * k::kTileCols * C;
  at::parallel_for(0, static_cast<int64_t>(items.size()), std::max<int64_t>(1, kMinTaskWork / item_work),
                   [&](int64_t i0, int64_t i1) {
    auto ap = aligned_floats(static_cast<size_t>(k::kBlockRows * C));
    auto partial = C > k::kKc ? aligned_floats(static_cast<size_t>(k::kBlockRows * k::kTileCols)) : nullptr;
    int64_t packed = -1;
    for (int64_t it = i0; it < i1; ++it) {
      const int64_t rb = items[it] / tiles, t = items[it] % tiles;
      const int64_t r0 = rb * k::kBlockRows, rows = std::min(k::kBlockRows, M - r0);
      if (rb != packed) k::pack_rows(a, r0, rows, C, ap.get()), packed = rb;
      const int64_t n0 = t * k::kTileCols;
      const int64_t cols = std::min(k::kTileCols, N - n0);
      k::block(ap.get(), r0, rows, bp, panels, n0, cols, C, partial.get(), symmetric, out, N);
      if (symmetric) k::mirror_block(out, N, r0, rows, n0, cols);
    }
  });
}

// a [M, C] times b [N, C]ᵀ into out [M, N] without a pack of the whole of b: a is packed once (its row
// blocks side by side, shared by the threads), and each thread packs the column tiles it takes, one at a
// time, into one buffer of its own (kTileCols · C floats), then multiplies every row block by it. b is
// still packed once in all, but the pack is never a fresh N·C-float buffer: where few rows meet many
// concepts that buffer's first-touch page faults and the trip of the whole pack through memory were most
// of the call (one Zen 4 core, 64 × 2,048 against 16,384 concepts: 128.6 ms, torch's mm 71.1).
void matmul_nt_avx512_tiles(const float* a, int64_t M, const float* b, int64_t N, int64_t C, float* out) {
  namespace k = matmul_nt512;
  const int64_t row_blocks = (M + k::kBlockRows - 1) / k::kBlockRows, tiles = (N + k::kTileCols - 1) / k::kTileCols;
  const int64_t block_floats = k::kBlockRows * C;
  auto ap = aligned_floats(static_cast<size_t>(row_blocks * block_floats));
  at::parallel_for(0, row_blocks, std::max<int64_t>(1, (int64_t(1) << 16) / block_floats), [&](int64_t r0, int64_t r1) {
    for (int64_t rb = r0; rb < r1; ++rb)
      k::pack_rows(a, rb * k::kBlockRows, std::min(k::kBlockRows, M - rb * k::kBlockRows), C, ap.get() + rb * block_floats);
  });
  const int64_t tile_work = M * k::kTileCols * C;
  at::parallel_for(0, tiles, std::max<int64_t>(1, kMinTaskWork / tile_work), [&](int64_t t0, int64_t t1) {
    auto bp = aligned_floats(static_cast<size_t>(k::kTileCols * C));
    auto partial = C > k::kKc ? aligned_floats(static_cast<size_t>(k::kBlockRows * k::kTileCols)) : nullptr;
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t n0 = t * k::kTileCols, cols = std::min(k::kTileCols, N - n0), panels = (cols + k::kNr - 1) / k::kNr;
      fused_argmax512::pack_panel_range(b + n0 * C, cols, C, k::kNr, 0, panels, bp.get());
      for (int64_t rb = 0; rb < row_blocks; ++rb) {  // out shifted to the tile's first column
        const int64_t r0 = rb * k::kBlockRows;
        k::block(ap.get() + rb * block_floats, r0, std::min(k::kBlockRows, M - r0), bp.get(), panels, 0, cols, C,
                 partial.get(), /*symmetric=*/false, out + n0, N);
      }
    }
  });
}

// The product where a has at most as many rows as b (the sparse coder's correlations Y Vᵀ of a chunk of
// vectors against the concepts) and there is a column tile for every thread goes by tiles
// (matmul_nt_avx512_tiles); with more rows than b, a packed per tile would be read once per tile where
// the whole pack of b, smaller, is read once per row block. Same kernel, same sums in the same order: the
// same bits either way. One Zen 4 core, against the whole pack (medians of 7, alternated): 2,000 × 256 on
// 2,048 27.2 → 21.1 ms, 500 × 512 on 4,096 25.6 → 21.8, 200 × 1,024 on 8,192 53.4 → 37.8, 64 × 2,048 on
// 16,384 146.1 → 72.2 (torch's mm 24.2, 26.0, 43.0, 81.0); two threads 15.7 → 12.3, 14.5 → 12.4,
// 38.3 → 21.1, 84.5 → 40.3.
void matmul_nt_avx512(const float* a, int64_t M, const float* b, int64_t N, int64_t C, bool symmetric, float* out) {
  const int64_t tiles = (N + matmul_nt512::kTileCols - 1) / matmul_nt512::kTileCols;
  const int64_t threads = at::in_parallel_region() ? 1 : at::get_num_threads();
  if (!symmetric && M <= N && tiles >= threads) return matmul_nt_avx512_tiles(a, M, b, N, C, out);
  matmul_nt_avx512_packed(a, M, pack_columns(b, N, C).get(), N, C, symmetric, out);
}
#endif

// The AVX-512 kernel where the CPU has AVX-512F. GIG_FAST_CPU_ISA=baseline (read once, csrc/common.h)
// keeps the baseline build, and GIG_FAST_MATMUL_ISA=blas (read at each call, as GIG_FAST_ASSIGN_ISA is)
// takes at::mm: so one machine tests both paths.
bool use_avx512() {
#if GIG_MATMUL_AVX512
  static const bool avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("fma");
  if (!avx512 || !cpu_has_avx2()) return false;
  const char* cap = std::getenv("GIG_FAST_MATMUL_ISA");
  return !(cap && std::strcmp(cap, "blas") == 0);
#else
  return false;
#endif
}

// The Gram a @ a.T by BLAS where our AVX-512 kernel does not run (AVX2 CPUs, other dtypes): only the
// blocks on and above the diagonal, each row block r0:r1 against rows r0:M as one at::mm into out's view
// (its row stride M is BLAS's leading dimension), the rest left to the mirror: 16 row blocks, 53 % of
// the whole product's multiply-adds. Measured on a Zen 3 core (MKL, the whole product against the
// blocks): K = 8,192, C = 1,024 1,798 → 1,213 ms on one thread, 924 → 766 ms on two; K = 4,096, C = 512
// 264 → 206 and 130 → 118 ms; at K = 2,048, C = 256 no gain on one thread and 20 → 23 ms on two, so
// smaller Grams stay one product.
constexpr int64_t kGramBlocksFrom = 4096;  // rows

void gram_upper_by_blocks(const at::Tensor& a, at::Tensor& out) {
  const int64_t M = a.size(0);
  const int64_t rows = ((M + 15) / 16 + 63) / 64 * 64;  // 16 blocks (13 to 16 after rounding to 64 rows)
  for (int64_t r0 = 0; r0 < M; r0 += rows) {
    const int64_t r1 = std::min(M, r0 + rows);
    at::Tensor block = out.narrow(0, r0, r1 - r0).narrow(1, r0, M - r0);
    at::mm_out(block, a.narrow(0, r0, r1 - r0), a.narrow(0, r0, M - r0).t());
  }
}

bool same_tensor(const at::Tensor& a, const at::Tensor& b) {
  return a.is_same(b) || (a.data_ptr() == b.data_ptr() && a.sizes() == b.sizes() && a.strides() == b.strides() &&
                          a.scalar_type() == b.scalar_type());
}

// A named error unless `out` is a contiguous CPU [M, N] tensor of `dtype`.
void check_out(const at::Tensor& out, int64_t M, int64_t N, at::ScalarType dtype) {
  TORCH_CHECK_VALUE(out.device().is_cpu() && out.scalar_type() == dtype && out.dim() == 2 && out.size(0) == M &&
                        out.size(1) == N && out.is_contiguous(),
                    "matmul_nt: out must be a contiguous CPU [", M, ", ", N, "] tensor of a's dtype, got ",
                    out.sizes(), " ", out.scalar_type());
}

}  // namespace

// a @ b.T into `out` [M, N] (contiguous, a's dtype): a caller that keeps its output buffer between
// calls spares the first-touch page faults of a fresh one (a 4,096 × 4,096 fp32 Gram: 22 ms of its 68).
void matmul_nt_out_cpu(const at::Tensor& a, const at::Tensor& b, bool symmetric, at::Tensor& out) {
  TORCH_CHECK_VALUE(a.device().is_cpu() && b.device().is_cpu(), "matmul_nt: a and b must be CPU tensors, got ",
                    a.device(), " and ", b.device());
  TORCH_CHECK_VALUE(a.dim() == 2, "matmul_nt: a must be 2-D [M, C], got shape ", a.sizes());
  TORCH_CHECK_VALUE(b.dim() == 2, "matmul_nt: b must be 2-D [N, C], got shape ", b.sizes());
  TORCH_CHECK_VALUE(a.scalar_type() == b.scalar_type(), "matmul_nt: a and b must share a dtype, got ",
                    a.scalar_type(), " and ", b.scalar_type());
  TORCH_CHECK_VALUE(at::isFloatingType(a.scalar_type()), "matmul_nt: a and b must be floating point, got ",
                    a.scalar_type());
  TORCH_CHECK_VALUE(a.size(1) == b.size(1), "matmul_nt: a is [M, C] = ", a.sizes(), " and b is [N, C] = ", b.sizes(),
                    ": their C (dim 1) differ");
  TORCH_CHECK_VALUE(!symmetric || same_tensor(a, b), "matmul_nt: symmetric=True computes a @ a.T: b must be a");
  const int64_t M = a.size(0), N = b.size(0), C = a.size(1);
  check_out(out, M, N, a.scalar_type());
  if (M == 0 || N == 0) return;
#if GIG_MATMUL_AVX512
  if (a.scalar_type() == at::kFloat && a.is_contiguous() && b.is_contiguous() && use_avx512()) {
    if (C == 0) {
      out.zero_();
      return;
    }
    matmul_nt_avx512(a.data_ptr<float>(), M, b.data_ptr<float>(), N, C, symmetric, out.data_ptr<float>());
    return;
  }
#endif
  if (symmetric && M >= kGramBlocksFrom)
    gram_upper_by_blocks(a, out);
  else
    at::mm_out(out, a, b.t());
  // BLAS computes out[m, n] and out[n, m] in different places of its kernels (their sums may round
  // differently): the upper triangle is copied down so that every path returns an exactly symmetric Gram.
  if (symmetric && M > 1)
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "matmul_nt_mirror",
                                    [&] { mirror_lower<scalar_t>(out.data_ptr<scalar_t>(), M); });
}

MatmulNtColumns::MatmulNtColumns(const at::Tensor& b) : b_(b.contiguous()) {
  TORCH_CHECK_VALUE(b_.device().is_cpu() && b_.dim() == 2 && at::isFloatingType(b_.scalar_type()),
                    "matmul_nt: b must be a 2-D floating-point CPU tensor [N, C], got ", b_.sizes(), " ",
                    b_.scalar_type(), " on ", b_.device());
#if GIG_MATMUL_AVX512
  if (b_.scalar_type() == at::kFloat && b_.numel() > 0 && use_avx512()) {
    auto packed = pack_columns(b_.data_ptr<float>(), b_.size(0), b_.size(1));
    packed_ = std::shared_ptr<float>(packed.release(), FreeDeleter{});
  }
#endif
}

void MatmulNtColumns::multiply(const at::Tensor& a, at::Tensor& out) const {
  const int64_t N = b_.size(0), C = b_.size(1);
  TORCH_CHECK_VALUE(a.dim() == 2 && a.size(1) == C && a.scalar_type() == b_.scalar_type() && a.device().is_cpu(),
                    "matmul_nt: a must be a CPU [M, C = ", C, "] tensor of b's dtype, got ", a.sizes(), " ",
                    a.scalar_type());
  const int64_t M = a.size(0);
  check_out(out, M, N, a.scalar_type());
  if (M == 0 || N == 0) return;
#if GIG_MATMUL_AVX512
  if (packed_ && a.is_contiguous()) {
    matmul_nt_avx512_packed(a.data_ptr<float>(), M, packed_.get(), N, C, /*symmetric=*/false, out.data_ptr<float>());
    return;
  }
#endif
  at::mm_out(out, a, b_.t());
}

at::Tensor matmul_nt_cpu(const at::Tensor& a, const at::Tensor& b, bool symmetric) {
  at::Tensor out = at::empty({a.dim() == 2 ? a.size(0) : 0, b.dim() == 2 ? b.size(0) : 0}, a.options());
  matmul_nt_out_cpu(a, b, symmetric, out);
  return out;
}

TORCH_LIBRARY_FRAGMENT(gig_fast_cpp, m) {
  m.def("matmul_nt(Tensor a, Tensor b, bool symmetric=False) -> Tensor", &matmul_nt_cpu);
  m.def("matmul_nt_out(Tensor a, Tensor b, bool symmetric, Tensor(a!) out) -> ()", &matmul_nt_out_cpu);
}

}  // namespace gig_fast
