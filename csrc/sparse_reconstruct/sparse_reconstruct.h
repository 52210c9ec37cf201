// sparse_reconstruct: the active-concept 1x1 conv (DESIGN.md §3, paper Eq. 1: X~ = U V + beta).
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

namespace gig_fast {

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
