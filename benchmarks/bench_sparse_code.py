"""Benchmark of ``sparse_code`` (Lasso / OMP coding of PFVs on the concept dictionary).

CPU: our ``cpp`` backend against scikit-learn's ``sparse_encode(algorithm="lasso_cd" | "omp")`` on the
same vectors (300 at C=256, K=2048; quick: 30), on a random dictionary, on PFV-like data and on real PFVs
of the demo network (layer4.1, C=256) coded against their own K=2048 concepts (when its weights are cached). One λ for
the whole batch (sparse_encode takes one): ``λ = λ_rel · mean λ_max``; sparse_encode's ``alpha`` for
lasso_cd is divided by n_features internally, so ``alpha = λ`` gives the same problem. Each row reports
both objectives (summed over the batch); ours is stopped at a tighter tolerance, so "equal objective"
is in scikit-learn's favour. scikit-learn runs are timed once (they take seconds to minutes).

GPU: the ``triton`` backend against a dense PyTorch FISTA (two GEMMs per iteration over all K, fp32
and tf32) at layer1 (C=256, K=2048), layer3 (C=1024, K=8192) and layer4 (C=2048, K=16384), 1000
PFV-like vectors each: FISTA runs until its objective is within 1e-4 of ours (checked every 25
iterations, at most 2000), then that many iterations are timed once.

``--calibrate`` prints the l0 ratio of a few λ_rel at K = 8C on PFV-like data (how the former default 0.2 was
chosen; the current DEFAULT_LAM_REL comes from the demo network's layers: benchmarks/lambda_rule.py).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.harness import record, time_ms  # noqa: E402
from gig_fast.ops import available_backends, sparse_code  # noqa: E402
from gig_fast.ops.sparse_code import DEFAULT_LAM_REL  # noqa: E402
from gig_fast.testing import dense_codes, pfv_like, random_problem  # noqa: E402

GPU_SHAPES = {"layer1": (256, 2048), "layer3": (1024, 8192), "layer4": (2048, 16384)}


def _once(fn, device: str) -> dict:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t = time.perf_counter()
    fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    ms = (time.perf_counter() - t) * 1e3
    return {"ms": ms, "ms_p20": ms, "ms_p80": ms}


def _objective(Y: torch.Tensor, V: torch.Tensor, U: torch.Tensor, lam: torch.Tensor) -> float:
    """Σ_n ½‖y_n − Vᵀu_n‖² + λ_n‖u_n‖₁ in float64."""
    Y, V, U = Y.double(), V.double(), U.double()
    R = Y - U @ V
    return float((0.5 * (R * R).sum(1) + lam.double() * U.abs().sum(1)).sum())


def _demo_problem(N: int, layer: str = "layer4.1", fit_images: int = 3000):
    """Real PFVs: ``layer`` pre-activations (C = 256, 2×2 positions) of the demo network on Fashion-MNIST
    test images; K = 8·C concepts by bisecting k-means on the PFVs of the first ``fit_images`` images, and
    ``N`` PFVs of later images, centred by β, to code. None when the demo weights are not cached."""
    from gig_fast.concepts import bisecting_spherical_kmeans
    from gig_fast.data import fashion_mnist
    from gig_fast.models.demo import load_demo
    from gig_fast.slicing import bn_shift, preactivation
    try:
        model = load_demo()
    except FileNotFoundError as e:
        print(f"  {e}: the demo-PFV rows are skipped")
        return None
    images = fashion_mnist("test").tensors[0][:fit_images + N]
    with torch.no_grad():
        xa = preactivation(model, layer, images)
    C = xa.shape[1]
    pfv = xa.permute(0, 2, 3, 1).reshape(images.shape[0], -1, C)  # [images, positions, C]
    beta = bn_shift(model, layer).to(pfv.dtype)
    V, _ = bisecting_spherical_kmeans(pfv[:fit_images].reshape(-1, C), 8 * C, beta=beta, mode="fast")
    return pfv[fit_images:].reshape(-1, C)[:N] - beta, V


def _cpu_problem(kind: str, N: int, C: int, K: int):
    g = torch.Generator().manual_seed(0)
    if kind == "demo":
        return _demo_problem(N)
    if kind == "random":
        X, V = random_problem(N, C, K, dtype=torch.float32, generator=g)
        return X, V
    X, V, beta = pfv_like(N, C, K, dtype=torch.float32, generator=g)
    return X - beta, V


def run_cpu(quick: bool) -> None:
    from sklearn.decomposition import sparse_encode

    N, C, K = (30 if quick else 300), 256, 2048
    shape = {"N": N, "C": C, "K": K}
    have_cpp = available_backends()["cpp"] == "runs"
    ours = "cpp" if have_cpp else "torch"
    for kind in ("random", "pfv", "demo"):
        problem = _cpu_problem(kind, N, C, K)
        if problem is None:
            continue
        Y, V = problem
        assert Y.shape[1] == C and V.shape[0] == K, (Y.shape, V.shape)
        lam = float(DEFAULT_LAM_REL * (Y @ V.T).abs().amax(1).mean())
        lam_vec = torch.full((N,), lam)
        Yn, Vn = Y.double().numpy(), V.double().numpy()
        # scikit-learn lasso_cd (float64, its default tol=1e-4: stops at duality gap <= 1e-4·‖y‖²)
        codes = {}
        t_sk = _once(lambda: codes.setdefault("sk", sparse_encode(Yn, Vn, algorithm="lasso_cd", alpha=lam,
                                                                    max_iter=1000)), "cpu")
        obj_sk = _objective(Y, V, torch.from_numpy(codes["sk"]), lam_vec)
        record("sparse_code", "sklearn lasso_cd", "cpu", shape, t_sk, extra={"data": kind, "objective": obj_sk})
        # ours (float32 inputs; the solver keeps its state in double) with scikit-learn's stopping rule
        # (gap <= 1e-4·‖y‖²) and with our default (1e-6); the objectives say which is "equal"
        for tol in (1e-4, 1e-6):
            fn = lambda: sparse_code(Y, V, lam=lam, lam_mode="absolute", tol=tol, backend=ours)  # noqa: E731
            t_ours = time_ms(fn, "cpu", warmup=1, min_run_time=1.0)
            idx, val = fn()
            obj_ours = _objective(Y, V, dense_codes(idx, val, K), lam_vec)
            nnz = float((idx >= 0).sum()) / N
            extra = {"data": kind, "lam": lam, "tol": tol, "objective": obj_ours, "objective_sklearn": obj_sk,
                     "objective_rel_diff": (obj_ours - obj_sk) / obj_sk, "mean_nnz": nnz}
            record("sparse_code", f"{ours} lasso tol={tol:g}", "cpu", shape, t_ours, baseline="sklearn lasso_cd",
                   baseline_ms=t_sk["ms"], extra=extra)
            print(f"    {kind}: objective ours {obj_ours:.6f} vs sklearn {obj_sk:.6f} "
                  f"(rel diff {(obj_ours - obj_sk) / obj_sk:+.2e}), mean nnz {nnz:.1f}", flush=True)
        # OMP with as many atoms as the Lasso code has on average
        atoms = max(1, int(round(nnz)))
        fn = lambda: sparse_code(Y, V, method="omp", n_nonzero=atoms, backend=ours)  # noqa: E731
        t_omp = time_ms(fn, "cpu", warmup=1, min_run_time=1.0)
        idx, _ = fn()
        t_sk_omp = _once(lambda: codes.setdefault("omp", sparse_encode(Yn, Vn, algorithm="omp",
                                                                       n_nonzero_coefs=atoms)), "cpu")
        same = np.mean([set(r[r >= 0].tolist()) == set(np.flatnonzero(s).tolist())
                        for r, s in zip(idx, codes["omp"])])
        record("sparse_code", "sklearn omp", "cpu", shape, t_sk_omp, extra={"data": kind, "atoms": atoms})
        record("sparse_code", f"{ours} omp", "cpu", shape, t_omp, baseline="sklearn omp", baseline_ms=t_sk_omp["ms"],
               extra={"data": kind, "atoms": atoms, "same_support_share": float(same)})


def _fista_dense(Y, V, lam, L, iters, tf32: bool, target=None, check=25):
    """Plain FISTA over all K: ``u ← soft(z − (z V − y) Vᵀ / L, λ/L)``. Returns (u, iterations run)."""
    prev = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = tf32
    try:
        u = torch.zeros(Y.shape[0], V.shape[0], device=Y.device)
        z, t = u.clone(), 1.0
        thr = (lam / L)[:, None]
        for it in range(1, iters + 1):
            g = (z @ V - Y) @ V.T
            w = z - g / L
            u_new = torch.sign(w) * (w.abs() - thr).clamp_min(0)
            t_new = (1 + (1 + 4 * t * t) ** 0.5) / 2
            z = u_new + ((t - 1) / t_new) * (u_new - u)
            u, t = u_new, t_new
            if target is not None and it % check == 0 and _objective(Y, V, u, lam) <= target:
                return u, it
        return u, iters
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev


def run_gpu(quick: bool) -> None:
    N = 1000
    for layer, (C, K) in GPU_SHAPES.items():
        shape = {"layer": layer, "N": N, "C": C, "K": K}
        g = torch.Generator().manual_seed(0)
        X, V, beta = pfv_like(N, C, K, dtype=torch.float32, generator=g)
        Y, V = (X - beta).cuda(), V.cuda()
        fn = lambda: sparse_code(Y, V, lam=DEFAULT_LAM_REL, backend="triton", return_info=True)  # noqa: E731
        idx, val, info = fn()
        lam = info.lam.float()
        t_ours = time_ms(fn, "cuda")
        obj = _objective(Y, V, dense_codes(idx.cpu(), val.cpu(), K).cuda(), lam)
        L = float(torch.linalg.matrix_norm(V.double(), ord=2) ** 2) * 1.0001
        record("sparse_code", "triton lasso", "cuda", shape, t_ours,
               extra={"objective": obj, "max_rel_gap": info.max_rel_gap,
                      "mean_nnz": float((idx >= 0).sum()) / N, "sweeps_max": int(info.iterations.max())})
        for tf32 in (False, True):
            name = "dense FISTA " + ("tf32" if tf32 else "fp32")
            u, n_it = _fista_dense(Y, V, lam, L, 2000, tf32, target=obj * (1 + 1e-4))
            reached = _objective(Y, V, u, lam) <= obj * (1 + 1e-4)
            t = _once(lambda: _fista_dense(Y, V, lam, L, n_it, tf32), "cuda")
            record("sparse_code", name, "cuda", shape, t,
                   extra={"iterations": n_it, "reached_objective": bool(reached),
                          "objective": _objective(Y, V, u, lam)})
            record("sparse_code", "triton lasso", "cuda", shape, t_ours, baseline=name, baseline_ms=t["ms"],
                   extra={"baseline_reached_objective": bool(reached)})


def calibrate() -> None:
    """l0 ratio (share of zero coefficients) against λ_rel at K = 8C on PFV-like data."""
    for C in (32, 64, 128):
        X, V, beta = pfv_like(200, C, 8 * C, generator=torch.Generator().manual_seed(1))
        for lam in (0.05, 0.1, 0.15, 0.2, 0.3):
            idx, val = sparse_code(X, V, bias=beta, lam=lam)
            Xr = (dense_codes(idx, val, 8 * C) @ V.double()) + beta.double()
            rel = float(((X.double() - Xr).norm(dim=1) / X.double().norm(dim=1)).mean())
            print(f"C={C:4d} K={8 * C:5d} lam_rel={lam:.2f}  l0 ratio={1 - float((idx >= 0).sum()) / idx.shape[0] / (8 * C):.4f}"
                  f"  mean nnz={float((idx >= 0).sum()) / idx.shape[0]:.1f}  rel L2 err={rel:.3f}")


def run(device: str, quick: bool) -> None:
    if device.startswith("cuda"):
        run_gpu(quick)
    else:
        run_cpu(quick)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--calibrate", action="store_true")
    a = ap.parse_args()
    calibrate() if a.calibrate else run(a.device, a.quick)
