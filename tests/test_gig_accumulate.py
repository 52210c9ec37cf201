"""gig_accumulate: every backend against the torch reference (and the reference against a dense einsum)."""
from __future__ import annotations


import pytest
import torch

from gig_fast import ops
from gig_fast.ops import available_backends, gig_accumulate
from gig_fast.ops.reference import gig_accumulate_ref

from _grids import accumulation_bound


def _runnable_backends() -> list[str]:
    """Backends that run on CPU tensors here (triton through its interpreter)."""
    avail = available_backends()
    return [b for b in ("torch", "cpp", "triton") if avail.get(b, "missing").startswith("runs")]


def make_inputs(T, m, P, C, K, s, dtype, device="cpu", pad_frac=0.3):
    """Random gradients, weights and padded codes (≈pad_frac of the entries are padding)."""
    grads = torch.randn(T, m, P, C, device=device).to(dtype)
    weights = torch.rand(m, device=device, dtype=torch.float64).to(dtype if dtype == torch.float64 else torch.float32)
    idx = torch.randint(0, K, (P, s), device=device)
    pad = torch.rand(P, s, device=device) < pad_frac
    idx[pad] = -1
    val = torch.randn(P, s, device=device).to(dtype)
    val[pad] = 0
    V = torch.randn(K, C, device=device).to(dtype)
    return grads, weights, idx, val, V


def assert_within_accumulation_error(got, expected, grads, w, idx, val, V):
    """Kernel and reference read the same (possibly half-precision) inputs and both sum in float32
    (float64 for float64 grads): only the order of the m + C terms of each output differs, so each
    element must lie within :func:`accumulation_bound` of ``|val|·Σ_c |v_c|·Σ_k |w_k·g_kc|`` (a kernel that
    accumulated in bfloat16 would be off by ~10^5 of it)."""
    g = torch.einsum("m,tmpc->tpc", w.double().abs(), grads.double().abs())  # [T, P, C]
    Vabs = V.double().abs()[idx.clamp_min(0)]  # [P, s, C]
    terms = torch.einsum("tpc,psc->tps", g, Vabs) * val.double().abs()
    bound = accumulation_bound(terms, grads.shape[1] + grads.shape[3], grads.dtype)
    err = (got.double() - expected.double()).abs()
    assert torch.all(err <= bound), f"largest error {float(err.max()):.3e}, ratio to its bound " \
                                    f"{float((err / bound).max()):.3g}"
SHAPES = [  # (T, m, P, C, K, s): tiny, odd, one-column, single node, larger C
    (1, 1, 1, 1, 1, 1),
    (1, 3, 7, 5, 4, 2),
    (2, 5, 33, 19, 11, 3),
    (3, 4, 17, 129, 40, 5),
    (1, 2, 65, 70, 300, 1),
    (5, 1, 37, 32, 50, 16),  # C a multiple of 16 (the AVX-512 CPU kernel's), one node, one block of 16 concepts
    (3, 4, 29, 48, 20, 21),  # several nodes, a second block of 5 concepts under a mask
]


def test_reference_matches_dense_einsum():
    """The oracle itself, against the dense route U·(Σ_k w_k G_k)·Vᵀ restricted to the active entries."""
    grads, w, idx, val, V = make_inputs(2, 4, 13, 9, 6, 3, torch.float64)
    g = torch.einsum("m,tmpc->tpc", w, grads)
    proj = torch.einsum("tpc,kc->tpk", g, V)  # [T, P, K] dense projection
    expected = torch.zeros(2, 13, 3, dtype=torch.float64)
    for p in range(13):
        for j in range(3):
            if idx[p, j] >= 0:
                expected[:, p, j] = val[p, j] * proj[:, p, idx[p, j]]
    torch.testing.assert_close(gig_accumulate_ref(grads, w, idx, val, V), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", _runnable_backends())
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_backend_matches_reference(backend, shape, dtype):
    T, m, P, C, K, s = shape
    if backend == "triton" and dtype in (torch.float16, torch.bfloat16) and shape[3] > 100:
        pytest.skip("interpreter time: fp16/bf16 are covered by the smaller shapes")
    grads, w, idx, val, V = make_inputs(T, m, P, C, K, s, dtype)
    expected = gig_accumulate_ref(grads, w, idx, val, V)
    got = gig_accumulate(grads, w, idx, val, V, backend=backend)
    assert got.shape == (T, P, s)
    assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert_within_accumulation_error(got, expected, grads, w, idx, val, V)
    assert torch.all(got[:, idx < 0] == 0), "padding entries must be exactly 0"


# GIG_FAST_ACCUMULATE_ISA caps the cpp backend's kernel for float32 gradients (read at each call):
# "generic" keeps the generic kernel, "avx2" the AVX2 kernel (C a multiple of 8) on an AVX-512 CPU, which
# otherwise takes its AVX-512 kernel where C is a multiple of 16; so one machine runs every kernel it has.
@pytest.mark.parametrize("isa", ["default", "generic", "avx2"])
def test_cpp_every_cpu_path(monkeypatch, isa):
    if "cpp" not in _runnable_backends():
        pytest.skip("cpp extension not built")
    if isa != "default":
        monkeypatch.setenv("GIG_FAST_ACCUMULATE_ISA", isa)
    shapes = [(5, 1, 37, 32, 50, 16),   # whole blocks of 8 and 16 concepts, one node
              (3, 4, 29, 48, 20, 21),   # several nodes, a last block of 5 concepts under a mask
              (2, 1, 130, 16, 9, 40),
              (4, 3, 23, 24, 30, 11),   # C a multiple of 8 but not of 16: the AVX2 kernel on every vector CPU
              (1, 2, 70, 8, 5, 3)]      # one vector per row, fewer concepts than a block
    for shape in shapes:
        grads, w, idx, val, V = make_inputs(*shape, torch.float32)
        val[idx < 0] = 1.5  # padding stores an exact 0 whatever value it holds
        got = gig_accumulate(grads, w, idx, val, V, backend="cpp")
        assert_within_accumulation_error(got, gig_accumulate_ref(grads, w, idx, val, V), grads, w, idx, val, V)
        assert torch.all(got[:, idx < 0] == 0)


@pytest.mark.parametrize("backend", _runnable_backends())
def test_single_target_shape_and_multi_target_consistency(backend):
    """[m, P, C] input gives [P, s]; a T-stack equals T separate calls."""
    grads, w, idx, val, V = make_inputs(3, 6, 21, 17, 9, 4, torch.float32)
    multi = gig_accumulate(grads, w, idx, val, V, backend=backend)
    for t in range(3):
        single = gig_accumulate(grads[t], w, idx, val, V, backend=backend)
        assert single.shape == (21, 4)
        torch.testing.assert_close(single, multi[t], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", _runnable_backends())
def test_mixed_dtypes_and_noncontiguous(backend):
    """bf16 gradients with float32 V/val/weights, and a non-contiguous grads view."""
    grads, w, idx, val, V = make_inputs(1, 3, 11, 24, 7, 3, torch.float32)
    gb = grads.to(torch.bfloat16)
    torch.testing.assert_close(gig_accumulate(gb, w, idx, val, V, backend=backend),
                               gig_accumulate_ref(gb, w, idx, val, V), rtol=1e-4, atol=1e-4)
    wide = torch.randn(1, 3, 11, 48)
    view = wide[..., ::2]
    torch.testing.assert_close(gig_accumulate(view, w, idx, val, V, backend=backend),
                               gig_accumulate_ref(view, w, idx, val, V), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend", _runnable_backends())
def test_all_padding_and_empty_codes(backend):
    grads, w, idx, val, V = make_inputs(2, 3, 5, 8, 4, 3, torch.float32)
    idx[:] = -1
    val[:] = 0
    assert torch.all(gig_accumulate(grads, w, idx, val, V, backend=backend) == 0)
    empty = gig_accumulate(grads, w, idx[:, :0], val[:, :0], V, backend=backend)
    assert empty.shape == (2, 5, 0)


@pytest.mark.parametrize("backend", _runnable_backends())
def test_opcheck(backend):
    grads, w, idx, val, V = make_inputs(2, 3, 9, 12, 5, 3, torch.float32)
    torch.library.opcheck(ops.spec("gig_accumulate").custom_op, (grads, w, idx, val, V, backend))


def test_cpp_op_registered_schema():
    if not available_backends()["cpp"].startswith("runs"):
        pytest.skip("cpp extension not built")
    schema = str(torch.ops.gig_fast_cpp.gig_accumulate.default._schema)
    assert "gig_accumulate(Tensor grads, Tensor weights, Tensor idx, Tensor val, Tensor V)" in schema


def test_validation_errors():
    grads, w, idx, val, V = make_inputs(1, 3, 5, 8, 4, 2, torch.float32)
    with pytest.raises(ValueError, match="weights"):
        gig_accumulate(grads, w[:2], idx, val, V)
    with pytest.raises(ValueError, match="P="):
        gig_accumulate(grads, w, idx[:4], val[:4], V)
    with pytest.raises(ValueError, match="C="):
        gig_accumulate(grads, w, idx, val, V[:, :5])
    with pytest.raises(ValueError, match="grads must be"):
        gig_accumulate(grads[0, 0], w, idx, val, V)
    bad = idx.clone()
    bad[0, 0] = 4
    with pytest.raises(ValueError, match="K=4"):
        gig_accumulate(grads, w, bad, val, V)
    nan = grads.clone()
    nan[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        gig_accumulate(nan, w, idx, val, V)
    with pytest.raises(ValueError, match="int64"):
        gig_accumulate(grads, w, idx.int(), val, V)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_gpu_backends(backend, dtype):
    for shape in SHAPES + [(2, 50, 1000, 1024, 8192, 30)]:
        T, m, P, C, K, s = shape
        grads, w, idx, val, V = make_inputs(T, m, P, C, K, s, dtype, device="cuda")
        expected = gig_accumulate_ref(grads, w, idx, val, V)
        got = gig_accumulate(grads, w, idx, val, V, backend=backend)
        assert_within_accumulation_error(got, expected, grads, w, idx, val, V)
