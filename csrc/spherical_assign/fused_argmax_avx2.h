// The fp32 assignment kernel of spherical_assign on AVX2+FMA CPUs: a blocked GEMM of unit rows against
// unit centroids whose epilogue folds each 6×16 score tile into the rows' running (best, label), so the
// N×K score matrix is never written (at::mm + a scan wrote and re-read a [256, 1024] tile per block).
//
// Layout (BLIS-style): the centroids are packed once per call into panels of kNr = 16 (zero-padded past
// K); each thread packs its block of unit rows into kMr = 6-row panels (zero-padded past N). The
// micro-kernel keeps the 6×16 tile in 12 ymm registers and streams the C dimension in chunks of
// at most kKc: the centroid panel's chunk (kKc·16 floats) stays in L1 while the row block's panels
// (block·kKc floats) stay in L2. Where C > kKc the partial tiles are kept in a per-thread [block, tile]
// buffer between chunks.
//
// Ties: each of a row's 8 lanes sees its centroids in increasing order and replaces its best only on a
// strictly larger score; the lanes are then merged taking the larger score, the smaller index on
// equality, so ties go to the smaller index as in the reference.
//
// No torch dependency: included by spherical_assign_cpu.cpp under `#pragma GCC target("avx2,fma")`.
#pragma once
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>

namespace gig_fast {
namespace fused_argmax {

constexpr int64_t kMr = 6;    // rows per micro-tile (6 × 2 accumulators + 2 loads + 1 broadcast = 15 ymm)
constexpr int64_t kNr = 16;   // centroids per micro-tile (two ymm)
constexpr int64_t kKc = 256;  // C chunk: a 16 KiB centroid panel chunk stays in a 32 KiB L1

// Both operands are packed chunk-major: for each C chunk [c0, c0 + kc) (kc = min(kKc, C − c0)), the
// panels of that chunk lie one after another, each [kc][width]; so the micro-kernels of one chunk read
// consecutive memory (panels strided by the whole of C put the partial sums and the chunks of the 16 row
// panels on the same L1 sets: 67 against 87 GFLOP/s at C = 2048).

// Pack `count` rows src [count, C] (row-major fp32) into `panels` panels of `width` rows, zero past count:
// out[chunk c0][panel q][c − c0][j] = src[q·width + j][c].
inline void pack_panels(const float* src, int64_t count, int64_t C, int64_t width, float* out) {
  const int64_t panels = (count + width - 1) / width;
  for (int64_t c0 = 0; c0 < C; c0 += kKc) {
    const int64_t kc = std::min(kKc, C - c0);
    float* chunk = out + c0 * panels * width;
    for (int64_t q = 0; q < panels; ++q) {
      float* o = chunk + q * kc * width;
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
}

// Start of panel q's chunk at c0 in a pack of `panels` panels of `width` (pack_panels).
inline int64_t panel_offset(int64_t q, int64_t c0, int64_t C, int64_t panels, int64_t width) {
  return c0 * panels * width + q * std::min(kKc, C - c0) * width;
}

// The running best of one row: 8 lanes of (score, centroid index), merged at the end.
struct LaneBest {
  alignas(32) float score[8];
  alignas(32) int32_t index[8];
};

inline void reset(LaneBest* b, int64_t rows) {
  for (int64_t r = 0; r < rows; ++r)
    for (int l = 0; l < 8; ++l) b[r].score[l] = -std::numeric_limits<float>::infinity(), b[r].index[l] = 0;
}

// The row's best over its lanes: the larger score, the smaller index on equal scores.
inline void merge(const LaneBest& b, float* best, int64_t* label) {
  float s = b.score[0];
  int32_t k = b.index[0];
  for (int l = 1; l < 8; ++l)
    if (b.score[l] > s || (b.score[l] == s && b.index[l] < k)) s = b.score[l], k = b.index[l];
  *best = s;
  *label = k;
}

// Fold one score vector (centroids base..base+7) into a row's lanes; lanes at k ≥ end are masked out.
inline void fold(LaneBest& b, __m256 v, int32_t base, int32_t end) {
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256i k = _mm256_add_epi32(_mm256_set1_epi32(base), lane);
  const __m256 cur = _mm256_load_ps(b.score);
  __m256 gt = _mm256_cmp_ps(v, cur, _CMP_GT_OQ);
  gt = _mm256_and_ps(gt, _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(end), k)));
  _mm256_store_ps(b.score, _mm256_blendv_ps(cur, v, gt));
  const __m256i idx = _mm256_load_si256(reinterpret_cast<const __m256i*>(b.index));
  _mm256_store_si256(reinterpret_cast<__m256i*>(b.index),
                     _mm256_castps_si256(_mm256_blendv_ps(_mm256_castsi256_ps(idx), _mm256_castsi256_ps(k), gt)));
}

// One 6×16 tile over a C chunk of length kc: a (6-row panel chunk, stride 6), b (16-centroid panel chunk,
// stride 16). `partial` ([6][16], or null when the chunk is the whole of C) carries the sums between
// chunks: read when !first, written when !last. On the last chunk the tile is folded into `best` (the
// panel's 6 rows; `rows` of them real) for centroids base..base+15, those at or past `end` left out.
inline void micro_tile(const float* a, const float* b, int64_t kc, float* partial, bool first, bool last,
                       LaneBest* best, int64_t rows, int32_t base, int32_t end) {
  __m256 c00, c01, c10, c11, c20, c21, c30, c31, c40, c41, c50, c51;
  if (first) {
    c00 = c01 = c10 = c11 = c20 = c21 = c30 = c31 = c40 = c41 = c50 = c51 = _mm256_setzero_ps();
  } else {
    c00 = _mm256_loadu_ps(partial + 0), c01 = _mm256_loadu_ps(partial + 8);
    c10 = _mm256_loadu_ps(partial + 16), c11 = _mm256_loadu_ps(partial + 24);
    c20 = _mm256_loadu_ps(partial + 32), c21 = _mm256_loadu_ps(partial + 40);
    c30 = _mm256_loadu_ps(partial + 48), c31 = _mm256_loadu_ps(partial + 56);
    c40 = _mm256_loadu_ps(partial + 64), c41 = _mm256_loadu_ps(partial + 72);
    c50 = _mm256_loadu_ps(partial + 80), c51 = _mm256_loadu_ps(partial + 88);
  }
#pragma GCC unroll 4
  for (int64_t c = 0; c < kc; ++c, a += kMr, b += kNr) {
    const __m256 b0 = _mm256_loadu_ps(b), b1 = _mm256_loadu_ps(b + 8);
    __m256 x = _mm256_broadcast_ss(a + 0);
    c00 = _mm256_fmadd_ps(x, b0, c00), c01 = _mm256_fmadd_ps(x, b1, c01);
    x = _mm256_broadcast_ss(a + 1);
    c10 = _mm256_fmadd_ps(x, b0, c10), c11 = _mm256_fmadd_ps(x, b1, c11);
    x = _mm256_broadcast_ss(a + 2);
    c20 = _mm256_fmadd_ps(x, b0, c20), c21 = _mm256_fmadd_ps(x, b1, c21);
    x = _mm256_broadcast_ss(a + 3);
    c30 = _mm256_fmadd_ps(x, b0, c30), c31 = _mm256_fmadd_ps(x, b1, c31);
    x = _mm256_broadcast_ss(a + 4);
    c40 = _mm256_fmadd_ps(x, b0, c40), c41 = _mm256_fmadd_ps(x, b1, c41);
    x = _mm256_broadcast_ss(a + 5);
    c50 = _mm256_fmadd_ps(x, b0, c50), c51 = _mm256_fmadd_ps(x, b1, c51);
  }
  if (!last) {
    _mm256_storeu_ps(partial + 0, c00), _mm256_storeu_ps(partial + 8, c01);
    _mm256_storeu_ps(partial + 16, c10), _mm256_storeu_ps(partial + 24, c11);
    _mm256_storeu_ps(partial + 32, c20), _mm256_storeu_ps(partial + 40, c21);
    _mm256_storeu_ps(partial + 48, c30), _mm256_storeu_ps(partial + 56, c31);
    _mm256_storeu_ps(partial + 64, c40), _mm256_storeu_ps(partial + 72, c41);
    _mm256_storeu_ps(partial + 80, c50), _mm256_storeu_ps(partial + 88, c51);
    return;
  }
  const __m256 acc[kMr][2] = {{c00, c01}, {c10, c11}, {c20, c21}, {c30, c31}, {c40, c41}, {c50, c51}};
  for (int64_t r = 0; r < rows; ++r) {
    fold(best[r], acc[r][0], base, end);
    fold(best[r], acc[r][1], base + 8, end);
  }
}

// Rows per thread block: its packed panels (block·kKc floats) stay in L2 next to the partial sums.
constexpr int64_t kBlockRows = 96;
// Centroids per pass over a row block where C > kKc: bounds the partial-sum buffer at 96·512·4 = 192 KiB.
constexpr int64_t kTileCols = 512;

// Fold `rows` (≤ kBlockRows) packed unit rows `ap` (pack_panels, width kMr) against the `count` centroids
// k0..k0+count (k0 a multiple of kNr) of the centroid pack `bp` (pack_panels, width kNr, `all_panels`
// panels) into `lanes` (reset first).
// `partial`: kBlockRows·kTileCols floats (C > kKc only).
inline void fold_pass(const float* ap, int64_t rows, const float* bp, int64_t all_panels, int64_t k0,
                      int64_t count, int64_t C, float* partial, LaneBest* lanes) {
  const int64_t row_panels = (rows + kMr - 1) / kMr;
  const int64_t col_panels = (count + kNr - 1) / kNr;
  const int64_t tile_panels = C > kKc ? kTileCols / kNr : col_panels;
  const int32_t end = static_cast<int32_t>(k0 + count);
  for (int64_t p0 = 0; p0 < col_panels; p0 += tile_panels) {
    const int64_t p1 = std::min(col_panels, p0 + tile_panels);
    for (int64_t c0 = 0; c0 < C; c0 += kKc) {
      const int64_t kc = std::min(kKc, C - c0);
      const bool first = c0 == 0, last = c0 + kc >= C;
      for (int64_t p = p0; p < p1; ++p) {
        const float* b = bp + panel_offset(k0 / kNr + p, c0, C, all_panels, kNr);
        for (int64_t i = 0; i < row_panels; ++i) {
          const float* a = ap + panel_offset(i, c0, C, row_panels, kMr);
          float* part = partial ? partial + ((p - p0) * row_panels + i) * kMr * kNr : nullptr;
          micro_tile(a, b, kc, part, first, last, lanes + i * kMr, std::min(kMr, rows - i * kMr),
                     static_cast<int32_t>(k0 + p * kNr), end);
        }
      }
    }
  }
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

}  // namespace fused_argmax
}  // namespace gig_fast
