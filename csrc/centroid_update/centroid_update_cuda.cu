// CUDA kernels of centroid_update (formula in centroid_update.h); deterministic, no float atomics.
//
// few clusters (K <= kSmallK, e.g. the 2-means splits): a block per (chunk of kChunkRows rows, block of
//   channels); each thread owns one channel and adds the chunk's rows in order into its column of a
//   shared [K, threads] partial, written out as partial[chunk, k, c]. A second kernel adds the chunk
//   partials in chunk order. Every SM is busy even when all points fall into two clusters.
// many clusters: rows stably sorted by label (at::sort), then a block row per cluster sums its segment
//   in sorted order (like grad_V of sparse_reconstruct).
#include "centroid_update/centroid_update.h"

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>

#include "common.h"
#include <ATen/ops/arange.h>
#include <ATen/ops/bincount.h>
#include <ATen/ops/searchsorted.h>
#include <ATen/ops/sort.h>

namespace gig_fast {
namespace {

constexpr int kThreads = 128;
constexpr int kSmallK = 16;
constexpr int64_t kChunkRows = 512;

template <typename scalar_t>
__global__ void chunk_partials_kernel(const scalar_t* __restrict__ X, const int64_t* __restrict__ labels,
                                      acc_t<scalar_t>* __restrict__ partial, int64_t N, int64_t C, int64_t K) {
  using acc = acc_t<scalar_t>;
  extern __shared__ unsigned char smem_raw[];
  acc* part = reinterpret_cast<acc*>(smem_raw);  // [K, blockDim.x]
  const int64_t chunk = blockIdx.x;
  const int64_t c = static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x;
  for (int64_t k = 0; k < K; ++k) part[k * blockDim.x + threadIdx.x] = acc(0);
  const int64_t lo = chunk * kChunkRows, hi = min(N, lo + kChunkRows);
  if (c < C) {
    for (int64_t n = lo; n < hi; ++n) part[labels[n] * blockDim.x + threadIdx.x] += static_cast<acc>(X[n * C + c]);
    for (int64_t k = 0; k < K; ++k) partial[(chunk * K + k) * C + c] = part[k * blockDim.x + threadIdx.x];
  }
}

template <typename acc>
__global__ void reduce_chunks_kernel(const acc* __restrict__ partial, acc* __restrict__ sums, int64_t chunks,
                                     int64_t total) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= total) return;
  acc s = 0;
  for (int64_t ch = 0; ch < chunks; ++ch) s += partial[ch * total + i];
  sums[i] = s;
}

template <typename scalar_t>
__global__ void segment_sum_kernel(const scalar_t* __restrict__ X, const int64_t* __restrict__ order,
                                   const int64_t* __restrict__ start, acc_t<scalar_t>* __restrict__ sums, int64_t C) {
  using acc = acc_t<scalar_t>;
  const int64_t k = blockIdx.x;
  const int64_t c = static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x;
  if (c >= C) return;
  acc s = 0;
  for (int64_t i = start[k]; i < start[k + 1]; ++i) s += static_cast<acc>(X[order[i] * C + c]);
  sums[k * C + c] = s;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> centroid_update_cuda(const at::Tensor& X, const at::Tensor& labels, int64_t K) {
  check_centroid_update_inputs(X, labels, K, c10::DeviceType::CUDA);
  const c10::cuda::CUDAGuard guard(X.device());
  const int64_t N = X.size(0), C = X.size(1);
  const auto acc_type = X.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  auto counts = at::bincount(labels, {}, K);
  auto sums = at::zeros({K, C}, X.options().dtype(acc_type));
  if (N == 0 || C == 0) return {sums, counts};
  auto stream = c10::cuda::getCurrentCUDAStream();
  const unsigned cblocks = static_cast<unsigned>((C + kThreads - 1) / kThreads);
  if (K <= kSmallK) {
    const int64_t chunks = (N + kChunkRows - 1) / kChunkRows;
    auto partial = at::empty({chunks, K, C}, sums.options());
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, X.scalar_type(), "centroid_update_cuda", [&] {
      using acc = acc_t<scalar_t>;
      const size_t smem = static_cast<size_t>(K) * kThreads * sizeof(acc);
      chunk_partials_kernel<scalar_t><<<dim3(static_cast<unsigned>(chunks), cblocks), kThreads, smem, stream>>>(
          X.data_ptr<scalar_t>(), labels.data_ptr<int64_t>(), partial.data_ptr<acc>(), N, C, K);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      const int64_t total = K * C;
      reduce_chunks_kernel<acc><<<static_cast<unsigned>((total + 255) / 256), 256, 0, stream>>>(
          partial.data_ptr<acc>(), sums.data_ptr<acc>(), chunks, total);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    return {sums, counts};
  }
  auto sorted = at::sort(labels, /*stable=*/true, /*dim=*/0, /*descending=*/false);
  auto keys = std::get<0>(sorted);
  auto order = std::get<1>(sorted);
  auto start = at::searchsorted(keys, at::arange(K + 1, labels.options()));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, X.scalar_type(), "centroid_update_cuda", [&] {
    using acc = acc_t<scalar_t>;
    segment_sum_kernel<scalar_t><<<dim3(static_cast<unsigned>(K), cblocks), kThreads, 0, stream>>>(
        X.data_ptr<scalar_t>(), order.data_ptr<int64_t>(), start.data_ptr<int64_t>(), sums.data_ptr<acc>(), C);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {sums, counts};
}

TORCH_LIBRARY_FRAGMENT(gig_fast_cuda, m) {
  m.def("centroid_update(Tensor X, Tensor labels, int K) -> (Tensor, Tensor)", &centroid_update_cuda);
}

}  // namespace gig_fast
