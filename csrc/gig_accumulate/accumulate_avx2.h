// The fp32 gig_accumulate kernel on AVX2+FMA CPUs without AVX-512 (AMD Zen 2/3, Intel client cores),
// for C a multiple of 8: accumulate_avx512.h's scheme at 256 bits.
//
// The generic kernel ends each of a position's s dot products in a horizontal sum of one vector. Here
// the dots go 8 at a time: 8 accumulator vectors (one per active concept, C / 8 FMAs each, independent
// chains: the two FMA pipes of a Zen 3 core with 4-cycle latency need 8 in flight), then one
// transpose-and-add tree that turns the 8 vectors into one vector of their 8 sums (14 shuffles and 7
// adds instead of 8 reductions), scaled by the codes' values and written to their slots. Only the
// active entries are dotted (ActiveCodes); padding stores an exact 0. No masked loads or stores: on
// Zen 2/3 they are microcoded (vmaskmovps stores took a third of a first version's time at s = 16, C = 32).
//
// Accumulation: each dot is summed in fp32 in another order than the generic kernel's (8-lane partial
// sums, then the tree), so the two agree to fp32 rounding, not bit for bit.
//
// No torch dependency: included by gig_accumulate_cpu.cpp under `#pragma GCC target("avx2,fma")`.
#pragma once
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "gig_accumulate/active_codes.h"

namespace gig_fast {
namespace accumulate256 {

// Lane j of the result: the sum of the 8 lanes of a[j].
inline __m256 sums_of_8(const __m256* a) {
  __m256 x[4], y[2];
  for (int k = 0; k < 4; ++k)  // per 128-bit lane: [a0+a2, b0+b2, a1+a3, b1+b3] of a = a[2k], b = a[2k+1]
    x[k] = _mm256_add_ps(_mm256_unpacklo_ps(a[2 * k], a[2 * k + 1]), _mm256_unpackhi_ps(a[2 * k], a[2 * k + 1]));
  for (int k = 0; k < 2; ++k) {  // per 128-bit lane: the lane's sums of a[4k], a[4k+1], a[4k+2], a[4k+3]
    const __m256d u = _mm256_castps_pd(x[2 * k]), v = _mm256_castps_pd(x[2 * k + 1]);
    y[k] = _mm256_add_ps(_mm256_castpd_ps(_mm256_unpacklo_pd(u, v)), _mm256_castpd_ps(_mm256_unpackhi_pd(u, v)));
  }
  // the two 128-bit lanes summed: lanes 0-3 of the result hold y[0]'s totals, lanes 4-7 y[1]'s
  return _mm256_add_ps(_mm256_permute2f128_ps(y[0], y[1], 0x20), _mm256_permute2f128_ps(y[0], y[1], 0x31));
}

// out[t, p, :] for positions [begin, end): grads [T, m, P, C], w [m], idx/val [P, s], V [K, C], out [T, P, s].
inline void accumulate_positions(const float* grads, const float* w, const int64_t* idx, const float* val,
                                 const float* V, float* out, int64_t T, int64_t m, int64_t P, int64_t s,
                                 int64_t C, int64_t begin, int64_t end) {
  std::vector<float> zero(C, 0.0f), weighted(C);
  ActiveCodes codes(kPositionBlock, s);  // active_codes.h
  for_each_position(idx, val, V, zero.data(), out, T, P, s, C, begin, end, codes,
                    [&](int64_t t, int64_t p, int64_t i, float* o) {
    const float* g = grads + (t * m * P + p) * C;  // one node: its gradient as it is, its weight at the end
    float scale = w[0];
    if (m > 1) {  // the weighted sum over the nodes, as the generic kernel forms it
      std::fill(weighted.begin(), weighted.end(), 0.0f);
      for (int64_t k = 0; k < m; ++k) {
        const __m256 wk = _mm256_set1_ps(w[k]);
        const float* src = grads + ((t * m + k) * P + p) * C;
        for (int64_t c = 0; c < C; c += 8)
          _mm256_storeu_ps(&weighted[c], _mm256_fmadd_ps(wk, _mm256_loadu_ps(src + c), _mm256_loadu_ps(&weighted[c])));
      }
      g = weighted.data();
      scale = 1.0f;
    }
    for (int64_t k0 = 0; k0 < codes.n[i]; k0 += 8) {
      const float* const* rows = &codes.row[i * codes.width + k0];
      __m256 acc[8];
      for (int j = 0; j < 8; ++j) acc[j] = _mm256_setzero_ps();
      for (int64_t c = 0; c < C; c += 8) {
        const __m256 gc = _mm256_loadu_ps(g + c);
#pragma GCC unroll 8
        for (int j = 0; j < 8; ++j) acc[j] = _mm256_fmadd_ps(gc, _mm256_loadu_ps(rows[j] + c), acc[j]);
      }
      const __m256 v = _mm256_loadu_ps(&codes.value[i * codes.width + k0]);
      alignas(32) float r[8];
      _mm256_store_ps(r, _mm256_mul_ps(_mm256_mul_ps(sums_of_8(acc), _mm256_set1_ps(scale)), v));
      const int64_t n = std::min<int64_t>(8, codes.n[i] - k0);
      for (int64_t j = 0; j < n; ++j) o[codes.slot[i * s + k0 + j]] = r[j];
    }
  });
}

}  // namespace accumulate256
}  // namespace gig_fast
