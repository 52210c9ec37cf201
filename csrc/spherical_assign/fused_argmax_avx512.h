// The fp32 assignment kernel of spherical_assign on AVX-512 CPUs: the AVX2 kernel's scheme
// (fused_argmax_avx2.h: a blocked GEMM of unit rows against unit centroids whose epilogue folds each score
// tile into the rows' running (best, label)) with 512-bit registers and a 12×32 register tile. On a CPU
// with full-width AVX-512 FMA units this doubles the multiply-adds per instruction; the AVX2 kernel (and
// BLAS sgemm built for AVX2, as faiss's OpenBLAS) stays at half that peak.
//
// Layout: as the AVX2 kernel (pack_panels below, chunk-major), with kMr = 12 row panels and kNr = 32
// centroid panels. A C chunk of kKc = 128: the centroid panel's chunk (16 KiB) and one row panel's chunk
// (6 KiB) stay in a 32-48 KiB L1 (at kKc = 256 the two would fill a 48 KiB L1: 44 KiB).
//
// Accumulation: each score is one fp32 FMA chain over c = 0..C−1 in order (partial sums are stored
// between chunks without rounding), as in the AVX2 kernel, so both give bit-identical scores.
//
// Ties: each of a row's 16 lanes sees its centroids in increasing order and replaces its best only on a
// strictly larger score; the lanes are then merged taking the larger score, the smaller index on
// equality, so ties go to the smaller index as in the reference.
//
// No torch dependency: included by spherical_assign_cpu.cpp under `#pragma GCC target("avx512f,...")`.
#pragma once
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>

namespace gig_fast {
namespace fused_argmax512 {

constexpr int64_t kMr = 12;   // rows per micro-tile (12 × 2 accumulators + 2 loads + 1 broadcast = 27 zmm)
constexpr int64_t kNr = 32;   // centroids per micro-tile (two zmm)
constexpr int64_t kKc = 128;  // C chunk (see the header comment)

// Start of panel q's chunk at c0 in a pack of `panels` panels of `width` (pack_panels).
inline int64_t panel_offset(int64_t q, int64_t c0, int64_t C, int64_t panels, int64_t width) {
  return c0 * panels * width + q * std::min(kKc, C - c0) * width;
}

// Panels q0..q1 of the pack of `count` rows src [count, C] (row-major fp32) in panels of `width` rows, zero
// past count, chunk-major: out[chunk c0][panel q][c − c0][j] = src[q·width + j][c]. Threads may pack
// disjoint panel ranges of one pack (matmul_nt).
inline void pack_panel_range(const float* src, int64_t count, int64_t C, int64_t width, int64_t q0, int64_t q1,
                             float* out) {
  const int64_t panels = (count + width - 1) / width;
  for (int64_t q = q0; q < q1; ++q)
    for (int64_t c0 = 0; c0 < C; c0 += kKc) {
      const int64_t kc = std::min(kKc, C - c0);
      float* o = out + panel_offset(q, c0, C, panels, width);
      for (int64_t j = 0; j < width; ++j) {
        const int64_t n = q * width + j;
        if (n < count) {
          const float* row = src + n * C + c0;
          for (int64_t c = 0; c < kc; ++c) o[c * width + j] = row[c];
        } else {
          for (int64_t c = 0; c < kc; ++c) o[c * width + j] = 0.f;
        }
      }
    }
}

// The whole pack of `count` rows (pack_panel_range's layout).
inline void pack_panels(const float* src, int64_t count, int64_t C, int64_t width, float* out) {
  pack_panel_range(src, count, C, width, 0, (count + width - 1) / width, out);
}


// The running best of one row: 16 lanes of (score, centroid index), merged at the end.
struct LaneBest {
  alignas(64) float score[16];
  alignas(64) int32_t index[16];
};

inline void reset(LaneBest* b, int64_t rows) {
  for (int64_t r = 0; r < rows; ++r)
    for (int l = 0; l < 16; ++l) b[r].score[l] = -std::numeric_limits<float>::infinity(), b[r].index[l] = 0;
}

// The row's best over its lanes: the larger score, the smaller index on equal scores.
inline void merge(const LaneBest& b, float* best, int64_t* label) {
  float s = b.score[0];
  int32_t k = b.index[0];
  for (int l = 1; l < 16; ++l)
    if (b.score[l] > s || (b.score[l] == s && b.index[l] < k)) s = b.score[l], k = b.index[l];
  *best = s;
  *label = k;
}

// Fold one score vector (centroids base..base+15) into a row's lanes; lanes at k ≥ end are masked out.
inline void fold(LaneBest& b, __m512 v, int32_t base, int32_t end) {
  const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512i k = _mm512_add_epi32(_mm512_set1_epi32(base), lane);
  const __mmask16 valid = _mm512_cmpgt_epi32_mask(_mm512_set1_epi32(end), k);
  const __m512 cur = _mm512_load_ps(b.score);
  const __mmask16 gt = _mm512_mask_cmp_ps_mask(valid, v, cur, _CMP_GT_OQ);
  _mm512_store_ps(b.score, _mm512_mask_mov_ps(cur, gt, v));
  const __m512i idx = _mm512_load_si512(b.index);
  _mm512_store_si512(b.index, _mm512_mask_mov_epi32(idx, gt, k));
}

// One 12×32 tile over a C chunk of length kc: a (12-row panel chunk, stride 12), b (32-column panel chunk,
// stride 32). `partial` ([12][32], or null when the chunk is the whole of C) carries the sums between
// chunks: read when !first, written when !last. On the last chunk the finished tile goes to `epilogue`
// row by row: epilogue(r, columns 0-15, columns 16-31) for r = 0..11 (rows past the matrix are the
// epilogue's to skip). The one register-tile loop of both users: the fused argmax folds the tile into
// its rows' lanes (fold_pass), matmul_nt stores it (csrc/matmul_nt/matmul_nt_avx512.h). Inlined with its
// epilogue, and the rows handed over by constant index, so the accumulators stay in registers (handing
// the epilogue the array by reference put them on the stack inside the FMA loop: half the speed).
template <typename Epilogue>
__attribute__((always_inline)) inline void micro_tile(const float* a, const float* b, int64_t kc, float* partial,
                                                      bool first, bool last, Epilogue&& epilogue) {
  __m512 acc[kMr][2];
#pragma GCC unroll 12
  for (int r = 0; r < kMr; ++r) {
    if (first) {
      acc[r][0] = _mm512_setzero_ps(), acc[r][1] = _mm512_setzero_ps();
    } else {
      acc[r][0] = _mm512_loadu_ps(partial + r * 32), acc[r][1] = _mm512_loadu_ps(partial + r * 32 + 16);
    }
  }
#pragma GCC unroll 2
  for (int64_t c = 0; c < kc; ++c, a += kMr, b += kNr) {
    const __m512 b0 = _mm512_loadu_ps(b), b1 = _mm512_loadu_ps(b + 16);
#pragma GCC unroll 12
    for (int r = 0; r < kMr; ++r) {
      const __m512 x = _mm512_set1_ps(a[r]);
      acc[r][0] = _mm512_fmadd_ps(x, b0, acc[r][0]);
      acc[r][1] = _mm512_fmadd_ps(x, b1, acc[r][1]);
    }
  }
  if (!last) {
#pragma GCC unroll 12
    for (int r = 0; r < kMr; ++r)
      _mm512_storeu_ps(partial + r * 32, acc[r][0]), _mm512_storeu_ps(partial + r * 32 + 16, acc[r][1]);
    return;
  }
#pragma GCC unroll 12
  for (int r = 0; r < kMr; ++r) epilogue(r, acc[r][0], acc[r][1]);
}

// Rows per row block (a multiple of kMr): its packed chunk (96·kKc floats) stays in L2 next to the
// partial sums.
constexpr int64_t kBlockRows = 96;
// Columns per tile where C > kKc: bounds the partial-sum buffer at 96·512·4 = 192 KiB.
constexpr int64_t kTileCols = 512;

// The blocked product of `rows` (≤ kBlockRows) packed rows `ap` (pack_panels, width kMr) with the column
// panels q0..q0+col_panels of the pack `bp` (pack_panels, width kNr, `all_panels` panels), chunk by chunk
// of C, in tiles of kTileCols columns where C > kKc (`partial`: kBlockRows·kTileCols floats, C > kKc only).
// Each finished 12×32 tile goes to `epilogue(i, p, r, v0, v1)` row by row (row panel i, column panel p
// counted from q0, row r of the panel: micro_tile), only for the pairs where `want(i, p)` (the symmetric
// product skips the tiles below the diagonal).
template <typename Want, typename Epilogue>
__attribute__((always_inline)) inline void tile_pass(const float* ap, int64_t rows, const float* bp,
                                                     int64_t all_panels, int64_t q0, int64_t col_panels, int64_t C,
                                                     float* partial, Want&& want, Epilogue&& epilogue) {
  const int64_t row_panels = (rows + kMr - 1) / kMr;
  const int64_t tile_panels = C > kKc ? kTileCols / kNr : col_panels;
  for (int64_t p0 = 0; p0 < col_panels; p0 += tile_panels) {
    const int64_t p1 = std::min(col_panels, p0 + tile_panels);
    for (int64_t c0 = 0; c0 < C; c0 += kKc) {
      const int64_t kc = std::min(kKc, C - c0);
      const bool first = c0 == 0, last = c0 + kc >= C;
      for (int64_t p = p0; p < p1; ++p) {
        const float* b = bp + panel_offset(q0 + p, c0, C, all_panels, kNr);
        for (int64_t i = 0; i < row_panels; ++i) {
          if (!want(i, p)) continue;
          const float* a = ap + panel_offset(i, c0, C, row_panels, kMr);
          float* part = partial ? partial + ((p - p0) * row_panels + i) * kMr * kNr : nullptr;
          micro_tile(a, b, kc, part, first, last,
                     [&](int r, __m512 v0, __m512 v1) __attribute__((always_inline)) { epilogue(i, p, r, v0, v1); });
        }
      }
    }
  }
}

// Fold `rows` (≤ kBlockRows) packed unit rows `ap` (pack_panels, width kMr) against the `count` centroids
// k0..k0+count (k0 a multiple of kNr) of the centroid pack `bp` (pack_panels, width kNr, `all_panels`
// panels) into `lanes` (reset first). `partial`: kBlockRows·kTileCols floats (C > kKc only).
inline void fold_pass(const float* ap, int64_t rows, const float* bp, int64_t all_panels, int64_t k0,
                      int64_t count, int64_t C, float* partial, LaneBest* lanes) {
  const int32_t end = static_cast<int32_t>(k0 + count);
  tile_pass(ap, rows, bp, all_panels, k0 / kNr, (count + kNr - 1) / kNr, C, partial,
            [](int64_t, int64_t) __attribute__((always_inline)) { return true; },
            [&](int64_t i, int64_t p, int r, __m512 v0, __m512 v1) __attribute__((always_inline)) {
              // row r of the panel's 12 (skipped past the real rows), for centroids base..base+31 (those
              // at or past `end` left out)
              if (r >= rows - i * kMr) return;
              LaneBest& best = lanes[i * kMr + r];
              const int32_t base = static_cast<int32_t>(k0 + p * kNr);
              fold(best, v0, base, end);
              fold(best, v1, base + 16, end);
            });
}

// Merge a pass's lanes into the rows' (best, label): the first pass sets them, later passes (larger
// indices) replace them only on a strictly larger score.
inline void merge_pass(const LaneBest* lanes, int64_t rows, bool first, float* best, int64_t* label) {
  for (int64_t r = 0; r < rows; ++r) {
    float s;
    int64_t k;
    merge(lanes[r], &s, &k);
    if (first || s > best[r]) best[r] = s, label[r] = k;
  }
}

}  // namespace fused_argmax512
}  // namespace gig_fast
