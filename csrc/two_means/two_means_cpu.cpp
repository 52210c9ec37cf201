// CPU kernels of the bisecting extractor's 2-means splits (formulas in two_means.h).
//
// Why fused: a split of a small cluster is microseconds of arithmetic, so calling the assignment and
// update ops from Python for every Lloyd iteration of every initialisation of 2,047 splits spent most
// of the time in dispatch. Here a whole split (sampling, initialisations, Lloyd, refinement, fallback)
// is one C++ call, and a batch of splits (fast mode) runs the clusters in parallel.
// One pass of a Lloyd step reads each row once: its dot with the side direction w = S1/|S1| − S0/|S0|
// (one dot instead of two cosines), then — in the first step for every row, later only for the rows that
// changed side — its addition to (and removal from) the per-chunk side sums, which are added to the fp64
// sums in chunk order.
#include "two_means/two_means.h"

#include <ATen/Parallel.h>
#include <algorithm>
#include <cmath>
#include <numeric>

#include "common.h"

namespace gig_fast {
namespace {

constexpr int64_t kChunkRows = 1024;                 // rows per partial sum (fixed: thread-count independent)
constexpr int64_t kParallelMinWork = int64_t(1) << 20;  // rows·C below which a pass stays on one thread

// SplitMix64 (Steele, Lea, Flood 2014): small, fast, and the same stream on every platform.
struct Rng {
  uint64_t state;
  uint64_t next() {
    uint64_t z = (state += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
  }
  double uniform() { return static_cast<double>(next() >> 11) * 0x1.0p-53; }  // [0, 1)
  int64_t index(int64_t n) { return std::min<int64_t>(n - 1, static_cast<int64_t>(uniform() * n)); }
};

// The rows U[rows[i]], i < n, of one cluster or of its sample.
template <typename scalar_t>
struct Rows {
  const scalar_t* U;
  const int64_t* rows;
  int64_t n;
  int64_t C;
  const scalar_t* row(int64_t i) const { return U + rows[i] * C; }
};

template <typename scalar_t>
GIG_INLINE scalar_t dot(const scalar_t* __restrict__ a, const scalar_t* __restrict__ b, int64_t C) {
  scalar_t s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t c = 0; c < C; ++c) s += a[c] * b[c];
  return s;
}

double norm(const double* v, int64_t C) {
  double s = 0;
  for (int64_t c = 0; c < C; ++c) s += v[c] * v[c];
  return std::sqrt(s);
}

// Rows [lo, hi) of one Lloyd step: side[i] = <x_i, w> > 0, and the sums of the rows into part [2, C]
// (full) or the moves of the rows whose side changed (otherwise). Returns the number of changed sides.
template <typename scalar_t>
GIG_INLINE int64_t chunk_pass(const Rows<scalar_t>& r, const scalar_t* w, int64_t lo,
                                                         int64_t hi, int64_t* side, bool full,
                                                         acc_t<scalar_t>* part) {
  using acc = acc_t<scalar_t>;
  const int64_t C = r.C;
  int64_t changed = 0;
  for (int64_t i = lo; i < hi; ++i) {
    const scalar_t* x = r.row(i);
    const int64_t s = dot(x, w, C) > 0 ? 1 : 0;
    if (!full && side[i] == s) continue;
    ++changed;
    side[i] = s;
    acc* to = part + s * C;
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) to[c] += static_cast<acc>(x[c]);
    if (full) continue;
    acc* from = part + (1 - s) * C;
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) from[c] -= static_cast<acc>(x[c]);
  }
  return changed;
}

// The pass is the whole cost: it also runs as an AVX2 build where the CPU has it (common.h; measured
// 1.5x on the whole bisecting run here).
template <typename scalar_t>
GIG_TARGET_AVX2 int64_t chunk_pass_avx2(const Rows<scalar_t>& r, const scalar_t* w, int64_t lo, int64_t hi,
                                        int64_t* side, bool full, acc_t<scalar_t>* part) {
  return chunk_pass(r, w, lo, hi, side, full, part);
}

template <typename scalar_t>
int64_t chunk_pass_isa(const Rows<scalar_t>& r, const scalar_t* w, int64_t lo, int64_t hi, int64_t* side, bool full,
                       acc_t<scalar_t>* part) {
  return cpu_has_avx2() ? chunk_pass_avx2(r, w, lo, hi, side, full, part) : chunk_pass(r, w, lo, hi, side, full, part);
}

// Cosine distances 1 − <x_i, x> (clamped at 0) of every row to x, into dist [n]; returns their sum.
template <typename scalar_t>
GIG_INLINE double distances(const Rows<scalar_t>& r, const scalar_t* x, double* dist) {
  double total = 0;
  for (int64_t i = 0; i < r.n; ++i) {
    dist[i] = std::max(0.0, 1.0 - static_cast<double>(dot(r.row(i), x, r.C)));
    total += dist[i];
  }
  return total;
}

template <typename scalar_t>
GIG_TARGET_AVX2 double distances_avx2(const Rows<scalar_t>& r, const scalar_t* x, double* dist) {
  return distances(r, x, dist);
}

template <typename scalar_t>
double distances_isa(const Rows<scalar_t>& r, const scalar_t* x, double* dist) {
  return cpu_has_avx2() ? distances_avx2(r, x, dist) : distances(r, x, dist);
}

// One Lloyd step: the sides of the rows for the direction w = S1/|S1| − S0/|S0| of `S_dir` [2, C]
// (written to side [n]), and their sums into `S_out` [2, C] (may alias S_dir):
//  * full: S_out = the sums of the new sides (the first step; every row counts as changed);
//  * otherwise S_out += the moves of the rows whose side changed (later steps: few rows move, so a step
//    costs one dot per row instead of a dot and C additions).
// Row sums are formed per chunk of kChunkRows rows in the accumulation type and added to the fp64 sums
// chunk by chunk in order. Returns the number of changed sides.
template <typename scalar_t>
int64_t lloyd_step(const Rows<scalar_t>& r, const double* S_dir, int64_t* side, bool full, double* S_out,
                   bool parallel) {
  using acc = acc_t<scalar_t>;
  const int64_t C = r.C;
  const double n0 = norm(S_dir, C), n1 = norm(S_dir + C, C);
  const double i0 = n0 > 0 ? 1.0 / n0 : 0.0, i1 = n1 > 0 ? 1.0 / n1 : 0.0;
  std::vector<scalar_t> w(C);
  for (int64_t c = 0; c < C; ++c) w[c] = static_cast<scalar_t>(S_dir[C + c] * i1 - S_dir[c] * i0);
  const int64_t chunks = std::max<int64_t>(1, (r.n + kChunkRows - 1) / kChunkRows);
  std::vector<acc> partial(static_cast<size_t>(chunks * 2 * C), acc(0));
  std::vector<int64_t> changed(chunks, 0);
  auto body = [&](int64_t begin, int64_t end) {
    for (int64_t ch = begin; ch < end; ++ch) {
      changed[ch] = chunk_pass_isa(r, w.data(), ch * kChunkRows, std::min(r.n, (ch + 1) * kChunkRows), side, full,
                                   partial.data() + ch * 2 * C);
    }
  };
  if (parallel && r.n * C >= kParallelMinWork) {
    at::parallel_for(0, chunks, 1, body);
  } else {
    body(0, chunks);
  }
  if (full) std::fill(S_out, S_out + 2 * C, 0.0);
  int64_t total = 0;
  for (int64_t ch = 0; ch < chunks; ++ch) {  // fixed order
    const acc* part = partial.data() + ch * 2 * C;
    for (int64_t c = 0; c < 2 * C; ++c) S_out[c] += static_cast<double>(part[c]);
    total += changed[ch];
  }
  return total;
}

// Lloyd from the sums S (updated in place to the final sides' sums); returns the cosine inertia.
template <typename scalar_t>
double lloyd(const Rows<scalar_t>& r, std::vector<double>& S, int64_t* side, int64_t max_iter, bool parallel) {
  for (int64_t it = 0; it < max_iter; ++it) {
    const int64_t changed = lloyd_step(r, S.data(), side, /*full=*/it == 0, S.data(), parallel);
    if (it > 0 && changed == 0) break;
  }
  return static_cast<double>(r.n) - norm(S.data(), r.C) - norm(S.data() + r.C, r.C);
}

// k-means++ start: S = (x_first, x_second) as sums of one row each.
template <typename scalar_t>
std::vector<double> init_pair(const Rows<scalar_t>& r, Rng& rng) {
  const int64_t C = r.C;
  const int64_t first = rng.index(r.n);
  const scalar_t* xf = r.row(first);
  std::vector<double> dist(r.n);
  const double total = distances_isa(r, xf, dist.data());
  int64_t second = (first + 1 + rng.index(std::max<int64_t>(r.n - 1, 1))) % r.n;
  if (total > 0) {
    const double u = rng.uniform() * total;
    double cum = 0;
    for (int64_t i = 0; i < r.n; ++i) {  // a row of distance 0 is never drawn
      cum += dist[i];
      if (u < cum) {
        second = i;
        break;
      }
    }
  }
  std::vector<double> S(2 * C);
  const scalar_t* xs = r.row(second);
  for (int64_t c = 0; c < C; ++c) {
    S[c] = static_cast<double>(xf[c]);
    S[C + c] = static_cast<double>(xs[c]);
  }
  return S;
}

struct SplitResult {
  at::Tensor side;
  std::vector<double> S;
  double inertia;
  bool fell_back;
};

template <typename scalar_t>
SplitResult split_one(const scalar_t* U, int64_t C, const at::Tensor& members, int64_t seed, int64_t n_init,
                      int64_t max_iter, int64_t init_sample, bool refine, bool parallel) {
  const int64_t n = members.numel();
  const int64_t* idx = members.data_ptr<int64_t>();
  Rng rng{static_cast<uint64_t>(seed)};
  std::vector<int64_t> sample_rows;
  Rows<scalar_t> whole{U, idx, n, C};
  Rows<scalar_t> sample = whole;
  if (n > init_sample) {  // a partial Fisher–Yates draw of init_sample members, then member order
    std::vector<int64_t> pos(n);
    std::iota(pos.begin(), pos.end(), 0);
    for (int64_t j = 0; j < init_sample; ++j) std::swap(pos[j], pos[j + rng.index(n - j)]);
    std::sort(pos.begin(), pos.begin() + init_sample);
    sample_rows.resize(init_sample);
    for (int64_t j = 0; j < init_sample; ++j) sample_rows[j] = idx[pos[j]];
    sample = Rows<scalar_t>{U, sample_rows.data(), init_sample, C};
  }
  std::vector<int64_t> side(sample.n), best_side;
  std::vector<double> best_S;
  double best = 0;
  for (int64_t t = 0; t < n_init; ++t) {
    std::vector<double> S = init_pair(sample, rng);
    const double inertia = lloyd(sample, S, side.data(), max_iter, parallel);
    if (t == 0 || inertia < best - 1e-9 * static_cast<double>(n)) {
      best = inertia;
      best_S = S;
      best_side = side;
    }
  }
  SplitResult out{at::empty({0}, members.options()), best_S, best, false};
  const bool refined = sample.n < n && refine;
  if (refined) {
    best_side.assign(n, 0);
    out.inertia = lloyd(whole, out.S, best_side.data(), max_iter, parallel);
  }
  out.side = at::empty({static_cast<int64_t>(best_side.size())}, members.options());
  std::copy(best_side.begin(), best_side.end(), out.side.data_ptr<int64_t>());
  if (sample.n < n && !refine) return out;
  const int64_t ones = std::accumulate(best_side.begin(), best_side.end(), int64_t(0));
  if (ones == 0 || ones == n) {  // inseparable: split by member order (leaves the inertia unchanged)
    int64_t* s = out.side.data_ptr<int64_t>();
    std::vector<double> S_new(2 * C, 0.0);
    for (int64_t i = 0; i < n; ++i) {
      s[i] = i >= (n + 1) / 2 ? 1 : 0;
      const scalar_t* x = whole.row(i);
      double* dst = S_new.data() + s[i] * C;
      for (int64_t c = 0; c < C; ++c) dst[c] += static_cast<double>(x[c]);
    }
    out.S = S_new;
    out.inertia = static_cast<double>(n) - norm(out.S.data(), C) - norm(out.S.data() + C, C);
    out.fell_back = true;
  }
  return out;
}

template <typename scalar_t>
void split_all(const scalar_t* U, int64_t C, at::TensorList members, at::IntArrayRef seeds, int64_t n_init,
               int64_t max_iter, int64_t init_sample, bool refine, std::vector<SplitResult>& results) {
  const int64_t B = static_cast<int64_t>(members.size());
  if (B == 1) {  // one cluster: its passes use the threads
    results[0] = split_one(U, C, members[0], seeds[0], n_init, max_iter, init_sample, refine, true);
    return;
  }
  // several clusters: one thread each, the largest first (the caller orders them), dynamic schedule
#pragma omp parallel for schedule(dynamic, 1) num_threads(at::get_num_threads())
  for (int64_t b = 0; b < B; ++b) {
    results[b] = split_one(U, C, members[b], seeds[b], n_init, max_iter, init_sample, refine, false);
  }
}

void check_inputs(const at::Tensor& U, const at::Tensor& members) {
  GIG_CHECK_CPU(U);
  GIG_CHECK_CONTIGUOUS(U);
  TORCH_CHECK(U.dim() == 2, "U must be [N, C]");
  TORCH_CHECK(U.scalar_type() == at::kFloat || U.scalar_type() == at::kDouble, "U must be float32 or float64");
  GIG_CHECK_CPU(members);
  GIG_CHECK_CONTIGUOUS(members);
  TORCH_CHECK(members.scalar_type() == at::kLong && members.dim() == 1, "members must be int64 [n]");
}

}  // namespace

std::tuple<std::vector<at::Tensor>, at::Tensor, at::Tensor, at::Tensor> two_means_splits_cpu(
    const at::Tensor& U, at::TensorList members, at::IntArrayRef seeds, int64_t n_init, int64_t max_iter,
    int64_t init_sample, bool refine) {
  const int64_t B = static_cast<int64_t>(members.size());
  TORCH_CHECK(static_cast<int64_t>(seeds.size()) == B, "one seed per cluster");
  TORCH_CHECK(n_init >= 1 && max_iter >= 1 && init_sample >= 2, "n_init, max_iter >= 1, init_sample >= 2");
  for (const auto& m : members) {
    check_inputs(U, m);
    TORCH_CHECK(m.numel() >= 2, "a cluster to split needs at least 2 members");
  }
  const int64_t C = U.size(1);
  std::vector<SplitResult> results(B);
  AT_DISPATCH_FLOATING_TYPES(U.scalar_type(), "two_means_splits_cpu", [&] {
    split_all(U.data_ptr<scalar_t>(), C, members, seeds, n_init, max_iter, init_sample, refine, results);
  });
  std::vector<at::Tensor> sides(B);
  auto sums = at::empty({B, 2, C}, U.options().dtype(at::kDouble));
  auto inertia = at::empty({B}, U.options().dtype(at::kDouble));
  auto fell_back = at::empty({B}, U.options().dtype(at::kBool));
  for (int64_t b = 0; b < B; ++b) {
    sides[b] = results[b].side;
    std::copy(results[b].S.begin(), results[b].S.end(), sums.data_ptr<double>() + b * 2 * C);
    inertia.data_ptr<double>()[b] = results[b].inertia;
    fell_back.data_ptr<bool>()[b] = results[b].fell_back;
  }
  return {sides, sums, inertia, fell_back};
}

std::tuple<at::Tensor, at::Tensor> two_means_step_cpu(const at::Tensor& U, const at::Tensor& members,
                                                      const at::Tensor& sums) {
  check_inputs(U, members);
  const int64_t C = U.size(1);
  TORCH_CHECK(sums.scalar_type() == at::kDouble && sums.numel() == 2 * C && sums.is_contiguous(),
              "sums must be contiguous float64 [2, C]");
  auto side = at::empty({members.numel()}, members.options());
  auto S_new = at::empty({2, C}, sums.options());
  AT_DISPATCH_FLOATING_TYPES(U.scalar_type(), "two_means_step_cpu", [&] {
    Rows<scalar_t> r{U.data_ptr<scalar_t>(), members.data_ptr<int64_t>(), members.numel(), C};
    lloyd_step(r, sums.data_ptr<double>(), side.data_ptr<int64_t>(), /*full=*/true, S_new.data_ptr<double>(),
               /*parallel=*/true);
  });
  return {side, S_new};
}

TORCH_LIBRARY_FRAGMENT(gig_fast_cpp, m) {
  m.def("two_means_splits(Tensor U, Tensor[] members, int[] seeds, int n_init, int max_iter, int init_sample, "
        "bool refine) -> (Tensor[], Tensor, Tensor, Tensor)",
        &two_means_splits_cpu);
  m.def("two_means_step(Tensor U, Tensor members, Tensor sums) -> (Tensor, Tensor)", &two_means_step_cpu);
}

}  // namespace gig_fast
