"""Our sparse coder against SPAMS with the calls alternated in one process: the ratio on a busy host.

    OMP_NUM_THREADS=1 python benchmarks/spams_alternated.py --rounds 9
    OMP_NUM_THREADS=2 python benchmarks/spams_alternated.py --shapes 2000x256x2048 --methods lasso

The suite (``bench_sparse_code.py``) times each library's rounds one after the other, so a host whose
load drifts between them moves the ratio: on a shared 2-core VM the same code's ratio moved 10–20 %
between runs. Here ours and SPAMS fp32 take turns, call after call, on the suite's ``unit`` data (PFV-like
rows on unit-norm concepts, the same seed, λ and OMP atoms as there), and each round's ratio is kept, so
drift hits both sides alike. Before timing, each side's result is checked: the Lasso's objectives equal
to 1e-6 relative; OMP at most the atoms asked for on every row, our residual orthogonal to our atoms (a
least-squares fit on its support), SPAMS's residual no more than 1 % above ours (as in the suite; its atom
rule differs, and its residual is 5 % lower at the suite's shapes, up to a third lower on small ones).

Prints one line per (method, shape): both medians, their ratio and the range of the per-round ratios.
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from gig_fast.ops import sparse_code
from gig_fast.ops.sparse_code import DEFAULT_LAM_REL
from gig_fast.testing import dense_codes, pfv_like

# the suite's Gram-route shapes (N rows × C channels on K = 8·C concepts) and OMP's atoms there (the
# Lasso's mean support on that data, which the suite measures with scikit-learn)
SHAPES = {(2000, 256, 2048): 21, (500, 512, 4096): 35, (200, 1024, 8192): 59}


def unit_problem(N: int, C: int, K: int):
    """The suite's ``unit`` case: ``Y [N, C]``, unit-norm ``V [K, C]`` (float32) and λ."""
    g = torch.Generator().manual_seed(0)
    X, V, beta = pfv_like(N, C, K, dtype=torch.float32, generator=g)
    Y, V = X - beta, V / V.norm(dim=1, keepdim=True)
    lam = float(DEFAULT_LAM_REL * (Y @ V.T).abs().amax(1).mean())
    return Y, V, lam


def objective(Y, V, U, lam) -> float:
    R = Y.double() - U @ V.double()
    return float((0.5 * (R * R).sum(1) + lam * U.abs().sum(1)).sum())


def pair(method: str, Y, V, lam: float, atoms: int):
    """(ours, SPAMS's) calls and a check of their results."""
    import spams
    threads = torch.get_num_threads()
    Yf, Df = np.asfortranarray(Y.numpy().T), np.asfortranarray(V.numpy().T)
    K = V.shape[0]
    if method == "lasso":
        ours = lambda: sparse_code(Y, V, lam=lam, lam_mode="absolute", backend="cpp")  # noqa: E731
        theirs = lambda: spams.lasso(Yf, D=Df, lambda1=lam, mode=2, numThreads=threads)  # noqa: E731
    else:
        ours = lambda: sparse_code(Y, V, method="omp", n_nonzero=atoms, backend="cpp")  # noqa: E731
        # eps and lambda1 given (0, their documented defaults): left out, spams-bin 2.6.14 returned all-zero codes
        # in about half of the processes
        theirs = lambda: spams.omp(Yf, D=Df, L=atoms, eps=0.0, lambda1=0.0, numThreads=threads)  # noqa: E731

    def check():
        U = dense_codes(*ours(), K)
        W = torch.from_numpy(np.asarray(theirs().toarray().T, dtype=np.float64))
        if method == "lasso":
            a, b = objective(Y, V, U, lam), objective(Y, V, W, lam)
            assert abs(a - b) <= 1e-6 * abs(b), f"Lasso objectives differ: ours {a:.9g}, SPAMS {b:.9g}"
        else:  # ours: a least-squares fit on its support (residual ⟂ its atoms); SPAMS: no worse than ours
            for codes in (U, W):
                assert int((codes != 0).sum(1).max()) <= atoms, "an OMP row with more atoms than asked for"
            R = Y.double() - U @ V.double()
            off = float(((R @ V.double().T).abs() * (U != 0)).amax() / Y.double().norm(dim=1).amax())
            assert off <= 1e-4, f"our OMP residual is not orthogonal to its atoms ({off:.2g} of ‖y‖)"
            a, b = objective(Y, V, U, 0.0), objective(Y, V, W, 0.0)
            assert b <= 1.01 * a, f"SPAMS's OMP residual {b:.6g} is over 1.01 × ours ({a:.6g}): not the same result"
    return ours, theirs, check


def alternate(ours, theirs, rounds: int):
    """Medians of ours and theirs and the per-round ratios theirs / ours, the calls taking turns."""
    ours(), theirs()  # warm-up: buffers, thread pools
    t_ours, t_theirs = [], []
    for _ in range(rounds):
        for f, times in ((ours, t_ours), (theirs, t_theirs)):
            start = time.perf_counter()
            f()
            times.append(time.perf_counter() - start)
    return statistics.median(t_ours), statistics.median(t_theirs), [b / a for a, b in zip(t_ours, t_theirs)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--methods", default="lasso,omp")
    ap.add_argument("--shapes", default=",".join("x".join(map(str, s)) for s in SHAPES),
                    help="NxCxK, comma-separated (OMP's atoms: the suite's where known, else K / 100)")
    args = ap.parse_args()
    for method in args.methods.split(","):
        for shape in args.shapes.split(","):
            N, C, K = (int(v) for v in shape.split("x"))
            Y, V, lam = unit_problem(N, C, K)
            ours, theirs, check = pair(method, Y, V, lam, SHAPES.get((N, C, K), max(1, K // 100)))
            check()
            m_ours, m_theirs, ratios = alternate(ours, theirs, args.rounds)
            print(f"{method:5s} {N} x {C} on {K}, {torch.get_num_threads()} thread(s), {args.rounds} rounds: "
                  f"ours {1e3 * m_ours:.1f} ms, SPAMS fp32 {1e3 * m_theirs:.1f} ms: {m_theirs / m_ours:.2f}x "
                  f"(rounds {min(ratios):.2f}-{max(ratios):.2f}x)", flush=True)


if __name__ == "__main__":
    main()
