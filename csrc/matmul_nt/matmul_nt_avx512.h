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

// Panels q0..q1 of the pack of src [count, C] (pack_panels' layout, width kNr, zero past count) into
// `out`, the pack of all its panels: the threads pack disjoint panel ranges of one pack.
inline void pack_panel_range(const float* src, int64_t count, int64_t C, int64_t q0, int64_t q1, float* out) {
  const int64_t panels = (count + kNr - 1) / kNr;
  for (int64_t q = q0; q < q1; ++q)
    for (int64_t c0 = 0; c0 < C; c0 += kKc) {
      const int64_t kc = std::min(kKc, C - c0);
      float* o = out + fused_argmax512::panel_offset(q, c0, C, panels, kNr);
      for (int64_t j = 0; j < kNr; ++j) {
        const int64_t n = q * kNr + j;
        if (n < count) {
          const float* row = src + n * C + c0;
          for (int64_t c = 0; c < kc; ++c) o[c * kNr + j] = row[c];
        } else {
          for (int64_t c = 0; c < kc; ++c) o[c * kNr + j] = 0.f;
        }
      }
    }
}

// Rows r0..r0+rows (rows ≤ kBlockRows) of a [M, C] packed into `ap` (96·C floats at most), for block().
inline void pack_rows(const float* a, int64_t r0, int64_t rows, int64_t C, float* ap) {
  fused_argmax512::pack_panels(a + r0 * C, rows, C, kMr, ap);
}

// out[r0.., n0..] = the block of `rows` packed rows `ap` (pack_rows) times the columns n0..n0+cols of
// the column pack `bp` (pack_panel_range, `all_panels` panels; n0 a multiple of kNr, cols ≤ kTileCols),
// out row-major with row stride ldo. symmetric: only the 12×32 tiles that hold an entry on or above the
// diagonal (column ≥ row); the rest is mirrored afterwards (mirror_lower). `partial`: kBlockRows·kTileCols
// floats where C > kKc, else null.
inline void block(const float* ap, int64_t r0, int64_t rows, const float* bp, int64_t all_panels, int64_t n0,
                  int64_t cols, int64_t C, float* partial, bool symmetric, float* out, int64_t ldo) {
  fused_argmax512::tile_pass(
      ap, rows, bp, all_panels, n0 / kNr, (cols + kNr - 1) / kNr, C, partial,
      [&](int64_t i, int64_t p) __attribute__((always_inline)) {
        return !symmetric || n0 + p * kNr + kNr - 1 >= r0 + i * kMr;
      },
      [&](int64_t i, int64_t p, int r, __m512 v0, __m512 v1) __attribute__((always_inline)) {
        if (r >= rows - i * kMr) return;  // rows past the block (past the matrix)
        const int64_t col = n0 + p * kNr, real_cols = std::min(kNr, n0 + cols - col);
        const __mmask16 m0 = real_cols >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << real_cols) - 1);
        const __mmask16 m1 = real_cols >= 32 ? __mmask16(0xFFFF)
                             : real_cols > 16 ? __mmask16((1u << (real_cols - 16)) - 1)
                                              : __mmask16(0);
        float* o = out + (r0 + i * kMr + r) * ldo + col;
        _mm512_mask_storeu_ps(o, m0, v0);
        _mm512_mask_storeu_ps(o + 16, m1, v1);
      });
}

}  // namespace matmul_nt512
}  // namespace gig_fast
