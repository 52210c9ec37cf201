// CPU kernels of sparse_reconstruct (formulas in sparse_reconstruct.h). Rows are split across OpenMP
// threads with at::parallel_for; the channel loops are contiguous and vectorised with `omp simd`.
#include "sparse_reconstruct/sparse_reconstruct.h"

#include <ATen/Parallel.h>
#include <vector>

#include "common.h"

namespace gig_fast {
namespace {

// Rows [begin, end) of the forward; `row` is a [C] scratch of the accumulation type.
template <typename scalar_t>
GIG_INLINE void forward_range(int64_t begin, int64_t end, const int64_t* idx, const scalar_t* val,
                              const scalar_t* V, const scalar_t* bias, scalar_t* out, int64_t s, int64_t C,
                              acc_t<scalar_t>* row) {
  using acc = acc_t<scalar_t>;
  for (int64_t p = begin; p < end; ++p) {
    for (int64_t c = 0; c < C; ++c) row[c] = bias ? static_cast<acc>(bias[c]) : acc(0);
    for (int64_t j = 0; j < s; ++j) {
      const int64_t k = idx[p * s + j];
      const acc w = static_cast<acc>(val[p * s + j]);
      if (k < 0 || w == acc(0)) continue;
      const scalar_t* v = V + k * C;
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) row[c] += w * static_cast<acc>(v[c]);
    }
    scalar_t* o = out + p * C;
    for (int64_t c = 0; c < C; ++c) o[c] = static_cast<scalar_t>(row[c]);
  }
}

template <typename scalar_t>
GIG_TARGET_AVX2 void forward_range_avx2(int64_t begin, int64_t end, const int64_t* idx, const scalar_t* val,
                                        const scalar_t* V, const scalar_t* bias, scalar_t* out, int64_t s,
                                        int64_t C, acc_t<scalar_t>* row) {
  forward_range(begin, end, idx, val, V, bias, out, s, C, row);
}

template <typename scalar_t>
void forward_rows(const int64_t* idx, const scalar_t* val, const scalar_t* V, const scalar_t* bias,
                  scalar_t* out, int64_t P, int64_t s, int64_t C) {
  using acc = acc_t<scalar_t>;
  const bool avx2 = cpu_has_avx2();
  at::parallel_for(0, P, 16, [&](int64_t begin, int64_t end) {
    std::vector<acc> row(C);
    if (avx2) {
      forward_range_avx2(begin, end, idx, val, V, bias, out, s, C, row.data());
    } else {
      forward_range(begin, end, idx, val, V, bias, out, s, C, row.data());
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
  const int64_t P = idx.size(0), s = idx.size(1), C = V.size(1);
  at::Tensor b;
  if (bias.has_value()) {
    b = bias->contiguous();
    check_sparse_reconstruct_bias(b, V);
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
