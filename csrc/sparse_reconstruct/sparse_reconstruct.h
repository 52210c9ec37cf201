// sparse_reconstruct: the active-concept 1x1 conv (docs/design.md §3, paper Eq. 1: X~ = U V + beta).
//
//   out[p, c] = bias[c] + sum_j val[p, j] * V[idx[p, j], c]        (idx = -1 is padding)
//
// Shapes: idx [P, s] int64, val [P, s], V [K, C], bias [C] or none, out [P, C]; val, V, bias share a
// float dtype (fp32/fp64/fp16/bf16), accumulation in fp32 (fp64 for fp64).
// Backward:
//   grad_val[p, j] = <grad_out[p], V[idx[p, j]]>                   (0 at padding; an SDDMM)
//   grad_V[k]      = sum_{(p,j): idx[p,j] = k} val[p, j] * grad_out[p]
// grad_V is a segment sum over the entries sorted by concept, in a fixed order: no float atomics, so
// two runs give bit-identical results. Inputs are validated in Python (gig_fast.ops); the host code
// here only re-checks what would otherwise crash, except the CPU forward, which checks the index range
// itself (a ValueError), in its own pass over idx.
#pragma once
#include <ATen/core/Tensor.h>
#include <tuple>

#include "common.h"

namespace gig_fast {

// Host checks shared by the CPU and CUDA entry points (`dev`: where the tensors must be): only what would
// otherwise crash a kernel; the Python op validates everything else with named ValueErrors.
inline void check_sparse_reconstruct_inputs(const at::Tensor& idx, const at::Tensor& val, const at::Tensor& V,
                                            c10::DeviceType dev) {
  GIG_CHECK_DEVICE(idx, dev); GIG_CHECK_DEVICE(val, dev); GIG_CHECK_DEVICE(V, dev);
  GIG_CHECK_CONTIGUOUS(idx); GIG_CHECK_CONTIGUOUS(val); GIG_CHECK_CONTIGUOUS(V);
  TORCH_CHECK(idx.scalar_type() == at::kLong, "idx must be int64");
  TORCH_CHECK(idx.dim() == 2 && val.sizes() == idx.sizes(), "idx and val must both be [P, s]");
  TORCH_CHECK(V.dim() == 2 && val.scalar_type() == V.scalar_type(), "V must be [K, C] with val's dtype");
}

inline void check_sparse_reconstruct_bias(const at::Tensor& b, const at::Tensor& V) {
  TORCH_CHECK(b.numel() == V.size(1) && b.scalar_type() == V.scalar_type(), "bias must be [C] with V's dtype");
}

inline void check_sparse_reconstruct_grad(const at::Tensor& grad, const at::Tensor& idx, const at::Tensor& V) {
  TORCH_CHECK(grad.dim() == 2 && grad.size(0) == idx.size(0) && grad.size(1) == V.size(1), "grad_out must be [P, C]");
}


at::Tensor sparse_reconstruct_forward_cpu(const at::Tensor& idx, const at::Tensor& val, const at::Tensor& V,
                                          const c10::optional<at::Tensor>& bias);
std::tuple<at::Tensor, at::Tensor> sparse_reconstruct_backward_cpu(const at::Tensor& grad_out, const at::Tensor& idx,
                                                                   const at::Tensor& val, const at::Tensor& V,
                                                                   bool need_val, bool need_V);

at::Tensor sparse_reconstruct_forward_cuda(const at::Tensor& idx, const at::Tensor& val, const at::Tensor& V,
                                           const c10::optional<at::Tensor>& bias);
std::tuple<at::Tensor, at::Tensor> sparse_reconstruct_backward_cuda(const at::Tensor& grad_out, const at::Tensor& idx,
                                                                    const at::Tensor& val, const at::Tensor& V,
                                                                    bool need_val, bool need_V);

}  // namespace gig_fast
