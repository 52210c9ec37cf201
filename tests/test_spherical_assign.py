"""spherical_assign: every backend against the float64 argmax and the torch reference."""
import pytest
import torch

from _grids import device_backend_pairs
from gig_fast import ops
from gig_fast.ops import available_backends, spherical_assign
from gig_fast.ops.reference import spherical_assign_ref
from gig_fast.testing import cosine_scores64, label_quality, random_unit

AVAIL = available_backends()
CPU_BACKENDS = [b for b in ("torch", "cpp", "triton") if AVAIL[b].startswith("runs")]
# largest cosine a wrong label may lose against the float64 argmax: accumulation rounding only
# (inputs are exact in float64); triton scores in bf16 then re-scores its top-2 in fp32.
LOSS_TOL = {"torch": 1e-5, "cpp": 1e-5, "triton": 2e-2, "cuda": 1e-5}
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


def _device_backends():
    return device_backend_pairs()


def _shapes(backend):
    if backend == "triton":  # the interpreter is slow: tiny shapes, still odd and multi-tile
        return [(1, 1, 1), (3, 5, 7), (17, 33, 19), (40, 9, 2)]
    # (N, C, K); the last two reach the CPU's fused fp32 kernel past its C chunk (256: partial sums kept
    # between chunks, a ragged last chunk) and past one pass of centroids (464 at C = 1100), with N and K
    # off its 6-row and 16-centroid tiles
    return [(1, 1, 1), (3, 5, 7), (129, 33, 2), (1000, 64, 9), (700, 8, 1100), (203, 300, 37), (50, 1100, 500)]


def _check(X, cents, labels, best, backend):
    assert labels.dtype == torch.int64 and labels.shape == X.shape[:1]
    acc = torch.float64 if X.dtype == torch.float64 else torch.float32
    assert best.dtype == acc
    S = cosine_scores64(X, cents)
    got = S.gather(1, labels[:, None].cpu().to(S.device)).squeeze(1)
    top = S.max(dim=1).values
    tol = LOSS_TOL[backend] if X.dtype != torch.float64 else 1e-12
    assert float((top - got).max()) <= tol, "a label loses more cosine than rounding allows"
    assert torch.allclose(best.double().cpu(), got.cpu(), atol=max(tol, 1e-6), rtol=0)


@pytest.mark.parametrize("device,backend", _device_backends())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_matches_float64_argmax(device, backend, dtype):
    for N, C, K in _shapes(backend):
        X = torch.randn(N, C, dtype=torch.float64).to(dtype).to(device)
        cents = (torch.randn(K, C, dtype=torch.float64) * 3).to(dtype).to(device)
        labels, best = spherical_assign(X, cents, backend=backend)
        _check(X, cents, labels, best, backend)
        ref_labels, ref_best = spherical_assign_ref(X, cents)
        # rows where two backends disagree must be float ties (covered by _check): at most one in 1,000
        assert int((labels != ref_labels).sum()) <= max(1, N // 1000), (N, K)


# The torch reference is left out: its BLAS matmul may score two identical centroid columns
# differently in the last bit (seen on this CPU), so exact duplicates are not exact ties there.
@pytest.mark.parametrize("device,backend", [db for db in _device_backends() if db[1] != "torch"])
@pytest.mark.parametrize("K", [7, 40])
def test_ties_go_to_smaller_index(device, backend, K):
    C = 12
    cents = torch.randn(K, C, device=device)
    cents[5] = cents[2]  # an exact duplicate: its scores equal those of centroid 2 bit for bit
    cents[K - 1] = cents[0]
    X = torch.cat([cents[2] + 0.01 * torch.randn(4, C, device=device),
                   cents[0] + 0.01 * torch.randn(3, C, device=device)])
    labels, _ = spherical_assign(X, cents, backend=backend)
    assert labels.tolist() == [2, 2, 2, 2, 0, 0, 0]
    # all-equal scores: every centroid identical → label 0
    same = cents[3].expand(K, C).contiguous()
    labels, best = spherical_assign(torch.randn(5, C, device=device), same, backend=backend)
    assert labels.tolist() == [0] * 5


@pytest.mark.parametrize("device,backend", _device_backends())
def test_zero_rows(device, backend):
    X = torch.randn(6, 10, device=device)
    X[1] = 0
    cents = torch.randn(4, 10, device=device)
    cents[0] = 0  # a zero centroid scores exactly 0
    labels, best = spherical_assign(X, cents, backend=backend)
    assert labels[1].item() == 0 and best[1].item() == 0.0
    _check(X, cents, labels, best, backend)


@pytest.mark.parametrize("device,backend", _device_backends())
def test_leading_dims_and_poisoned_outputs(device, backend):
    X = torch.randn(2, 3, 5, 8, device=device)
    cents = torch.randn(6, 8, device=device)
    labels, best = spherical_assign(X, cents, backend=backend)
    assert labels.shape == (2, 3, 5) and best.shape == (2, 3, 5)
    ref_labels, _ = spherical_assign_ref(X.reshape(-1, 8), cents)
    assert float((labels.reshape(-1) == ref_labels).double().mean()) > 0.9
    assert bool((labels >= 0).all() & (labels < 6).all())  # every label written (empty memory is garbage)


def _near_ties(n: int, C: int, g: torch.Generator):
    """Rows whose best two centroids differ in cosine by 1e-5 … 1e-3 — below the error of bf16 scoring
    (~1e-3), far above float32's (~1e-7) — plus decoy centroids clearly worse (by ≥ 0.05)."""
    c0 = torch.nn.functional.normalize(torch.randn(C, dtype=torch.float64, generator=g), dim=0)
    r = torch.nn.functional.normalize(torch.randn(C, dtype=torch.float64, generator=g), dim=0)
    c1 = torch.nn.functional.normalize(c0 + 0.05 * r, dim=0)
    mid = torch.nn.functional.normalize(c0 + c1, dim=0)
    # move each row along c1 − c0 by a signed amount giving a cosine gap of ±(1e-5 … 1e-3)
    gap = (10 ** (-5 + 2 * torch.rand(n, dtype=torch.float64, generator=g))) * torch.sign(torch.randn(n, generator=g, dtype=torch.float64))
    d = c1 - c0
    X = mid + gap[:, None] * d / (d @ d)
    decoys = torch.nn.functional.normalize(mid + 0.6 * torch.randn(4, C, dtype=torch.float64, generator=g), dim=1)
    cents = torch.cat([c0[None], decoys[:2], c1[None], decoys[2:]])
    return X, cents


@pytest.mark.parametrize("device,backend", _device_backends())
def test_near_ties_are_resolved_in_float32(device, backend):
    """Labels equal the float64 argmax on every row whose best two cosines differ by more than float32
    rounding, although bf16 scoring cannot tell them apart: the fp32 re-score of the top-2 (triton) or
    fp32 scoring (the others) must decide. A kernel that keeps its bf16 choice gets ~half of them wrong."""
    g = torch.Generator().manual_seed(21)
    X, cents = _near_ties(64 if backend == "triton" and device == "cpu" else 2000, 32, g)
    S = cosine_scores64(X, cents)
    top2 = S.topk(2, dim=1).values
    clear = (top2[:, 0] - top2[:, 1]) > 1e-6
    assert int(clear.sum()) > 0.9 * X.shape[0]  # the construction makes near-ties, not exact ones
    labels, _ = spherical_assign(X.float().to(device), cents.float().to(device), backend=backend)
    want = S.argmax(1)
    assert torch.equal(labels.cpu()[clear], want[clear]), int((labels.cpu()[clear] != want[clear]).sum())


# GIG_FAST_ASSIGN_ISA caps the cpp kernel (read at each call): on an AVX-512 BF16 CPU "avx512" reaches the
# fp32 AVX-512 kernel, on an AVX-512 CPU "avx2" the AVX2 kernel, and "blas" the at::mm + scan path, which
# the default run would never take there.
@pytest.mark.parametrize("isa", ["avx512", "avx2", "blas"])
def test_cpp_every_cpu_path(monkeypatch, isa):
    if "cpp" not in CPU_BACKENDS:
        pytest.skip("cpp extension not built")
    monkeypatch.setenv("GIG_FAST_ASSIGN_ISA", isa)
    for dtype in (torch.float32, torch.bfloat16):
        for N, C, K in _shapes("cpp"):
            X = torch.randn(N, C, dtype=torch.float64).to(dtype)
            cents = (torch.randn(K, C, dtype=torch.float64) * 3).to(dtype)
            labels, best = spherical_assign(X, cents, backend="cpp")
            _check(X, cents, labels, best, "cpp")
            ref_labels, _ = spherical_assign_ref(X, cents)
            assert int((labels != ref_labels).sum()) <= max(1, N // 1000), (isa, N, K)
    test_ties_go_to_smaller_index("cpu", "cpp", 40)
    test_zero_rows("cpu", "cpp")
    test_fused_centroids_are_scale_free(isa)


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            return {w for line in f if line.startswith("flags") for w in line.split(":", 1)[1].split()}
    except OSError:
        return set()


def _screen_cases(g: torch.Generator):
    """(name, X, centroids) for the bf16 screen: every shape of the grid, odd C (a half-empty last pair),
    C past the 256-channel chunk, K past one 512-centroid score tile and past one pass of centroids (953
    at C = 1,100), near ties bf16 cannot separate, exact duplicates (ties resolved among the candidates),
    centroids repeated 200 times (more candidates than a row keeps: the fp32 fallback), zero rows, and
    rows of extreme scale."""
    cases = [(f"randn {N}x{C} vs {K}", torch.randn(N, C, generator=g), torch.randn(K, C, generator=g) * 3)
             for N, C, K in _shapes("cpp") + [(300, 1100, 2000), (2000, 256, 2048), (97, 513, 600)]]
    X, cents = _near_ties(2000, 32, g)
    cases.append(("near ties", X.float(), cents.float()))
    base = torch.randn(40, 24, generator=g)
    X = base[torch.randint(0, 40, (500,), generator=g)] + 0.05 * torch.randn(500, 24, generator=g)
    cases.append(("each centroid twice", X, torch.cat([base, base])))
    cases.append(("three centroids 200 times", X, base[:3].repeat(200, 1)))
    X = torch.randn(400, 64, generator=g)
    X[::4] = 0
    X[1::9] *= 1e30
    X[2::9] *= 1e-38
    cases.append(("zero and extreme rows", X, torch.randn(300, 64, generator=g)))
    return cases


def test_cpp_bf16_screen_equals_fp32_kernel(monkeypatch):
    """On AVX-512 BF16 CPUs the default kernel screens in bf16 and re-scores in fp32: its labels and best
    cosines must be those of the fp32 AVX-512 kernel bit for bit (the screen's bound keeps the fp32
    winner among the candidates, which are re-scored by the fp32 kernel's own FMA chain)."""
    if "cpp" not in CPU_BACKENDS:
        pytest.skip("cpp extension not built")
    if "avx512_bf16" not in _cpu_flags():
        pytest.skip("this CPU lacks AVX-512 BF16: the default kernel is the fp32 one")
    g = torch.Generator().manual_seed(17)
    for name, X, cents in _screen_cases(g):
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            if dtype != torch.float32 and name == "zero and extreme rows":
                continue  # outside the 16-bit ranges
            Xd, Cd = X.to(dtype), cents.to(dtype)
            monkeypatch.delenv("GIG_FAST_ASSIGN_ISA", raising=False)
            labels, best = spherical_assign(Xd, Cd, backend="cpp")
            monkeypatch.setenv("GIG_FAST_ASSIGN_ISA", "avx512")
            want_labels, want_best = spherical_assign(Xd, Cd, backend="cpp")
            differ = int((labels != want_labels).sum())
            assert differ == 0, f"{name} {dtype}: {differ} labels differ from the fp32 kernel's"
            assert torch.equal(best, want_best), f"{name} {dtype}: best cosines differ from the fp32 kernel's"


def test_fused_centroids_are_scale_free(isa="default"):
    """The fused kernels bring each centroid into range as they pack it (K above the direct path's 8):
    centroids scaled by 1e30 or 1e-40 (fp32 squares overflow / underflow) give the unscaled labels."""
    if "cpp" not in CPU_BACKENDS:
        pytest.skip("cpp extension not built")
    g = torch.Generator().manual_seed(3)
    X, cents = torch.randn(300, 40, generator=g), torch.randn(50, 40, generator=g)
    want = spherical_assign_ref(X.double(), cents.double())[0]
    for scale in (1e30, 1e-40):
        big = (cents.double() * scale).float()
        got = spherical_assign(X, big, backend="cpp")[0]
        assert torch.equal(got, want), (isa, scale)


def test_agreement_with_float64_cpp_large():
    """≥ 99.99% label agreement with a float64 argmax on random unit vectors (the issue's bar)."""
    if "cpp" not in CPU_BACKENDS:
        pytest.skip("cpp extension not built")
    X, cents = random_unit(20000, 64), random_unit(300, 64)
    labels, _ = spherical_assign(X, cents, backend="cpp")
    q = label_quality(X, cents, labels)
    assert q["agreement"] >= 0.9999 and q["worst_loss"] < 1e-5


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_agreement_with_float64_gpu(backend):
    X, cents = random_unit(50000, 256, device="cuda"), random_unit(2048, 256, device="cuda")
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        labels, _ = spherical_assign(X.to(dtype), cents.to(dtype), backend=backend)
        q = label_quality(X.to(dtype), cents.to(dtype), labels)
        assert q["agreement"] >= 0.9999, (dtype, q)


def test_opcheck():
    X, cents = torch.randn(9, 5), torch.randn(3, 5)
    for backend in CPU_BACKENDS:
        torch.library.opcheck(ops.spec("spherical_assign").custom_op, (X, cents, backend))


@pytest.mark.parametrize("bad", ["channels", "dtype", "nan", "empty", "not_tensor", "rank"])
def test_bad_input(bad):
    X, cents = torch.randn(4, 5), torch.randn(3, 5)
    if bad == "channels":
        args = (X, torch.randn(3, 6))
    elif bad == "dtype":
        args = (X, cents.double())
    elif bad == "nan":
        X[1, 2] = float("nan")
        args = (X, cents)
    elif bad == "empty":
        args = (X, torch.randn(0, 5))
    elif bad == "not_tensor":
        args = (X.tolist(), cents)
    else:
        args = (X, cents[None])
    with pytest.raises(ValueError):
        spherical_assign(*args)
