// CPU kernels of sparse_reconstruct (formulas in sparse_reconstruct.h). Rows are split across OpenMP
// threads with at::parallel_for; the channel loops are contiguous and vectorised with `omp simd`.
#include "sparse_reconstruct/sparse_reconstruct.h"

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string_view>
#include <vector>

#include "common.h"

namespace gig_fast {
namespace {

// The forward sums a row's active entries into a block of output channels held in registers and
// stores the block once: out[p, c0:c0+B] = bias + sum_i w_i * V[k_i, c0:c0+B], block after block.
// What decided it (P=3136, K=8192, C=1024, s=30, one thread of this 2-core EPYC, minima of 9-15 runs
// with the machine loaded by other jobs, so only differences over ~20% count; embedding_bag =
// F.embedding_bag(per_sample_weights=...), FBGEMM's kernels, the route of SAE decoders):
//   fp32: the whole [C] row through an L1 scratch per entry (the first version)  ~40 ms, embedding_bag ~35
//         64-float blocks (8 AVX2 registers), prefetch of entry i+4's block      ~40-57 ms
//         + prefetch of the *next* block of the same entry while summing this one ~32 ms
//         256-float blocks (16 AVX-512 registers), the same prefetches           ~19-27 ms, embedding_bag ~18-21
//   bf16: the same with c10's conversions on 256-bit vectors (spilled)          ~35 ms, embedding_bag ~9
//         + widen/narrow below, 512-bit vectors                                  ~5-8 ms, embedding_bag ~4-8
// The gathered rows are random, so no hardware prefetcher can guess them; the next block of an entry is
// a whole pass over the row's entries away, long enough to hide its latency.
// Per channel the sum runs bias, then the entries in (p, j) order, with no FMA contraction (the pragma
// below: the AVX-512 build would otherwise fuse): the baseline, AVX2 and AVX-512 builds agree bit for bit
// (tests/test_cpu_isa.py; GIG_FAST_CPU_ISA=baseline / avx2 force the narrower ones).
#pragma GCC push_options
#pragma GCC optimize("fp-contract=off")

constexpr int64_t kLookahead = 8;  // entries ahead whose first block is prefetched

// v[c] in the accumulation type. A bfloat16 is the top half of a float32, so its widening is a 16-bit
// shift, which the compiler vectorises; through c10::BFloat16's conversion operator the bf16 forward ran
// 4x slower than embedding_bag's (35 vs 9 ms at P=3136, K=8192, C=1024, one thread).
template <typename scalar_t>
GIG_INLINE acc_t<scalar_t> widen(const scalar_t* v, int64_t c) {
  return static_cast<acc_t<scalar_t>>(v[c]);
}

template <>
GIG_INLINE float widen<c10::BFloat16>(const c10::BFloat16* v, int64_t c) {
  const uint32_t bits = static_cast<uint32_t>(reinterpret_cast<const uint16_t*>(v)[c]) << 16;
  float out;
  std::memcpy(&out, &bits, sizeof(out));
  return out;
}

// x stored as scalar_t; for bfloat16 the round-to-nearest-even of c10::BFloat16 (NaN -> 0x7FC0) in bit
// operations the compiler vectorises (the conversion operator alone cost more than the gathers at C=256).
template <typename scalar_t>
GIG_INLINE void narrow(scalar_t* out, int64_t c, acc_t<scalar_t> x) {
  out[c] = static_cast<scalar_t>(x);
}

template <>
GIG_INLINE void narrow<c10::BFloat16>(c10::BFloat16* out, int64_t c, float x) {
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof(bits));
  const uint32_t rounded = (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;
  reinterpret_cast<uint16_t*>(out)[c] = static_cast<uint16_t>(x != x ? 0x7FC0u : rounded);
}

template <int64_t B, typename scalar_t>
GIG_INLINE void prefetch_block(const scalar_t* v) {
  for (int64_t byte = 0; byte < B * static_cast<int64_t>(sizeof(scalar_t)); byte += 64)
    __builtin_prefetch(reinterpret_cast<const char*>(v) + byte);
}

// out[c0:c0+B] of one row from its n active entries (row offsets k*C and weights).
template <int64_t B, typename scalar_t>
GIG_INLINE void sum_block(const int64_t* rows, const acc_t<scalar_t>* weights, int64_t n, const scalar_t* V,
                          const scalar_t* bias, scalar_t* o, int64_t c0, int64_t C) {
  using acc = acc_t<scalar_t>;
  acc block[B];
#pragma omp simd
  for (int64_t c = 0; c < B; ++c) block[c] = bias ? static_cast<acc>(bias[c0 + c]) : acc(0);
  const bool next = c0 + 2 * B <= C;
  for (int64_t i = 0; i < n; ++i) {
    if (c0 == 0 && i + kLookahead < n) prefetch_block<B>(V + rows[i + kLookahead]);
    if (next) prefetch_block<B>(V + rows[i] + c0 + B);
    const scalar_t* v = V + rows[i] + c0;
    const acc w = weights[i];
#pragma omp simd
    for (int64_t c = 0; c < B; ++c) block[c] += w * widen(v, c);
  }
#pragma omp simd
  for (int64_t c = 0; c < B; ++c) narrow(o, c0 + c, block[c]);
}

// Rows [begin, end) with blocks of Wide channels, then of 16, then one channel at a time.
template <int64_t Wide, typename scalar_t>
GIG_INLINE void forward_range(int64_t begin, int64_t end, const int64_t* idx, const scalar_t* val,
                              const scalar_t* V, const scalar_t* bias, scalar_t* out, int64_t s, int64_t C,
                              int64_t* rows, acc_t<scalar_t>* weights) {
  using acc = acc_t<scalar_t>;
  for (int64_t p = begin; p < end; ++p) {
    int64_t n = 0;  // the row's active entries, padding and zero coefficients dropped once
    for (int64_t j = 0; j < s; ++j) {
      const int64_t k = idx[p * s + j];
      const acc w = static_cast<acc>(val[p * s + j]);
      if (k < 0 || w == acc(0)) continue;
      rows[n] = k * C;
      weights[n++] = w;
    }
    scalar_t* o = out + p * C;
    int64_t c0 = 0;
    for (; c0 + Wide <= C; c0 += Wide) sum_block<Wide>(rows, weights, n, V, bias, o, c0, C);
    for (; c0 + 16 <= C; c0 += 16) sum_block<16>(rows, weights, n, V, bias, o, c0, C);
    for (int64_t c = c0; c < C; ++c) {
      acc sum = bias ? static_cast<acc>(bias[c]) : acc(0);
      for (int64_t i = 0; i < n; ++i) sum += weights[i] * widen(V + rows[i], c);
      narrow(o, c, sum);
    }
  }
}

// Register budget per block: 256 bytes of accumulators in the baseline and AVX2 builds (16 registers,
// half of them accumulators), 1 KiB in the AVX-512 build (32 registers).
template <typename scalar_t>
constexpr int64_t block_of(int64_t bytes) {
  return bytes / static_cast<int64_t>(sizeof(acc_t<scalar_t>));
}

template <typename scalar_t>
GIG_TARGET_AVX2 void forward_range_avx2(int64_t begin, int64_t end, const int64_t* idx, const scalar_t* val,
                                        const scalar_t* V, const scalar_t* bias, scalar_t* out, int64_t s,
                                        int64_t C, int64_t* rows, acc_t<scalar_t>* weights) {
  forward_range<block_of<scalar_t>(256)>(begin, end, idx, val, V, bias, out, s, C, rows, weights);
}

#if GIG_HAVE_AVX2_PATH
// 512-bit vectors preferred: GCC's default for AVX-512 targets is 256-bit, which left the bf16 loop on
// ymm registers with spilled accumulators (4x slower than embedding_bag at C=256).
#define GIG_TARGET_AVX512 __attribute__((target("avx512f,avx512vl,avx512bw,prefer-vector-width=512")))
#else
#define GIG_TARGET_AVX512
#endif

template <typename scalar_t>
GIG_TARGET_AVX512 void forward_range_avx512(int64_t begin, int64_t end, const int64_t* idx, const scalar_t* val,
                                            const scalar_t* V, const scalar_t* bias, scalar_t* out, int64_t s,
                                            int64_t C, int64_t* rows, acc_t<scalar_t>* weights) {
  forward_range<block_of<scalar_t>(1024)>(begin, end, idx, val, V, bias, out, s, C, rows, weights);
}

#pragma GCC pop_options

// AVX-512 where the CPU has it, unless GIG_FAST_CPU_ISA asks for a narrower build ("avx2", "baseline").
bool use_avx512() {
#if GIG_HAVE_AVX2_PATH
  static const bool use = cpu_has_avx2() && __builtin_cpu_supports("avx512f") &&
                          __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bw") &&
                          std::string_view(std::getenv("GIG_FAST_CPU_ISA") ? std::getenv("GIG_FAST_CPU_ISA") : "") !=
                              "avx2";
  return use;
#else
  return false;
#endif
}

// Every index of rows [begin, end) is a concept (< K) or -1: a ValueError in Python otherwise. Checked in
// the forward's own parallel pass over idx, where it costs nothing: the separate min/max reductions of
// the Python-side check were two more OpenMP regions, and on this 2-core box shared with other jobs each
// waited out the scheduler (~20 ms apiece at P=3136, s=30: more than the forward).
void check_index_range(const int64_t* idx, int64_t begin, int64_t end, int64_t s, int64_t K) {
  for (int64_t e = begin * s; e < end * s; ++e) {
    TORCH_CHECK_VALUE(idx[e] >= -1, "idx holds ", idx[e], "; entries must be concept indices in [0, ", K,
                      ") or -1 for padding");
    TORCH_CHECK_VALUE(idx[e] < K, "idx holds ", idx[e], " but V has only K=", K, " concepts (valid: 0..", K - 1,
                      ", -1 = padding)");
  }
}

template <typename scalar_t>
void forward_rows(const int64_t* idx, const scalar_t* val, const scalar_t* V, const scalar_t* bias,
                  scalar_t* out, int64_t P, int64_t s, int64_t K, int64_t C) {
  using acc = acc_t<scalar_t>;
  const bool avx512 = use_avx512(), avx2 = cpu_has_avx2();
  at::parallel_for(0, P, 16, [&](int64_t begin, int64_t end) {
    check_index_range(idx, begin, end, s, K);
    std::vector<int64_t> rows(s);
    std::vector<acc> weights(s);
    if (avx512) {
      forward_range_avx512(begin, end, idx, val, V, bias, out, s, C, rows.data(), weights.data());
    } else if (avx2) {
      forward_range_avx2(begin, end, idx, val, V, bias, out, s, C, rows.data(), weights.data());
    } else {
      forward_range<block_of<scalar_t>(256)>(begin, end, idx, val, V, bias, out, s, C, rows.data(),
                                             weights.data());
    }
  });
}

// Rows [begin, end) of grad_val (the SDDMM): <grad[p], V[idx[p, j]]> at the active entries, 0 at padding.
template <typename scalar_t>
GIG_INLINE void grad_val_range(int64_t begin, int64_t end, const scalar_t* grad, const int64_t* idx,
                               const scalar_t* V, scalar_t* grad_val, int64_t s, int64_t C, acc_t<scalar_t>* g) {
  using acc = acc_t<scalar_t>;
  for (int64_t p = begin; p < end; ++p) {
    for (int64_t c = 0; c < C; ++c) g[c] = static_cast<acc>(grad[p * C + c]);
    for (int64_t j = 0; j < s; ++j) {
      const int64_t k = idx[p * s + j];
      acc dot = 0;
      if (k >= 0) {
        const scalar_t* v = V + k * C;
#pragma omp simd reduction(+ : dot)
        for (int64_t c = 0; c < C; ++c) dot += g[c] * static_cast<acc>(v[c]);
      }
      grad_val[p * s + j] = static_cast<scalar_t>(dot);
    }
  }
}

template <typename scalar_t>
GIG_TARGET_AVX2 void grad_val_range_avx2(int64_t begin, int64_t end, const scalar_t* grad, const int64_t* idx,
                                         const scalar_t* V, scalar_t* grad_val, int64_t s, int64_t C,
                                         acc_t<scalar_t>* g) {
  grad_val_range(begin, end, grad, idx, V, grad_val, s, C, g);
}

template <typename scalar_t>
void grad_val_rows(const scalar_t* grad, const int64_t* idx, const scalar_t* V, scalar_t* grad_val,
                   int64_t P, int64_t s, int64_t C) {
  using acc = acc_t<scalar_t>;
  const bool avx2 = cpu_has_avx2();
  at::parallel_for(0, P, 16, [&](int64_t begin, int64_t end) {
    std::vector<acc> g(C);
    if (avx2) {
      grad_val_range_avx2(begin, end, grad, idx, V, grad_val, s, C, g.data());
    } else {
      grad_val_range(begin, end, grad, idx, V, grad_val, s, C, g.data());
    }
  });
}

// Concepts [begin, end) of grad_V: each the sum of val[e]·grad[row of e] over its entries, in order.
template <typename scalar_t>
GIG_INLINE void grad_V_range(int64_t begin, int64_t end, const scalar_t* grad, const scalar_t* val,
                             const int64_t* start, const int64_t* order, scalar_t* grad_V, int64_t s, int64_t C,
                             acc_t<scalar_t>* row) {
  using acc = acc_t<scalar_t>;
  for (int64_t k = begin; k < end; ++k) {
    for (int64_t c = 0; c < C; ++c) row[c] = acc(0);
    for (int64_t i = start[k]; i < start[k + 1]; ++i) {
      const int64_t e = order[i];
      const acc w = static_cast<acc>(val[e]);
      const scalar_t* g = grad + (e / s) * C;
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) row[c] += w * static_cast<acc>(g[c]);
    }
    scalar_t* o = grad_V + k * C;
    for (int64_t c = 0; c < C; ++c) o[c] = static_cast<scalar_t>(row[c]);
  }
}

template <typename scalar_t>
GIG_TARGET_AVX2 void grad_V_range_avx2(int64_t begin, int64_t end, const scalar_t* grad, const scalar_t* val,
                                       const int64_t* start, const int64_t* order, scalar_t* grad_V, int64_t s,
                                       int64_t C, acc_t<scalar_t>* row) {
  grad_V_range(begin, end, grad, val, start, order, grad_V, s, C, row);
}

// grad_V by a counting sort of the entries on their concept (stable: entries keep their (p, j)
// order inside a concept), then one independent sum per concept — the result does not depend on the
// number of threads (nor on the instruction set: the per-channel sums run in the same order).
template <typename scalar_t>
void grad_V_rows(const scalar_t* grad, const int64_t* idx, const scalar_t* val, scalar_t* grad_V,
                 int64_t P, int64_t s, int64_t K, int64_t C) {
  using acc = acc_t<scalar_t>;
  const int64_t E = P * s;
  std::vector<int64_t> start(K + 1, 0);
  for (int64_t e = 0; e < E; ++e)
    if (idx[e] >= 0) ++start[idx[e] + 1];
  for (int64_t k = 0; k < K; ++k) start[k + 1] += start[k];
  std::vector<int64_t> order(start[K]);
  std::vector<int64_t> fill(start.begin(), start.end() - 1);
  for (int64_t e = 0; e < E; ++e)
    if (idx[e] >= 0) order[fill[idx[e]]++] = e;
  const bool avx2 = cpu_has_avx2();
  at::parallel_for(0, K, 4, [&](int64_t begin, int64_t end) {
    std::vector<acc> row(C);
    if (avx2) {
      grad_V_range_avx2(begin, end, grad, val, start.data(), order.data(), grad_V, s, C, row.data());
    } else {
      grad_V_range(begin, end, grad, val, start.data(), order.data(), grad_V, s, C, row.data());
    }
  });
}

}  // namespace

at::Tensor sparse_reconstruct_forward_cpu(const at::Tensor& idx, const at::Tensor& val, const at::Tensor& V,
                                          const c10::optional<at::Tensor>& bias) {
  check_sparse_reconstruct_inputs(idx, val, V, c10::DeviceType::CPU);
  const int64_t P = idx.size(0), s = idx.size(1), K = V.size(0), C = V.size(1);
  at::Tensor b;
  if (bias.has_value()) {
    b = bias->contiguous();
    check_sparse_reconstruct_bias(b, V);
  }
  auto out = at::empty({P, C}, V.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, V.scalar_type(), "sparse_reconstruct_forward_cpu", [&] {
    forward_rows<scalar_t>(idx.data_ptr<int64_t>(), val.data_ptr<scalar_t>(), V.data_ptr<scalar_t>(),
                           b.defined() ? b.data_ptr<scalar_t>() : nullptr, out.data_ptr<scalar_t>(), P, s, K, C);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> sparse_reconstruct_backward_cpu(const at::Tensor& grad_out, const at::Tensor& idx,
                                                                   const at::Tensor& val, const at::Tensor& V,
                                                                   bool need_val, bool need_V) {
  check_sparse_reconstruct_inputs(idx, val, V, c10::DeviceType::CPU);
  auto grad = grad_out.to(V.scalar_type()).contiguous();
  const int64_t P = idx.size(0), s = idx.size(1), K = V.size(0), C = V.size(1);
  check_sparse_reconstruct_grad(grad, idx, V);
  auto grad_val = need_val ? at::empty_like(val) : at::zeros_like(val);
  auto grad_V = need_V ? at::empty_like(V) : at::zeros_like(V);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, V.scalar_type(), "sparse_reconstruct_backward_cpu", [&] {
    if (need_val)
      grad_val_rows<scalar_t>(grad.data_ptr<scalar_t>(), idx.data_ptr<int64_t>(), V.data_ptr<scalar_t>(),
                              grad_val.data_ptr<scalar_t>(), P, s, C);
    if (need_V)
      grad_V_rows<scalar_t>(grad.data_ptr<scalar_t>(), idx.data_ptr<int64_t>(), val.data_ptr<scalar_t>(),
                            grad_V.data_ptr<scalar_t>(), P, s, K, C);
  });
  return {grad_val, grad_V};
}

TORCH_LIBRARY_FRAGMENT(gig_fast_cpp, m) {
  m.def("sparse_reconstruct_forward(Tensor idx, Tensor val, Tensor V, Tensor? bias) -> Tensor",
        &sparse_reconstruct_forward_cpu);
  m.def("sparse_reconstruct_backward(Tensor grad_out, Tensor idx, Tensor val, Tensor V, bool need_val, bool need_V)"
        " -> (Tensor, Tensor)",
        &sparse_reconstruct_backward_cpu);
}

}  // namespace gig_fast
