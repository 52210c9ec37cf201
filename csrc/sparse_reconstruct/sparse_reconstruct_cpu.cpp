// CPU kernels of sparse_reconstruct (formulas in sparse_reconstruct.h). Rows are split across OpenMP
// threads with at::parallel_for; the channel loops are contiguous and vectorised with `omp simd`.
#include "sparse_reconstruct/sparse_reconstruct.h"

#include <ATen/Parallel.h>
#include <vector>

#include "common.h"

namespace gig_fast {
namespace {

void check_inputs(const at::Tensor& idx, const at::Tensor& val, const at::Tensor& V) {
  GIG_CHECK_CPU(idx); GIG_CHECK_CPU(val); GIG_CHECK_CPU(V);
  GIG_CHECK_CONTIGUOUS(idx); GIG_CHECK_CONTIGUOUS(val); GIG_CHECK_CONTIGUOUS(V);
  TORCH_CHECK(idx.scalar_type() == at::kLong, "idx must be int64");
  TORCH_CHECK(idx.dim() == 2 && val.sizes() == idx.sizes(), "idx and val must both be [P, s]");
  TORCH_CHECK(V.dim() == 2 && val.scalar_type() == V.scalar_type(), "V must be [K, C] with val's dtype");
}

// The forward keeps a block of kBlock output channels in registers while it sums the row's active
// entries into it, then stores the block once: out[p, c0:c0+kBlock] = bias + sum_i w_i * V[k_i, c0:...].
// The first version streamed the whole [C] row through an L1 scratch for every entry (a load, an add
// and a store per channel per entry) and lost to F.embedding_bag(per_sample_weights=...) (FBGEMM):
// 13.0 vs 5.4 ms at P=3136, K=8192, C=1024, s=30 and 5.2 vs 2.8 ms at P=12544, K=2048, C=256 (2 threads,
// this 2-core box). Register blocks of 64 floats (8 AVX2 registers) and a prefetch of the block of the
// entry kPrefetch ahead (the gathered rows are random: no hardware prefetcher can guess them) brought it
// ahead of embedding_bag (benchmarks/bench_sparse_reconstruct.py). Per channel the sum still runs
// bias, then the entries in (p, j) order, with no FMA contraction: the AVX2 and baseline builds agree bit
// for bit (tests/test_cpu_isa.py).
constexpr int64_t kBlock = 64;
constexpr int64_t kPrefetch = 4;

template <typename scalar_t>
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
    for (; c0 + kBlock <= C; c0 += kBlock) {
      acc block[kBlock];
#pragma omp simd
      for (int64_t c = 0; c < kBlock; ++c) block[c] = bias ? static_cast<acc>(bias[c0 + c]) : acc(0);
      for (int64_t i = 0; i < n; ++i) {
        if (i + kPrefetch < n) __builtin_prefetch(V + rows[i + kPrefetch] + c0);
        const scalar_t* v = V + rows[i] + c0;
        const acc w = weights[i];
#pragma omp simd
        for (int64_t c = 0; c < kBlock; ++c) block[c] += w * static_cast<acc>(v[c]);
      }
#pragma omp simd
      for (int64_t c = 0; c < kBlock; ++c) o[c0 + c] = static_cast<scalar_t>(block[c]);
    }
    for (int64_t c = c0; c < C; ++c) {  // the last C % kBlock channels
      acc sum = bias ? static_cast<acc>(bias[c]) : acc(0);
      for (int64_t i = 0; i < n; ++i) sum += weights[i] * static_cast<acc>(V[rows[i] + c]);
      o[c] = static_cast<scalar_t>(sum);
    }
  }
}

template <typename scalar_t>
GIG_TARGET_AVX2 void forward_range_avx2(int64_t begin, int64_t end, const int64_t* idx, const scalar_t* val,
                                        const scalar_t* V, const scalar_t* bias, scalar_t* out, int64_t s,
                                        int64_t C, int64_t* rows, acc_t<scalar_t>* weights) {
  forward_range(begin, end, idx, val, V, bias, out, s, C, rows, weights);
}

template <typename scalar_t>
void forward_rows(const int64_t* idx, const scalar_t* val, const scalar_t* V, const scalar_t* bias,
                  scalar_t* out, int64_t P, int64_t s, int64_t C) {
  using acc = acc_t<scalar_t>;
  const bool avx2 = cpu_has_avx2();
  at::parallel_for(0, P, 16, [&](int64_t begin, int64_t end) {
    std::vector<int64_t> rows(s);
    std::vector<acc> weights(s);
    if (avx2) {
      forward_range_avx2(begin, end, idx, val, V, bias, out, s, C, rows.data(), weights.data());
    } else {
      forward_range(begin, end, idx, val, V, bias, out, s, C, rows.data(), weights.data());
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
  check_inputs(idx, val, V);
  const int64_t P = idx.size(0), s = idx.size(1), C = V.size(1);
  at::Tensor b;
  if (bias.has_value()) {
    b = bias->contiguous();
    TORCH_CHECK(b.numel() == C && b.scalar_type() == V.scalar_type(), "bias must be [C] with V's dtype");
  }
  auto out = at::empty({P, C}, V.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, V.scalar_type(), "sparse_reconstruct_forward_cpu", [&] {
    forward_rows<scalar_t>(idx.data_ptr<int64_t>(), val.data_ptr<scalar_t>(), V.data_ptr<scalar_t>(),
                           b.defined() ? b.data_ptr<scalar_t>() : nullptr, out.data_ptr<scalar_t>(), P, s, C);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> sparse_reconstruct_backward_cpu(const at::Tensor& grad_out, const at::Tensor& idx,
                                                                   const at::Tensor& val, const at::Tensor& V,
                                                                   bool need_val, bool need_V) {
  check_inputs(idx, val, V);
  auto grad = grad_out.to(V.scalar_type()).contiguous();
  const int64_t P = idx.size(0), s = idx.size(1), K = V.size(0), C = V.size(1);
  TORCH_CHECK(grad.size(0) == P && grad.size(1) == C, "grad_out must be [P, C]");
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
