"""``cpu_matmul_nt`` (gig_fast.ops.common) and the C++ op behind it, ``torch.ops.gig_fast_cpp.matmul_nt``:
``a @ bᵀ`` and the symmetric Gram ``a @ aᵀ`` against a float64 product of the same inputs.

Tolerance: every path sums C products in the inputs' dtype (fp32: one rounding per FMA or per multiply
and add, in any order), so |out − exact| ≤ γ·(|a| @ |b|ᵀ) with γ = (C + 1)·u, u = 2⁻²⁴ for fp32 and 2⁻⁵³
for fp64 (the standard bound of a dot product of C terms); the float64 reference adds far less. A
misplaced tile, a wrong chunk offset, a missed tail row or column or an unwritten mirror entry is off by
the size of an entry, about √C times the bound's scale. The random seed of a failing test is printed.

Paths: by default contiguous fp32 runs our AVX-512 kernel on a CPU that has AVX-512F, and at::mm
elsewhere; ``GIG_FAST_MATMUL_ISA=blas`` (read at each call) forces at::mm, so both run on one machine.
Our kernel packs b whole where a has more rows than b (or there are fewer 512-column tiles than
threads) and tile by tile otherwise; SHAPES has both on one and on two threads.
"""
import pytest
import torch

from gig_fast.ops import available_backends
from gig_fast.ops.common import cpu_matmul_nt

HAS_CPP = available_backends()["cpp"] == "runs"

# (M, C, N): M, N around and off the 12 × 32 register tile and the 96-row / 512-column work items; C below,
# at and past the 128 chunk, not a multiple of it, and 1; empty sides
SHAPES = [(1, 1, 1), (12, 128, 32), (13, 5, 33), (11, 127, 31), (97, 129, 70), (50, 1, 40), (96, 256, 512),
          (100, 300, 515), (200, 384, 1030), (230, 64, 600), (0, 7, 5), (5, 7, 0), (4, 0, 3), (0, 0, 0)]


def _bound(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The fp32/fp64 accumulation bound of each entry of ``a @ bᵀ`` (module docstring)."""
    u = torch.finfo(a.dtype).eps / 2
    return (a.shape[1] + 1) * u * (a.double().abs() @ b.double().abs().T) + 1e-300


def _check(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    assert out.shape == (a.shape[0], b.shape[0]) and out.dtype == a.dtype
    ref = a.double() @ b.double().T
    err = (out.double() - ref).abs()
    bound = _bound(a, b)
    assert bool((err <= bound).all()), f"max error {err.max():.3g} over a bound of {bound.max():.3g}"


@pytest.fixture(params=[1, 2], ids=lambda t: f"threads{t}")
def threads(request):
    old = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(old)


@pytest.fixture(params=["default", "blas"])
def path(request, monkeypatch):
    if request.param == "blas":
        monkeypatch.setenv("GIG_FAST_MATMUL_ISA", "blas")
    else:
        monkeypatch.delenv("GIG_FAST_MATMUL_ISA", raising=False)
    return request.param


@pytest.mark.parametrize("M,C,N", SHAPES, ids=[f"{m}x{c}x{n}" for m, c, n in SHAPES])
def test_product_matches_float64(M, C, N, threads, path, seed):
    g = torch.Generator().manual_seed(seed)
    a, b = torch.randn(M, C, generator=g), torch.randn(N, C, generator=g)
    _check(cpu_matmul_nt(a, b), a, b)


# (4100, 3): BLAS's Gram in 13 row blocks of 320, the last of 260 (the blocks on and above the diagonal, from 4,096 rows)
@pytest.mark.parametrize("M,C", [(1, 1), (13, 5), (97, 129), (100, 300), (230, 64), (600, 140), (4100, 3), (0, 3),
                                 (7, 0)], ids=lambda v: str(v))
def test_gram_is_the_exactly_symmetric_product(M, C, threads, path, seed):
    """``b=None``: ``a @ aᵀ`` within the bound, exactly symmetric; with our AVX-512 kernel (or below
    BLAS's row blocks) its upper triangle is bit for bit the full product's (the same FMA chains)."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(M, C, generator=g)
    G = cpu_matmul_nt(a)
    _check(G, a, a)
    assert torch.equal(G, G.T)
    our_kernel = path == "default" and torch.backends.cpu.get_cpu_capability() == "AVX512"
    if our_kernel or M < 4096:
        full = cpu_matmul_nt(a, a.clone())
        assert torch.equal(torch.triu(G), torch.triu(full))


@pytest.mark.parametrize("gram", [False, True], ids=["product", "gram"])
def test_out_is_written_and_returned(gram, path, seed):
    """``out=``: every entry of a reused buffer (filled with NaN first) is overwritten with the product the
    fresh call returns, bit for bit; a buffer of the wrong shape, dtype or layout is refused."""
    g = torch.Generator().manual_seed(seed)
    a, b = torch.randn(97, 129, generator=g), torch.randn(70, 129, generator=g)
    other = a if gram else b
    out = torch.full((97, other.shape[0]), float("nan"))
    got = cpu_matmul_nt(a, None if gram else b, out=out)
    assert got is out and torch.equal(out, cpu_matmul_nt(a, None if gram else b))
    for bad in (torch.empty(97, other.shape[0] + 1), torch.empty(97, other.shape[0], dtype=torch.float64),
                torch.empty(other.shape[0], 97).T, [[0.0] * other.shape[0]] * 97):
        with pytest.raises(ValueError, match="out must be"):
            cpu_matmul_nt(a, None if gram else b, out=bad)


@pytest.mark.parametrize("M,C,N", [(13, 129, 1100), (97, 300, 1030), (200, 64, 2049)], ids=lambda v: str(v))
def test_tiles_and_whole_pack_give_the_same_bits(M, C, N, threads, seed):
    """``a @ bᵀ`` with a the shorter side goes tile by tile (b packed per 512 columns by the thread that
    takes them), ``b @ aᵀ`` packs a whole: each entry is the same FMA chain either way (fma(x, y, s) =
    fma(y, x, s)), so one is the other's transpose bit for bit — a tile packed from the wrong columns or
    stored at the wrong offset, a skipped row block, is off by whole entries."""
    if torch.backends.cpu.get_cpu_capability() != "AVX512" or not HAS_CPP:
        pytest.skip("our AVX-512 kernel runs only on a CPU with AVX-512F (at::mm elsewhere)")
    g = torch.Generator().manual_seed(seed)
    a, b = torch.randn(M, C, generator=g), torch.randn(N, C, generator=g)
    by_tiles = cpu_matmul_nt(a, b)
    _check(by_tiles, a, b)
    assert torch.equal(by_tiles, cpu_matmul_nt(b, a).T)


def test_threads_give_identical_results(seed):
    """Each entry is one FMA chain whichever thread computes it: 1 and 2 threads agree bit for bit."""
    g = torch.Generator().manual_seed(seed)
    a, b = torch.randn(300, 200, generator=g), torch.randn(1100, 200, generator=g)
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one, one_gram = cpu_matmul_nt(a, b), cpu_matmul_nt(b)
        torch.set_num_threads(2)
        two, two_gram = cpu_matmul_nt(a, b), cpu_matmul_nt(b)
    finally:
        torch.set_num_threads(old)
    assert torch.equal(one, two) and torch.equal(one_gram, two_gram)


@pytest.mark.skipif(not HAS_CPP, reason="needs the compiled CPU extension")
def test_blas_path_is_at_mm(monkeypatch, seed):
    """``GIG_FAST_MATMUL_ISA=blas`` takes at::mm: the product is torch's bit for bit."""
    monkeypatch.setenv("GIG_FAST_MATMUL_ISA", "blas")
    g = torch.Generator().manual_seed(seed)
    a, b = torch.randn(70, 150, generator=g), torch.randn(90, 150, generator=g)
    assert torch.equal(torch.ops.gig_fast_cpp.matmul_nt(a, b, False), torch.mm(a, b.T))


@pytest.mark.parametrize("kind", ["float64", "bfloat16", "a strided", "b transposed"])
def test_other_inputs_fall_back(kind, seed):
    """fp64, bf16 and non-contiguous inputs take at::mm (the op's fallback), with the same contract."""
    g = torch.Generator().manual_seed(seed)
    a, b = torch.randn(45, 140, generator=g, dtype=torch.float64), torch.randn(37, 140, generator=g, dtype=torch.float64)
    if kind == "bfloat16":
        a, b = a.bfloat16(), b.bfloat16()
        out, ref = cpu_matmul_nt(a, b), a.double() @ b.double().T
        # bf16 inputs, fp32 accumulation and a bf16 result: the result's rounding (2⁻⁸) dominates
        assert out.dtype == torch.bfloat16
        assert bool(((out.double() - ref).abs() <= 2 ** -8 * ref.abs() + _bound(a.float(), b.float())).all())
        G = cpu_matmul_nt(a)
        assert torch.equal(G, G.T)
        return
    if kind == "float64":
        _check(cpu_matmul_nt(a, b), a, b)
        G = cpu_matmul_nt(a)
        _check(G, a, a)
        assert torch.equal(G, G.T)
        return
    a, b = a.float(), b.float()
    if kind == "a strided":
        wide = torch.randn(45, 280, generator=g)
        a = wide[:, ::2]
        assert not a.is_contiguous()
        _check(cpu_matmul_nt(a, b), a, b)
        G = cpu_matmul_nt(a)
        _check(G, a, a)
        assert torch.equal(G, G.T)
    else:
        bt = b.T.contiguous().T  # [37, 140] with column-major strides
        assert not bt.is_contiguous()
        _check(cpu_matmul_nt(a, bt), a, bt)


def test_gradients_flow_through_the_torch_route(seed):
    """Inputs that need gradients take torch's product (the op has no backward), so autograd works."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(20, 30, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(25, 30, generator=g, dtype=torch.float64)
    cpu_matmul_nt(a, b).sum().backward()
    assert torch.allclose(a.grad, b.sum(0).expand(20, 30), rtol=0, atol=1e-12)


@pytest.mark.parametrize("args,match", [
    ((torch.ones(3), torch.ones(2, 3)), "a must be 2-D"),
    ((torch.ones(2, 3), torch.ones(1, 2, 3)), "b must be 2-D"),
    ((torch.ones(2, 3), torch.ones(2, 4)), "C \\(dim 1\\) differ"),
    ((torch.ones(2, 3), torch.ones(2, 3, dtype=torch.float64)), "must share dtype"),
    ((torch.ones(2, 3, dtype=torch.int64), None), "floating point"),
    (([[1.0]], None), "must be a torch.Tensor"),
])
def test_bad_inputs_raise(args, match):
    with pytest.raises(ValueError, match=match):
        cpu_matmul_nt(*args)


@pytest.mark.skipif(not HAS_CPP, reason="needs the compiled CPU extension")
@pytest.mark.parametrize("args,match", [
    ((torch.ones(3), torch.ones(2, 3), False), "a must be 2-D"),
    ((torch.ones(2, 3), torch.ones(3), False), "b must be 2-D"),
    ((torch.ones(2, 3), torch.ones(2, 4), False), "their C \\(dim 1\\) differ"),
    ((torch.ones(2, 3), torch.ones(2, 3, dtype=torch.float64), False), "must share a dtype"),
    ((torch.ones(2, 3, dtype=torch.int32), torch.ones(2, 3, dtype=torch.int32), False), "floating point"),
    ((torch.ones(2, 3), torch.ones(2, 3), True), "b must be a"),
])
def test_op_checks_its_inputs(args, match):
    """The C++ op's own checks (callers of torch.ops skip the Python ones): ValueErrors that name the problem."""
    with pytest.raises(ValueError, match=match):
        torch.ops.gig_fast_cpp.matmul_nt(*args)
