// spherical_assign: the assignment step of spherical k-means (DESIGN.md §1.3, §3).
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
#include <tuple>

namespace gig_fast {

std::tuple<at::Tensor, at::Tensor> spherical_assign_cpu(const at::Tensor& X, const at::Tensor& centroids);
std::tuple<at::Tensor, at::Tensor> spherical_assign_cuda(const at::Tensor& X, const at::Tensor& centroids);

}  // namespace gig_fast
