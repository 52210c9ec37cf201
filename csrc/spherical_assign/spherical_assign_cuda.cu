// CUDA kernel of spherical_assign (formula in spherical_assign.h): a plain tiled GEMM in the
// accumulation precision (fp32; fp64 for fp64 inputs) with the argmax fused into its epilogue.
//
// A block owns kBM = 64 rows and walks all centroids in tiles of kBN = 64; X and centroid tiles of
// kBK = 16 channels are staged in shared memory and each of the 16x16 threads accumulates a 4x4
// sub-tile (rows ty + 16 i, centroids tx + 16 j). After each centroid tile, every thread folds its
// 4 scores per row into a running (best, label); at the end the 16 threads sharing a row reduce
// theirs through shared memory. Scores are dot * (1/|x|) * (1/|c|), so no normalised copy of X is
// made, and nothing N x K is ever stored. Ties go to the smaller k (equal scores compare indices).
// The faster low-precision path on the GPU is the Triton backend (bf16 tensor cores + fp32 re-score).
#include "spherical_assign/spherical_assign.h"

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>

#include "common.h"
#include <ATen/ops/linalg_vector_norm.h>

namespace gig_fast {
namespace {

constexpr int kBM = 64, kBN = 64, kBK = 16, kTY = 16, kTX = 16;

template <typename acc>
__device__ __forceinline__ bool better(acc s, int64_t k, acc best, int64_t arg) {
  return s > best || (s == best && k < arg);
}

template <typename scalar_t>
__global__ void assign_kernel(const scalar_t* __restrict__ X, const scalar_t* __restrict__ Cm,
                              const acc_t<scalar_t>* __restrict__ xinv, const acc_t<scalar_t>* __restrict__ cinv,
                              int64_t* __restrict__ labels, acc_t<scalar_t>* __restrict__ best_out,
                              int64_t N, int64_t K, int64_t C) {
  using acc = acc_t<scalar_t>;
  __shared__ acc xs[kBK][kBM + 1];
  __shared__ acc cs[kBK][kBN + 1];
  __shared__ acc red_v[kTX][kBM];
  __shared__ int64_t red_i[kTX][kBM];
  const int tx = threadIdx.x % kTX, ty = threadIdx.x / kTX;
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * kBM;
  acc best[4];
  int64_t arg[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) { best[i] = -INFINITY; arg[i] = K; }
  for (int64_t n0 = 0; n0 < K; n0 += kBN) {
    acc sum[4][4] = {};
    for (int64_t c0 = 0; c0 < C; c0 += kBK) {
      for (int e = threadIdx.x; e < kBM * kBK; e += blockDim.x) {
        const int r = e / kBK, kk = e % kBK;
        const int64_t row = m0 + r, col = n0 + r, c = c0 + kk;
        xs[kk][r] = (row < N && c < C) ? static_cast<acc>(X[row * C + c]) : acc(0);
        cs[kk][r] = (col < K && c < C) ? static_cast<acc>(Cm[col * C + c]) : acc(0);
      }
      __syncthreads();
#pragma unroll
      for (int kk = 0; kk < kBK; ++kk) {
        acc a[4], b[4];
#pragma unroll
        for (int i = 0; i < 4; ++i) { a[i] = xs[kk][ty + kTY * i]; b[i] = cs[kk][tx + kTX * i]; }
#pragma unroll
        for (int i = 0; i < 4; ++i)
#pragma unroll
          for (int j = 0; j < 4; ++j) sum[i][j] += a[i] * b[j];
      }
      __syncthreads();
    }
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int64_t row = m0 + ty + kTY * i;
      const acc xi = row < N ? xinv[row] : acc(0);
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int64_t k = n0 + tx + kTX * j;
        if (k < K) {
          const acc s = sum[i][j] * xi * cinv[k];
          if (better(s, k, best[i], arg[i])) { best[i] = s; arg[i] = k; }
        }
      }
    }
  }
#pragma unroll
  for (int i = 0; i < 4; ++i) { red_v[tx][ty + kTY * i] = best[i]; red_i[tx][ty + kTY * i] = arg[i]; }
  __syncthreads();
  if (threadIdx.x < kBM) {
    const int r = threadIdx.x;
    acc b = red_v[0][r];
    int64_t a = red_i[0][r];
    for (int t = 1; t < kTX; ++t)
      if (better(red_v[t][r], red_i[t][r], b, a)) { b = red_v[t][r]; a = red_i[t][r]; }
    const int64_t row = m0 + r;
    if (row < N) { labels[row] = a; best_out[row] = b; }
  }
}

at::Tensor inverse_norms(const at::Tensor& t, at::ScalarType acc_type) {
  return at::linalg_vector_norm(t, 2, at::IntArrayRef{1}, false, acc_type).clamp_min(1e-12).reciprocal().contiguous();
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> spherical_assign_cuda(const at::Tensor& X_in, const at::Tensor& centroids_in) {
  check_spherical_assign_inputs(X_in, centroids_in, c10::DeviceType::CUDA);
  const c10::cuda::CUDAGuard guard(X_in.device());
  // scale-free: rows of extreme scale are brought into range first (see spherical_assign.h)
  const at::Tensor X = scale_extreme_rows(X_in), centroids = scale_extreme_rows(centroids_in);
  const int64_t N = X.size(0), C = X.size(1), K = centroids.size(0);
  const auto acc_type = X.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  auto labels = at::empty({N}, X.options().dtype(at::kLong));
  auto best = at::empty({N}, X.options().dtype(acc_type));
  if (N == 0) return {labels, best};
  auto xinv = inverse_norms(X, acc_type);
  auto cinv = inverse_norms(centroids, acc_type);
  const unsigned blocks = static_cast<unsigned>((N + kBM - 1) / kBM);
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, X.scalar_type(), "spherical_assign_cuda", [&] {
    using acc = acc_t<scalar_t>;
    assign_kernel<scalar_t><<<blocks, kTX * kTY, 0, stream>>>(
        X.data_ptr<scalar_t>(), centroids.data_ptr<scalar_t>(), xinv.data_ptr<acc>(), cinv.data_ptr<acc>(),
        labels.data_ptr<int64_t>(), best.data_ptr<acc>(), N, K, C);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {labels, best};
}

TORCH_LIBRARY_FRAGMENT(gig_fast_cuda, m) {
  m.def("spherical_assign(Tensor X, Tensor centroids) -> (Tensor, Tensor)", &spherical_assign_cuda);
}

}  // namespace gig_fast
