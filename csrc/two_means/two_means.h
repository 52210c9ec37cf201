// two_means: the spherical 2-means splits of the bisecting concept extractor, fused on the CPU
// (docs/design.md §1.3; gig_fast/ops/two_means.py is the op, gig_fast/ops/reference.py its pure-PyTorch form with the
// same random draws).
//
// A cluster is given by the sorted indices `members [n]` of its rows in the unit-row matrix U [N, C]
// (fp32 or fp64). One split, with a SplitMix64 generator seeded by the split's `seed`:
//   * sample: when n > init_sample, init_sample distinct members drawn uniformly (kept in member order);
//     otherwise the whole cluster;
//   * n_init initialisations on the sample, k-means++ style: a uniform random row, then a row drawn with
//     probability ∝ its cosine distance 1 − <x, x_first> (any other row if all distances are 0);
//   * Lloyd iterations from each, until the sides stop changing (at most max_iter):
//       side[i] = 1  iff  <x_i, S1/|S1| − S0/|S0|> > 0   (ties → 0; an empty side's term is 0)
//       S_k     = Σ_{side[i] = k} x_i                      (fp64, summed in fixed chunks of rows)
//     cosine inertia of the result: n − |S0| − |S1|; the lowest wins (a later one only if it is lower
//     by more than 1e-9·n);
//   * refine: when the sample was a subsample, Lloyd on the whole cluster from the best sums;
//   * fallback: a side left empty (identical or zero rows) → the first ⌈n/2⌉ members vs the rest.
// Every sum over rows is formed chunk by chunk (kChunkRows rows, fixed) and the chunks are added in
// order, so the result does not depend on the number of threads.
#pragma once
#include <ATen/core/Tensor.h>
#include <cstdint>
#include <tuple>
#include <vector>

namespace gig_fast {

// Splits of several clusters (one per entry of `members`/`seeds`), clusters spread over the threads.
// Returns (sides: int64 [n_b] each in {0, 1}, sums fp64 [B, 2, C] of the returned sides,
// inertia fp64 [B], fell_back bool [B]). With refine = false a cluster larger than init_sample stops
// after the sample: its side and sums are the sample's (n_b = init_sample), and no fallback is applied.
std::tuple<std::vector<at::Tensor>, at::Tensor, at::Tensor, at::Tensor> two_means_splits_cpu(
    const at::Tensor& U, at::TensorList members, at::IntArrayRef seeds, int64_t n_init, int64_t max_iter,
    int64_t init_sample, bool refine);

// One Lloyd step on the rows U[members] from the sums `sums` fp64 [2, C]: (side int64 [n], the new sums
// fp64 [2, C] of those sides). The data-parallel refinement of the distributed extractor is made of it.
std::tuple<at::Tensor, at::Tensor> two_means_step_cpu(const at::Tensor& U, const at::Tensor& members,
                                                      const at::Tensor& sums);

}  // namespace gig_fast
