// The active entries of a block of positions' padded codes, shared by the vector kernels of
// gig_accumulate (accumulate_avx2.h, accumulate_avx512.h): both dot a position's active concepts 8 at a
// time and skip its padding. No intrinsics, no torch dependency.
#pragma once
#include <algorithm>
#include <cstdint>
#include <vector>

namespace gig_fast {
namespace accumulate256 {

// A block of positions' active codes, padding left out: position i's entries are n[i] slots of the
// codes' rows (j), their concepts' rows of V and their values, each padded to whole groups of 8 with a
// row of zeros. Stage 4's codes are mostly padding (the demo's Lasso codes: s = 13–29, 4–8 active), and
// a kernel over every slot did 3–4× the dots of the generic kernel, which skips padding.
struct ActiveCodes {
  std::vector<int64_t> slot;  // [block, s]: the j of each active entry, in order
  std::vector<const float*> row;  // [block, s rounded up to 8]
  std::vector<float> value;  // [block, s rounded up to 8]
  std::vector<int64_t> n;  // [block]
  int64_t width = 0;

  ActiveCodes(int64_t block, int64_t s)
      : slot(block * s), row(block * ((s + 7) / 8 * 8)), value(row.size()), n(block), width((s + 7) / 8 * 8) {}

  void gather(const int64_t* idx, const float* val, const float* V, const float* zero, int64_t C, int64_t s,
              int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t i = p - p0;
      int64_t k = 0;
      for (int64_t j = 0; j < s; ++j) {
        const int64_t q = idx[p * s + j];
        if (q < 0) continue;
        slot[i * s + k] = j;
        row[i * width + k] = V + q * C;
        value[i * width + k] = val[p * s + j];
        ++k;
      }
      n[i] = k;
      for (int64_t r = k; r < (k + 7) / 8 * 8; ++r) {
        row[i * width + r] = zero;
        value[i * width + r] = 0.0f;
      }
    }
  }
};

// Positions per block of the vector kernels' walk (for_each_position).
constexpr int64_t kPositionBlock = 64;

// The vector kernels' walk over positions [begin, end) of out [T, P, s]: blocks of kPositionBlock
// positions, every target in each (a target's gradients are read as one stream per block and the block's
// codes stay in cache; every target inside each position, 20 targets' streams 2.5 MB apart, took 9.95 ms
// against 6.6–6.9 ms this way at 20 × 19,600 positions, C = 32). Each block's active codes are gathered
// into `codes` (ActiveCodes(kPositionBlock, s)); then for every target t and position p, out[t, p, :] is
// zeroed (padding: an exact 0) and position(t, p, i, o) called, i the position's row in `codes` and
// o = out[t, p].
template <typename Position>
void for_each_position(const int64_t* idx, const float* val, const float* V, const float* zero, float* out,
                       int64_t T, int64_t P, int64_t s, int64_t C, int64_t begin, int64_t end, ActiveCodes& codes,
                       Position&& position) {
  for (int64_t p0 = begin; p0 < end; p0 += kPositionBlock) {
    const int64_t p1 = std::min(end, p0 + kPositionBlock);
    codes.gather(idx, val, V, zero, C, s, p0, p1);
    for (int64_t t = 0; t < T; ++t)
      for (int64_t p = p0; p < p1; ++p) {
        float* o = out + (t * P + p) * s;
        std::fill(o, o + s, 0.0f);
        position(t, p, p - p0, o);
      }
  }
}

}  // namespace accumulate256
}  // namespace gig_fast
