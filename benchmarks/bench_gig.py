"""GIG engine vs Captum's LayerIntegratedGradients and a plain α-loop; gig_accumulate backends vs reference.

Same model, same f_ab, same codes, same steps and rule for every implementation, timed side by side:

* ``gig_fast``  — :func:`gig_fast.gig` (all α in one batch, one backward, fused sparse projection) with
  the fixed m-node rule (``tolerance=None``: the same work as the others);
* ``gig_fast adaptive`` — the same with the default completeness refinement (``tolerance=0.01``): what a
  user gets by default, its cost over the fixed rule and its worst delta;
* ``captum_lig`` — Captum ``LayerIntegratedGradients`` on the paper's formulation (App.): the codes as a
  dense ``U [B, K, H, W]`` fed through a 1×1 "concept conv" with weights ``Vᵀ`` (+β) into f_ab, attributing
  to that layer's input (``attribute_to_layer_input=True``) — dense GIG for every concept and position;
* ``alpha_loop`` — one forward/backward per α-node in plain PyTorch, then the torch projection.

Full mode (cuda): torchvision ResNet-50 (random weights), 224×224, layer3.5 → layer4.0, layer3.5 → logits,
layer1.2 → layer2.0, m ∈ {20, 50, 300}, K = 8·C, s = 30; time per image and peak memory.
Quick mode (CPU): the same ResNet-50 layers on 32×32 images, 2 images, m = 20, K = 8·C, s = 16.
Run: ``python benchmarks/bench_gig.py --device cpu --quick``.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
if "gig_fast" not in sys.modules:  # run from a checkout without installing: use the in-tree package
    sys.path.insert(1, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from harness import record, time_ms  # noqa: E402

from gig_fast.gig import ClassTarget, ConceptTarget, gig, quadrature  # noqa: E402
from gig_fast.ops import gig_accumulate, sparse_reconstruct  # noqa: E402
from gig_fast.ops.gig_accumulate import IMPLEMENTED, IMPLS  # noqa: E402
from gig_fast.ops.registry import backend_runs_on  # noqa: E402
from gig_fast.ops.reference import gig_accumulate_ref  # noqa: E402
from gig_fast.slicing import bn_shift, make_f_ab, preactivation  # noqa: E402
from gig_fast.testing import random_codes, randomize_bn  # noqa: E402


class _ConceptConv(nn.Module):
    """The paper's 1×1 conv from dense codes ``U [n, K, H, W]`` to ``X = U V + β`` ``[n, C, H, W]``."""

    def __init__(self, V: torch.Tensor, beta: torch.Tensor):
        super().__init__()
        self.register_buffer("weight", V.t().contiguous()[:, :, None, None])
        self.register_buffer("beta", beta)

    def forward(self, U):
        return nn.functional.conv2d(U, self.weight) + self.beta[None, :, None, None]


def _target_fn(target):
    if isinstance(target, ClassTarget):
        return lambda out: torch.softmax(out, 1)[:, target.index]
    unit = target.vector / target.vector.norm()
    return lambda out: torch.einsum("nchw,c->n", out, unit)


def _dense_codes(idx, val, K, H, W):
    B, P, s = idx.shape
    U = torch.zeros(B, P, K, dtype=val.dtype, device=val.device)
    U.scatter_add_(2, idx.clamp_min(0), torch.where(idx >= 0, val, torch.zeros_like(val)))
    return U.permute(0, 2, 1).reshape(B, K, H, W).contiguous()


def _captum_lig(f, V, beta, target, m, U, internal_batch_size=None):
    from captum.attr import LayerIntegratedGradients
    conv = _ConceptConv(V, beta)
    fn = _target_fn(target)
    lig = LayerIntegratedGradients(lambda u: fn(f(conv(u))), conv)
    return lig.attribute(U, baselines=torch.zeros_like(U), n_steps=m, method="gausslegendre",
                         attribute_to_layer_input=True, internal_batch_size=internal_batch_size)


def _alpha_loop(f, idx, val, V, beta, target, m, H, W):
    B, P, s = idx.shape
    nodes, weights = quadrature("gausslegendre", m)
    UV = sparse_reconstruct(idx.reshape(B * P, s), val.reshape(B * P, s), V).reshape(B, H, W, -1)
    fn = _target_fn(target)
    acc = torch.zeros(B, H, W, V.shape[1], dtype=V.dtype, device=V.device)
    for a, w in zip(nodes.tolist(), weights.tolist()):
        X = (beta + a * UV).permute(0, 3, 1, 2).detach().requires_grad_(True)
        (g,) = torch.autograd.grad(fn(f(X)).sum(), X)
        acc += w * g.permute(0, 2, 3, 1)
    return gig_accumulate_ref(acc.reshape(1, B * P, -1), torch.ones(1, dtype=V.dtype, device=V.device),
                              idx.reshape(B * P, s), val.reshape(B * P, s), V)


def _interleaved(fns, reps: int, warm: int, device: str = "cpu") -> list[dict]:
    """Median/min/max ms of each callable, run round-robin ``reps`` times after one warm-up call of the
    first ``warm`` callables (the α-loop runs the same kernels as the engine: it needs none)."""
    import time
    for fn in fns[:warm]:
        fn()
    times = [[] for _ in fns]
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    for _ in range(reps):
        for i, fn in enumerate(fns):
            sync()
            start = time.perf_counter()
            fn()
            sync()
            times[i].append(1e3 * (time.perf_counter() - start))
    return [{"ms": sorted(t)[len(t) // 2], "ms_p20": min(t), "ms_p80": max(t)} for t in times]


def _peak_mb(fn, device):
    if not device.startswith("cuda"):
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def bench_engine(device: str, quick: bool) -> None:
    import torchvision
    torch.manual_seed(0)
    # the goal's case (layer3.5 → logits at m = 50) first: the GPU campaign time-boxes this script
    transitions = [("layer3.5", "logits"), ("layer3.5", "layer4.0"), ("layer1.2", "layer2.0")]
    if quick:  # the paper's layers and K = 8·C, on small images
        model, size, B, s, steps = torchvision.models.resnet50(), 32, 2, 16, [20]
    else:
        model, size, B, s, steps = torchvision.models.resnet50(), 224, 2, 30, [50, 20, 300]
    model = randomize_bn(model).eval().to(device)
    for p in model.parameters():
        p.requires_grad_(False)
    x = torch.randn(B, 3, size, size, device=device)
    for a, b in transitions:
        with torch.no_grad():
            xa = preactivation(model, a, x)
        _, C, H, W = xa.shape
        K = 8 * C
        f = make_f_ab(model, a, b)
        beta = bn_shift(model, a).to(device)
        V = torch.randn(K, C, device=device) / C ** 0.5
        idx, val = random_codes((B, H * W), s, K, dtype=torch.float32, pad_frac=0.25, scale=0.5, device=device)
        with torch.no_grad():
            out = f(xa)
        target = ClassTarget(0) if out.dim() == 2 else ConceptTarget(torch.randn(out.shape[1], device=device))
        U = _dense_codes(idx, val, K, H, W)
        for m in steps:
            shape = {"model": "resnet50", "size": size, "a": a, "b": b, "m": m, "B": B, "K": K, "s": s,
                     "P": H * W}
            # GPU: bound the rows per batch so m = 300 on layer1 fits; the CPU runs everything at once
            bs = None if quick else (256 if a.startswith("layer1") else 1024)
            ours = lambda: gig(f, (idx, val), V, beta, target, steps=m, batch_size=bs, tolerance=None)  # noqa: E731
            adaptive = lambda: gig(f, (idx, val), V, beta, target, steps=m, batch_size=bs)  # noqa: E731
            captum = lambda: _captum_lig(f, V, beta, target, m, U, bs)  # noqa: E731
            loop = lambda: _alpha_loop(f, idx, val, V, beta, target, m, H, W)  # noqa: E731
            res = ours()
            ref = captum()
            # interleaved runs (load swings hit all alike) and a fixed call count: the whole GPU run of
            # this script must stay under a minute, and single calls take up to seconds at m = 300
            impls = [("captum_lig", captum, None), ("alpha_loop", loop, None), ("gig_fast", ours, res)]
            if m == steps[0]:  # the default's cost at the first m only: at m = 300 it may refine to 2,400 nodes
                impls.append(("gig_fast adaptive", adaptive, adaptive()))
            if device.startswith("cuda"):  # f_ab in bf16 (tensor cores); CPUs without bf16 units only slow down
                bf16 = lambda: gig(f, (idx, val), V, beta, target, steps=m, batch_size=bs,  # noqa: E731
                                   tolerance=None, autocast=torch.bfloat16)
                impls.append(("gig_fast bf16", bf16, bf16()))
            times = _interleaved([fn for _, fn, _ in impls], reps=5 if quick else 3,
                                 warm=0, device=device)  # the check above warmed up
            t_captum = times[0]
            for (impl, fn, result), t in zip(impls, times):
                per_image = {**t, "ms": t["ms"] / B, "ms_p20": t["ms_p20"] / B, "ms_p80": t["ms_p80"] / B}
                extra = {"per_image": True, "peak_mb": _peak_mb(fn, device)}
                if result is not None:
                    rel = float((result.per_concept - ref.sum((2, 3))).abs().max() / ref.sum((2, 3)).abs().max())
                    extra.update(rel_err_vs_captum=rel, max_rel_delta=float(result.relative_delta().max()),
                                 mean_steps=float(result.steps.float().mean()))
                record("gig_engine", impl, device, shape, per_image, extra=extra,
                       baseline=None if impl == "captum_lig" else "captum_lig",
                       baseline_ms=t_captum["ms"] / B)


def bench_accumulate(device: str, quick: bool) -> None:
    shapes = [(1, 20, 2 * 64, 256, 2048, 16)] if quick else \
        [(1, 50, 4 * 196, 1024, 8192, 30), (4, 50, 196, 1024, 8192, 30), (1, 50, 4 * 3136, 256, 2048, 30)]
    for T, m, P, C, K, s in shapes:
        grads = torch.randn(T, m, P, C, device=device)
        w = torch.rand(m, device=device)
        idx = torch.randint(0, K, (P, s), device=device)
        val = torch.randn(P, s, device=device)
        V = torch.randn(K, C, device=device)
        # minimal traffic: gradients once, codes, output; the V rows are gathered (counted once per position)
        bytes_moved = grads.numel() * 4 + idx.numel() * 8 + val.numel() * 4 + T * P * s * 4
        shape = {"T": T, "m": m, "P": P, "C": C, "K": K, "s": s}
        t_ref = time_ms(lambda: gig_accumulate_ref(grads, w, idx, val, V), device, min_run_time=0.1)
        record("gig_accumulate", "torch", device, shape, t_ref, bytes_moved=bytes_moved)
        for backend in IMPLEMENTED:
            if backend == "torch" or not backend_runs_on(backend, torch.device(device)):
                continue
            if backend == "triton" and not device.startswith("cuda"):
                continue  # the interpreter is for tests, not timings
            fn = lambda: gig_accumulate(grads, w, idx, val, V, backend=backend)  # noqa: E731
            record("gig_accumulate", backend, device, shape, time_ms(fn, device, min_run_time=0.1),
                   bytes_moved=bytes_moved, baseline="torch", baseline_ms=t_ref["ms"])
            # the kernel alone, without the public function's input checks (finite scan, index range)
            kernel = lambda: IMPLS[backend](grads, w, idx, val, V)  # noqa: E731
            record("gig_accumulate", f"{backend} kernel", device, shape, time_ms(kernel, device, min_run_time=0.1),
                   bytes_moved=bytes_moved, baseline="torch", baseline_ms=t_ref["ms"])


def run(device: str, quick: bool) -> None:
    if os.environ.get("GIG_BENCH_PART", "all") in ("all", "accumulate"):
        bench_accumulate(device, quick)
    if os.environ.get("GIG_BENCH_PART", "all") in ("all", "engine"):
        bench_engine(device, quick)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    run(args.device, args.quick or not args.device.startswith("cuda"))
