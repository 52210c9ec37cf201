"""sparse_reconstruct: our backends against the routes PyTorch already ships, forward and forward+backward.

Routes on the same codes ``(idx, val) [P, s]``, ``V [K, C]``, ``bias [C]`` (each gets its inputs in the
layout it wants, built outside the timing):

* ours: the public op ``gig_fast.ops.sparse_reconstruct`` on each backend (``cpp``, ``triton``, ``cuda``);
* baselines: ``torch`` (our pure-PyTorch reference), ``dense U@V`` (the codes as a dense ``[P, K]``
  matrix: ``addmm``), ``torch.sparse CSR`` (the codes as a CSR matrix: ``torch.sparse.addmm`` on the GPU,
  ``U_csr @ V + bias`` on the CPU) and ``embedding_bag`` (``F.embedding_bag(idx, V,
  per_sample_weights=val, mode="sum") + bias``: FBGEMM's kernels on the CPU, the route of SAE decoders).

Shapes: ResNet-50 layer1/layer3/layer4 with 64 images, K = 8·C, s = 30 (``RECON_SHAPES``) on a GPU;
16 (layer3) and 4 (layer1) images on a CPU. Bytes (the bound): read idx and val once, write the output
once and read each *distinct* concept row once (V mostly stays in cache): ``P·s·(8 + b) + P·C·b +
min(K, P·s)·C·b`` for element size b. Every result is checked against a float64 reference with the
summation bound of its dtype before it is timed.
"""
from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

from checks import check_sums
from gig_fast.ops import sparse_reconstruct
from gig_fast.ops.reference import sparse_reconstruct_backward_ref, sparse_reconstruct_ref
from gig_fast.testing import RECON_SHAPES, random_codes


@dataclass(frozen=True)
class Case:
    layer: str
    P: int
    K: int
    C: int
    s: int
    dtype: str
    backward: bool = True

    @property
    def name(self) -> str:
        return f"{self.layer} P={self.P} K={self.K} C={self.C} s={self.s} {self.dtype}"


def cases(size: str, device: str) -> list[Case]:
    if size == "smoke":
        return [Case("tiny", 96, 256, 40, 7, "float32"), Case("tiny", 96, 256, 40, 7, "bfloat16")]
    if device.startswith("cuda"):
        out = [Case(name, **shape, dtype="float32") for name, shape in RECON_SHAPES.items()]
        return out + [Case(name, **shape, dtype="bfloat16") for name, shape in RECON_SHAPES.items()]
    layer3, layer1 = dict(P=16 * 196, K=8192, C=1024, s=30), dict(P=4 * 3136, K=2048, C=256, s=30)
    if size == "quick":  # the dense and reference backwards take ~1 s a call here: full size only
        return [Case("layer3-16img", **layer3, dtype="float32", backward=False),
                Case("layer1-4img", **layer1, dtype="float32"),
                Case("layer1-4img", **layer1, dtype="bfloat16", backward=False)]
    return [Case("layer3-16img", **layer3, dtype="float32"), Case("layer1-4img", **layer1, dtype="float32"),
            Case("layer3-16img", **layer3, dtype="bfloat16"), Case("layer1-4img", **layer1, dtype="bfloat16")]


def pytest_generate_tests(metafunc):
    if "problem" in metafunc.fixturenames:
        all_cases = cases(metafunc.config.gig_size, metafunc.config.gig_device)
        if metafunc.function.__name__ == "bench_forward_backward":
            all_cases = [c for c in all_cases if c.backward]
        metafunc.parametrize("problem", all_cases, ids=[c.name.replace(" ", "-") for c in all_cases],
                             indirect=True, scope="module")


class Problem:
    """One case's inputs on the device, the float64 reference and the bound's magnitudes."""

    def __init__(self, case: Case, device: str):
        self.case, self.dtype = case, getattr(torch, case.dtype)
        g = torch.Generator().manual_seed(0)
        idx, val = random_codes(case.P, case.s, case.K, dtype=self.dtype, pad_frac=0.1, generator=g)
        V = torch.randn(case.K, case.C, generator=g).to(self.dtype)
        b = torch.randn(case.C, generator=g).to(self.dtype)
        self.want = sparse_reconstruct_ref(idx, val.double(), V.double(), b.double())
        self.magnitude = sparse_reconstruct_ref(idx, val.double().abs(), V.double().abs(), b.double().abs())
        self.idx, self.val, self.V, self.b = idx.to(device), val.to(device), V.to(device), b.to(device)
        self.shape = {"layer": case.layer, "P": case.P, "K": case.K, "C": case.C, "s": case.s, "dtype": case.dtype}
        elem = self.V.element_size()
        self.bytes = case.P * case.s * (8 + elem) + case.P * case.C * elem + min(case.K, case.P * case.s) * case.C * elem

    def check_forward(self, acc: torch.dtype | None = None):
        def check(out):
            return check_sums(out.float().cpu(), self.want, self.magnitude, self.dtype, self.case.s + 1,
                              "sparse_reconstruct forward", acc=acc)
        return check


@pytest.fixture(scope="module")
def problem(request, device):
    return Problem(request.param, device)


def _baseline_forward(name: str, p: Problem):
    """The outside route ``name`` as a callable, its inputs prepared outside the timing."""
    idx, val, V, b = p.idx, p.val, p.V, p.b
    P, K = idx.shape[0], V.shape[0]
    active = idx >= 0
    rows = torch.arange(P, device=idx.device)[:, None].expand_as(idx)[active]
    cols, vals = idx[active], val[active]
    if name == "dense U@V":
        if P * K > 2e9:
            pytest.skip(f"the dense [P, K] = [{P}, {K}] matrix does not fit")
        U = torch.zeros(P, K, dtype=V.dtype, device=V.device)
        U.index_put_((rows, cols), vals, accumulate=True)
        return lambda: torch.addmm(b, U, V)
    if name == "torch.sparse CSR":
        crow = torch.zeros(P + 1, dtype=torch.int64, device=idx.device)
        crow[1:] = torch.cumsum(active.sum(1), 0)
        U_csr = torch.sparse_csr_tensor(crow, cols, vals, (P, K), check_invariants=False)
        return (lambda: torch.sparse.addmm(b, U_csr, V)) if V.is_cuda else (lambda: (U_csr @ V) + b)
    if name == "embedding_bag":
        safe, weights = idx.clamp_min(0), val * active
        return lambda: F.embedding_bag(safe, V, per_sample_weights=weights, mode="sum") + b
    raise ValueError(name)


FORWARD = ["dense U@V", "torch.sparse CSR", "embedding_bag", "torch", "cpp", "triton", "cuda"]


@pytest.mark.parametrize("impl", FORWARD, ids=[f.replace(" ", "_") for f in FORWARD])
def bench_forward(bench, problem, impl):
    p = problem
    common = dict(op="sparse_reconstruct", case=p.case.name, shape=p.shape, bytes_moved=p.bytes)
    if impl in ("cpp", "triton", "cuda", "torch"):
        bench.skip_unless_runs(impl)
        if impl == "torch" and bench.size == "quick" and p.dtype != torch.float32:
            pytest.skip("the torch reference in half precision (~2 s a call here): not at the quick size")
        fn = lambda: sparse_reconstruct(p.idx, p.val, p.V, p.b, backend=impl)  # noqa: E731
        bench(fn, impl=impl, role="baseline" if impl == "torch" else "ours", check=p.check_forward(), **common)
    else:
        # outside routes may accumulate half types in their own precision: checked with that bound
        bench(_baseline_forward(impl, p), impl=impl, role="baseline", check=p.check_forward(acc=p.dtype), **common)


BACKWARD = ["embedding_bag", "torch", "cpp", "triton", "cuda"]


@pytest.mark.parametrize("impl", BACKWARD, ids=BACKWARD)
def bench_forward_backward(bench, problem, impl):
    """Forward and backward to ``val`` and ``V`` (``embedding_bag``: to its per-sample weights and
    weight, the same two gradients; its padded entries point at row 0 with weight 0 and are not compared)."""
    p = problem
    g = torch.Generator().manual_seed(1)
    grad_out = torch.randn(p.case.P, p.case.C, generator=g).to(p.dtype)
    want_val, want_V = sparse_reconstruct_backward_ref(grad_out.double(), p.idx.cpu(), p.val.double().cpu(),
                                                       p.V.double().cpu())
    mag_val, mag_V = sparse_reconstruct_backward_ref(grad_out.double().abs(), p.idx.cpu(),
                                                     p.val.double().abs().cpu(), p.V.double().abs().cpu())
    grad_out = grad_out.to(p.V.device)
    active = (p.idx >= 0).cpu()
    val = p.val.clone().requires_grad_()
    V = p.V.clone().requires_grad_()
    if impl == "embedding_bag":
        role, acc, safe = "baseline", p.dtype, p.idx.clamp_min(0)
        forward = lambda: F.embedding_bag(safe, V, per_sample_weights=val, mode="sum") + p.b  # noqa: E731
    else:
        bench.skip_unless_runs(impl)
        if impl == "torch" and bench.size == "quick":
            pytest.skip("the torch reference's backward (~1 s a call here): not at the quick size")
        role, acc = ("baseline" if impl == "torch" else "ours"), None
        forward = lambda: sparse_reconstruct(p.idx, val, V, p.b, backend=impl)  # noqa: E731

    def fn():
        val.grad = V.grad = None
        forward().backward(grad_out)
        return val.grad, V.grad

    def check(grads):
        gv, gV = (t.float().cpu() for t in grads)
        figures = check_sums(gv[active], want_val[active], mag_val[active], p.dtype, p.case.C,
                             "grad_val", acc=acc)
        counts = int(torch.bincount(p.idx.cpu()[active], minlength=p.case.K).max())
        figures_V = check_sums(gV, want_V, mag_V, p.dtype, counts, "grad_V", acc=acc)
        return {"max_abs_err_grad_val": figures["max_abs_err"], "max_abs_err_grad_V": figures_V["max_abs_err"]}

    bench(fn, op="sparse_reconstruct_fwd+bwd", impl=impl, role=role, case=p.case.name, shape=p.shape, check=check)
