"""Spherical k-means: the assignment, the centroid update and the bisecting concept extractor.

* ``spherical_assign`` (ours: ``cpp``, ``triton`` fp32 and bf16, ``cuda``) against ``(X @ Cᵀ).argmax(1)`` on
  unit rows in fp32 (``matmul+argmax fp32``), tf32 and bf16 (GPU routes), our ``torch`` reference, the bare
  bf16 GEMM of the same shape (``bare bf16 GEMM (floor)``: ours is reported as a multiple of it) and
  flash-kmeans's fused cosine assignment (``flash-kmeans``, fp16, where the package imports); on a CPU
  faiss's exact search ``IndexFlatIP`` on the same unit rows (``faiss IndexFlatIP``: its BLAS GEMM in
  blocks, then a top-1 scan; ``faiss-cpu``, optional, the row skips with the reason where it is missing)
  and the fp32 GEMM the assignment contains (``fp32 GEMM (floor)``: ``X @ Cᵀ``, torch's BLAS). Checked: the
  share of labels equal to a float64 argmax on a subsample of rows (``agreement``), ≥ 0.999 for ours
  (bf16 scores are re-scored in fp32 where the top two are close) and ≥ 0.95 for the outside routes.
  FLOPs: ``2·N·C·K``.
* ``matmul_nt`` (the assignment's AVX-512 register tile as a plain fp32 GEMM: ``cpu_matmul_nt``, CPU only)
  against torch's ``a @ b.T`` and numpy's (its OpenBLAS limited to the same threads by threadpoolctl), at
  one and two threads: the product ``a [M, C] @ b [N, C]ᵀ`` (the sparse coder's correlations ``Y Vᵀ``)
  and the Gram ``a @ aᵀ`` (its ``V Vᵀ``; ours computes the upper tiles only, numpy calls syrk). Checked
  against float64 with the fp32 summation bound (``checks.check_sums``). FLOPs: ``2·M·N·C`` for every
  route (the Gram's too, so the rates compare the same result).
* ``centroid_update`` (ours: ``cpp``, ``triton``, ``cuda``) against ``index_add_`` + ``bincount`` and our
  ``torch`` reference, at K = 2 (the 2-means case) and the full K; sums checked against float64 with
  the summation bound, counts exactly. Bytes: ``N·C·4 + N·8 + K·C·4``.
* ``two_means_splits`` (one round of bisecting splits: B clusters, each its own seed; ours: ``batched`` —
  all clusters at once as segments, the CUDA route — and ``cpp``) against the per-cluster ``torch``
  reference on the same device (``per-cluster reference``: a Python loop over clusters and Lloyd
  iterations). Checked against that reference: the same sides on ≥ 99% of the clusters (a row within
  rounding of a splitting hyperplane may differ), the same fallbacks, the summed inertia within 1e-6.
* bisecting (``gig_fast.concepts``, ``sequential`` and ``fast`` modes) against scikit-learn's
  ``BisectingKMeans`` on the unit-normalised centred data (``bisecting_strategy="largest_cluster"``, the
  same algorithm, and its default ``"biggest_inertia"``); on a GPU also against our fused CPU path on
  the machine's own cores. Checked: K non-empty clusters; cosine inertia (``cosine_inertia``) reported
  with its ratio to the sequential reference, ours within 5% of it. Single-digit rounds (seconds a call).
  On a GPU also the GPU bisecting case: K = 8,192 over 200,000 × 1,024 vectors around 1,024 directions, fast
  mode only (the sequential mode is 8,191 rounds), against our fused CPU fast path (its inertia the
  reference: ours within 0.5%), and a 20,000-row sample of the same mixture (K = 1,024) on which
  scikit-learn runs too. On a CPU also faiss's flat ``Kmeans(spherical=True)`` (20 Lloyd iterations, the
  same unit rows) at equal quality: its row carries the inertia-against-time curve of faiss (1 … 32
  iterations) next to one run of ours, faiss's inertia at our time and its time to reach our inertia.
"""
from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from checks import check_sums
from gig_fast import ops
from gig_fast.concepts import bisecting_spherical_kmeans, cosine_inertia
from gig_fast.ops import centroid_update, spherical_assign, two_means_splits
from gig_fast.ops.common import cpu_matmul_nt
from gig_fast.testing import clustered_points, label_quality, random_unit


@dataclass(frozen=True)
class AssignCase:
    N: int
    C: int
    K: int
    check_rows: int

    @property
    def name(self) -> str:
        return f"N={self.N} C={self.C} K={self.K}"


@dataclass(frozen=True)
class UpdateCase:
    N: int
    C: int
    K: int

    @property
    def name(self) -> str:
        return f"N={self.N} C={self.C} K={self.K}"


@dataclass(frozen=True)
class SplitsCase:
    N: int
    C: int
    B: int  # clusters split in the round (N/B rows each)

    @property
    def name(self) -> str:
        return f"N={self.N} C={self.C} B={self.B}"


@dataclass(frozen=True)
class MatmulCase:
    M: int
    C: int
    N: int  # 0: the Gram a @ aᵀ of a [M, C]
    threads: int

    @property
    def name(self) -> str:
        what = f"Gram M={self.M} C={self.C}" if self.N == 0 else f"M={self.M} C={self.C} N={self.N}"
        return f"{what} {self.threads}t"


@dataclass(frozen=True)
class BisectCase:
    N: int
    C: int
    K: int
    directions: int = 0  # mixture components of the data (0: K // 8)
    reference: str = "sequential"  # the mode of the CPU run whose inertia ours is compared with
    modes: tuple = ("sequential", "fast")
    sklearn: bool = True  # scikit-learn runs on this case (not on the 200,000 × 1,024 one)

    @property
    def name(self) -> str:
        return f"N={self.N} C={self.C} K={self.K}"


def assign_cases(size: str, device: str) -> list[AssignCase]:
    if size == "smoke":
        return [AssignCase(300, 24, 40, 300)]
    if device.startswith("cuda"):
        return [AssignCase(200_000, 1024, 8192, 20_000), AssignCase(200_000, 256, 2048, 20_000),
                AssignCase(50_000, 2048, 16384, 5_000)]
    if size == "quick":
        return [AssignCase(4000, 256, 2048, 1000)]
    # 100,000 × 256 against 2,048, then the pipeline's K = 8·C at the same GEMM size (about 105 GFLOP each)
    return [AssignCase(20_000, 256, 2048, 2000), AssignCase(100_000, 256, 2048, 5000),
            AssignCase(25_000, 512, 4096, 2000), AssignCase(6_250, 1024, 8192, 2000),
            AssignCase(1_600, 2048, 16384, 1600)]


def update_cases(size: str, device: str) -> list[UpdateCase]:
    if size == "smoke":
        return [UpdateCase(2000, 16, 2), UpdateCase(2000, 16, 64)]
    if device.startswith("cuda"):
        return [UpdateCase(200_000, 1024, 2), UpdateCase(200_000, 1024, 8192)]
    N = 50_000 if size == "quick" else 200_000
    return [UpdateCase(N, 256, 2), UpdateCase(N, 256, 2048)]


def splits_cases(size: str, device: str) -> list[SplitsCase]:
    if size == "smoke":
        return [SplitsCase(1200, 16, 8)]
    if device.startswith("cuda"):  # a late fast-mode round of 781-row clusters, an early one of 12,500-row ones
        return [SplitsCase(200_000, 1024, 256), SplitsCase(200_000, 1024, 16)]
    if size == "quick":
        return [SplitsCase(20_000, 64, 64), SplitsCase(20_000, 64, 8)]
    return [SplitsCase(50_000, 256, 256), SplitsCase(50_000, 256, 16)]


# the GPU bisecting case (K = 8,192 over 200,000 × 1,024) and the sample of its mixture that scikit-learn can run (the same 1,024 directions)
GPU_BISECT = BisectCase(200_000, 1024, 8192, reference="fast", modes=("fast",), sklearn=False)
GPU_BISECT_SAMPLE = BisectCase(20_000, 1024, 1024, directions=1024, modes=("fast",))  # sequential: 1,023 rounds


def matmul_cases(size: str, device: str) -> list[MatmulCase]:
    if device.startswith("cuda"):
        return []  # a CPU op
    if size == "smoke":
        return [MatmulCase(50, 20, 70, 1), MatmulCase(50, 20, 0, 2)]
    # the sparse coder's shapes: correlations of 2,000 rows with 2,048 atoms of 256 channels and of 500 rows
    # with 4,096 of 512; the Grams of those dictionaries
    shapes = [(2000, 256, 2048), (500, 512, 4096), (2048, 256, 0), (4096, 512, 0)]
    return [MatmulCase(M, C, N, t) for t in (1, 2) for M, C, N in shapes]


def bisect_cases(size: str, device: str) -> list[BisectCase]:
    if size == "smoke":  # the smoke run checks the code of the issue-25 rows at a tiny size
        return [BisectCase(600, 16, 16), BisectCase(1500, 16, 64, reference="fast", modes=("fast",), sklearn=False)]
    if size == "quick" and not device.startswith("cuda"):
        return [BisectCase(4000, 64, 128)]  # scikit-learn takes seconds a call here
    if device.startswith("cuda"):
        return [BisectCase(50_000, 256, 2048), GPU_BISECT, GPU_BISECT_SAMPLE]
    return [BisectCase(50_000, 256, 2048)]


def _params(metafunc, name, found):
    metafunc.parametrize(name, found, ids=[c.name.replace(" ", "-") for c in found], indirect=True, scope="module")


def pytest_generate_tests(metafunc):
    size, device = metafunc.config.gig_size, metafunc.config.gig_device
    for name, make in (("assign_problem", assign_cases), ("update_problem", update_cases),
                       ("splits_problem", splits_cases), ("bisect_problem", bisect_cases),
                       ("matmul_problem", matmul_cases)):
        if name in metafunc.fixturenames:
            _params(metafunc, name, make(size, device))


# ---------------------------------------------------------------------------------------------------
# Assignment


@contextlib.contextmanager
def _tf32(on: bool):
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = on
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old


def _flash_kmeans_assign():
    """flash-kmeans's cosine assignment ``(x [B, N, D], c [B, K, D]) -> [B, N]``, or None."""
    for module in ("flash_kmeans.assign_euclid_triton", "flash_kmeans.kmeans_triton_impl"):
        try:
            mod = __import__(module, fromlist=["cosine_assign_triton"])
            return mod.cosine_assign_triton
        except (ImportError, AttributeError):
            continue
    return None


class AssignProblem:
    def __init__(self, case: AssignCase, device: str):
        g = torch.Generator().manual_seed(0)
        self.case = case
        self.X = random_unit(case.N, case.C, torch.float32, "cpu", g).to(device)
        self.cents = random_unit(case.K, case.C, torch.float32, "cpu", g).to(device)
        self.shape = {"N": case.N, "C": case.C, "K": case.K}
        self.flops = 2.0 * case.N * case.C * case.K

    def check(self, least: float, dtype: torch.dtype = torch.float32):
        """Labels against the float64 argmax of the inputs the route was given (rounded to ``dtype``)."""
        rows = slice(0, min(self.case.N, self.case.check_rows))
        X, cents = self.X[rows].to(dtype).float(), self.cents.to(dtype).float()

        def check(labels):
            labels = labels[0] if isinstance(labels, tuple) else labels
            q = label_quality(X, cents, labels.reshape(-1)[rows].long())
            assert q["agreement"] >= least, f"labels agree with the float64 argmax on {q['agreement']:.4%} < {least:.2%}"
            return {"agreement": q["agreement"], "worst_cosine_loss": q["worst_loss"]}
        return check


    def with_faiss_agreement(self, check):
        """``check`` plus ``equal_to_faiss``: the share of all N labels equal to faiss's (where it imports)."""
        try:
            import faiss  # noqa: F401
        except ImportError:
            return check

        def both(labels):
            figures = check(labels)
            theirs = _faiss_assign(self.X, self.cents)()
            figures["equal_to_faiss"] = float((labels[0].cpu() == theirs).double().mean())
            return figures
        return both


@pytest.fixture(scope="module")
def assign_problem(request, device):
    return AssignProblem(request.param, device)


ASSIGN_BASELINES = ["matmul+argmax fp32", "matmul+argmax tf32", "matmul+argmax bf16", "bare bf16 GEMM (floor)",
                    "flash-kmeans", "faiss IndexFlatIP", "fp32 GEMM (floor)"]


def import_faiss(threads: int):
    """faiss with ``threads`` OpenMP threads (its own pool, not torch's), or a skip that says why."""
    try:
        import faiss
    except ImportError:
        pytest.skip("faiss is not installed (optional benchmark dependency: pip install faiss-cpu)")
    faiss.omp_set_num_threads(threads)
    return faiss


def outside_blas() -> str:
    """The BLAS each outside library loaded here runs, as threadpoolctl reports it ("openblas 0.3.15
    Zen (faiss_cpu.libs)"): a CPU-tuned kernel or a generic one decides a BLAS-bound rival's speed."""
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return "unknown (threadpoolctl missing)"
    found = [f"{i.get('internal_api')} {i.get('version')} {i.get('architecture', '')} "
             f"({i['filepath'].split('/')[-2]})" for i in threadpool_info() if i.get("user_api") == "blas"]
    return "; ".join(found) or "none"


def _faiss_assign(X: torch.Tensor, cents: torch.Tensor):
    """faiss's exact inner-product search on unit rows: ``labels [N]`` (int64), as a user would run it."""
    faiss = import_faiss(torch.get_num_threads())
    Xn, Cn = X.cpu().numpy(), cents.cpu().numpy()
    index = faiss.IndexFlatIP(Cn.shape[1])
    index.add(Cn)
    return lambda: torch.from_numpy(index.search(Xn, 1)[1][:, 0])


@pytest.mark.parametrize("impl", ASSIGN_BASELINES, ids=[b.replace(" ", "_") for b in ASSIGN_BASELINES])
def bench_assign_baseline(bench, assign_problem, impl):
    p = assign_problem
    X, cents = p.X, p.cents
    common = dict(op="spherical_assign", impl=impl, case=p.case.name, shape=p.shape, flops=p.flops)
    if impl == "matmul+argmax fp32":
        bench(lambda: (X @ cents.T).argmax(1), role="baseline", check=p.check(0.95), flops_dtype="float32", **common)
    elif impl == "matmul+argmax tf32":
        bench.gpu_only(impl)

        def tf32():
            with _tf32(True):
                return (X @ cents.T).argmax(1)
        bench(tf32, role="baseline", check=p.check(0.95), dtype="tf32", flops_dtype="tf32", **common)
    elif impl == "matmul+argmax bf16":
        bench.gpu_only(impl + " (this CPU: 8x slower than fp32)")
        Xb, Cb = X.bfloat16(), cents.bfloat16()
        bench(lambda: (Xb @ Cb.T).argmax(1), role="baseline", check=p.check(0.95, torch.bfloat16),
              dtype="bfloat16", flops_dtype="bfloat16", **common)
    elif impl == "bare bf16 GEMM (floor)":
        bench.gpu_only(impl)
        Xb, Cb = X.bfloat16(), cents.bfloat16()
        rows = min(p.case.N, p.case.check_rows)
        want = Xb[:rows].double() @ Cb.double().T
        magnitude = Xb[:rows].double().abs() @ Cb.double().abs().T

        def check(scores):
            return check_sums(scores[:rows].float().cpu(), want.cpu(), magnitude.cpu(), torch.bfloat16, p.case.C,
                              "bf16 GEMM")
        bench(lambda: Xb @ Cb.T, role="floor", check=check, dtype="bfloat16", flops_dtype="bfloat16", **common)
    elif impl == "faiss IndexFlatIP":
        if p.X.device.type != "cpu":
            pytest.skip("faiss-cpu: compared on CPU devices")
        bench(_faiss_assign(X, cents), role="baseline", check=p.check(0.999), flops_dtype="float32",
              blas=outside_blas(), **common)
    elif impl == "fp32 GEMM (floor)":
        if p.X.device.type != "cpu":
            pytest.skip("the CPU's bound: on a GPU the bf16 GEMM is the floor")
        bench(lambda: X @ cents.T, role="floor", flops_dtype="float32", **common)
    else:
        bench.gpu_only(impl)
        assign = _flash_kmeans_assign()
        if assign is None:
            pytest.skip("flash-kmeans is not installed (pip package flash-kmeans; a GPU package)")
        Xh, Ch = X.half()[None], cents.half()[None]
        bench(lambda: assign(Xh, Ch), role="baseline", check=p.check(0.95, torch.float16), dtype="float16",
              flops_dtype="bfloat16", **common)


OURS_ASSIGN = [("torch", "float32"), ("cpp", "float32"), ("triton", "float32"), ("triton", "bfloat16"),
               ("cuda", "float32")]


@pytest.mark.parametrize("backend,dtype", OURS_ASSIGN, ids=[f"{b}-{d}" for b, d in OURS_ASSIGN])
def bench_assign(bench, assign_problem, backend, dtype):
    bench.skip_unless_runs(backend)
    p = assign_problem
    Xd, Cd = p.X.to(getattr(torch, dtype)), p.cents.to(getattr(torch, dtype))
    short = {"float32": "fp32", "bfloat16": "bf16"}[dtype]
    check = p.check(0.999, Xd.dtype)
    if backend == "cpp" and dtype == "float32":
        check = p.with_faiss_agreement(check)
    bench(lambda: spherical_assign(Xd, Cd, backend=backend), op="spherical_assign", impl=backend,
          label=f"{backend} {short}", role="baseline" if backend == "torch" else "ours", case=p.case.name,
          shape={**p.shape, "dtype": dtype}, check=check, flops=p.flops, flops_dtype=dtype)


# ---------------------------------------------------------------------------------------------------
# matmul_nt: the fp32 GEMM on the assignment's register tile


class MatmulProblem:
    def __init__(self, case: MatmulCase):
        g = torch.Generator().manual_seed(0)
        self.case = case
        self.a = torch.randn(case.M, case.C, generator=g)
        self.b = self.a if case.N == 0 else torch.randn(case.N, case.C, generator=g)
        N = self.b.shape[0]
        self.shape = {"M": case.M, "C": case.C, "N": N, **({"b": "a"} if case.N == 0 else {})}  # b = a: the Gram
        self.flops = 2.0 * case.M * N * case.C
        a64, b64 = self.a.double(), self.b.double()
        self.want, self.magnitude = a64 @ b64.T, a64.abs() @ b64.abs().T

    def check(self, what: str):
        def check(out):
            out = torch.as_tensor(out)
            figures = check_sums(out, self.want, self.magnitude, torch.float32, self.case.C, what)
            if self.case.N == 0:
                figures["symmetric"] = bool(torch.equal(out, out.T))
            return figures
        return check


@pytest.fixture(scope="module")
def matmul_problem(request):
    return MatmulProblem(request.param)


@contextlib.contextmanager
def _threads(n: int):
    """torch at ``n`` threads (restored after): the op and torch's BLAS run on its pool."""
    if n > (os.cpu_count() or 1):
        pytest.skip(f"{n} threads on a {os.cpu_count()}-CPU machine")
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


MATMUL = ["cpu_matmul_nt", "torch a @ b.T", "numpy a @ b.T"]


@pytest.mark.parametrize("impl", MATMUL, ids=["ours", "torch", "numpy"])
def bench_matmul_nt(bench, matmul_problem, impl, device):
    if device != "cpu":
        pytest.skip("cpu_matmul_nt is a CPU op")
    p = matmul_problem
    a, b, gram = p.a, p.b, p.case.N == 0
    common = dict(op="matmul_nt", case=p.case.name, shape=p.shape, flops=p.flops, flops_dtype="float32",
                  check=p.check(impl))
    with _threads(p.case.threads):
        if impl == "cpu_matmul_nt":
            bench.skip_unless_runs("cpp")
            bench((lambda: cpu_matmul_nt(a)) if gram else (lambda: cpu_matmul_nt(a, b)), impl=impl, **common)
        elif impl == "torch a @ b.T":
            bench(lambda: a @ b.T, impl=impl, role="baseline", **common)
        else:
            try:
                from threadpoolctl import threadpool_limits
            except ImportError:
                pytest.skip("threadpoolctl is not installed: numpy's BLAS threads cannot be limited")
            an, bn = a.numpy(), b.numpy()  # the Gram: bn is an, so numpy runs syrk
            with threadpool_limits(limits=p.case.threads, user_api="blas"):
                bench(lambda: an @ bn.T, impl=impl, role="baseline", blas=outside_blas(), **common)


# ---------------------------------------------------------------------------------------------------
# Centroid update


class UpdateProblem:
    def __init__(self, case: UpdateCase, device: str):
        g = torch.Generator().manual_seed(0)
        self.case = case
        X = torch.randn(case.N, case.C, generator=g)
        labels = torch.randint(case.K, (case.N,), generator=g)
        self.want = torch.zeros(case.K, case.C, dtype=torch.float64).index_add_(0, labels, X.double())
        self.magnitude = torch.zeros(case.K, case.C, dtype=torch.float64).index_add_(0, labels, X.double().abs())
        self.counts = torch.bincount(labels, minlength=case.K)
        self.X, self.labels = X.to(device), labels.to(device)
        self.shape = {"N": case.N, "C": case.C, "K": case.K}
        self.bytes = case.N * case.C * 4 + case.N * 8 + case.K * case.C * 4

    def check(self, result):
        sums, counts = result
        assert torch.equal(counts.cpu().long(), self.counts), "cluster counts differ from bincount"
        return check_sums(sums.cpu(), self.want, self.magnitude, torch.float32, int(self.counts.max()),
                          "centroid sums")


@pytest.fixture(scope="module")
def update_problem(request, device):
    return UpdateProblem(request.param, device)


UPDATE = ["index_add_", "torch", "cpp", "triton", "cuda"]


@pytest.mark.parametrize("impl", UPDATE, ids=UPDATE)
def bench_update(bench, update_problem, impl):
    p = update_problem
    X, labels, K = p.X, p.labels, p.case.K
    if impl == "index_add_":
        def fn():
            sums = torch.zeros(K, X.shape[1], device=X.device).index_add_(0, labels, X)
            return sums, torch.bincount(labels, minlength=K)
        role = "baseline"
    else:
        bench.skip_unless_runs(impl)
        fn = lambda: centroid_update(X, labels, K, backend=impl)  # noqa: E731
        role = "baseline" if impl == "torch" else "ours"
    bench(fn, op="centroid_update", impl=impl, role=role, case=p.case.name, shape=p.shape, check=p.check,
          bytes_moved=p.bytes)


# ---------------------------------------------------------------------------------------------------
# One round of 2-means splits (the GPU's batched route against the per-cluster reference)


class SplitsProblem:
    """B clusters of a mixture of directions (disjoint random member sets of N/B rows, sorted, as the
    bisecting loop passes them), each split with its own seed; the per-cluster reference's result on
    the same device is the oracle."""

    def __init__(self, case: SplitsCase, device: str):
        g = torch.Generator().manual_seed(0)
        self.case = case
        X = clustered_points(case.N, case.C, max(2, case.N // 200), generator=g) - 2.0
        self.U = (X / X.norm(dim=1, keepdim=True)).contiguous().to(device)
        perm = torch.randperm(case.N, generator=g)
        self.members = [m.sort().values.to(device) for m in perm.chunk(case.B)]
        self.seeds = list(range(1, case.B + 1))
        self.want = self.run("torch")
        self.shape = {"N": case.N, "C": case.C, "B": case.B}

    def run(self, backend: str):
        return two_means_splits(self.U, self.members, self.seeds, backend=backend)

    def check(self, got):
        sides, want_sides = got[0], self.want[0]
        same = sum(bool(torch.equal(a, b)) for a, b in zip(sides, want_sides)) / len(want_sides)
        assert same >= 0.99, f"sides equal the reference's on {same:.2%} of the clusters"
        assert torch.equal(got[3].cpu(), self.want[3].cpu()), "fallbacks differ from the reference's"
        inertia, want = float(got[2].sum()), float(self.want[2].sum())
        assert abs(inertia - want) <= 1e-6 * want, f"inertia {inertia} vs the reference's {want}"
        return {"clusters_with_equal_sides": same, "inertia": inertia, "inertia_vs_reference": inertia / want}


@pytest.fixture(scope="module")
def splits_problem(request, device):
    return SplitsProblem(request.param, device)


SPLITS = ["torch", "batched", "cpp"]


@pytest.mark.parametrize("impl", SPLITS, ids=SPLITS)
def bench_two_means_splits(bench, splits_problem, impl, device):
    p = splits_problem
    bench.skip_unless_runs(impl)
    role = "baseline" if impl == "torch" else "ours"
    label = "per-cluster reference" if impl == "torch" else impl
    # seconds a call for the reference on a GPU (thousands of launches): one round there
    bench(lambda: p.run(impl), op="two_means_splits", impl=impl, label=label, role=role, case=p.case.name,
          shape=p.shape, check=p.check, rounds=1 if device.startswith("cuda") else None)


# ---------------------------------------------------------------------------------------------------
# Bisecting


class BisectProblem:
    def __init__(self, case: BisectCase, device: str):
        g = torch.Generator().manual_seed(0)
        self.case = case
        self.X = clustered_points(case.N, case.C, case.directions or max(2, case.K // 8), generator=g)
        self.beta = torch.full((case.C,), 2.0)
        _, labels = bisecting_spherical_kmeans(self.X, case.K, beta=self.beta, mode=case.reference)  # on the CPU
        self.reference_inertia = cosine_inertia(self.X, labels, case.K, self.beta)
        self.shape = {"N": case.N, "C": case.C, "K": case.K}
        self.device = device

    def check(self, most: float | None, all_clusters: bool = True):
        """Labels in [0, K), K non-empty clusters (``all_clusters``: a flat k-means may leave a few centroids
        without points, reported as ``clusters``), the cosine inertia at most ``most`` × the reference's."""
        K = self.case.K

        def check(labels):
            labels = torch.as_tensor(labels).cpu().long()
            assert labels.min() >= 0 and labels.max() < K, "labels outside [0, K)"
            clusters = int(torch.unique(labels).numel())
            assert clusters == K or not all_clusters, f"{clusters} non-empty clusters, asked for {K}"
            inertia = cosine_inertia(self.X, labels, K, self.beta)
            ratio = inertia / self.reference_inertia
            assert most is None or ratio <= most, f"cosine inertia {ratio:.4f}x the {self.case.reference} reference's"
            return {"cosine_inertia": inertia, f"inertia_vs_{self.case.reference}": ratio, "clusters": clusters}
        return check


@pytest.fixture(scope="module")
def bisect_problem(request, device):
    return BisectProblem(request.param, device)


BISECT = ["gig_fast sequential", "gig_fast fast", "gig_fast fast (CPU)", "sklearn largest_cluster",
          "sklearn biggest_inertia", "faiss Kmeans spherical"]
# faiss's flat spherical k-means: Lloyd iterations of its timed row, and those of its inertia-against-time
# curve (each a fresh run from the same seed)
FAISS_ITERATIONS = 20
FAISS_CURVE = (1, 2, 4, 8, 16, 32)


def _unit_centred(p) -> "np.ndarray":
    """The rows the outside k-means see: ``(x − β)/‖x − β‖`` in float32 (ours centres and normalises itself)."""
    U = p.X.double() - p.beta.double()
    return (U / U.norm(dim=1, keepdim=True)).float().numpy()


def _faiss_kmeans(U, K: int, niter: int):
    """faiss ``Kmeans(spherical=True)`` trained on ``U`` with ``niter`` iterations, seed 0; returns a
    callable giving the labels of U under the final centroids (int64 ``[N]``)."""
    faiss = import_faiss(torch.get_num_threads())

    def run():
        km = faiss.Kmeans(U.shape[1], K, niter=niter, spherical=True, seed=0, verbose=False)
        km.train(U)
        return torch.from_numpy(km.index.search(U, 1)[1][:, 0]).long()
    return run


def _wall(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def inertia_against_time(p, U) -> dict:
    """Ours (fast mode, the default settings) against faiss's flat k-means at equal quality: one run of
    ours and one faiss run per iteration count of FAISS_CURVE, interleaved in this process. Returns the
    curve, faiss's inertia at our time (its longest run that took no longer), faiss's time to reach our
    inertia (its shortest run that did; None if none), and whether ours reaches faiss's inertia at its
    timed iteration count."""
    K = p.case.K
    ours_labels, ours_s = _wall(lambda: bisecting_spherical_kmeans(p.X, K, beta=p.beta, mode="fast")[1])
    ours = cosine_inertia(p.X, ours_labels, K, p.beta)
    curve = []
    for niter in FAISS_CURVE:
        labels, seconds = _wall(_faiss_kmeans(U, K, niter))
        curve.append({"iterations": niter, "s": seconds, "cosine_inertia": cosine_inertia(p.X, labels, K, p.beta)})
    within = [c for c in curve if c["s"] <= ours_s]
    reach = [c for c in curve if c["cosine_inertia"] <= ours]
    timed = min(curve, key=lambda c: abs(c["iterations"] - FAISS_ITERATIONS))
    return {"ours_s": ours_s, "ours_cosine_inertia": ours, "faiss_curve": curve,
            "faiss_inertia_at_our_time": within[-1]["cosine_inertia"] if within else None,
            "faiss_s_to_our_inertia": reach[0]["s"] if reach else None,
            "ours_reaches_faiss_inertia": ours <= timed["cosine_inertia"]}


@pytest.mark.parametrize("impl", BISECT, ids=[b.replace(" ", "_").replace("(", "").replace(")", "") for b in BISECT])
def bench_bisecting(bench, bisect_problem, impl, device, gig_size):
    p = bisect_problem
    K = p.case.K
    common = dict(op="bisecting", case=p.case.name, shape=p.shape)
    if impl.startswith("gig_fast"):
        mode = impl.split()[1]
        on = "cpu" if impl.endswith("(CPU)") else device
        if impl.endswith("(CPU)") and device == "cpu":
            pytest.skip("the CPU path is the row 'gig_fast fast' on a CPU device")
        if mode not in p.case.modes:
            pytest.skip(f"{mode} mode: not timed on this case ({K - 1} rounds)")
        X, beta = p.X.to(on), p.beta.to(on)
        role = "baseline" if impl.endswith("(CPU)") else "ours"
        # the GPU bisecting case: within 0.5% of the fused CPU fast path's inertia; otherwise within 5% of the sequential one's
        most = None if role == "baseline" else (1.005 if p.case.reference == "fast" else 1.05)
        # a GPU campaign time-boxes each module: one round a route there (the sequential mode takes seconds)
        bench(lambda: bisecting_spherical_kmeans(X, K, beta=beta, mode=mode)[1], impl=impl, role=role,
              check=p.check(most), rounds=1 if device.startswith("cuda") else None,
              two_means=ops.kernel("two_means_splits", on)[0], **common)
        return
    if impl.startswith("faiss"):
        if device != "cpu":
            pytest.skip("faiss-cpu: compared on CPU devices")
        U = _unit_centred(p)
        run = _faiss_kmeans(U, K, FAISS_ITERATIONS)
        curve = inertia_against_time(p, U) if gig_size != "smoke" else {}
        bench(run, impl=f"faiss Kmeans spherical niter={FAISS_ITERATIONS}", label=impl, role="baseline",
              check=p.check(None, all_clusters=False), rounds=3, blas=outside_blas(), **curve, **common)
        return
    if not p.case.sklearn:
        pytest.skip("scikit-learn: too slow at this size; it runs on the case of a sample of this mixture")
    if gig_size == "quick" and impl.endswith("biggest_inertia"):
        pytest.skip("scikit-learn's default strategy: full size only (the same algorithm is 'largest_cluster')")
    sklearn_cluster = pytest.importorskip("sklearn.cluster")
    U = p.X.double() - p.beta.double()
    U = (U / U.norm(dim=1, keepdim=True)).float().numpy()
    strategy = impl.split()[1]
    fit = lambda: sklearn_cluster.BisectingKMeans(K, random_state=0, bisecting_strategy=strategy).fit(U).labels_  # noqa: E731
    bench(fit, impl=f"sklearn BisectingKMeans {strategy}", label=impl, role="baseline", check=p.check(None),
          rounds=3 if device == "cpu" else 1, **common)
