// spherical_assign: the assignment step of spherical k-means (docs/design.md §1.3, §3).
//
//   labels[n] = argmax_k  <X[n], centroids[k]> / (|X[n]| |centroids[k]|)        ties -> smaller k
//   best[n]   = that maximal cosine
//
// Shapes: X [N, C], centroids [K, C] (same float dtype: fp32/fp64/fp16/bf16), labels int64 [N],
// best [N] in the accumulation dtype (fp32; fp64 for fp64 inputs). A zero row (point or centroid) is
// kept at zero after normalisation, so it scores cosine 0 (an all-zero point goes to centroid 0).
// The N x K score matrix is never materialised: rows are processed in blocks, centroids in tiles, and
// each row keeps a running (best, label) that later tiles only replace on a strictly larger score.
// Inputs are validated in Python (gig_fast.ops); the host code re-checks only what would crash.
#pragma once
#include <ATen/core/Tensor.h>
#include <cmath>
#include <limits>
#include <tuple>

#include "common.h"

namespace gig_fast {

// Host checks shared by the CPU and CUDA entry points (`dev`: where the tensors must be): only what would
// otherwise crash a kernel; the Python op validates everything else with named ValueErrors.
inline void check_spherical_assign_inputs(const at::Tensor& X, const at::Tensor& centroids, c10::DeviceType dev) {
  GIG_CHECK_DEVICE(X, dev); GIG_CHECK_DEVICE(centroids, dev);
  GIG_CHECK_CONTIGUOUS(X); GIG_CHECK_CONTIGUOUS(centroids);
  TORCH_CHECK(X.dim() == 2 && centroids.dim() == 2 && X.size(1) == centroids.size(1),
              "X must be [N, C] and centroids [K, C]");
  TORCH_CHECK(X.scalar_type() == centroids.scalar_type(), "X and centroids must share a dtype");
  TORCH_CHECK(centroids.size(0) > 0, "centroids is empty (K = 0)");
}

// Cosine is scale-free, but the squares of an fp32 row with entries >~ 1e19 overflow (its norm becomes inf
// and every cosine 0) and those of a denormal row underflow. Rows whose largest |entry| lies outside
// [2^-30, 2^30] are therefore first scaled by the power of two that brings it into [0.5, 1): exact, so every
// other row scores bit for bit as before. The reference does the same (scale_extreme_rows in
// gig_fast/ops/reference.py). One read of t and one host sync; a copy only when some row needs it. The
// CUDA host applies it to X and the centroids; the CPU kernels apply it to the centroids here and to
// each row of X as they read it (rescale_if_extreme in spherical_assign_cpu.cpp: no second pass over X).
inline at::Tensor scale_extreme_rows(const at::Tensor& t) {
  if (t.numel() == 0) return t;
  const double bound = std::ldexp(1.0, 30);
  const auto m = t.norm(std::numeric_limits<double>::infinity(), at::IntArrayRef{1}).to(at::kDouble);
  const auto bad = m.gt(bound).logical_or(m.lt(1.0 / bound).logical_and(m.gt(0.0)));
  if (!bad.any().item<bool>()) return t;
  const auto rows = bad.nonzero().squeeze(1);
  const auto e = std::get<1>(m.index_select(0, rows).frexp()).to(at::kDouble).unsqueeze(1);  // m = f·2^e
  const auto half = e.neg().div(2.0).floor();  // two factors: 2^±1074 (a float64 denormal) overflows one
  const auto scaled = t.index_select(0, rows).to(at::kDouble).mul(half.exp2()).mul(e.neg().sub(half).exp2());
  return t.clone().index_copy_(0, rows, scaled.to(t.scalar_type()));
}

std::tuple<at::Tensor, at::Tensor> spherical_assign_cpu(const at::Tensor& X, const at::Tensor& centroids);
std::tuple<at::Tensor, at::Tensor> spherical_assign_cuda(const at::Tensor& X, const at::Tensor& centroids);

}  // namespace gig_fast
