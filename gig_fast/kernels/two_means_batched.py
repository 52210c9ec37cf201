"""The ``batched`` backend of ``two_means_splits`` / ``two_means_step``: every cluster of a batch split at
once, as segments of one concatenation (the GPU route of the bisecting concept extractor).

The algorithm, its split rule and its random draws are those of :func:`gig_fast.ops.reference.two_means_splits_ref`
(written out in ``csrc/two_means/two_means.h``). The reference loops over clusters and over Lloyd
iterations in Python — thousands of tiny launches per layer on a GPU. Here the rows of all clusters of a
batch are concatenated (``rows [M]`` into U, with the cluster id ``seg [M]`` of each row), and each Lloyd
iteration is a fixed number of tensor ops over all of them, whatever the number of clusters:

* the direction ``w_b = S1/|S1| − S0/|S0|`` of every cluster (``[B, C]``),
* the score ``<x_i, w_seg(i)>`` of every row and its side ``score > 0`` (ties → 0),
* the side sums of every cluster (a segment reduction keyed by ``(seg, side)``, float64),
* the per-cluster convergence mask (a segment count of changed sides); the rows of converged clusters
  are dropped from the next iteration (one host sync per iteration, the loop's exit test).

The per-cluster scalar draws stay on the host: SplitMix64 is counter-based (the k-th output is a pure
function of seed + (k+1)·γ), so :func:`splitmix64_draws` computes the k-th draw of every cluster at once
in numpy; only the k-means++ second pick needs the data (one host sync per initialisation for the
cosine-distance totals, which decide whether a uniform is drawn).

Determinism (:class:`SideSums`): on the CPU the side sums are ``index_add_`` over the rows in member
order, the reference's own reduction, so sums and inertia equal the reference's bit for bit and sides
equal it except for a row that lies within float rounding of a splitting hyperplane (the scores are
per-row dot products here, a gemv there). On CUDA ``index_add_`` on floats uses atomics (run-to-run
differences), so the side sums are a two-level ``torch.segment_reduce`` over the contiguous segments:
no atomics, the same result on every run (and within the summation bound of the reference's). What is
not deterministic on CUDA: nothing that reaches a result — the changed-side counts are integer
``index_add_`` (exact in any order), the scores elementwise products with a per-row ``sum`` (a fixed
reduction tree), the k-means++ cumsum/searchsorted fixed scans.
"""
from __future__ import annotations

import numpy as np
import torch

__all__ = ["CHUNKED_SUM_DEVICES", "SUM_CHUNK", "SideSums", "splitmix64_draws", "two_means_splits_batched",
           "two_means_step_batched"]

_GAMMA = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)


def splitmix64_draws(seeds: np.ndarray, counters: np.ndarray) -> np.ndarray:
    """The ``counters``-th output (0-based) of :class:`~gig_fast.ops.reference.SplitMix64` ``(seeds)``,
    elementwise: SplitMix64's state after ``k + 1`` draws is ``seed + (k + 1)·γ mod 2^64``.

    Args: seeds, counters: broadcastable integer arrays (seeds < 2^64, counters ≥ 0).
    Returns: uint64 array of the draws.
    """
    seeds = np.asarray(seeds, dtype=np.uint64)
    counters = np.asarray(counters, dtype=np.uint64)
    with np.errstate(over="ignore"):  # uint64 arithmetic wraps mod 2^64, as SplitMix64 means it to
        z = seeds + (counters + np.uint64(1)) * _GAMMA
        z = (z ^ (z >> np.uint64(30))) * _MIX1
        z = (z ^ (z >> np.uint64(27))) * _MIX2
    return z ^ (z >> np.uint64(31))


def _uniform(z: np.ndarray) -> np.ndarray:
    """Doubles in [0, 1) from the top 53 bits (``SplitMix64.uniform``)."""
    return (z >> np.uint64(11)).astype(np.float64) * 2.0 ** -53


def _index(z: np.ndarray, n: np.ndarray) -> np.ndarray:
    """Uniform indices in ``[0, n)`` (``SplitMix64.index``)."""
    return np.minimum(n - 1, np.floor(_uniform(z) * n).astype(np.int64))


class _Draws:
    """The SplitMix64 streams of a batch of clusters: one seed and one draw counter per cluster."""

    def __init__(self, seeds: list[int]):
        self.seeds = np.array(seeds, dtype=np.uint64)
        self.count = np.zeros(len(seeds), dtype=np.int64)

    def index(self, n: np.ndarray) -> np.ndarray:
        """One index in ``[0, n_b)`` per cluster."""
        out = _index(splitmix64_draws(self.seeds, self.count), n)
        self.count += 1
        return out

    def uniform(self, where: np.ndarray) -> np.ndarray:
        """One uniform per cluster where ``where`` (bool ``[B]``); the others draw nothing (0 returned)."""
        out = np.where(where, _uniform(splitmix64_draws(self.seeds, self.count)), 0.0)
        self.count += where.astype(np.int64)
        return out


def _sample_positions(seed: int, n: int, k: int) -> list[int]:
    """The positions (sorted) of the ``k`` members of an ``n``-member cluster drawn by the reference's
    partial Fisher–Yates shuffle (draws 0 … k−1 of the cluster's stream); a dict holds the swapped
    entries, so the cost is O(k) even for a cluster of 200,000 members."""
    j = np.arange(k, dtype=np.int64)
    r = j + _index(splitmix64_draws(np.uint64(seed), j), n - j)
    pos: dict[int, int] = {}
    for a, b in zip(j.tolist(), r.tolist()):
        pos[a], pos[b] = pos.get(b, b), pos.get(a, a)
    return sorted(pos.get(a, a) for a in range(k))


class _Segments:
    """Clusters concatenated: ``rows [M]`` (indices into U), ``seg [M]`` (cluster of each row),
    ``lengths`` int64 ``[B]`` (host and device), ``offsets`` int64 ``[B]`` (first row of each cluster)."""

    def __init__(self, pieces: list[torch.Tensor], device: torch.device):
        self.lengths_host = np.array([p.shape[0] for p in pieces], dtype=np.int64)
        self.B = len(pieces)
        self.lengths = torch.as_tensor(self.lengths_host, device=device)
        self.offsets = torch.cumsum(self.lengths, 0) - self.lengths
        self.rows = torch.cat(pieces) if pieces else torch.zeros(0, dtype=torch.int64, device=device)
        self.seg = torch.repeat_interleave(torch.arange(self.B, device=device), self.lengths)

    def position(self) -> torch.Tensor:
        """int64 ``[M]``: each row's position inside its cluster."""
        return torch.arange(self.rows.shape[0], device=self.rows.device) - self.offsets[self.seg]

    def split(self, values: torch.Tensor) -> list[torch.Tensor]:
        return list(values.split(self.lengths_host.tolist()))


def _directions(S: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``[B, C]`` ``S1/|S1| − S0/|S0|`` of the side sums ``S [B, 2, C]`` (an empty side's term 0), in
    ``dtype`` (the reference's ``two_means_step_ref``, batched)."""
    norms = S.norm(dim=2)
    inv = torch.where(norms > 0, 1.0 / norms.clamp_min(torch.finfo(torch.float64).tiny), torch.zeros_like(norms))
    return (S[:, 1] * inv[:, 1, None] - S[:, 0] * inv[:, 0, None]).to(dtype)


# Devices whose side sums are the two-level chunked segment reduction (see SideSums); elsewhere index_add_.
CHUNKED_SUM_DEVICES = {"cuda"}
# Rows per first-level chunk: a segment_reduce thread adds its chunk's rows one after the other, so a
# chunk bounds that serial loop (one 200,000-row cluster would otherwise be 200,000 dependent adds per
# thread) while the second level adds at most ⌈n/256⌉ chunk sums per cluster. Not measured yet.
SUM_CHUNK = 256


class SideSums:
    """Float64 side sums ``[B, 2, C]`` of clusters stored as contiguous segments of ``lengths [B] > 0``
    rows (``seg [M]``: each row's cluster), deterministic on every device.

    * CPU (default): ``index_add_`` keyed by ``2·seg + side``, rows in member order — the reference's own
      reduction (``_side_sums`` of ``two_means_step_ref``), so the sums equal it bit for bit.
    * CUDA: ``index_add_`` on floats is atomic (the order, hence the last bits, change from run to run),
      so each side is a ``torch.segment_reduce`` in two levels — chunks of :data:`SUM_CHUNK` rows that
      never straddle a cluster, then the chunks of each cluster — a fixed order, no atomics. The other
      side's rows add an exact 0.
    """

    def __init__(self, seg: torch.Tensor, lengths: torch.Tensor, chunked: bool | None = None):
        self.seg, self.B = seg, lengths.shape[0]
        self.chunked = seg.device.type in CHUNKED_SUM_DEVICES if chunked is None else chunked
        if self.chunked:
            self.per = (lengths + SUM_CHUNK - 1) // SUM_CHUNK  # chunks of each cluster
            chunk_seg = torch.repeat_interleave(torch.arange(self.B, device=seg.device), self.per)
            first_chunk = torch.cumsum(self.per, 0) - self.per
            nth = torch.arange(chunk_seg.shape[0], device=seg.device) - first_chunk[chunk_seg]  # chunk's rank
            self.chunk_lengths = (lengths[chunk_seg] - nth * SUM_CHUNK).clamp(max=SUM_CHUNK)

    def __call__(self, X64: torch.Tensor, side: torch.Tensor) -> torch.Tensor:
        """``X64 [M, C]`` float64 rows, ``side`` int64 ``[M]`` in {0, 1} → ``[B, 2, C]``."""
        C = X64.shape[1]
        if not self.chunked:
            out = torch.zeros(2 * self.B, C, dtype=torch.float64, device=X64.device)
            return out.index_add_(0, 2 * self.seg + side, X64).view(self.B, 2, C)
        one = side.bool()[:, None]
        zero = torch.zeros((), dtype=torch.float64, device=X64.device)
        sides = []
        for rows in (torch.where(one, zero, X64), torch.where(one, X64, zero)):
            chunks = torch.segment_reduce(rows, "sum", lengths=self.chunk_lengths, axis=0)
            sides.append(torch.segment_reduce(chunks, "sum", lengths=self.per, axis=0))
        return torch.stack(sides, 1)


def _count(seg: torch.Tensor, flags: torch.Tensor, B: int) -> torch.Tensor:
    """int64 ``[B]``: the number of true ``flags`` of each cluster (integer adds: exact in any order)."""
    return torch.zeros(B, dtype=torch.int64, device=seg.device).index_add_(0, seg, flags.to(torch.int64))


def _lloyd(X: torch.Tensor, X64: torch.Tensor, parts: _Segments, S: torch.Tensor, max_iter: int
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Lloyd of every cluster of ``parts`` from its side sums ``S [B, 2, C]``, each until its sides stop
    changing (at most ``max_iter`` steps), as ``_lloyd_ref`` does for one.

    Args: X ``[M, C]`` the clusters' rows (U's dtype), X64 the same in float64.
    Returns: ``(side int64 [M], S float64 [B, 2, C] of those sides, inertia float64 [B] = n_b − |S0| − |S1|)``.
    """
    S = S.clone()
    side = torch.zeros(X.shape[0], dtype=torch.int64, device=X.device)
    # the clusters still iterating (ids into S), their rows (positions in X), each row's index into act,
    # their sizes, rows, side sums and current sides; written back to S/side when some converge or at the end
    act = torch.arange(parts.B, device=X.device)
    rows = torch.arange(X.shape[0], device=X.device)
    local, lengths, Xa, Xa64, Sa, prev = parts.seg, parts.lengths, X, X64, S, None
    sums = SideSums(local, lengths)
    for it in range(max_iter):
        new = ((Xa * _directions(Sa, X.dtype)[local]).sum(1) > 0).to(torch.int64)
        Sa = sums(Xa64, new)
        if prev is None or it == max_iter - 1:
            prev = new
            continue
        moving = _count(local, new != prev, act.shape[0]) > 0
        prev = new
        still = int(moving.sum())  # the loop's one host sync
        if still == act.shape[0]:
            continue
        S[act], side[rows] = Sa, prev
        if still == 0:
            return side, S, parts.lengths.to(torch.float64) - S.norm(dim=2).sum(1)
        keep = moving[local]  # drop the rows of the converged clusters
        Xa, Xa64, rows, prev = Xa[keep], Xa64[keep], rows[keep], prev[keep]
        local = (torch.cumsum(moving, 0) - 1)[local[keep]]
        act, lengths, Sa = act[moving], lengths[moving], Sa[moving]
        sums = SideSums(local, lengths)
    S[act], side[rows] = Sa, prev
    inertia = parts.lengths.to(torch.float64) - S.norm(dim=2).sum(1)
    return side, S, inertia


def _init_pairs(X: torch.Tensor, parts: _Segments, draws: _Draws) -> torch.Tensor:
    """k-means++ starts ``[B, 2, C]`` float64 of every cluster (``_init_pair_ref``, batched): a uniform
    random row, then a row drawn with probability ∝ its cosine distance to the first (the default
    ``first + 1 + index(n − 1)`` when every distance is 0)."""
    n = parts.lengths_host
    first = draws.index(n)
    second = (first + 1 + draws.index(np.maximum(n - 1, 1))) % n
    dev = X.device
    first_rows = X[parts.offsets + torch.as_tensor(first, device=dev)]  # [B, C]
    dist = (1.0 - (X * first_rows[parts.seg]).sum(1).double()).clamp_min(0)
    # per-cluster cumulative distances, padded with zeros to the largest cluster (≤ init_sample columns)
    padded = torch.zeros(parts.B, int(n.max()), dtype=torch.float64, device=dev)
    padded[parts.seg, parts.position()] = dist
    total = padded.sum(1).cpu().numpy()  # one host sync: a uniform is drawn only where total > 0
    has = total > 0
    u = torch.as_tensor(draws.uniform(has) * total, device=dev)
    hit = torch.searchsorted(torch.cumsum(padded, 1), u[:, None], right=True)[:, 0]
    use_hit = torch.as_tensor(has, device=dev) & (hit < parts.lengths)  # a row of distance 0 is never drawn
    second = torch.where(use_hit, hit, torch.as_tensor(second, device=dev))
    picks = torch.stack([torch.as_tensor(first, device=dev), second], 1) + parts.offsets[:, None]
    return X[picks].double()


def _best_of_inits(U: torch.Tensor, sample: _Segments, sizes: torch.Tensor, draws: _Draws, n_init: int,
                   max_iter: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The lowest-inertia Lloyd result of ``n_init`` initialisations on every cluster's sample (a later
    one wins only if lower by more than ``1e-9·n``, n the whole cluster's size ``sizes [B]``).
    Returns ``(side [M_sample], S [B, 2, C], inertia [B])``."""
    X = U[sample.rows]
    X64 = X.double()
    best = None
    for t in range(n_init):
        side, S, inertia = _lloyd(X, X64, sample, _init_pairs(X, sample, draws), max_iter)
        if t == 0:
            best = (side, S, inertia)
            continue
        better = inertia < best[2] - 1e-9 * sizes
        best = (torch.where(better[sample.seg], side, best[0]), torch.where(better[:, None, None], S, best[1]),
                torch.where(better, inertia, best[2]))
    return best


def _fall_back(U: torch.Tensor, members: list[torch.Tensor], sides: list[torch.Tensor], S: torch.Tensor,
               inertia: torch.Tensor, eligible: list[int]) -> torch.Tensor:
    """Clusters of ``eligible`` whose side is constant (inseparable points) are split by member order —
    the first ⌈n/2⌉ members vs the rest — in place in ``sides``/``S``/``inertia``. Returns bool ``[B]``."""
    fell = torch.zeros(len(members), dtype=torch.bool, device=U.device)
    if not eligible:
        return fell
    flags = _Segments([sides[b] for b in eligible], U.device)  # its "rows" are the sides themselves
    ones = _count(flags.seg, flags.rows, flags.B)  # rows on side 1, per cluster
    flat = (ones == 0) | (ones == flags.lengths)
    which = [b for b, f in zip(eligible, flat.tolist()) if f]
    if not which:
        return fell
    fb = _Segments([members[b] for b in which], U.device)
    side = (fb.position() >= (fb.lengths[fb.seg] + 1) // 2).to(torch.int64)
    sums = SideSums(fb.seg, fb.lengths)(U[fb.rows].double(), side)
    idx = torch.as_tensor(which, device=U.device)
    S[idx] = sums
    inertia[idx] = fb.lengths.to(torch.float64) - sums.norm(dim=2).sum(1)
    fell[idx] = True
    for b, piece in zip(which, fb.split(side)):
        sides[b] = piece
    return fell


def two_means_splits_batched(U: torch.Tensor, members: list[torch.Tensor], seeds: list[int], n_init: int,
                             max_iter: int, init_sample: int, refine: bool
                             ) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`~gig_fast.ops.reference.two_means_splits_ref`'s splits, all clusters at once (inputs validated
    by ``gig_fast.ops.two_means_splits``).

    Args: U ``[N, C]`` unit rows (float32/float64), members: int64 ``[n_b]`` sorted row indices (n_b ≥ 2),
        seeds: one int per cluster; n_init, max_iter, init_sample, refine as in the op.
    Returns: ``(sides [int64 [n_b]], sums float64 [B, 2, C], inertia float64 [B], fell_back bool [B])``
        (``refine=False``: a cluster larger than ``init_sample`` returns its sample's side and sums).
    """
    B, C, dev = len(members), U.shape[1], U.device
    if B == 0:
        return [], torch.zeros(0, 2, C, dtype=torch.float64, device=dev), \
            torch.zeros(0, dtype=torch.float64, device=dev), torch.zeros(0, dtype=torch.bool, device=dev)
    n = [int(m.shape[0]) for m in members]
    sampled = [b for b in range(B) if n[b] > init_sample]
    draws = _Draws(seeds)
    picks = list(members)
    if sampled:  # host draws (the first init_sample of each cluster's stream), then one gather for all
        start = np.cumsum([0] + [n[b] for b in sampled])
        where = np.concatenate([start[j] + np.array(_sample_positions(seeds[b], n[b], init_sample))
                                for j, b in enumerate(sampled)])
        rows = torch.cat([members[b] for b in sampled])[torch.as_tensor(where, device=dev)]
        for b, piece in zip(sampled, rows.split(init_sample)):
            picks[b] = piece
        draws.count[sampled] = init_sample
    sample = _Segments(picks, dev)
    sizes = torch.as_tensor(n, dtype=torch.float64, device=dev)
    side, S, inertia = _best_of_inits(U, sample, sizes, draws, n_init, max_iter)
    sides = sample.split(side)
    refined = sampled if refine else []
    if refined:  # Lloyd on every refined cluster's whole membership, from its best sample sums
        whole = _Segments([members[b] for b in refined], dev)
        X = U[whole.rows]
        idx = torch.as_tensor(refined, device=dev)
        side_r, S[idx], inertia[idx] = _lloyd(X, X.double(), whole, S[idx], max_iter)
        for b, piece in zip(refined, whole.split(side_r)):
            sides[b] = piece
    eligible = [b for b in range(B) if refine or n[b] <= init_sample]  # refine=False: no fallback on samples
    fell = _fall_back(U, members, sides, S, inertia, eligible)
    return sides, S, inertia, fell


def two_means_step_batched(U: torch.Tensor, members: torch.Tensor, sums: torch.Tensor
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`~gig_fast.ops.reference.two_means_step_ref` with the deterministic side sums of this backend.

    Args: U ``[N, C]`` unit rows, members int64 ``[n]``, sums float64 ``[2, C]``.
    Returns: ``(side int64 [n], new sums float64 [2, C])``.
    """
    X = U[members]
    w = _directions(sums[None], U.dtype)[0]
    side = (X @ w > 0).to(torch.int64)
    if members.shape[0] == 0:
        return side, torch.zeros_like(sums)
    lengths = torch.tensor([members.shape[0]], device=U.device)
    return side, SideSums(torch.zeros_like(members), lengths)(X.double(), side)[0]
