// CUDA kernels of sparse_reconstruct (formulas in sparse_reconstruct.h).
//
// Layout shared by the three kernels: a block is TPR x RPB threads; the TPR threads of a row each own
// VEC consecutive channels (16-byte vector loads/stores where C and the pointers allow, else VEC = 1),
// so one block covers TPR*VEC channels of RPB rows; wider C uses more blocks along grid.y.
//
// forward:  the codes of each row are staged in shared memory a tile at a time; every thread streams
//           the concept rows it needs (coalesced 16-byte loads, mostly L2 hits) into VEC accumulators.
// grad_val: the same row layout holds grad_out[p] in registers; for each code entry a partial dot
//           product per thread, reduced across the row's threads (shuffles + shared memory).
// grad_V:   entries stably sorted by concept (torch.sort), then one block per concept sums its segment
//           in sorted order: deterministic, no atomics.
#include "sparse_reconstruct/sparse_reconstruct.h"

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "common.h"
#include <ATen/ops/arange.h>
#include <ATen/ops/searchsorted.h>
#include <ATen/ops/sort.h>

namespace gig_fast {
namespace {

constexpr int kBlockThreads = 256;
constexpr int kCodeTile = 64;   // code entries per row staged in shared memory at once
constexpr int kDotTile = 8;     // code entries whose dot products are reduced together

template <typename scalar_t, int VEC>
struct alignas(sizeof(scalar_t) * VEC) Pack {
  scalar_t v[VEC];
};

struct RowLayout {
  int vec;       // elements per thread-load
  int tpr;       // threads per row (a multiple of 32)
  int rpb;       // rows per block
  int chunks;    // blocks along the channel axis
};

RowLayout row_layout(int64_t C, int vec) {
  const int64_t vectors = (C + vec - 1) / vec;
  int tpr = static_cast<int>(std::min<int64_t>(((vectors + 31) / 32) * 32, kBlockThreads));
  RowLayout l;
  l.vec = vec;
  l.tpr = tpr;
  l.rpb = kBlockThreads / tpr;
  l.chunks = static_cast<int>((vectors + tpr - 1) / tpr);
  return l;
}

template <typename scalar_t>
int pick_vec(int64_t C, std::initializer_list<const void*> ptrs) {
  constexpr int vec = 16 / sizeof(scalar_t);
  if (C % vec != 0) return 1;
  for (const void* p : ptrs)
    if (p != nullptr && reinterpret_cast<uintptr_t>(p) % 16 != 0) return 1;
  return vec;
}

template <typename scalar_t, int VEC>
__device__ __forceinline__ void load_pack(const scalar_t* ptr, int64_t c, int64_t C, acc_t<scalar_t> (&x)[VEC]) {
  if (VEC > 1 && c + VEC <= C) {
    const Pack<scalar_t, VEC> pk = *reinterpret_cast<const Pack<scalar_t, VEC>*>(ptr + c);
#pragma unroll
    for (int i = 0; i < VEC; ++i) x[i] = static_cast<acc_t<scalar_t>>(pk.v[i]);
  } else {
#pragma unroll
    for (int i = 0; i < VEC; ++i) x[i] = (c + i < C) ? static_cast<acc_t<scalar_t>>(ptr[c + i]) : acc_t<scalar_t>(0);
  }
}

template <typename scalar_t, int VEC>
__device__ __forceinline__ void store_pack(scalar_t* ptr, int64_t c, int64_t C, const acc_t<scalar_t> (&x)[VEC]) {
  if (VEC > 1 && c + VEC <= C) {
    Pack<scalar_t, VEC> pk;
#pragma unroll
    for (int i = 0; i < VEC; ++i) pk.v[i] = static_cast<scalar_t>(x[i]);
    *reinterpret_cast<Pack<scalar_t, VEC>*>(ptr + c) = pk;
  } else {
#pragma unroll
    for (int i = 0; i < VEC; ++i)
      if (c + i < C) ptr[c + i] = static_cast<scalar_t>(x[i]);
  }
}

template <typename scalar_t, int VEC>
__global__ void forward_kernel(const int64_t* __restrict__ idx, const scalar_t* __restrict__ val,
                               const scalar_t* __restrict__ V, const scalar_t* __restrict__ bias,
                               scalar_t* __restrict__ out, int64_t P, int64_t s, int64_t C) {
  using acc = acc_t<scalar_t>;
  extern __shared__ unsigned char smem_raw[];
  int64_t* s_idx = reinterpret_cast<int64_t*>(smem_raw);                      // [rpb][kCodeTile]
  acc* s_val = reinterpret_cast<acc*>(s_idx + blockDim.y * kCodeTile);      // [rpb][kCodeTile]
  const int64_t p = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y;
  const int64_t c = (static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x) * VEC;
  const bool row_ok = p < P;
  acc sum[VEC];
  if (bias != nullptr) {
    load_pack<scalar_t, VEC>(bias, c, C, sum);
  } else {
#pragma unroll
    for (int i = 0; i < VEC; ++i) sum[i] = acc(0);
  }
  int64_t* my_idx = s_idx + threadIdx.y * kCodeTile;
  acc* my_val = s_val + threadIdx.y * kCodeTile;
  for (int64_t j0 = 0; j0 < s; j0 += kCodeTile) {
    const int n = static_cast<int>(min(static_cast<int64_t>(kCodeTile), s - j0));
    __syncthreads();
    for (int t = threadIdx.x; t < n; t += blockDim.x) {
      my_idx[t] = row_ok ? idx[p * s + j0 + t] : -1;
      my_val[t] = row_ok ? static_cast<acc>(val[p * s + j0 + t]) : acc(0);
    }
    __syncthreads();
    if (row_ok && c < C) {
#pragma unroll 4
      for (int t = 0; t < n; ++t) {
        const int64_t k = my_idx[t];
        if (k < 0) continue;
        acc v[VEC];
        load_pack<scalar_t, VEC>(V + k * C, c, C, v);
        const acc w = my_val[t];
#pragma unroll
        for (int i = 0; i < VEC; ++i) sum[i] += w * v[i];
      }
    }
  }
  if (row_ok && c < C) store_pack<scalar_t, VEC>(out + p * C, c, C, sum);
}

// grad_val[p, j] = <grad[p], V[idx[p, j]]>. The row's TPR threads each hold VEC channels of grad[p]
// (one channel chunk per blockIdx.y); each chunk writes its partial dot products to `partial`
// [chunks, P, s], which the host sums over chunks in a fixed order (deterministic).
template <typename scalar_t, int VEC>
__global__ void grad_val_kernel(const scalar_t* __restrict__ grad, const int64_t* __restrict__ idx,
                                const scalar_t* __restrict__ V, acc_t<scalar_t>* __restrict__ partial,
                                int64_t P, int64_t s, int64_t C) {
  using acc = acc_t<scalar_t>;
  __shared__ acc s_red[kBlockThreads / 32][kDotTile];
  const int64_t p = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y;
  const int64_t c = (static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x) * VEC;
  const bool row_ok = p < P;
  const int lane = threadIdx.x % 32;
  const int warp_in_row = threadIdx.x / 32;
  const int warps_per_row = blockDim.x / 32;
  const int warp_id = threadIdx.y * warps_per_row + warp_in_row;
  acc g[VEC];
  if (row_ok) {
    load_pack<scalar_t, VEC>(grad + p * C, c, C, g);
  } else {
#pragma unroll
    for (int i = 0; i < VEC; ++i) g[i] = acc(0);
  }
  for (int64_t j0 = 0; j0 < s; j0 += kDotTile) {
    acc dots[kDotTile];
#pragma unroll
    for (int t = 0; t < kDotTile; ++t) {
      dots[t] = acc(0);
      const int64_t j = j0 + t;
      const int64_t k = (row_ok && j < s) ? idx[p * s + j] : -1;
      if (k >= 0 && c < C) {
        acc v[VEC];
        load_pack<scalar_t, VEC>(V + k * C, c, C, v);
#pragma unroll
        for (int i = 0; i < VEC; ++i) dots[t] += g[i] * v[i];
      }
#pragma unroll
      for (int off = 16; off > 0; off /= 2) dots[t] += __shfl_down_sync(0xffffffff, dots[t], off);
    }
    __syncthreads();
    if (lane == 0) {
#pragma unroll
      for (int t = 0; t < kDotTile; ++t) s_red[warp_id][t] = dots[t];
    }
    __syncthreads();
    if (row_ok && threadIdx.x < kDotTile && j0 + threadIdx.x < s) {
      acc total = 0;
      for (int w = 0; w < warps_per_row; ++w) total += s_red[threadIdx.y * warps_per_row + w][threadIdx.x];
      partial[(static_cast<int64_t>(blockIdx.y) * P + p) * s + j0 + threadIdx.x] = total;
    }
  }
}

template <typename scalar_t, int VEC>
__global__ void grad_V_kernel(const scalar_t* __restrict__ grad, const scalar_t* __restrict__ val,
                              const int64_t* __restrict__ order, const int64_t* __restrict__ start,
                              scalar_t* __restrict__ grad_V, int64_t K, int64_t s, int64_t C) {
  using acc = acc_t<scalar_t>;
  const int64_t k = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y;
  const int64_t c = (static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x) * VEC;
  if (k >= K || c >= C) return;
  acc sum[VEC];
#pragma unroll
  for (int i = 0; i < VEC; ++i) sum[i] = acc(0);
  const int64_t hi = start[k + 1];
#pragma unroll 2
  for (int64_t i = start[k]; i < hi; ++i) {
    const int64_t e = order[i];
    const acc w = static_cast<acc>(val[e]);
    acc g[VEC];
    load_pack<scalar_t, VEC>(grad + (e / s) * C, c, C, g);
#pragma unroll
    for (int t = 0; t < VEC; ++t) sum[t] += w * g[t];
  }
  store_pack<scalar_t, VEC>(grad_V + k * C, c, C, sum);
}

// Calls fn.template operator()<VEC>() with the vector width chosen at run time.
template <typename scalar_t, typename Fn>
void with_vec(int vec, Fn&& fn) {
  constexpr int kMax = 16 / sizeof(scalar_t);
  if (vec == kMax) {
    fn(std::integral_constant<int, kMax>{});
  } else {
    fn(std::integral_constant<int, 1>{});
  }
}

dim3 grid_for(int64_t rows, const RowLayout& l) {
  return dim3(static_cast<unsigned>((rows + l.rpb - 1) / l.rpb), static_cast<unsigned>(l.chunks));
}

}  // namespace

at::Tensor sparse_reconstruct_forward_cuda(const at::Tensor& idx, const at::Tensor& val, const at::Tensor& V,
                                           const c10::optional<at::Tensor>& bias) {
  check_sparse_reconstruct_inputs(idx, val, V, c10::DeviceType::CUDA);
  const c10::cuda::CUDAGuard guard(V.device());
  const int64_t P = idx.size(0), s = idx.size(1), C = V.size(1);
  at::Tensor b;
  if (bias.has_value()) {
    b = bias->contiguous();
    check_sparse_reconstruct_bias(b, V);
  }
  auto out = at::empty({P, C}, V.options());
  if (P == 0 || C == 0) return out;
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, V.scalar_type(), "sparse_reconstruct_forward_cuda", [&] {
    const scalar_t* bptr = b.defined() ? b.data_ptr<scalar_t>() : nullptr;
    const int vec = pick_vec<scalar_t>(C, {V.data_ptr(), out.data_ptr(), bptr});
    const RowLayout l = row_layout(C, vec);
    const size_t smem = static_cast<size_t>(l.rpb) * kCodeTile * (sizeof(int64_t) + sizeof(acc_t<scalar_t>));
    with_vec<scalar_t>(vec, [&](auto VEC) {
      forward_kernel<scalar_t, decltype(VEC)::value><<<grid_for(P, l), dim3(l.tpr, l.rpb), smem, stream>>>(
          idx.data_ptr<int64_t>(), val.data_ptr<scalar_t>(), V.data_ptr<scalar_t>(), bptr,
          out.data_ptr<scalar_t>(), P, s, C);
    });
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

std::tuple<at::Tensor, at::Tensor> sparse_reconstruct_backward_cuda(const at::Tensor& grad_out, const at::Tensor& idx,
                                                                    const at::Tensor& val, const at::Tensor& V,
                                                                    bool need_val, bool need_V) {
  check_sparse_reconstruct_inputs(idx, val, V, c10::DeviceType::CUDA);
  const c10::cuda::CUDAGuard guard(V.device());
  auto grad = grad_out.to(V.scalar_type()).contiguous();
  const int64_t P = idx.size(0), s = idx.size(1), K = V.size(0), C = V.size(1);
  check_sparse_reconstruct_grad(grad, idx, V);
  auto grad_val = at::zeros_like(val);
  auto grad_V = at::zeros_like(V);
  if (P == 0 || s == 0 || C == 0) return {grad_val, grad_V};
  auto stream = c10::cuda::getCurrentCUDAStream();
  if (need_val) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, V.scalar_type(), "sparse_reconstruct_grad_val_cuda", [&] {
      const int vec = pick_vec<scalar_t>(C, {V.data_ptr(), grad.data_ptr()});
      const RowLayout l = row_layout(C, vec);
      using acc = acc_t<scalar_t>;
      auto partial = at::empty({l.chunks, P, s}, V.options().dtype(c10::CppTypeToScalarType<acc>::value));
      with_vec<scalar_t>(vec, [&](auto VEC) {
        grad_val_kernel<scalar_t, decltype(VEC)::value><<<grid_for(P, l), dim3(l.tpr, l.rpb), 0, stream>>>(
            grad.data_ptr<scalar_t>(), idx.data_ptr<int64_t>(), V.data_ptr<scalar_t>(), partial.data_ptr<acc>(),
            P, s, C);
      });
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      // chunks are summed in a fixed order; padding entries computed 0 already
      grad_val.copy_(l.chunks == 1 ? partial[0] : partial.sum(0));
    });
  }
  if (need_V && K > 0) {
    // Stable sort of the flat entries by concept; padding (-1) sorts first and lies before start[0].
    auto sorted = at::sort(idx.reshape({-1}), /*stable=*/true, /*dim=*/0, /*descending=*/false);
    auto keys = std::get<0>(sorted);
    auto order = std::get<1>(sorted);
    auto start = at::searchsorted(keys, at::arange(K + 1, idx.options()));
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, V.scalar_type(), "sparse_reconstruct_grad_V_cuda", [&] {
      const int vec = pick_vec<scalar_t>(C, {grad.data_ptr(), grad_V.data_ptr()});
      const RowLayout l = row_layout(C, vec);
      with_vec<scalar_t>(vec, [&](auto VEC) {
        grad_V_kernel<scalar_t, decltype(VEC)::value><<<grid_for(K, l), dim3(l.tpr, l.rpb), 0, stream>>>(
            grad.data_ptr<scalar_t>(), val.data_ptr<scalar_t>(), order.data_ptr<int64_t>(),
            start.data_ptr<int64_t>(), grad_V.data_ptr<scalar_t>(), K, s, C);
      });
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
