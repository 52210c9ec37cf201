// Helpers shared by the host code of every op.
#pragma once
// Only the ATen pieces the kernels use (not <torch/extension.h>, which pulls in pybind11 and the whole
// C++ frontend): a fresh CPU build takes a fraction of the time, which the README's demo budget needs.
// bind_cpu.cpp / bind_cuda.cpp alone include <torch/extension.h> (for PYBIND11_MODULE).
#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/full.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>
#include <torch/library.h>

#define GIG_CHECK_CONTIGUOUS(x) TORCH_CHECK((x).is_contiguous(), #x " must be contiguous")
#define GIG_CHECK_CPU(x) TORCH_CHECK((x).device().is_cpu(), #x " must be a CPU tensor")
#define GIG_CHECK_CUDA(x) TORCH_CHECK((x).device().is_cuda(), #x " must be a CUDA tensor")

namespace gig_fast {

// Accumulation type: double for double, float for float/half/bfloat16.
template <typename scalar_t>
using acc_t = at::opmath_type<scalar_t>;

}  // namespace gig_fast
