// centroid_update: the update step of (spherical) k-means (docs/design.md §1.3, §3).
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

#include "common.h"

namespace gig_fast {

// Host checks shared by the CPU and CUDA entry points (`dev`: where the tensors must be): only what would
// otherwise crash a kernel; the Python op validates everything else with named ValueErrors.
inline void check_centroid_update_inputs(const at::Tensor& X, const at::Tensor& labels, int64_t K, c10::DeviceType dev) {
  GIG_CHECK_DEVICE(X, dev); GIG_CHECK_DEVICE(labels, dev);
  GIG_CHECK_CONTIGUOUS(X); GIG_CHECK_CONTIGUOUS(labels);
  TORCH_CHECK(X.dim() == 2 && labels.dim() == 1 && labels.size(0) == X.size(0), "X must be [N, C], labels [N]");
  TORCH_CHECK(labels.scalar_type() == at::kLong, "labels must be int64");
  TORCH_CHECK(K >= 1, "K must be >= 1");
}


std::tuple<at::Tensor, at::Tensor> centroid_update_cpu(const at::Tensor& X, const at::Tensor& labels, int64_t K);
std::tuple<at::Tensor, at::Tensor> centroid_update_cuda(const at::Tensor& X, const at::Tensor& labels, int64_t K);

}  // namespace gig_fast
