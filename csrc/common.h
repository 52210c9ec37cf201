// Helpers shared by the host code of every op.
#pragma once
#include <torch/extension.h>
#include <ATen/OpMathType.h>

#define GIG_CHECK_CONTIGUOUS(x) TORCH_CHECK((x).is_contiguous(), #x " must be contiguous")
#define GIG_CHECK_CPU(x) TORCH_CHECK((x).device().is_cpu(), #x " must be a CPU tensor")
#define GIG_CHECK_CUDA(x) TORCH_CHECK((x).device().is_cuda(), #x " must be a CUDA tensor")

namespace gig_fast {

// Accumulation type: double for double, float for float/half/bfloat16.
template <typename scalar_t>
using acc_t = at::opmath_type<scalar_t>;

}  // namespace gig_fast
