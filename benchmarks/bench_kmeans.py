"""Spherical k-means: the assignment, the centroid update and the bisecting concept extractor.

* assignment (``spherical_assign``, every backend) vs ``(X @ Cᵀ).argmax(1)`` on unit rows in fp32,
  tf32 (GPU) and bf16, a bare bf16 GEMM of the same shape (GPU: the floor), and flash-kmeans's cosine
  assignment when the ``flash_kmeans`` package imports. Each row carries its label agreement with a
  float64 argmax (on a subsample of rows).
* centroid update (``centroid_update``, every backend) vs ``index_add_`` + ``bincount``, for K = 2
  (the 2-means case) and the full K.
* bisecting (``gig_fast.concepts``, sequential and fast) vs scikit-learn's ``BisectingKMeans`` (CPU,
  on the unit-normalised centred data, ``bisecting_strategy="largest_cluster"`` = the same algorithm,
  and its default ``"biggest_inertia"``), comparing time and cosine inertia.

    python benchmarks/bench_kmeans.py --device cpu --quick
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from harness import record, time_ms  # noqa: E402

from gig_fast.concepts import bisecting_spherical_kmeans, cosine_inertia  # noqa: E402
from gig_fast.ops import available_backends, centroid_update, spherical_assign  # noqa: E402
from gig_fast.testing import clustered_points, label_quality, random_unit  # noqa: E402


def _backends(device: str) -> list[str]:
    avail = available_backends()
    return [b for b in ("torch", "cpp", "triton", "cuda") if avail[b] == "runs" and
            (b != "cpp" or device == "cpu") and (b != "cuda" or device == "cuda") and
            (b != "triton" or device == "cuda")]


@contextlib.contextmanager
def _tf32(on: bool):
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = on
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old


def _flash_kmeans_assign():
    """flash-kmeans's cosine assignment ``(x [B,N,D], c [B,K,D]) -> [B,N] int32`` or None."""
    try:
        from flash_kmeans.assign_euclid_triton import cosine_assign_triton
        return cosine_assign_triton
    except Exception:
        try:
            from flash_kmeans.kmeans_triton_impl import cosine_assign_triton
            return cosine_assign_triton
        except Exception:
            return None


def bench_assign(device: str, N: int, C: int, K: int, check_rows: int, bf16_baseline: bool = True) -> None:
    X = random_unit(N, C, torch.float32, device)
    cents = random_unit(K, C, torch.float32, device)
    shape = {"N": N, "C": C, "K": K}
    flops = 2.0 * N * C * K
    sub = slice(0, min(N, check_rows))

    def quality(labels):
        return label_quality(X[sub], cents, labels[sub])["agreement"]

    base_fp32 = time_ms(lambda: (X @ cents.T).argmax(1), device)
    record("spherical_assign", "matmul+argmax fp32", device, shape, base_fp32, flops=flops,
           extra={"agreement": quality((X @ cents.T).argmax(1)) if N * K <= 4e9 else None})
    if device == "cuda":
        with _tf32(True):
            t = time_ms(lambda: (X @ cents.T).argmax(1), device)
            record("spherical_assign", "matmul+argmax tf32", device, shape, t, flops=flops,
                   baseline="matmul+argmax fp32", baseline_ms=base_fp32["ms"],
                   extra={"agreement": quality((X @ cents.T).argmax(1))})
    Xb, Cb = X.bfloat16(), cents.bfloat16()
    if bf16_baseline:  # slow on CPUs without bf16 units: left out of the quick CPU run
        t = time_ms(lambda: (Xb @ Cb.T).argmax(1), device)
        record("spherical_assign", "matmul+argmax bf16", device, shape, t, flops=flops,
               baseline="matmul+argmax fp32", baseline_ms=base_fp32["ms"],
               extra={"agreement": quality((Xb @ Cb.T).argmax(1))})
    gemm = None
    if device == "cuda":
        gemm = time_ms(lambda: Xb @ Cb.T, device)
        record("spherical_assign", "bare bf16 GEMM (floor)", device, shape, gemm, flops=flops)
        fk = _flash_kmeans_assign()
        if fk is None:
            print("  flash-kmeans not importable (pip package flash-kmeans): skipped")
        else:
            Xh, Ch = X.half()[None], cents.half()[None]
            t = time_ms(lambda: fk(Xh, Ch), device)
            record("spherical_assign", "flash-kmeans fp16", device, shape, t, flops=flops,
                   baseline="matmul+argmax fp32", baseline_ms=base_fp32["ms"],
                   extra={"agreement": quality(fk(Xh, Ch)[0].long())})
    for b in _backends(device):
        for dtype in ((torch.float32, torch.bfloat16) if device == "cuda" else (torch.float32,)):
            Xd, Cd = X.to(dtype), cents.to(dtype)
            t = time_ms(lambda: spherical_assign(Xd, Cd, backend=b), device)
            labels = spherical_assign(Xd, Cd, backend=b)[0]
            extra = {"agreement": quality(labels), "dtype": str(dtype).replace("torch.", "")}
            if gemm is not None:
                extra["x_bf16_gemm"] = t["ms"] / gemm["ms"]
            record("spherical_assign", f"{b} {extra['dtype']}", device, shape, t, flops=flops,
                   baseline="matmul+argmax fp32", baseline_ms=base_fp32["ms"], extra=extra)


def bench_update(device: str, N: int, C: int, Ks: tuple[int, ...]) -> None:
    X = torch.randn(N, C, device=device)
    for K in Ks:
        labels = torch.randint(K, (N,), device=device)
        shape = {"N": N, "C": C, "K": K}
        nbytes = N * C * 4 + N * 8 + K * C * 4

        def index_add():
            return torch.zeros(K, C, device=device).index_add_(0, labels, X), torch.bincount(labels, minlength=K)

        base = time_ms(index_add, device)
        record("centroid_update", "index_add_ (atomics)", device, shape, base, bytes_moved=nbytes)
        for b in _backends(device):
            t = time_ms(lambda: centroid_update(X, labels, K, backend=b), device)
            record("centroid_update", b, device, shape, t, bytes_moved=nbytes, baseline="index_add_",
                   baseline_ms=base["ms"])


def _once(fn):
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return out, (time.perf_counter() - t0) * 1e3


def bench_bisecting(device: str, N: int, C: int, K: int, sklearn_too: bool,
                    strategies: tuple[str, ...] = ("largest_cluster", "biggest_inertia")) -> None:
    g = torch.Generator().manual_seed(0)
    X = clustered_points(N, C, max(2, K // 8), generator=g).to(device)
    beta = torch.full((C,), 2.0, device=device)
    shape = {"N": N, "C": C, "K": K}
    results = {}
    for mode in ("sequential", "fast"):
        (_, labels, info), ms = _once(lambda: bisecting_spherical_kmeans(X, K, beta=beta, mode=mode, return_info=True))
        results[mode] = (ms, info.inertia)
        record("bisecting", f"gig_fast {mode}", device, shape, {"ms": ms, "ms_p20": ms, "ms_p80": ms},
               extra={"cosine_inertia": info.inertia, "rounds": info.rounds,
                      "inertia_vs_sequential": info.inertia / results["sequential"][1]})
    if not sklearn_too:
        return
    try:
        from sklearn.cluster import BisectingKMeans
    except ImportError:
        print("  scikit-learn not importable: bisecting baseline skipped")
        return
    U = X.cpu().double() - 2.0
    U = (U / U.norm(dim=1, keepdim=True)).float().numpy()
    for strategy in strategies:
        sk, ms = _once(lambda: BisectingKMeans(K, random_state=0, bisecting_strategy=strategy).fit(U))
        inertia = cosine_inertia(X.cpu(), torch.from_numpy(sk.labels_).long(), K, beta.cpu())
        for mode in ("sequential", "fast"):
            ours_ms, ours_inertia = results[mode]
            print(f"  gig_fast {mode}: {sk_speed(ms, ours_ms)} vs sklearn BisectingKMeans({strategy}); "
                  f"cosine inertia {ours_inertia:.2f} vs {inertia:.2f} ({ours_inertia / inertia:.4f}x)")
        record("bisecting", f"sklearn BisectingKMeans {strategy}", device, shape,
               {"ms": ms, "ms_p20": ms, "ms_p80": ms}, extra={"cosine_inertia": inertia})


def sk_speed(sk_ms: float, ours_ms: float) -> str:
    return f"{sk_ms / ours_ms:.2f}x faster ({ours_ms:.0f} ms vs {sk_ms:.0f} ms)"


def run(device: str, quick: bool) -> None:
    if device == "cuda":
        bench_assign(device, 200_000, 1024, 8192, check_rows=20_000)
        bench_assign(device, 200_000, 256, 2048, check_rows=20_000)
        bench_assign(device, 50_000, 2048, 16384, check_rows=5_000)
        bench_update(device, 200_000, 1024, (2, 8192))
        bench_bisecting(device, 50_000, 256, 2048, sklearn_too=False)
    elif quick:
        bench_assign(device, 4000, 256, 2048, check_rows=1000, bf16_baseline=False)
        bench_update(device, 50_000, 256, (2, 2048))
        bench_bisecting(device, 5000, 64, 256, sklearn_too=True, strategies=("largest_cluster",))
    else:
        bench_assign(device, 20_000, 256, 2048, check_rows=2000)
        bench_update(device, 200_000, 256, (2, 2048))
        bench_bisecting(device, 50_000, 256, 2048, sklearn_too=True)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true")
    a = p.parse_args()
    run(a.device, a.quick)
