// CUDA kernel of gig_accumulate (formula in gig_accumulate.h).
//
// One block per position p. For each target t the block streams the m gradient rows grads[t, :, p, :]
// (threads across channels: coalesced, the only large read) and keeps their weighted sum g in shared
// memory; then each warp takes active code entries j of p and reduces <g, V[idx[p, j]]> with shuffles.
// The V rows of p are re-read for every t but stay in L2; grads is read exactly once.
#include "gig_accumulate/gig_accumulate.h"

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>

#include "common.h"

namespace gig_fast {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

template <typename scalar_t>
__global__ void gig_accumulate_kernel(const scalar_t* __restrict__ grads, const acc_t<scalar_t>* __restrict__ w,
                                      const int64_t* __restrict__ idx, const acc_t<scalar_t>* __restrict__ val,
                                      const acc_t<scalar_t>* __restrict__ V, acc_t<scalar_t>* __restrict__ out,
                                      int64_t T, int64_t m, int64_t P, int64_t s, int64_t C) {
  using acc = acc_t<scalar_t>;
  extern __shared__ unsigned char smem_raw[];
  acc* g = reinterpret_cast<acc*>(smem_raw);  // [C]
  const int64_t p = blockIdx.x;
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  for (int64_t t = 0; t < T; ++t) {
    for (int64_t c = threadIdx.x; c < C; c += kThreads) {
      acc sum = 0;
      const scalar_t* src = grads + ((t * m) * P + p) * C + c;
#pragma unroll 4
      for (int64_t k = 0; k < m; ++k) sum += w[k] * static_cast<acc>(src[k * P * C]);
      g[c] = sum;
    }
    __syncthreads();
    for (int64_t j = warp; j < s; j += kWarps) {
      const int64_t q = idx[p * s + j];
      acc dot = 0;
      if (q >= 0) {
        const acc* v = V + q * C;
        for (int64_t c = lane; c < C; c += 32) dot += g[c] * v[c];
      }
      for (int off = 16; off > 0; off /= 2) dot += __shfl_down_sync(0xffffffff, dot, off);
      if (lane == 0) out[(t * P + p) * s + j] = q >= 0 ? val[p * s + j] * dot : acc(0);
    }
    __syncthreads();  // g is overwritten by the next target
  }
}

}  // namespace

at::Tensor gig_accumulate_cuda(const at::Tensor& grads, const at::Tensor& weights, const at::Tensor& idx,
                               const at::Tensor& val, const at::Tensor& V) {
  check_gig_accumulate_inputs(grads, weights, idx, val, V, c10::DeviceType::CUDA);
  const int64_t T = grads.size(0), m = grads.size(1), P = grads.size(2), C = grads.size(3), s = idx.size(1);
  TORCH_CHECK(P < 2147483647LL, "P must be < 2^31 for the CUDA kernel");
  const c10::cuda::CUDAGuard guard(grads.device());
  const auto acc_type = grads.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  auto g = grads.contiguous();
  auto w = weights.to(acc_type).contiguous();
  auto vl = val.to(acc_type).contiguous();
  auto Vc = V.to(acc_type).contiguous();
  auto ix = idx.contiguous();
  auto out = at::empty({T, P, s}, grads.options().dtype(acc_type));
  if (out.numel() == 0) return out;
  const size_t smem = static_cast<size_t>(C) * (acc_type == at::kDouble ? sizeof(double) : sizeof(float));
  TORCH_CHECK(smem <= 48 * 1024, "gig_accumulate_cuda: C=", C, " is too large for one block's shared memory");
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grads.scalar_type(), "gig_accumulate_cuda", [&] {
    using acc = acc_t<scalar_t>;
    gig_accumulate_kernel<scalar_t><<<static_cast<unsigned>(P), kThreads, smem, stream>>>(
        g.data_ptr<scalar_t>(), w.data_ptr<acc>(), ix.data_ptr<int64_t>(), vl.data_ptr<acc>(), Vc.data_ptr<acc>(),
        out.data_ptr<acc>(), T, m, P, s, C);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

TORCH_LIBRARY_FRAGMENT(gig_fast_cuda, m) {
  m.def("gig_accumulate(Tensor grads, Tensor weights, Tensor idx, Tensor val, Tensor V) -> Tensor",
        &gig_accumulate_cuda);
}

}  // namespace gig_fast
