// CPU kernel of centroid_update (formula in centroid_update.h). Two deterministic schedules, chosen
// from (N, K, C) only:
//  * few clusters (the 2-means case): the rows are cut into a fixed number of contiguous chunks that
//    depends on N alone; each chunk sums its rows into private [K, C] partials in row order (chunks
//    run in parallel), then the partials are added chunk by chunk in a fixed order. All threads work
//    even when every point falls into one or two clusters.
//  * many clusters: a stable counting sort of the rows by label, then one independent sum per cluster
//    in row order, clusters spread over the threads (like grad_V of sparse_reconstruct).
#include "centroid_update/centroid_update.h"

#include <ATen/Parallel.h>
#include <algorithm>
#include <vector>

#include "common.h"

namespace gig_fast {
namespace {

constexpr int64_t kMinChunkRows = 1024;
constexpr int64_t kMaxChunks = 64;
constexpr int64_t kMinTaskWork = int64_t(1) << 18;  // element adds per thread below which we stay serial
constexpr int64_t kMaxPartialElems = int64_t(1) << 24;  // cap on chunks * K * C scratch (64 MiB fp32)

int64_t num_chunks(int64_t N) {
  return std::max<int64_t>(1, std::min(kMaxChunks, (N + kMinChunkRows - 1) / kMinChunkRows));
}

template <typename scalar_t>
GIG_INLINE void add_row(acc_t<scalar_t>* __restrict__ dst, const scalar_t* __restrict__ x, int64_t C) {
#pragma omp simd
  for (int64_t c = 0; c < C; ++c) dst[c] += static_cast<acc_t<scalar_t>>(x[c]);
}

// dst[label or k] += X[row] for rows = lo..hi-1 (order == nullptr: row n itself, into part + labels[n]·C)
// or rows = order[lo..hi-1] (all into dst): the whole cost of the update, also built for AVX2 (common.h).
template <typename scalar_t>
GIG_INLINE void add_rows(const scalar_t* X, const int64_t* labels, const int64_t* order, int64_t lo, int64_t hi,
                         int64_t C, acc_t<scalar_t>* dst) {
  for (int64_t i = lo; i < hi; ++i) {
    if (order) {
      add_row<scalar_t>(dst, X + order[i] * C, C);
    } else {
      add_row<scalar_t>(dst + labels[i] * C, X + i * C, C);
    }
  }
}

template <typename scalar_t>
GIG_TARGET_AVX2 void add_rows_avx2(const scalar_t* X, const int64_t* labels, const int64_t* order, int64_t lo,
                                   int64_t hi, int64_t C, acc_t<scalar_t>* dst) {
  add_rows(X, labels, order, lo, hi, C, dst);
}

template <typename scalar_t>
void add_rows_isa(const scalar_t* X, const int64_t* labels, const int64_t* order, int64_t lo, int64_t hi, int64_t C,
                  acc_t<scalar_t>* dst) {
  if (cpu_has_avx2()) {
    add_rows_avx2(X, labels, order, lo, hi, C, dst);
  } else {
    add_rows(X, labels, order, lo, hi, C, dst);
  }
}

template <typename scalar_t>
void sums_chunked(const scalar_t* X, const int64_t* labels, int64_t N, int64_t K, int64_t C,
                  acc_t<scalar_t>* sums) {
  using acc = acc_t<scalar_t>;
  const int64_t chunks = num_chunks(N);
  const int64_t rows_per = (N + chunks - 1) / chunks;
  std::vector<acc> partial(static_cast<size_t>(chunks * K * C), acc(0));
  // threads only when each gets enough rows (a fork/join costs more than a small cluster's pass)
  const int64_t grain = std::max<int64_t>(1, kMinTaskWork / std::max<int64_t>(1, rows_per * C));
  at::parallel_for(0, chunks, grain, [&](int64_t begin, int64_t end) {
    for (int64_t ch = begin; ch < end; ++ch) {
      acc* part = partial.data() + ch * K * C;
      const int64_t lo = ch * rows_per, hi = std::min(N, lo + rows_per);
      add_rows_isa<scalar_t>(X, labels, nullptr, lo, hi, C, part);
    }
  });
  // Fixed-order reduction over chunks, parallel over the K*C outputs.
  const int64_t total = K * C;
  at::parallel_for(0, total, std::max<int64_t>(2048, kMinTaskWork / chunks), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) sums[i] = acc(0);
    for (int64_t ch = 0; ch < chunks; ++ch) {
      const acc* part = partial.data() + ch * total;
#pragma omp simd
      for (int64_t i = begin; i < end; ++i) sums[i] += part[i];
    }
  });
}

template <typename scalar_t>
void sums_sorted(const scalar_t* X, const int64_t* labels, const int64_t* start, int64_t N, int64_t K,
                 int64_t C, acc_t<scalar_t>* sums) {
  using acc = acc_t<scalar_t>;
  std::vector<int64_t> order(N);
  std::vector<int64_t> fill(start, start + K);
  for (int64_t n = 0; n < N; ++n) order[fill[labels[n]]++] = n;  // stable counting sort
  const int64_t grain = std::max<int64_t>(1, kMinTaskWork * K / std::max<int64_t>(1, N * C));
  at::parallel_for(0, K, grain, [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k) {
      acc* dst = sums + k * C;
      std::fill(dst, dst + C, acc(0));
      add_rows_isa<scalar_t>(X, nullptr, order.data(), start[k], start[k + 1], C, dst);
    }
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> centroid_update_cpu(const at::Tensor& X, const at::Tensor& labels, int64_t K) {
  check_centroid_update_inputs(X, labels, K, c10::DeviceType::CPU);
  const int64_t N = X.size(0), C = X.size(1);
  const auto acc_type = X.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  auto sums = at::empty({K, C}, X.options().dtype(acc_type));
  auto counts = at::zeros({K}, X.options().dtype(at::kLong));
  const int64_t* lab = labels.data_ptr<int64_t>();
  int64_t* cnt = counts.data_ptr<int64_t>();
  for (int64_t n = 0; n < N; ++n) {
    TORCH_CHECK(lab[n] >= 0 && lab[n] < K, "labels must lie in [0, K)");
    ++cnt[lab[n]];
  }
  if (C == 0) return {sums, counts};
  const bool chunked = num_chunks(N) * K * C <= kMaxPartialElems && K <= 64;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, X.scalar_type(), "centroid_update_cpu", [&] {
    using acc = acc_t<scalar_t>;
    if (chunked) {
      sums_chunked<scalar_t>(X.data_ptr<scalar_t>(), lab, N, K, C, sums.data_ptr<acc>());
    } else {
      std::vector<int64_t> start(K + 1, 0);
      for (int64_t k = 0; k < K; ++k) start[k + 1] = start[k] + cnt[k];
      sums_sorted<scalar_t>(X.data_ptr<scalar_t>(), lab, start.data(), N, K, C, sums.data_ptr<acc>());
    }
  });
  return {sums, counts};
}

TORCH_LIBRARY_FRAGMENT(gig_fast_cpp, m) {
  m.def("centroid_update(Tensor X, Tensor labels, int K) -> (Tensor, Tensor)", &centroid_update_cpu);
}

}  // namespace gig_fast
