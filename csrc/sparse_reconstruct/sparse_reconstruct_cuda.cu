// CUDA kernels of sparse_reconstruct (formulas in sparse_reconstruct.h).
//
// forward:  one block row per position p, threads across channels; the codes of p are staged in
//           shared memory and each thread streams the s concept rows it needs (coalesced in c).
// grad_val: one warp per code entry (p, j), a dot product over C reduced with shuffles.
// grad_V:   entries sorted by concept (stable), then one block row per concept sums its segment in
//           sorted order: deterministic, no atomics.
#include "sparse_reconstruct/sparse_reconstruct.h"

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>

#include "common.h"

namespace gig_fast {
namespace {

constexpr int kThreads = 256;
constexpr int kCodeTile = 128;

template <typename scalar_t>
__global__ void forward_kernel(const int64_t* __restrict__ idx, const scalar_t* __restrict__ val,
                               const scalar_t* __restrict__ V, const scalar_t* __restrict__ bias,
                               scalar_t* __restrict__ out, int64_t s, int64_t C) {
  using acc = acc_t<scalar_t>;
  __shared__ int64_t s_idx[kCodeTile];
  __shared__ acc s_val[kCodeTile];
  const int64_t p = blockIdx.x;
  const int64_t c = static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x;
  acc sum = (bias != nullptr && c < C) ? static_cast<acc>(bias[c]) : acc(0);
  for (int64_t j0 = 0; j0 < s; j0 += kCodeTile) {
    const int64_t n = min(static_cast<int64_t>(kCodeTile), s - j0);
    __syncthreads();
    for (int64_t t = threadIdx.x; t < n; t += blockDim.x) {
      s_idx[t] = idx[p * s + j0 + t];
      s_val[t] = static_cast<acc>(val[p * s + j0 + t]);
    }
    __syncthreads();
    if (c < C) {
      for (int64_t t = 0; t < n; ++t) {
        const int64_t k = s_idx[t];
        if (k >= 0) sum += s_val[t] * static_cast<acc>(V[k * C + c]);
      }
    }
  }
  if (c < C) out[p * C + c] = static_cast<scalar_t>(sum);
}

template <typename scalar_t>
__global__ void grad_val_kernel(const scalar_t* __restrict__ grad, const int64_t* __restrict__ idx,
                                const scalar_t* __restrict__ V, scalar_t* __restrict__ grad_val,
                                int64_t E, int64_t s, int64_t C) {
  using acc = acc_t<scalar_t>;
  const int64_t e = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
  const int lane = threadIdx.x % 32;
  if (e >= E) return;
  const int64_t k = idx[e];
  acc dot = 0;
  if (k >= 0) {
    const scalar_t* g = grad + (e / s) * C;
    const scalar_t* v = V + k * C;
    for (int64_t c = lane; c < C; c += 32) dot += static_cast<acc>(g[c]) * static_cast<acc>(v[c]);
  }
  for (int off = 16; off > 0; off /= 2) dot += __shfl_down_sync(0xffffffff, dot, off);
  if (lane == 0) grad_val[e] = static_cast<scalar_t>(dot);
}

template <typename scalar_t>
__global__ void grad_V_kernel(const scalar_t* __restrict__ grad, const scalar_t* __restrict__ val,
                              const int64_t* __restrict__ order, const int64_t* __restrict__ start,
                              scalar_t* __restrict__ grad_V, int64_t s, int64_t C) {
  using acc = acc_t<scalar_t>;
  const int64_t k = blockIdx.x;
  const int64_t c = static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x;
  if (c >= C) return;
  acc sum = 0;
  for (int64_t i = start[k]; i < start[k + 1]; ++i) {
    const int64_t e = order[i];
    sum += static_cast<acc>(val[e]) * static_cast<acc>(grad[(e / s) * C + c]);
  }
  grad_V[k * C + c] = static_cast<scalar_t>(sum);
}

void check_inputs(const at::Tensor& idx, const at::Tensor& val, const at::Tensor& V) {
  GIG_CHECK_CUDA(idx); GIG_CHECK_CUDA(val); GIG_CHECK_CUDA(V);
  GIG_CHECK_CONTIGUOUS(idx); GIG_CHECK_CONTIGUOUS(val); GIG_CHECK_CONTIGUOUS(V);
  TORCH_CHECK(idx.scalar_type() == at::kLong, "idx must be int64");
  TORCH_CHECK(idx.dim() == 2 && val.sizes() == idx.sizes(), "idx and val must both be [P, s]");
  TORCH_CHECK(V.dim() == 2 && val.scalar_type() == V.scalar_type(), "V must be [K, C] with val's dtype");
  TORCH_CHECK(idx.size(0) < 2147483647LL, "P must be < 2^31 for the CUDA kernels");
}

}  // namespace

at::Tensor sparse_reconstruct_forward_cuda(const at::Tensor& idx, const at::Tensor& val, const at::Tensor& V,
                                           const c10::optional<at::Tensor>& bias) {
  check_inputs(idx, val, V);
  const c10::cuda::CUDAGuard guard(V.device());
  const int64_t P = idx.size(0), s = idx.size(1), C = V.size(1);
  at::Tensor b;
  if (bias.has_value()) {
    b = bias->contiguous();
    TORCH_CHECK(b.numel() == C && b.scalar_type() == V.scalar_type(), "bias must be [C] with V's dtype");
  }
  auto out = at::empty({P, C}, V.options());
  if (P == 0 || C == 0) return out;
  const dim3 grid(static_cast<unsigned>(P), static_cast<unsigned>((C + kThreads - 1) / kThreads));
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, V.scalar_type(), "sparse_reconstruct_forward_cuda", [&] {
    forward_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(
        idx.data_ptr<int64_t>(), val.data_ptr<scalar_t>(), V.data_ptr<scalar_t>(),
        b.defined() ? b.data_ptr<scalar_t>() : nullptr, out.data_ptr<scalar_t>(), s, C);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

std::tuple<at::Tensor, at::Tensor> sparse_reconstruct_backward_cuda(const at::Tensor& grad_out, const at::Tensor& idx,
                                                                    const at::Tensor& val, const at::Tensor& V,
                                                                    bool need_val, bool need_V) {
  check_inputs(idx, val, V);
  const c10::cuda::CUDAGuard guard(V.device());
  auto grad = grad_out.to(V.scalar_type()).contiguous();
  const int64_t P = idx.size(0), s = idx.size(1), K = V.size(0), C = V.size(1);
  TORCH_CHECK(grad.size(0) == P && grad.size(1) == C, "grad_out must be [P, C]");
  auto grad_val = need_val ? at::empty_like(val) : at::zeros_like(val);
  auto grad_V = need_V ? at::empty_like(V) : at::zeros_like(V);
  auto stream = c10::cuda::getCurrentCUDAStream();
  const int64_t E = P * s;
  if (E == 0 || C == 0) return {grad_val.zero_(), grad_V.zero_()};
  if (need_val) {
    const int64_t blocks = (E * 32 + kThreads - 1) / kThreads;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, V.scalar_type(), "sparse_reconstruct_grad_val_cuda", [&] {
      grad_val_kernel<scalar_t><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
          grad.data_ptr<scalar_t>(), idx.data_ptr<int64_t>(), V.data_ptr<scalar_t>(), grad_val.data_ptr<scalar_t>(),
          E, s, C);
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  if (need_V && K > 0) {
    // Stable sort of the flat entries by concept; padding (-1) sorts first and lies before start[0].
    auto sorted = at::sort(idx.reshape({-1}), /*stable=*/true, /*dim=*/0, /*descending=*/false);
    auto keys = std::get<0>(sorted);
    auto order = std::get<1>(sorted);
    auto bounds = at::arange(K + 1, idx.options());
    auto start = at::searchsorted(keys, bounds);  // start[k] = first sorted position with key >= k
    const dim3 grid(static_cast<unsigned>(K), static_cast<unsigned>((C + kThreads - 1) / kThreads));
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, V.scalar_type(), "sparse_reconstruct_grad_V_cuda", [&] {
      grad_V_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(
          grad.data_ptr<scalar_t>(), val.data_ptr<scalar_t>(), order.data_ptr<int64_t>(),
          start.data_ptr<int64_t>(), grad_V.data_ptr<scalar_t>(), s, C);
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return {grad_val, grad_V};
}

TORCH_LIBRARY_FRAGMENT(gig_fast_cuda, m) {
  m.def("sparse_reconstruct_forward(Tensor idx, Tensor val, Tensor V, Tensor? bias) -> Tensor",
        &sparse_reconstruct_forward_cuda);
  m.def("sparse_reconstruct_backward(Tensor grad_out, Tensor idx, Tensor val, Tensor V, bool need_val, bool need_V)"
        " -> (Tensor, Tensor)",
        &sparse_reconstruct_backward_cuda);
}

}  // namespace gig_fast
