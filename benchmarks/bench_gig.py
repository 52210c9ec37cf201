"""The GIG engine against Captum, and ``gig_accumulate`` against its torch path.

Engine: same model, ``F_ab``, codes, quadrature (Gauss–Legendre, m nodes) and target for every route:

* ``gig_fast`` — :func:`gig_fast.gig` with the fixed m-node rule (``tolerance=None``: the work Captum does);
* ``gig_fast adaptive`` — the default completeness refinement (``tolerance=0.01``), at m ≤ 50 (and at the
  quick size B = 2 only): its cost over the fixed rule on the same images;
* ``gig_fast bf16`` — F_ab under ``torch.autocast(bfloat16)`` (GPU rows; on the CPU only in the smoke run);
* ``captum_ig_sparse`` — Captum ``IntegratedGradients`` on the sparse coefficients ``val``, ``X = β +
  rebuild(idx, val, V)`` through F_ab (tests/test_gig.py's oracle), the rebuild by
  ``F.embedding_bag(per_sample_weights=val)``: the fastest differentiable PyTorch route (the oracle
  below uses our torch reference instead);
* ``captum_lig`` — Captum ``LayerIntegratedGradients`` on the paper's dense formulation (the codes as
  ``U [B, K, H, W]`` through a 1×1 "concept conv" ``Vᵀ`` into F_ab);
* ``alpha_loop`` — one forward/backward per α-node in plain PyTorch (not at the quick size).

The speed-up of ours is against the faster Captum route of the same case. Every route is checked
against the oracle (Captum IG on ``val`` with the torch-reference rebuild, computed once per case):
``gig_fast`` and ``captum_ig_sparse`` per position and ``captum_lig`` per concept within 1e-4 of its
largest entry — a failed check fails the benchmark; ``gig_fast adaptive`` on the images it did not
refine, and no less complete than the fixed rule elsewhere, its time also as a ratio to ``gig_fast``'s
(``x_relative``); ``gig_fast bf16`` per concept within 1e-2 of each image's total attribution in our
fp32 path (the CPU smoke run: 1e-1).

fp32 is IEEE fp32 on every route: PyTorch's default lets cuDNN convolutions use TF32, which put the
H200 rows of 4d0460d at 2e-3..1.3e-2 from Captum; ``gig`` turns it off for its own call (``tf32=False``,
the suite leaves the global default on, so the GPU rows check that), the Captum routes and the oracle
run in :func:`fp32_exact`.

Sizes: torchvision ResNet-50 (random weights, randomised BN statistics), K = 8·C concepts.
GPU (full): 224×224, s = 30, B = 32 at m = 50 for layer3.5 → logits and layer1.2 → layer2.0 (the two
headline cases, first), then B = 2 at m = 50 for those and layer3.5 → layer4.0, and at m ∈ {20, 300} for
layer3.5 → logits. CPU: 32×32 (quick) or 64×64 (full), s = 16, m = 20, B = 2 for the three transitions
and B = 32 for layer1.2 → layer2.0.

Time to accuracy (``gig_time_to_accuracy``): the pipeline's stage-4 workload — B = 8 images, each with its
top T = 5 concepts of layer b as per-image ``ConceptTarget`` s (its predicted class for the logits), codes
with s = 16 on K = 8·C random concepts, ResNet-50 at 96 px (CPU) or 224 px (GPU); and the same on a
finished demo run (its network, concepts and stored codes; ``GIG_FAST_DEMO_RUN`` or ``gig_demo/``, else
skipped). Accuracy is the share of (image, target) pairs whose completeness gap is within 1 % of
``|T(X(1)) − T(X(0))|``. ``gig_fast`` is :func:`gig_fast.gig` as stage 4 calls it (the adapters'
BN-folded F_ab, the pipeline's defaults: the adaptive rule from 5 nodes to a 1 % bar); Captum's ``IntegratedGradients`` gets every pair in
one call (codes repeated per target, per-example targets, the ``embedding_bag`` rebuild, Gauss–Legendre)
at the fewest of :data:`CAPTUM_STEPS` whose share reaches ours, with the fastest of
:data:`CAPTUM_BATCHES` as ``internal_batch_size``, on the model as is and on the same folded F_ab (how
much of the gain is the fold). The steps and both shares are in each row.

``gig_accumulate``: the public op of each backend (ours) against the torch path (``torch``, baseline)
and the bare kernel (``<backend> kernel``, floor: the public op's host-side cost is its excess over it).
Bytes: the gradients once, the codes, the output and the distinct concept rows.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from checks import check_relative, check_sums
from gig_fast.gig import ClassTarget, ConceptTarget, gig, quadrature, tf32_allowed
from gig_fast.ops import gig_accumulate, kernel, sparse_reconstruct
from gig_fast.ops.reference import gig_accumulate_ref
from gig_fast.slicing import bn_shift, make_f_ab, preactivation
from gig_fast.testing import random_codes, randomize_bn

# ---------------------------------------------------------------------------------------------------
# gig_accumulate


@dataclass(frozen=True)
class AccumulateCase:
    T: int
    m: int
    P: int
    C: int
    K: int
    s: int

    @property
    def name(self) -> str:
        return f"T={self.T} m={self.m} P={self.P} C={self.C} K={self.K} s={self.s}"


def accumulate_cases(size: str, device: str) -> list[AccumulateCase]:
    if size == "smoke":
        return [AccumulateCase(2, 4, 40, 24, 64, 5)]
    if device.startswith("cuda"):
        return [AccumulateCase(1, 50, 4 * 196, 1024, 8192, 30), AccumulateCase(4, 50, 196, 1024, 8192, 30),
                AccumulateCase(1, 50, 4 * 3136, 256, 2048, 30)]
    if size == "quick":
        return [AccumulateCase(1, 20, 2 * 64, 256, 2048, 16)]
    return [AccumulateCase(1, 50, 4 * 196, 1024, 8192, 30), AccumulateCase(1, 50, 4 * 3136, 256, 2048, 30)]


class AccumulateProblem:
    def __init__(self, case: AccumulateCase, device: str):
        g = torch.Generator().manual_seed(0)
        self.case = case
        grads = torch.randn(case.T, case.m, case.P, case.C, generator=g)
        weights = torch.rand(case.m, generator=g)
        idx, val = random_codes(case.P, case.s, case.K, pad_frac=0.1, generator=g)
        V = torch.randn(case.K, case.C, generator=g)
        self.want = gig_accumulate_ref(grads.double(), weights.double(), idx, val.double(), V.double())
        self.magnitude = gig_accumulate_ref(grads.double().abs(), weights.double(), idx, val.double().abs(),
                                            V.double().abs())
        self.args = tuple(t.to(device) for t in (grads, weights, idx, val, V))
        self.shape = {"T": case.T, "m": case.m, "P": case.P, "C": case.C, "K": case.K, "s": case.s}
        self.bytes = (grads.numel() * 4 + idx.numel() * 8 + val.numel() * 4 + case.T * case.P * case.s * 4
                      + min(case.K, case.P * case.s) * case.C * 4)

    def check(self, out):
        # each entry sums m weighted gradients, then a C-term dot product
        return check_sums(out.cpu(), self.want, self.magnitude, torch.float32, self.case.m + self.case.C,
                          "gig_accumulate")


# ---------------------------------------------------------------------------------------------------
# The engine


@dataclass(frozen=True)
class EngineCase:
    a: str
    b: str
    m: int
    B: int
    size: int
    s: int

    @property
    def name(self) -> str:
        return f"{self.a}->{self.b} m={self.m} B={self.B} {self.size}px s={self.s}"


def engine_cases(size: str, device: str) -> list[EngineCase]:
    if size == "smoke":
        return [EngineCase("layer3.5", "logits", 4, 2, 32, 4), EngineCase("layer1.2", "layer2.0", 4, 2, 32, 4)]
    if device.startswith("cuda"):
        headline = [EngineCase("layer3.5", "logits", 50, 32, 224, 30), EngineCase("layer1.2", "layer2.0", 50, 32, 224, 30)]
        at_50 = [EngineCase(a, b, 50, 2, 224, 30) for a, b in
                 (("layer3.5", "logits"), ("layer3.5", "layer4.0"), ("layer1.2", "layer2.0"))]
        return headline + at_50 + [EngineCase("layer3.5", "logits", m, 2, 224, 30) for m in (20, 300)]
    px = 32 if size == "quick" else 64
    return [EngineCase(a, b, 20, 2, px, 16) for a, b in
            (("layer3.5", "logits"), ("layer3.5", "layer4.0"), ("layer1.2", "layer2.0"))] + \
        [EngineCase("layer1.2", "layer2.0", 20, 32, px, 16)]


def pytest_generate_tests(metafunc):
    size, device = metafunc.config.gig_size, metafunc.config.gig_device
    for name, make in (("accumulate_problem", accumulate_cases), ("engine_problem", engine_cases),
                       ("accuracy_problem", accuracy_cases)):
        if name in metafunc.fixturenames:
            found = make(size, device)
            metafunc.parametrize(name, found, ids=[c.name.replace(" ", "-") for c in found], indirect=True,
                                 scope="module")


@pytest.fixture(scope="module")
def accumulate_problem(request, device):
    return AccumulateProblem(request.param, device)


def fp32_exact():
    """cuDNN convolutions and CUDA matmuls in IEEE float32 inside the block (flags restored after it).

    PyTorch lets cuDNN convolutions use TF32 by default (``torch.backends.cudnn.allow_tf32``): Captum runs
    the model as it is, so its routes and the oracle run in here; ``gig`` sets the same itself
    (``tf32=False``), which the GPU rows check since the suite leaves PyTorch's defaults alone.
    """
    return tf32_allowed(False)


def _in_fp32_exact(fn):
    def call():
        with fp32_exact():
            return fn()
    return call


class _ConceptConv(nn.Module):
    """The paper's 1×1 conv from dense codes ``U [n, K, H, W]`` to ``X = U V + β`` ``[n, C, H, W]``."""

    def __init__(self, V: torch.Tensor, beta: torch.Tensor):
        super().__init__()
        self.register_buffer("weight", V.t().contiguous()[:, :, None, None])
        self.register_buffer("beta", beta)

    def forward(self, U):
        return F.conv2d(U, self.weight) + self.beta[None, :, None, None]


def _target_fn(target):
    """``out -> [n]``: T(F_ab(X)) per row, as the engine defines it (softmax probability / concept sum)."""
    if isinstance(target, ClassTarget):
        return lambda out: torch.softmax(out, 1)[:, target.index]
    unit = target.vector / target.vector.norm()
    return lambda out: torch.einsum("nchw,c->n", out, unit)


def _rebuild_torch(idx, val, V, beta):
    return sparse_reconstruct(idx, val, V, beta, backend="torch")


def _rebuild_embedding_bag(idx, val, V, beta):
    flat_idx, flat_val = idx.reshape(-1, idx.shape[-1]), val.reshape(-1, val.shape[-1])
    out = F.embedding_bag(flat_idx.clamp_min(0), V, per_sample_weights=flat_val * (flat_idx >= 0), mode="sum")
    return (out + beta).reshape(idx.shape[:-1] + (V.shape[1],))


def _captum_ig_sparse(f, idx, val, V, beta, target, m, hw, rebuild, internal_batch_size=None):
    """Captum IG on ``val [B, P, s]`` of ``T(F_ab(β + rebuild(idx, val, V)))``, baseline ``val = 0``."""
    from captum.attr import IntegratedGradients
    H, W = hw
    fn = _target_fn(target)

    def forward(v, idx_rep):
        X = rebuild(idx_rep, v, V, beta).reshape(v.shape[0], H, W, -1).permute(0, 3, 1, 2)
        return fn(f(X))

    ig = IntegratedGradients(forward)
    return ig.attribute(val, baselines=torch.zeros_like(val), additional_forward_args=(idx,), n_steps=m,
                        method="gausslegendre", internal_batch_size=internal_batch_size)


def _captum_lig(f, V, beta, target, m, U, internal_batch_size=None):
    from captum.attr import LayerIntegratedGradients
    conv = _ConceptConv(V, beta)
    fn = _target_fn(target)
    lig = LayerIntegratedGradients(lambda u: fn(f(conv(u))), conv)
    return lig.attribute(U, baselines=torch.zeros_like(U), n_steps=m, method="gausslegendre",
                         attribute_to_layer_input=True, internal_batch_size=internal_batch_size)


def _alpha_loop(f, idx, val, V, beta, target, m, hw):
    """One forward and backward per α-node, then the torch projection: the plain-PyTorch IG loop."""
    B, P, s = idx.shape
    H, W = hw
    nodes, weights = quadrature("gausslegendre", m)
    UV = sparse_reconstruct(idx.reshape(B * P, s), val.reshape(B * P, s), V).reshape(B, H, W, -1)
    fn = _target_fn(target)
    acc = torch.zeros(B, H, W, V.shape[1], dtype=V.dtype, device=V.device)
    for a, w in zip(nodes.tolist(), weights.tolist()):
        X = (beta + a * UV).permute(0, 3, 1, 2).detach().requires_grad_(True)
        (g,) = torch.autograd.grad(fn(f(X)).sum(), X)
        acc += w * g.permute(0, 2, 3, 1)
    return gig_accumulate_ref(acc.reshape(1, B * P, -1), torch.ones(1, dtype=V.dtype, device=V.device),
                              idx.reshape(B * P, s), val.reshape(B * P, s), V).reshape(B, P, s)


def _per_concept(per_position, idx, K):
    """``[B, P, s]`` attributions → ``[B, K]`` (summed over positions)."""
    B = idx.shape[0]
    out = torch.zeros(B, K, dtype=per_position.dtype, device=per_position.device)
    return out.scatter_add_(1, idx.clamp_min(0).reshape(B, -1), (per_position * (idx >= 0)).reshape(B, -1))


_MODELS: dict = {}


@dataclass
class EngineInputs:
    """What every route of one case shares: ``F_ab`` of a ResNet-50 (random weights, randomised BN
    statistics), the codes ``idx, val [B, P, s]`` of layer a, its concepts ``V [8·C, C]``, its BN shift
    ``beta [C]``, the target, the spatial size ``hw`` of layer a and the rows per forward (``batch``)."""
    f: nn.Module
    idx: torch.Tensor
    val: torch.Tensor
    V: torch.Tensor
    beta: torch.Tensor
    target: object
    hw: tuple
    batch: int | None

    def gig(self, m: int, **options):
        """One :func:`gig_fast.gig` call on these inputs (``options``: tolerance, autocast, ...)."""
        return gig(self.f, (self.idx, self.val), self.V, self.beta, self.target, steps=m, batch_size=self.batch,
                   **options)


def resnet50_on(device: str) -> nn.Module:
    """torchvision's ResNet-50 with random weights and randomised BN statistics (seed 0), eval mode, no
    parameter gradients; built once per device."""
    import torchvision
    torch.manual_seed(0)
    if device not in _MODELS:
        model = randomize_bn(torchvision.models.resnet50()).eval().to(device)
        for p in model.parameters():
            p.requires_grad_(False)
        _MODELS[device] = model
    return _MODELS[device]


def _resnet50_codes(a: str, b: str, B: int, size: int, s: int, g: torch.Generator, device: str):
    """ResNet-50's F_ab from ``a`` to ``b``, layer a's pre-activations ``xa [B, C, H, W]`` of ``B`` random
    ``size``-px images, K = 8·C random concepts ``V`` and random codes (s per position, a quarter padded),
    drawn from ``g`` in that order. Returns ``(f_ab, xa, V, idx, val)``."""
    model = resnet50_on(device)
    x = torch.randn(B, 3, size, size, generator=g).to(device)
    with torch.no_grad():
        xa = preactivation(model, a, x)
    _, C, H, W = xa.shape
    V = (torch.randn(8 * C, C, generator=g) / C ** 0.5).to(device)
    idx, val = random_codes((B, H * W), s, 8 * C, pad_frac=0.25, scale=0.5, generator=g)
    return make_f_ab(model, a, b), xa, V, idx, val


def engine_inputs(case: EngineCase, device: str) -> EngineInputs:
    """The inputs of ``case`` on ``device`` (seeded: the same on every call; the model is built once)."""
    g = torch.Generator().manual_seed(1)
    f, xa, V, idx, val = _resnet50_codes(case.a, case.b, case.B, case.size, case.s, g, device)
    H, W = xa.shape[2:]
    beta = bn_shift(resnet50_on(device), case.a).to(device)
    with torch.no_grad():
        out = f(xa)
    target = ClassTarget(0) if out.dim() == 2 else ConceptTarget(torch.randn(out.shape[1], generator=g).to(device))
    # rows per forward on the GPU, so that B = 32 at m = 300 on layer1 fits; the CPU runs all at once
    batch = None if device == "cpu" else (256 if case.a.startswith("layer1") else 1024)
    return EngineInputs(f, idx.to(device), val.to(device), V, beta, target, (H, W), batch)


class EngineProblem:
    """One transition of a ResNet-50, its codes and the oracle's attributions."""

    def __init__(self, case: EngineCase, device: str):
        inputs = engine_inputs(case, device)
        H, W = inputs.hw
        self.case, self.device, self.hw, self.K = case, device, inputs.hw, inputs.V.shape[0]
        self.f, self.beta, self.V, self.target, self.batch = inputs.f, inputs.beta, inputs.V, inputs.target, inputs.batch
        self.idx, self.val = inputs.idx, inputs.val
        self.U = self._dense_codes()
        with fp32_exact():  # Captum runs the model as is: its fp32 is whatever the global flags say
            self.want = _captum_ig_sparse(self.f, self.idx, self.val, self.V, self.beta, self.target, case.m,
                                          self.hw, _rebuild_torch, self.batch).detach()
        self.want_concept = _per_concept(self.want, self.idx, self.K)
        self.fixed = inputs.gig(case.m, tolerance=None)
        self.shape = {"model": "resnet50", "size": case.size, "a": case.a, "b": case.b, "m": case.m, "B": case.B,
                      "K": self.K, "s": case.s, "P": H * W}

    def _dense_codes(self):
        B, P, s = self.idx.shape
        U = torch.zeros(B, P, self.K, dtype=self.val.dtype, device=self.device)
        U.scatter_add_(2, self.idx.clamp_min(0), torch.where(self.idx >= 0, self.val, torch.zeros_like(self.val)))
        H, W = self.hw
        return U.permute(0, 2, 1).reshape(B, self.K, H, W).contiguous()

    def run(self, impl: str):
        """The call that times ``impl``: ours under PyTorch's default flags (gig sets fp32 itself), the
        baselines in :func:`fp32_exact`."""
        c, args = self.case, (self.f, (self.idx, self.val), self.V, self.beta, self.target)
        if impl == "gig_fast":
            return lambda: gig(*args, steps=c.m, batch_size=self.batch, tolerance=None)
        if impl == "gig_fast adaptive":
            return lambda: gig(*args, steps=c.m, batch_size=self.batch)
        if impl == "gig_fast bf16":
            return lambda: gig(*args, steps=c.m, batch_size=self.batch, tolerance=None, autocast=torch.bfloat16)
        if impl == "captum_ig_sparse":
            return _in_fp32_exact(lambda: _captum_ig_sparse(self.f, self.idx, self.val, self.V, self.beta, self.target,
                                                            c.m, self.hw, _rebuild_embedding_bag, self.batch))
        if impl == "captum_lig":
            return _in_fp32_exact(lambda: _captum_lig(self.f, self.V, self.beta, self.target, c.m, self.U, self.batch))
        if impl == "alpha_loop":
            return _in_fp32_exact(lambda: _alpha_loop(self.f, self.idx, self.val, self.V, self.beta, self.target, c.m,
                                                      self.hw))
        raise ValueError(impl)

    def check(self, impl: str):
        rtol = 1e-4

        def completeness(res):
            return {"max_rel_delta": float(res.relative_delta().max()), "mean_steps": float(res.steps.float().mean())}

        def check(out):
            if impl in ("captum_ig_sparse", "alpha_loop"):
                return check_relative(out, self.want, rtol, impl, "rel_err_vs_captum")
            if impl == "captum_lig":
                return check_relative(out.sum((2, 3)), self.want_concept, rtol, impl, "rel_err_vs_captum")
            if impl == "gig_fast":
                return {**check_relative(out.per_position, self.want, rtol, impl, "rel_err_vs_captum"),
                        **completeness(out)}
            if impl == "gig_fast adaptive":
                kept = ~out.refined
                figures = check_relative(out.per_position[kept], self.want[kept], rtol, impl + " (unrefined images)",
                                         "rel_err_vs_captum") if bool(kept.any()) else {}
                worse = out.relative_delta() > self.fixed.relative_delta() * (1 + 1e-6) + 1e-12
                assert not bool((worse & out.refined).any()), "a refined image is less complete than the fixed rule"
                return {**figures, **completeness(out), "refined_share": float(out.refined.float().mean()),
                        "fixed_max_rel_delta": float(self.fixed.relative_delta().max())}
            if impl == "gig_fast bf16":  # against our fp32 path, per concept, relative to each image's total
                tol = 1e-2 if self.device.startswith("cuda") else 1e-1
                total = self.fixed.per_position.sum((1, 2)).abs().clamp_min(1e-30)[:, None]
                rel = float(((out.per_concept - self.fixed.per_concept).abs() / total).max())
                assert rel <= tol, f"bf16 attributions differ from gig_fast fp32 by {rel:.3e} of an image's total " \
                                   f"(> {tol:g})"
                return {"rel_err_vs_fp32_per_image_total": rel, **completeness(out)}
            raise ValueError(impl)
        return check


@pytest.fixture(scope="module")
def engine_problem(request, device):
    return EngineProblem(request.param, device)


ENGINE = ["captum_ig_sparse", "captum_lig", "alpha_loop", "gig_fast", "gig_fast adaptive", "gig_fast bf16"]


@pytest.mark.parametrize("impl", ENGINE, ids=[e.replace(" ", "_") for e in ENGINE])
def bench_engine(bench, engine_problem, impl, gig_size):
    p = engine_problem
    if impl.startswith("captum"):
        pytest.importorskip("captum.attr", reason="Captum is not installed (pip install captum)")
    if impl == "alpha_loop" and gig_size == "quick":
        pytest.skip("alpha_loop (the plain PyTorch loop, 3-10x slower than Captum here): not at the quick size")
    if impl == "gig_fast adaptive" and p.case.m > 50:
        pytest.skip("the adaptive rule at m > 50 may refine to 8·m nodes: timed at m <= 50")
    if impl == "gig_fast adaptive" and gig_size == "quick" and p.case.B > 2:
        pytest.skip("the adaptive rule at B = 32 on the CPU (~10x the fixed rule there): full size only")
    if impl == "gig_fast bf16":
        bench.gpu_only(impl)
    role = "baseline" if impl.startswith("captum") or impl == "alpha_loop" else "ours"
    # the adaptive rule's cost is its time over the fixed rule's on the same images (harness: x_relative)
    info = {"relative_to": "gig_fast"} if impl == "gig_fast adaptive" else {}
    bench(p.run(impl), op="gig_engine", impl=impl, role=role, case=p.case.name, shape=p.shape, check=p.check(impl),
          dtype="bfloat16 autocast" if impl == "gig_fast bf16" else "float32", **info)


ACCUMULATE = ["torch", "cpp", "triton", "cuda"]


@pytest.mark.parametrize("impl", ACCUMULATE, ids=ACCUMULATE)
@pytest.mark.parametrize("bare", [False, True], ids=["op", "kernel"])
def bench_accumulate(bench, accumulate_problem, impl, bare):
    p = accumulate_problem
    if impl == "torch" and bare:
        pytest.skip("the torch path is the baseline; its bare form is the same function")
    bench.skip_unless_runs(impl)
    if bare:
        _, fn = kernel("gig_accumulate", p.args[0].device, impl)
        call = lambda: fn(*p.args)  # noqa: E731
    else:
        call = lambda: gig_accumulate(*p.args, backend=impl)  # noqa: E731
    role = "floor" if bare else ("baseline" if impl == "torch" else "ours")
    bench(call, op="gig_accumulate", impl=f"{impl} kernel" if bare else impl, role=role, case=p.case.name,
          shape=p.shape, check=p.check, bytes_moved=p.bytes)


# ---------------------------------------------------------------------------------------------------
# Time to accuracy: the pipeline's workload (stage 4), ours at its defaults against Captum at the fewest
# steps that reach our completeness

# Captum's candidate step counts (Gauss–Legendre), smallest first: the first that reaches our share of
# complete pairs is timed; the last one is timed if none does (the ratio is then a lower bound)
CAPTUM_STEPS = (8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256)
# Captum's internal_batch_size candidates (rows = examples × steps per forward; None: all at once),
# the fastest of one call each at the chosen steps is timed
CAPTUM_BATCHES = (64, 256, None)


@dataclass(frozen=True)
class AccuracyCase:
    """``B`` images × their targets of layer b (``T`` top concepts, or the class for the logits) at
    ``size`` px, codes with ``s`` active concepts per position; ``model`` ``resnet50`` (random weights,
    random concepts and codes) or ``demo`` (a finished demo run's network, concepts and codes: ``size``
    and ``s`` are the run's)."""
    a: str
    b: str
    B: int
    T: int
    size: int
    s: int
    model: str = "resnet50"

    @property
    def name(self) -> str:
        where = "demo" if self.model == "demo" else f"{self.size}px s={self.s}"
        return f"{self.a}->{self.b} B={self.B} T={1 if self.b == 'logits' else self.T} {where}"


def accuracy_cases(size: str, device: str) -> list[AccuracyCase]:
    if size == "smoke":
        return [AccuracyCase("layer3.5", "layer4.0", 1, 2, 32, 4)]
    # B = 8: with 2 images (10 pairs) one pair is 10 % of the share, and Captum's share, which is not
    # monotone in its steps (ReLU switches between the nodes), matched ours at a lucky small count
    B, px = 8, (224 if device.startswith("cuda") else 96)
    transitions = (("layer1.2", "layer2.0"), ("layer3.5", "layer4.0"), ("layer3.5", "logits"))
    # the demo network's: the same three, then its last block to the logits (stage 4's smallest call) and
    # its least complete transition at the former default (layer2.0 → layer2.1: 93 % of pairs within 1 %)
    demo = transitions + (("layer4.2", "logits"), ("layer2.0", "layer2.1"))
    return ([AccuracyCase(a, b, B, 5, px, 16) for a, b in transitions]
            + [AccuracyCase(a, b, B, 5, 0, 0, model="demo") for a, b in demo])


def complete_share(relative_gap: torch.Tensor) -> float:
    """The share of (image, target) pairs whose completeness gap is within 1 % of ``|T(X(1)) − T(X(0))|``."""
    return float((relative_gap <= 0.01).double().mean())


class PairwiseTargets:
    """The (target, image) pairs of a workload as Captum's per-example targets: the codes repeated per
    target (``[T·B, P, s]``, target-major) and ``T(F_ab(X))`` per row (``[T·B]``), a class's softmax
    probability or a concept's projection summed over positions."""

    def __init__(self, targets: list, B: int):
        self.T = len(targets)
        if isinstance(targets[0], ClassTarget):
            self.classes = targets[0].index.repeat(self.T)
            self.units = None
        else:
            self.units = torch.cat([t.vector / t.vector.norm(dim=-1, keepdim=True) for t in targets])  # [T·B, C_b]

    def repeat(self, t: torch.Tensor) -> torch.Tensor:
        return t.repeat(self.T, *([1] * (t.dim() - 1)))

    def value(self, out: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """``T`` of each row of F_ab's output ``out``; ``rows [n]``: the example each row belongs to."""
        if self.units is None:
            return torch.softmax(out, 1).gather(1, self.classes[rows][:, None])[:, 0]
        return torch.einsum("nchw,nc->n", out, self.units[rows])


def _captum_pairs(f, idx, val, V, beta, pairs: PairwiseTargets, hw, n_steps, internal_batch_size):
    """Captum IG of every (target, image) pair in one call: ``val`` repeated per target ``[T·B, P, s]``,
    the example index as an additional argument (Captum expands it with the steps), the rebuild by
    ``embedding_bag``. Returns ``[T·B, P, s]``."""
    from captum.attr import IntegratedGradients
    H, W = hw
    vals, idxs = pairs.repeat(val), pairs.repeat(idx)
    rows = torch.arange(vals.shape[0], device=val.device)

    def forward(v, idx_rows, row):
        X = _rebuild_embedding_bag(idx_rows, v, V, beta).reshape(v.shape[0], H, W, -1).permute(0, 3, 1, 2)
        return pairs.value(f(X), row)

    return IntegratedGradients(forward).attribute(
        vals, baselines=torch.zeros_like(vals), additional_forward_args=(idxs, rows), n_steps=n_steps,
        method="gausslegendre", internal_batch_size=internal_batch_size)


def demo_run_folder() -> Path | None:
    """A finished demo run: ``GIG_FAST_DEMO_RUN``, else ``gig_demo`` (what ``gig-fast demo`` writes) in the
    working folder; None if there is none."""
    path = Path(os.environ.get("GIG_FAST_DEMO_RUN", "gig_demo"))
    return path if (path / "graph.json").is_file() else None


def _resnet50_workload(case: AccuracyCase, device: str) -> dict:
    """ResNet-50 (random weights, randomised BN statistics) at ``case.size`` px: random codes on
    K = 8·C random concepts of layer a, each image's top T concepts of layer b (K_b = 8·C_b random
    unit-scale concepts) by its projections, or its predicted class."""
    model = resnet50_on(device)
    g = torch.Generator().manual_seed(2)
    f_model, xa, V, idx, val = _resnet50_codes(case.a, case.b, case.B, case.size, case.s, g, device)
    H, W = xa.shape[2:]
    with torch.no_grad():
        out = f_model(xa)
    if out.dim() == 2:  # each image's class: its prediction
        targets = [ClassTarget(out.argmax(1))]
    else:
        Cb = out.shape[1]
        Vb = (torch.randn(8 * Cb, Cb, generator=g) / Cb ** 0.5).to(device)
        top = torch.einsum("nchw,kc->nk", out, Vb).topk(case.T, dim=1).indices
        targets = [ConceptTarget(Vb[top[:, t]]) for t in range(case.T)]
    return {"f_model": f_model, "beta": bn_shift(model, case.a).to(device), "V": V, "idx": idx.to(device),
            "val": val.to(device), "hw": (H, W), "targets": targets, "model": "resnet50", "size": case.size}


def _demo_workload(case: AccuracyCase, device: str) -> dict:
    """A finished demo run: its network, layer a's concepts and the stored codes of its first ``B``
    explained images, each image's top T concepts of layer b by the sum of its stored codes there (or its
    predicted class). Skips when no finished demo run is at hand (``gig-fast demo`` makes one)."""
    from gig_fast import Run
    folder = demo_run_folder()
    if folder is None:
        pytest.skip("no finished demo run: run `gig-fast demo` (writes gig_demo/) or set GIG_FAST_DEMO_RUN")
    run = Run.open(folder, device=device)
    images = run.image_ids()[:case.B]
    bank = run.bank(case.a)
    codes = [run.stored_codes(i, case.a) for i in images]
    idx = torch.stack([c.idx for c in codes]).to(device)
    val = torch.stack([c.val for c in codes]).to(device=device, dtype=bank.V.dtype)
    f_model = make_f_ab(run.model, case.a, case.b)
    for p in f_model.parameters():
        p.requires_grad_(False)
    if case.b == "logits":
        targets = [ClassTarget(torch.tensor([run.image_graph(i).prediction for i in images], device=device))]
    else:
        Vb, K_b = run.bank(case.b).V.to(device), run.layer(case.b).n_concepts
        scores = []
        for i in images:  # Σ over positions of each concept's code values at b
            c = run.stored_codes(i, case.b)
            scores.append(torch.zeros(K_b, dtype=torch.float64).index_add_(
                0, c.idx.clamp_min(0).reshape(-1), torch.where(c.idx >= 0, c.val, 0).reshape(-1).double()))
        top = torch.stack(scores).topk(case.T, dim=1).indices.to(device)
        targets = [ConceptTarget(Vb[top[:, t]]) for t in range(case.T)]
    return {"f_model": f_model, "beta": bank.beta.to(device), "V": bank.V.to(device), "idx": idx, "val": val,
            "hw": tuple(run.layer(case.a).spatial), "targets": targets, "model": "demo",
            "size": int(run.config.image_size)}


class AccuracyProblem:
    """One transition of the workload: F_ab as the pipeline builds it (BNs folded) and as the model is,
    the codes, each image's targets, ours at the pipeline's defaults, and Captum's chosen steps."""

    def __init__(self, case: AccuracyCase, device: str):
        from gig_fast.models.bn import fold_batchnorm
        from gig_fast.pipeline.config import PipelineConfig
        work = (_demo_workload if case.model == "demo" else _resnet50_workload)(case, device)
        self.case, self.device, self.hw = case, device, work["hw"]
        self.f_model = work["f_model"]
        self.f_folded = fold_batchnorm(self.f_model)  # what the pipeline's adapters give stage 4
        self.beta, self.V, self.idx, self.val, self.targets = (work[k] for k in ("beta", "V", "idx", "val", "targets"))
        self.pairs = PairwiseTargets(self.targets, case.B)
        self.options = {k: v for k, v in PipelineConfig().gig_options().items() if k != "batch_size"}
        self.ours = self.gig()
        self.share = complete_share(self.ours.relative_delta())
        self.span = self._span()
        self.n_steps, self.captum_share, self.shares_seen = self._captum_steps()
        self.internal_batch = self._captum_batch()
        H, W = self.hw
        self.shape = {"model": work["model"], "size": work["size"], "a": case.a, "b": case.b, "B": case.B,
                      "T": len(self.targets), "K": self.V.shape[0], "s": self.idx.shape[2], "P": H * W}

    def gig(self):
        """Ours as stage 4 calls it: the folded F_ab, the pipeline's defaults (adaptive refinement on)."""
        return gig(self.f_folded, (self.idx, self.val), self.V, self.beta, self.targets, spatial=self.hw,
                   **self.options)

    def captum(self, f, n_steps: int, internal_batch_size=None):
        with fp32_exact():
            return _captum_pairs(f, self.idx, self.val, self.V, self.beta, self.pairs, self.hw, n_steps,
                                 internal_batch_size)

    def _span(self):
        """``T(X(1))`` and ``T(X(0))`` of every pair ``[T·B]`` (Captum's completeness reference)."""
        rows = torch.arange(len(self.targets) * self.case.B, device=self.device)
        vals, idxs = self.pairs.repeat(self.val), self.pairs.repeat(self.idx)
        H, W = self.hw
        with torch.no_grad(), fp32_exact():
            ends = [self.pairs.value(self.f_model(_rebuild_embedding_bag(idxs, v, self.V, self.beta)
                                                  .reshape(v.shape[0], H, W, -1).permute(0, 3, 1, 2)), rows)
                    for v in (vals, torch.zeros_like(vals))]
        return ends[0], ends[1]

    def captum_share_at(self, attr) -> float:
        v1, v0 = self.span
        return complete_share((attr.sum((1, 2)) - (v1 - v0)).abs() / (v1 - v0).abs().clamp_min(1e-30))

    def _captum_steps(self):
        """The fewest of :data:`CAPTUM_STEPS` at which Captum reaches our share (the last if none does)."""
        seen = {}
        for n in CAPTUM_STEPS:
            seen[n] = self.captum_share_at(self.captum(self.f_model, n, 256).detach())
            if seen[n] >= self.share:
                break
        return n, seen[n], seen

    def _captum_batch(self):
        times = {}
        for ibs in CAPTUM_BATCHES:
            t0 = time.perf_counter()
            self.captum(self.f_model, self.n_steps, ibs)
            times[ibs] = time.perf_counter() - t0
        return min(times, key=times.get)

    def run(self, impl: str):
        if impl == "gig_fast":
            return self.gig
        f = self.f_model if impl == "captum_ig_sparse" else self.f_folded
        return lambda: self.captum(f, self.n_steps, self.internal_batch)

    def check(self, impl: str):
        def check(out):
            if impl == "gig_fast":
                share = complete_share(out.relative_delta())
                assert share == self.share, f"gig's share of complete pairs changed between calls: {share} != {self.share}"
                return {"share_within_1pct": share, "mean_nodes": float(out.steps.double().mean()),
                        "refined_share": float(out.refined.double().mean())}
            share = self.captum_share_at(out)
            assert share >= self.share or self.n_steps == CAPTUM_STEPS[-1], \
                f"{impl} at {self.n_steps} steps: {share} of pairs complete, ours {self.share}"
            return {"share_within_1pct": share, "n_steps": self.n_steps, "internal_batch_size": self.internal_batch,
                    "ours_share_within_1pct": self.share,
                    "reached_our_share": share >= self.share,
                    "shares_by_steps": {str(k): v for k, v in self.shares_seen.items()}}
        return check


@pytest.fixture(scope="module")
def accuracy_problem(request, device):
    pytest.importorskip("captum.attr", reason="Captum is not installed (pip install captum)")
    return AccuracyProblem(request.param, device)


ACCURACY = ["captum_ig_sparse", "captum_ig_sparse folded", "gig_fast"]


@pytest.mark.parametrize("impl", ACCURACY, ids=[e.replace(" ", "_") for e in ACCURACY])
def bench_time_to_accuracy(bench, accuracy_problem, impl):
    p = accuracy_problem
    role = "ours" if impl == "gig_fast" else "baseline"
    label = {"captum_ig_sparse": "captum (model as is)", "captum_ig_sparse folded": "captum (BNs folded)"}.get(impl)
    bench(p.run(impl), op="gig_time_to_accuracy", impl=impl, label=label, role=role, case=p.case.name,
          shape=p.shape, check=p.check(impl))
