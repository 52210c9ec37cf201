// The AVX-512 kernel of matmul_nt (matmul_nt.h): the register tile of the fused assignment
// (fused_argmax512::micro_tile, 12 rows × 32 columns, C in chunks of kKc = 128) with an epilogue that
// stores the tile into the output (rows and columns past the matrix masked off) instead of folding it
// into an argmax. Packing as there: b [N, C] in panels of 32 columns (packed once, shared by the
// threads), a in row blocks of 96 rows in panels of 12 (packed by the thread that owns the block).
//
// Accumulation: each entry is one fp32 FMA chain over c = 0..C−1 in order (partial sums are stored
// between chunks without rounding), so out[m, n] and out[n, m] of a @ aᵀ are bit-identical by
// construction (fma(x, y, s) = fma(y, x, s)).
//
// No torch dependency: included by matmul_nt_cpu.cpp under `#pragma GCC target("avx512f,...")`.
#pragma once
#include <immintrin.h>

#include <algorithm>
#include <cstdint>

#include "spherical_assign/fused_argmax_avx512.h"

namespace gig_fast {
namespace matmul_nt512 {

using fused_argmax512::kBlockRows;
using fused_argmax512::kKc;
using fused_argmax512::kMr;
using fused_argmax512::kNr;
using fused_argmax512::kTileCols;

// Rows r0..r0+rows (rows ≤ kBlockRows) of a [M, C] packed into `ap` (96·C floats at most), for block().
inline void pack_rows(const float* a, int64_t r0, int64_t rows, int64_t C, float* ap) {
  fused_argmax512::pack_panels(a + r0 * C, rows, C, kMr, ap);
}

// Lanes lo..hi−1 of a 32-column row (0 ≤ lo, hi ≤ 32; none when lo ≥ hi).
inline uint32_t lanes(int64_t lo, int64_t hi) {
  lo = std::max<int64_t>(lo, 0);
  if (lo >= hi) return 0;
  return static_cast<uint32_t>(((uint64_t(1) << hi) - 1) & ~((uint64_t(1) << lo) - 1));
}

// out[r0.., n0..] = the block of `rows` packed rows `ap` (pack_rows) times the columns n0..n0+cols of
// the column pack `bp` (fused_argmax512::pack_panel_range, `all_panels` panels; n0 a multiple of kNr, cols ≤ kTileCols),
// out row-major with row stride ldo. `partial`: kBlockRows·kTileCols floats where C > kKc, else null.
//
// symmetric (a @ aᵀ, out [M, M]): only the 12×32 tiles that hold an entry on or above the diagonal are
// computed, and of those only the entries on or above it stored; mirror_block copies them down.
inline void block(const float* ap, int64_t r0, int64_t rows, const float* bp, int64_t all_panels, int64_t n0,
                  int64_t cols, int64_t C, float* partial, bool symmetric, float* out, int64_t ldo) {
  fused_argmax512::tile_pass(
      ap, rows, bp, all_panels, n0 / kNr, (cols + kNr - 1) / kNr, C, partial,
      [&](int64_t i, int64_t p) __attribute__((always_inline)) {
        return !symmetric || n0 + p * kNr + kNr - 1 >= r0 + i * kMr;
      },
      [&](int64_t i, int64_t p, int r, __m512 v0, __m512 v1) __attribute__((always_inline)) {
        if (r >= rows - i * kMr) return;  // rows past the block (past the matrix)
        const int64_t row = r0 + i * kMr + r, col = n0 + p * kNr, real_cols = std::min(kNr, n0 + cols - col);
        // symmetric: the lanes from the diagonal on (column ≥ row)
        const uint32_t keep = lanes(symmetric ? row - col : 0, real_cols);
        float* o = out + row * ldo + col;
        _mm512_mask_storeu_ps(o, static_cast<__mmask16>(keep), v0);
        _mm512_mask_storeu_ps(o + 16, static_cast<__mmask16>(keep >> 16), v1);
      });
}

// dst[c][r] = src[r][c] for a full 16 × 16 square (row strides ld): three rounds of AVX-512F shuffles
// (pairs of rows, then 4 × 4 blocks inside the 128-bit lanes, then the lanes).
inline void transpose16(const float* src, float* dst, int64_t ld) {
  __m512 r[16], t[16];
  for (int k = 0; k < 16; ++k) r[k] = _mm512_loadu_ps(src + k * ld);
  for (int k = 0; k < 16; k += 2) t[k] = _mm512_unpacklo_ps(r[k], r[k + 1]), t[k + 1] = _mm512_unpackhi_ps(r[k], r[k + 1]);
  for (int k = 0; k < 16; k += 4) {
    r[k] = _mm512_shuffle_ps(t[k], t[k + 2], 0x44), r[k + 1] = _mm512_shuffle_ps(t[k], t[k + 2], 0xEE);
    r[k + 2] = _mm512_shuffle_ps(t[k + 1], t[k + 3], 0x44), r[k + 3] = _mm512_shuffle_ps(t[k + 1], t[k + 3], 0xEE);
  }
  for (int k = 0; k < 4; ++k) {
    t[k] = _mm512_shuffle_f32x4(r[k], r[k + 4], 0x88), t[k + 4] = _mm512_shuffle_f32x4(r[k], r[k + 4], 0xDD);
    t[k + 8] = _mm512_shuffle_f32x4(r[k + 8], r[k + 12], 0x88), t[k + 12] = _mm512_shuffle_f32x4(r[k + 8], r[k + 12], 0xDD);
  }
  for (int k = 0; k < 8; ++k) {
    _mm512_storeu_ps(dst + k * ld, _mm512_shuffle_f32x4(t[k], t[k + 8], 0x88));
    _mm512_storeu_ps(dst + (k + 8) * ld, _mm512_shuffle_f32x4(t[k], t[k + 8], 0xDD));
  }
}

// The symmetric product's entries of one block (rows r0..r0+rows, columns n0..n0+cols of out [M, M],
// stored by block() just before, so still in L2) that lie above the diagonal, copied to their mirror
// places below it, in 16 × 16 squares (r0 and n0 are multiples of 16: a square lies above, on or below the
// diagonal). Every entry below the diagonal is written once, by the thread that computed its mirror.
// Gram of 2048 × 256 on one thread (this loaded 2-core machine; the full product 9-10 ms): 5.3 ms, of
// which this copy 0.7 ms; with scalar loops instead of transpose16, 7.2 ms; with a pass over the whole
// matrix after the product (from memory), 8.6 ms; with scalar stores of each row's mirror straight from
// the tile's registers (32 rows apart), 15 ms.
inline void mirror_block(float* out, int64_t ldo, int64_t r0, int64_t rows, int64_t n0, int64_t cols) {
  constexpr int64_t kS = 16;
  for (int64_t cb = n0; cb < n0 + cols; cb += kS)
    for (int64_t rb = r0; rb < r0 + rows; rb += kS) {
      if (cb < rb) continue;  // the square lies below the diagonal
      const int64_t c1 = std::min(cb + kS, n0 + cols), r1 = std::min(rb + kS, r0 + rows);
      if (cb > rb && c1 - cb == kS && r1 - rb == kS) {
        transpose16(out + rb * ldo + cb, out + cb * ldo + rb, ldo);
        continue;
      }
      for (int64_t c = cb; c < c1; ++c)
        for (int64_t r = rb; r < std::min(r1, c); ++r) out[c * ldo + r] = out[r * ldo + c];
    }
}

}  // namespace matmul_nt512
}  // namespace gig_fast
