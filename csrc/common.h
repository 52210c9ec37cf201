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

#include <cstdlib>
#include <string_view>

#define GIG_CHECK_CONTIGUOUS(x) TORCH_CHECK((x).is_contiguous(), #x " must be contiguous")
#define GIG_CHECK_CPU(x) TORCH_CHECK((x).device().is_cpu(), #x " must be a CPU tensor")
#define GIG_CHECK_CUDA(x) TORCH_CHECK((x).device().is_cuda(), #x " must be a CUDA tensor")
// The device check of the host checks that each op's header shares between its CPU and CUDA entry points.
#define GIG_CHECK_DEVICE(x, dev) \
  TORCH_CHECK((x).device().type() == (dev), #x " must be a ", c10::DeviceTypeName(dev), " tensor")

// The build targets baseline x86-64 (SSE2: 4 floats per instruction) so the wheel runs anywhere. A hot
// loop written as an always-inline body can also be compiled for AVX2 (8) through a wrapper marked
// GIG_TARGET_AVX2, called when cpu_has_avx2(): measured 1.5-2x on the gather/axpy loops here.
// (sparse_reconstruct, two_means, centroid_update; sparse_code compiles its solvers twice instead, under `#pragma GCC
// target`, as they call helpers an always-inline body would not reach.) GIG_FAST_CPU_ISA=baseline (read
// once) keeps the baseline build, so tests can check both paths (tests/test_cpu_isa.py).
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define GIG_TARGET_AVX2 __attribute__((target("avx2")))
#define GIG_HAVE_AVX2_PATH 1
#else
#define GIG_TARGET_AVX2
#define GIG_HAVE_AVX2_PATH 0
#endif
#define GIG_INLINE inline __attribute__((always_inline))

namespace gig_fast {

inline bool cpu_has_avx2() {
#if GIG_HAVE_AVX2_PATH
  static const bool has = __builtin_cpu_supports("avx2") &&
                           std::string_view(std::getenv("GIG_FAST_CPU_ISA") ? std::getenv("GIG_FAST_CPU_ISA") : "") !=
                               "baseline";
  return has;
#else
  return false;
#endif
}

// Accumulation type: double for double, float for float/half/bfloat16.
template <typename scalar_t>
using acc_t = at::opmath_type<scalar_t>;

}  // namespace gig_fast
