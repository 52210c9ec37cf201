// The fp32 assignment kernel of spherical_assign on CPUs with AVX-512 BF16 (Zen 4 and later, Intel
// Cooper Lake / Sapphire Rapids and later): screen every centroid in bf16, re-score the few that can
// still win in fp32.
//
// Why: the fp32 kernels (fused_argmax_avx512.h) run at the FMA peak, as does faiss's BLAS search, so
// neither can gain more with fp32 arithmetic. VDPBF16PS does 32 multiply-adds per instruction where
// VFMADD231PS does 16, at the same rate (measured on Zen 4: 0.28 against 0.31 ns per zmm instruction):
// scoring in bf16 halves the arithmetic and the bytes of both packs.
//
// Exactness: the labels and best cosines are those of the fp32 kernels, bit for bit. For unit rows x and
// centroids c (the fp32 unit rows every kernel uses), let s be the fp32 kernels' score (one FMA chain
// over c = 0..C−1) and š the bf16 one. Rounding x and c to bf16 (8 significant bits, round to nearest
// even; denormals flushed, each by less than 2⁻¹²⁶) moves each product by at most (2·2⁻⁸ + 2⁻¹⁶)|x_i c_i|
// (plus the flushes); both sums add at most γ_C Σ|x_i c_i|
// (γ_C = C·2⁻²⁴ / (1 − C·2⁻²⁴)); and Σ|x_i c_i| ≤ |x||c| ≤ 1 up to the norms' own rounding. So
// |š − s| ≤ e (screen_error below: 0.0079 at C = 256, 0.0081 at C = 2,048), and the fp32 winner k*
// always has š_k* ≥ max š − 2e. Every such centroid (a "candidate") is re-scored by the fp32 kernels'
// own FMA chain (exact_scores), so the fp32 argmax over the candidates, ties to the smaller index, is
// the fp32 kernels' answer. On random unit data (the hardest case: the best two cosines are closest)
// a row has 1–60 candidates (mean 2.4 of 2,048 centroids at C = 256, 14 of 16,384 at C = 2,048).
//
// Candidates are kept per row in a list of kCandidates, pruned as the row's best bf16 score rises; a
// row whose list still overflows (many centroids within 2e of its best: duplicated centroids) is
// marked, and its caller scores that row with the fp32 kernel.
//
// Layout: as fused_argmax_avx512.h (12-row and 32-centroid panels, chunk-major), over bf16 *pairs*:
// element t of a panel row holds channels 2t and 2t+1 (a zero past an odd C) in one 32-bit word, the
// operand VDPBF16PS takes. A chunk of kKp = 128 pairs (256 channels) keeps a centroid panel's chunk
// (16 KiB) and a row panel's (6 KiB) in L1, as the fp32 kernel's 128-channel chunk does.
//
// No torch dependency: included by spherical_assign_cpu.cpp under `#pragma GCC target("avx512bf16,...")`.
#pragma once
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

namespace gig_fast {
namespace screen_bf16 {

constexpr int64_t kMr = 12;   // rows per micro-tile (12 × 2 accumulators + 2 loads + 1 broadcast = 27 zmm)
constexpr int64_t kNr = 32;   // centroids per micro-tile (two zmm)
constexpr int64_t kKp = 128;  // bf16 pairs per C chunk (see the header comment)
constexpr int64_t kBlockRows = 96;   // rows per row block (a multiple of kMr)
constexpr int64_t kTileCols = 512;   // centroids per score tile: kBlockRows × kTileCols floats = 192 KiB
constexpr int kCandidates = 128;     // candidates kept per row: 60 seen on random unit rows at C = 2,048

// The bound e on |bf16 score − fp32 score| for unit vectors of C channels (header comment), with the
// norms' rounding and a factor of 2 on the accumulation terms for slack, plus an absolute term for the
// bf16 flushes of denormal inputs and products (each < 2^-126). Candidates are the centroids within
// 2e of the row's best bf16 score.
inline float screen_error(int64_t C) {
  const double u = std::ldexp(1.0, -24);
  if (C * u >= 0.5) return std::numeric_limits<float>::infinity();  // no useful bound: every row to the fp32 kernel
  const double gamma = C * u / (1 - C * u);
  const double norms = (1 + 4 * (C + 2) * u) * (1 + 4 * (C + 2) * u);
  return static_cast<float>(norms * (2 * std::ldexp(1.0, -8) + std::ldexp(1.0, -16) + 2 * 2 * gamma) +
                            4 * (C + 1) * std::ldexp(1.0, -126) + 1e-7);  // 1e-7: the threshold's rounding
}

inline int64_t pairs_of(int64_t C) { return (C + 1) / 2; }

// Start (in 32-bit words) of panel q's chunk at pair t0 in a pack of `panels` panels of `width`.
inline int64_t panel_offset(int64_t q, int64_t t0, int64_t Cp, int64_t panels, int64_t width) {
  return t0 * panels * width + q * std::min(kKp, Cp - t0) * width;
}

// The first n lanes (n ≤ 0: none, n ≥ 16: all).
inline __mmask16 first_lanes(int64_t n) {
  return n >= 16 ? __mmask16(0xFFFF) : n <= 0 ? __mmask16(0) : __mmask16((1u << n) - 1);
}

// Panels q0..q1 of the bf16 pair pack of a matrix M of `count` rows [count, C] in panels of `width` (≤ kNr)
// rows, zero past count and past C, chunk-major: out[chunk t0][panel q][t − t0][j] = the pair
// (M[q·width + j][2t], M[q·width + j][2t + 1]), the even channel in the low half. `src` holds M's rows
// from q0·width on (fp32, row-major), so threads can pack disjoint panels from their own scratch.
// Each row's chunk is converted 32 channels at a time (VCVTNE2PS2BF16: round to nearest even, denormal
// inputs as zero, both inside screen_error's bound) into `words`, then transposed into the panel. (A scalar
// conversion per channel took ~60 ms of a call at K = 16,384, C = 2,048.)
inline void pack_pair_panels(const float* src, int64_t count, int64_t C, int64_t width, int64_t q0, int64_t q1,
                             uint32_t* out) {
  const int64_t Cp = pairs_of(C), panels = (count + width - 1) / width;
  alignas(64) uint32_t words[kNr * kKp];  // one panel's chunk, [width][kKp]
  for (int64_t q = q0; q < q1; ++q)
    for (int64_t t0 = 0; t0 < Cp; t0 += kKp) {
      const int64_t kp = std::min(kKp, Cp - t0);
      for (int64_t j = 0; j < width; ++j) {
        uint32_t* w = words + j * kKp;
        const int64_t n = q * width + j;
        if (n >= count) {
          std::fill(w, w + kp, 0u);
          continue;
        }
        const float* row = src + (n - q0 * width) * C;
        for (int64_t t = 0; t < kp; t += 16) {
          const int64_t c = 2 * (t0 + t);  // this block's 32 channels start here
          const __m512 lo = _mm512_maskz_loadu_ps(first_lanes(C - c), row + c);
          const __m512 hi = _mm512_maskz_loadu_ps(first_lanes(C - c - 16), row + c + 16);
          _mm512_mask_storeu_epi32(w + t, first_lanes(kp - t), (__m512i)_mm512_cvtne2ps_pbh(hi, lo));
        }
      }
      uint32_t* o = out + panel_offset(q, t0, Cp, panels, width);
      for (int64_t t = 0; t < kp; ++t)
        for (int64_t j = 0; j < width; ++j) o[t * width + j] = words[j * kKp + t];
    }
}

// One R×32 tile of bf16 scores (R ≤ 12: the first R rows of the panel) over a chunk of kp pairs: a (row
// panel chunk, stride 12 words), b (centroid panel chunk, stride 32 words). `partial` ([12][32] floats, or
// null when the chunk is the whole of C) carries the fp32 sums between chunks. On the last chunk the tile
// goes to epilogue(r, v0, v1).
template <int R = kMr, typename Epilogue>
__attribute__((always_inline)) inline void micro_tile(const uint32_t* a, const uint32_t* b, int64_t kp,
                                                      float* partial, bool first, bool last, Epilogue&& epilogue) {
  __m512 acc[R][2];
#pragma GCC unroll 12
  for (int r = 0; r < R; ++r) {
    if (first) {
      acc[r][0] = _mm512_setzero_ps(), acc[r][1] = _mm512_setzero_ps();
    } else {
      acc[r][0] = _mm512_loadu_ps(partial + r * 32), acc[r][1] = _mm512_loadu_ps(partial + r * 32 + 16);
    }
  }
#pragma GCC unroll 2
  for (int64_t t = 0; t < kp; ++t, a += kMr, b += kNr) {
    const __m512bh b0 = (__m512bh)_mm512_loadu_si512(b), b1 = (__m512bh)_mm512_loadu_si512(b + 16);
#pragma GCC unroll 12
    for (int r = 0; r < R; ++r) {
      const __m512bh x = (__m512bh)_mm512_set1_epi32(static_cast<int>(a[r]));
      acc[r][0] = _mm512_dpbf16_ps(acc[r][0], x, b0);
      acc[r][1] = _mm512_dpbf16_ps(acc[r][1], x, b1);
    }
  }
  if (!last) {
#pragma GCC unroll 12
    for (int r = 0; r < R; ++r)
      _mm512_storeu_ps(partial + r * 32, acc[r][0]), _mm512_storeu_ps(partial + r * 32 + 16, acc[r][1]);
    return;
  }
#pragma GCC unroll 12
  for (int r = 0; r < R; ++r) epilogue(r, acc[r][0], acc[r][1]);
}

// A row's screening state across all passes: its best bf16 score so far and the candidates (index,
// bf16 score) in increasing index order.
struct Screen {
  float top;
  int32_t count;
  bool overflow;
  int32_t index[kCandidates];
  float score[kCandidates];
};

inline void reset(Screen* s, int64_t rows) {
  for (int64_t r = 0; r < rows; ++r) s[r].top = -std::numeric_limits<float>::infinity(), s[r].count = 0,
                                     s[r].overflow = false;
}

// Drop the candidates below `threshold` (it only rises, so they can never qualify again).
inline void prune(Screen& s, float threshold) {
  int32_t kept = 0;
  for (int32_t i = 0; i < s.count; ++i)
    if (s.score[i] >= threshold) s.index[kept] = s.index[i], s.score[kept] = s.score[i], ++kept;
  s.count = kept;
}

// Fold `cols` bf16 scores of one row (centroids base..base+cols) into its screen: raise its best, then
// keep every score within `margin` (2e) of it.
inline void scan_row(Screen& s, const float* scores, int64_t cols, int32_t base, float margin) {
  if (s.overflow) return;
  __m512 m = _mm512_set1_ps(s.top);
  for (int64_t j = 0; j < cols; j += 16) {
    const __mmask16 live = first_lanes(cols - j);
    m = _mm512_mask_max_ps(m, live, m, _mm512_maskz_loadu_ps(live, scores + j));
  }
  alignas(64) float lanes[16];
  _mm512_store_ps(lanes, m);
  const float top = *std::max_element(lanes, lanes + 16);
  const float threshold = top - margin;
  if (top > s.top) prune(s, threshold);
  s.top = top;
  const __m512 thr = _mm512_set1_ps(threshold);
  for (int64_t j = 0; j < cols; j += 16) {
    const __mmask16 live = first_lanes(cols - j);
    uint32_t hits = _mm512_mask_cmp_ps_mask(live, _mm512_maskz_loadu_ps(live, scores + j), thr, _CMP_GE_OQ);
    while (hits) {
      const int l = __builtin_ctz(hits);
      hits &= hits - 1;
      if (s.count == kCandidates) {
        s.overflow = true;  // prune already ran at this threshold: the list is all within 2e
        return;
      }
      s.index[s.count] = base + static_cast<int32_t>(j + l), s.score[s.count] = scores[j + l], ++s.count;
    }
  }
}

// Screen `rows` (≤ kBlockRows) packed rows `ap` (pack_pair_panels, width kMr) against the `count`
// centroids k0..k0+count (k0 a multiple of kNr) of the pack `bp` (width kNr, `all_panels` panels), in
// tiles of kTileCols centroids: each finished tile's scores go to `tile` ([kBlockRows][kTileCols]) and are
// scanned into the rows' screens. `partial`: kBlockRows·kTileCols floats (C > 2·kKp only). ABS screens
// |score| instead (OMP's rule: the largest |correlation|; ||š| − |s|| ≤ |š − s|, so the same bound holds).
template <bool ABS = false>
inline void screen_pass(const uint32_t* ap, int64_t rows, const uint32_t* bp, int64_t all_panels, int64_t k0,
                        int64_t count, int64_t C, float margin, float* partial, float* tile, Screen* screens) {
  const int64_t Cp = pairs_of(C), row_panels = (rows + kMr - 1) / kMr, q0 = k0 / kNr;
  const int64_t col_panels = (count + kNr - 1) / kNr, tile_panels = kTileCols / kNr;
  for (int64_t p0 = 0; p0 < col_panels; p0 += tile_panels) {
    const int64_t p1 = std::min(col_panels, p0 + tile_panels);
    for (int64_t t0 = 0; t0 < Cp; t0 += kKp) {
      const int64_t kp = std::min(kKp, Cp - t0);
      const bool first = t0 == 0, last = t0 + kp >= Cp;
      for (int64_t p = p0; p < p1; ++p) {
        const uint32_t* b = bp + panel_offset(q0 + p, t0, Cp, all_panels, kNr);
        for (int64_t i = 0; i < row_panels; ++i) {
          const uint32_t* a = ap + panel_offset(i, t0, Cp, row_panels, kMr);
          float* part = partial ? partial + ((p - p0) * row_panels + i) * kMr * kNr : nullptr;
          const auto store = [&](int r, __m512 v0, __m512 v1) __attribute__((always_inline)) {
            if (r >= rows - i * kMr) return;
            float* o = tile + (i * kMr + r) * kTileCols + (p - p0) * kNr;
            if constexpr (ABS) v0 = _mm512_abs_ps(v0), v1 = _mm512_abs_ps(v1);
            _mm512_storeu_ps(o, v0), _mm512_storeu_ps(o + 16, v1);
          };
          // a last panel of 4 or 8 rows skips the padding rows' products (64 rows: 72 → 64 of them)
          const int64_t left = rows - i * kMr;
          if (left <= 4)
            micro_tile<4>(a, b, kp, part, first, last, store);
          else if (left <= 8)
            micro_tile<8>(a, b, kp, part, first, last, store);
          else
            micro_tile(a, b, kp, part, first, last, store);
        }
      }
    }
    const int64_t cols = std::min((p1 - p0) * kNr, count - p0 * kNr);
    for (int64_t r = 0; r < rows; ++r)
      scan_row(screens[r], tile + r * kTileCols, cols, static_cast<int32_t>(k0 + p0 * kNr), margin);
  }
}

// The fp32 kernels' scores of unit row x against the unit centroids `index[0..n)`: one FMA chain each over
// the channels in order from +0 (fused_argmax_avx512.h's accumulation), so their scores bit for bit.
// unit_row(k, out) writes centroid k's unit row [C] (the one the fp32 kernels pack); four at a time in
// `scratch` [4, C], whose four chains run side by side (independent: the FMA latency is hidden).
template <typename UnitRow>
void exact_scores(const float* x, int64_t C, const int32_t* index, int32_t n, UnitRow&& unit_row, float* scratch,
                  float* out) {
  for (int32_t i = 0; i < n; i += 4) {
    const int32_t m = std::min<int32_t>(4, n - i);
    for (int32_t g = 0; g < 4; ++g) unit_row(index[i + std::min(g, m - 1)], scratch + g * C);  // pad: repeat
    const float *c0 = scratch, *c1 = scratch + C, *c2 = scratch + 2 * C, *c3 = scratch + 3 * C;
    __m128 s0 = _mm_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;
    for (int64_t c = 0; c < C; ++c) {
      const __m128 xc = _mm_set_ss(x[c]);
      s0 = _mm_fmadd_ss(xc, _mm_set_ss(c0[c]), s0);
      s1 = _mm_fmadd_ss(xc, _mm_set_ss(c1[c]), s1);
      s2 = _mm_fmadd_ss(xc, _mm_set_ss(c2[c]), s2);
      s3 = _mm_fmadd_ss(xc, _mm_set_ss(c3[c]), s3);
    }
    const float got[4] = {_mm_cvtss_f32(s0), _mm_cvtss_f32(s1), _mm_cvtss_f32(s2), _mm_cvtss_f32(s3)};
    std::copy_n(got, m, out + i);
  }
}

// A screened row's answer: the fp32 argmax over its candidates within 2e of its best (in increasing
// index order, replaced only on a strictly larger score: ties to the smaller index). x: its fp32 unit
// row; unit_row, scratch: as exact_scores. Returns false for an overflowed row (the caller scores it).
template <typename UnitRow>
bool finish(Screen& s, const float* x, int64_t C, float margin, UnitRow&& unit_row, float* scratch, float* best,
            int64_t* label) {
  if (s.overflow) {
    // an all-zero row scores +0 against every centroid (so every one is a candidate): centroid 0, as in
    // the fp32 kernels; ReLU activations make such rows common enough not to send them to the fallback
    if (std::all_of(x, x + C, [](float v) { return v == 0.f; })) {
      *best = 0.f, *label = 0;
      return true;
    }
    return false;
  }
  prune(s, s.top - margin);
  if (s.count == 0) return false;  // cannot happen (the best bf16 score is a candidate); kept safe
  float exact[kCandidates] = {};
  exact_scores(x, C, s.index, s.count, unit_row, scratch, exact);
  float b = exact[0];
  int32_t k = s.index[0];
  for (int32_t i = 1; i < s.count; ++i)
    if (exact[i] > b) b = exact[i], k = s.index[i];
  *best = b;
  *label = k;
  return true;
}

}  // namespace screen_bf16
}  // namespace gig_fast
