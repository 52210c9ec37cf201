// The fp32 gig_accumulate kernel on AVX-512 CPUs, for C a multiple of 16.
//
// Per (position p, target t) the generic kernel forms g = Σ_k w_k·G[t, k, p, :] and then takes s dot
// products ⟨g, V[idx[p, j]]⟩, each ending in a horizontal sum of one vector: at C = 32 that is two FMAs
// and a reduction chain of ~15 cycles per dot, and the kernel ran at ~20 GFLOP/s on two cores of an Intel
// Xeon (5 targets × 24,892 positions, C = 32, s = 16: 6.0 ms, against 0.35 ms to read the gradients once).
// Here a position's active concepts (ActiveCodes, active_codes.h: padding left out) go 16 at a time
// while 16 are left, then 8 at a time: one accumulator vector of 16 lanes per concept (C / 16 FMAs each,
// independent chains), then one transpose-and-add tree (for 8: their halves added, then
// accumulate_avx2.h's tree) turns them into one vector of their sums, scaled by the codes' values and
// written to their slots; padding stores an exact 0. (A first version dotted every
// slot, padding included, 16 at a time: 1.5–1.6 ms at the shape above, 3.5× the generic kernel; but
// stage 4's codes are 65–70 % padding, and on codes padded like theirs it was 1.03–1.9× slower than the
// AVX2 kernel, which skips padding, on a Zen 4 core.)
//
// Accumulation: each dot is summed in fp32 in another order than the generic kernel's (16-lane partial
// sums, then the tree), so the two agree to fp32 rounding, not bit for bit. Measured on a Zen 4 core
// (two threads, 5 targets, codes padded as stage 4's, alternated with the version over every slot on a
// busy host, medians of 9): s = 29 with 8 active, C = 256: 3.6–4.9 → 1.9–3.7 ms; s = 14 with 5 active,
// C = 512: 0.9–1.6 → 0.6–1.2 ms; s = 22 with 7 active, C = 1,024: 1.3–1.8 → 1.0–1.7 ms.
//
// No torch dependency: included by gig_accumulate_cpu.cpp under `#pragma GCC target("avx512f,...")`.
#pragma once
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "gig_accumulate/accumulate_avx2.h"  // sums_of_8 and ActiveCodes (included first, for AVX2)

namespace gig_fast {
namespace accumulate512 {

// Lane j of the result: the sum of the 16 lanes of a[j].
inline __m512 sums_of_16(const __m512* a) {
  __m512 x[8], y[4];
  for (int k = 0; k < 8; ++k)  // per 128-bit lane: [a0+a2, b0+b2, a1+a3, b1+b3] of a = a[2k], b = a[2k+1]
    x[k] = _mm512_add_ps(_mm512_unpacklo_ps(a[2 * k], a[2 * k + 1]), _mm512_unpackhi_ps(a[2 * k], a[2 * k + 1]));
  for (int k = 0; k < 4; ++k) {  // per 128-bit lane: the lane's sum of a[4k], a[4k+1], a[4k+2], a[4k+3]
    const __m512d u = _mm512_castps_pd(x[2 * k]), v = _mm512_castps_pd(x[2 * k + 1]);
    y[k] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(u, v)), _mm512_castpd_ps(_mm512_unpackhi_pd(u, v)));
  }
  // the four 128-bit lanes of each y[k] summed: lane i of the result holds y[i]'s totals, a[4i .. 4i+3]
  const __m512 z0 = _mm512_add_ps(_mm512_shuffle_f32x4(y[0], y[1], _MM_SHUFFLE(2, 0, 2, 0)),
                                  _mm512_shuffle_f32x4(y[0], y[1], _MM_SHUFFLE(3, 1, 3, 1)));
  const __m512 z1 = _mm512_add_ps(_mm512_shuffle_f32x4(y[2], y[3], _MM_SHUFFLE(2, 0, 2, 0)),
                                  _mm512_shuffle_f32x4(y[2], y[3], _MM_SHUFFLE(3, 1, 3, 1)));
  return _mm512_add_ps(_mm512_shuffle_f32x4(z0, z1, _MM_SHUFFLE(2, 0, 2, 0)),
                       _mm512_shuffle_f32x4(z0, z1, _MM_SHUFFLE(3, 1, 3, 1)));
}

// Lane j of the result: the sum of the 16 lanes of a[j], j < 8: each vector's two 256-bit halves added,
// then accumulate_avx2.h's tree over the 8 halves.
inline __m256 sums_of_8(const __m512* a) {
  __m256 half[8];
  for (int j = 0; j < 8; ++j)
    half[j] = _mm256_add_ps(_mm512_castps512_ps256(a[j]),
                            _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(a[j]), 1)));
  return accumulate256::sums_of_8(half);
}

// out[t, p, :] for positions [begin, end): grads [T, m, P, C], w [m], idx/val [P, s], V [K, C], out [T, P, s].
inline void accumulate_positions(const float* grads, const float* w, const int64_t* idx, const float* val,
                                 const float* V, float* out, int64_t T, int64_t m, int64_t P, int64_t s,
                                 int64_t C, int64_t begin, int64_t end) {
  std::vector<float> zero(C, 0.0f), weighted(C);
  accumulate256::ActiveCodes codes(accumulate256::kPositionBlock, s);  // active_codes.h
  accumulate256::for_each_position(idx, val, V, zero.data(), out, T, P, s, C, begin, end, codes,
                                   [&](int64_t t, int64_t p, int64_t i, float* o) {
    const float* g = grads + (t * m * P + p) * C;  // one node: its gradient as it is, its weight at the end
    float scale = w[0];
    if (m > 1) {  // the weighted sum over the nodes, as the generic kernel forms it
      std::fill(weighted.begin(), weighted.end(), 0.0f);
      for (int64_t k = 0; k < m; ++k) {
        const __m512 wk = _mm512_set1_ps(w[k]);
        const float* src = grads + ((t * m + k) * P + p) * C;
        for (int64_t c = 0; c < C; c += 16)
          _mm512_storeu_ps(&weighted[c], _mm512_fmadd_ps(wk, _mm512_loadu_ps(src + c), _mm512_loadu_ps(&weighted[c])));
      }
      g = weighted.data();
      scale = 1.0f;
    }
    int64_t k0 = 0;
    for (; codes.n[i] - k0 >= 16; k0 += 16) {  // 16 active concepts at a time while 16 are left
      const float* const* rows = &codes.row[i * codes.width + k0];
      __m512 acc[16];
      for (int j = 0; j < 16; ++j) acc[j] = _mm512_setzero_ps();
      for (int64_t c = 0; c < C; c += 16) {
        const __m512 gc = _mm512_loadu_ps(g + c);
#pragma GCC unroll 16
        for (int j = 0; j < 16; ++j) acc[j] = _mm512_fmadd_ps(gc, _mm512_loadu_ps(rows[j] + c), acc[j]);
      }
      const __m512 v = _mm512_loadu_ps(&codes.value[i * codes.width + k0]);
      alignas(64) float r[16];
      _mm512_store_ps(r, _mm512_mul_ps(_mm512_mul_ps(sums_of_16(acc), _mm512_set1_ps(scale)), v));
      for (int64_t j = 0; j < 16; ++j) o[codes.slot[i * s + k0 + j]] = r[j];
    }
    for (; k0 < codes.n[i]; k0 += 8) {  // then 8 at a time (rows past the active ones: zeros)
      const float* const* rows = &codes.row[i * codes.width + k0];
      __m512 acc[8];
      for (int j = 0; j < 8; ++j) acc[j] = _mm512_setzero_ps();
      for (int64_t c = 0; c < C; c += 16) {
        const __m512 gc = _mm512_loadu_ps(g + c);
#pragma GCC unroll 8
        for (int j = 0; j < 8; ++j) acc[j] = _mm512_fmadd_ps(gc, _mm512_loadu_ps(rows[j] + c), acc[j]);
      }
      const __m256 v = _mm256_loadu_ps(&codes.value[i * codes.width + k0]);
      alignas(32) float r[8];
      _mm256_store_ps(r, _mm256_mul_ps(_mm256_mul_ps(sums_of_8(acc), _mm256_set1_ps(scale)), v));
      const int64_t n = std::min<int64_t>(8, codes.n[i] - k0);
      for (int64_t j = 0; j < n; ++j) o[codes.slot[i * s + k0 + j]] = r[j];
    }
  });
}

}  // namespace accumulate512
}  // namespace gig_fast
