// gig_accumulate: the fused quadrature sum and active-concept projection of GIG (docs/design.md §1.5, §3;
// paper Eq. 4 with the integral over alpha replaced by a quadrature rule).
//
//   g[t, p, c]      = sum_k weights[k] * grads[t, k, p, c]                  (alpha-integral of the gradient)
//   attr[t, p, j]   = val[p, j] * <g[t, p, :], V[idx[p, j], :]>             (0 where idx = -1)
//
// Shapes: grads [T, m, P, C] (fp32/fp64/fp16/bf16), weights [m], idx [P, s] int64, val [P, s], V [K, C];
// out [T, P, s] in the accumulation type (fp32, fp64 for fp64 grads). The host code converts weights, val
// and V to the accumulation type (they are small next to grads), so the kernels are templated on the
// grads dtype only. One pass over grads: each (t, p) row of g is formed once in registers / shared memory
// and then dotted with the s active concept rows of p, so the dense [P, K] projection is never formed.
// Inputs are validated in Python (gig_fast.ops.gig_accumulate); the host code only re-checks what would
// otherwise crash.
#pragma once
#include <ATen/core/Tensor.h>

#include "common.h"

namespace gig_fast {

// Host checks shared by the CPU and CUDA entry points (`dev`: where the tensors must be): only what would
// otherwise crash a kernel; the Python op validates everything else with named ValueErrors.
inline void check_gig_accumulate_inputs(const at::Tensor& grads, const at::Tensor& weights, const at::Tensor& idx,
                                        const at::Tensor& val, const at::Tensor& V, c10::DeviceType dev) {
  GIG_CHECK_DEVICE(grads, dev); GIG_CHECK_DEVICE(weights, dev); GIG_CHECK_DEVICE(idx, dev);
  GIG_CHECK_DEVICE(val, dev); GIG_CHECK_DEVICE(V, dev);
  TORCH_CHECK(grads.dim() == 4, "grads must be [T, m, P, C]");
  TORCH_CHECK(idx.scalar_type() == at::kLong, "idx must be int64");
  TORCH_CHECK(idx.dim() == 2 && val.sizes() == idx.sizes(), "idx and val must both be [P, s]");
  TORCH_CHECK(weights.numel() == grads.size(1), "weights must be [m]");
  TORCH_CHECK(idx.size(0) == grads.size(2), "idx must have P rows");
  TORCH_CHECK(V.dim() == 2 && V.size(1) == grads.size(3), "V must be [K, C]");
}


at::Tensor gig_accumulate_cpu(const at::Tensor& grads, const at::Tensor& weights, const at::Tensor& idx,
                              const at::Tensor& val, const at::Tensor& V);

at::Tensor gig_accumulate_cuda(const at::Tensor& grads, const at::Tensor& weights, const at::Tensor& idx,
                               const at::Tensor& val, const at::Tensor& V);

}  // namespace gig_fast
