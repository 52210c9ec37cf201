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
// Paths: contiguous fp32 on a CPU with AVX-512F → our kernel (matmul_nt_avx512.h; b packed whole, or tile
// by tile where a has at most as many rows: matmul_nt_cpu.cpp); everything else
// (fp64, fp16, bf16, non-contiguous, no AVX-512, or GIG_FAST_MATMUL_ISA=blas) → at::mm(a, bᵀ); there a
// Gram of at least 4,096 rows is computed by row blocks on and above the diagonal (gram_upper_by_blocks).
#pragma once
#include <ATen/core/Tensor.h>

#include <memory>

#include "common.h"

namespace gig_fast {

at::Tensor matmul_nt_cpu(const at::Tensor& a, const at::Tensor& b, bool symmetric);

// The same into `out` [M, N] (contiguous, a's dtype), e.g. a buffer kept between calls.
void matmul_nt_out_cpu(const at::Tensor& a, const at::Tensor& b, bool symmetric, at::Tensor& out);

// b [N, C] made ready once for many products a @ bᵀ with the same b (a lockstep solver's step after step
// on one dictionary): on the AVX-512 path its panels are packed here, where each matmul_nt call packs b
// anew (these figures are from before calls went tile by tile: each packed the whole of b) — at 64 rows
// against 16,384 × 2,048 concepts such a call ran at 16 GFMA/s (133 ms; at::mm at 28 GFMA/s),
// and OMP's lockstep steps (64 rows × 60 atoms, one Zen 4 core) took 9.7 s packing at every product,
// 4.9 s with at::mm and 3.85 s against b packed once; elsewhere multiply() is at::mm. Keeps a reference to b (and
// an N·C-float copy on the AVX-512 path); copies share the packed panels.
class MatmulNtColumns {
 public:
  explicit MatmulNtColumns(const at::Tensor& b);
  // out [M, N] (contiguous, b's dtype) = a [M, C] @ bᵀ.
  void multiply(const at::Tensor& a, at::Tensor& out) const;

 private:
  at::Tensor b_;
  std::shared_ptr<float> packed_;  // null: at::mm
};

}  // namespace gig_fast
