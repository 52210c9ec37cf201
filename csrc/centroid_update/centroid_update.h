// centroid_update: the update step of (spherical) k-means (DESIGN.md §1.3, §3).
//
//   sums[k, c] = sum_{n : labels[n] = k} X[n, c]          counts[k] = #{n : labels[n] = k}
//
// Shapes: X [N, C] (fp32/fp64/fp16/bf16), labels int64 [N] in [0, K), sums [K, C] in the accumulation
// dtype (fp32; fp64 for fp64 X), counts int64 [K]. Deterministic: the summation order depends only on
// (N, K, C) and the data, never on the number of threads or on scheduling (no float atomics).
// Inputs (label range included) are validated in Python (gig_fast.ops); the host code re-checks
// what would otherwise crash.
#pragma once
#include <ATen/core/Tensor.h>
#include <tuple>

namespace gig_fast {

std::tuple<at::Tensor, at::Tensor> centroid_update_cpu(const at::Tensor& X, const at::Tensor& labels, int64_t K);
std::tuple<at::Tensor, at::Tensor> centroid_update_cuda(const at::Tensor& X, const at::Tensor& labels, int64_t K);

}  // namespace gig_fast
