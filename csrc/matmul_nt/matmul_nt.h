// matmul_nt: the fp32 product a @ bᵀ on the CPU, and the symmetric Gram a @ aᵀ.
//
//   out[m, n] = Σ_c a[m, c] · b[n, c]        a [M, C], b [N, C] (same floating dtype) → out [M, N]
//
// symmetric = true requires b to be a (the same tensor): only the tiles on and above the diagonal are
// computed (about half the multiply-adds) and out[n, m] = out[m, n] is copied, so the result is exactly
// symmetric on every path.
//
// Why: on AVX-512 CPUs whose BLAS runs AVX2 code (MKL and OpenBLAS on AMD Zen 5 reach ~100-125 GFLOP/s
// on one thread), the 512-bit register tile of the fused assignment (fused_argmax_avx512.h) does the
// same GEMM in 0.54-0.59 times torch's time, the Gram in 0.25-0.37 times (one thread; bench_kmeans.py);
// the sparse coder's Gram V Vᵀ and correlations Y Vᵀ are such GEMMs.
// Paths: contiguous fp32 on a CPU with AVX-512F → our kernel (matmul_nt_avx512.h); everything else
// (fp64, fp16, bf16, non-contiguous, no AVX-512, or GIG_FAST_MATMUL_ISA=blas) → at::mm(a, bᵀ).
#pragma once
#include <ATen/core/Tensor.h>

#include "common.h"

namespace gig_fast {

at::Tensor matmul_nt_cpu(const at::Tensor& a, const at::Tensor& b, bool symmetric);

// The same into `out` [M, N] (contiguous, a's dtype), e.g. a buffer kept between calls.
void matmul_nt_out_cpu(const at::Tensor& a, const at::Tensor& b, bool symmetric, at::Tensor& out);

}  // namespace gig_fast
