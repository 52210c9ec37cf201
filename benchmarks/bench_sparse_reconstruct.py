"""sparse_reconstruct: every backend against dense ``U @ V``, ``torch.sparse`` CSR and ``embedding_bag``.

Shapes: ResNet-50 layer1/layer3/layer4 with 64 images, K = 8·C, s = 30 (``gig_fast.testing.RECON_SHAPES``).
Minimal traffic (the roofline): read idx + val once, the output once, and each *distinct* concept row
once (V mostly stays in L2): ``P·s·(8 + b) + P·C·b + min(K, P·s)·C·b`` bytes for element size b.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the in-tree package first

import harness  # noqa: E402
from gig_fast.ops import available_backends, sparse_reconstruct  # noqa: E402
from gig_fast.ops.registry import backend_runs_on  # noqa: E402
from gig_fast.ops.reference import sparse_reconstruct_ref  # noqa: E402
from gig_fast.testing import RECON_SHAPES, random_codes  # noqa: E402


def _min_bytes(P, s, K, C, elem):
    return P * s * (8 + elem) + P * C * elem + min(K, P * s) * C * elem


def _baselines(idx, val, V, b):
    """Outside implementations of the same product, built outside the timed region."""
    P, s = idx.shape
    K, C = V.shape
    active = idx >= 0
    rows = torch.arange(P, device=idx.device)[:, None].expand(P, s)[active]
    cols, vals = idx[active], val[active]
    out = {}
    if P * K <= 2e9:
        U = torch.zeros(P, K, dtype=V.dtype, device=V.device)
        U.index_put_((rows, cols), vals, accumulate=True)
        out["dense U@V"] = lambda: torch.addmm(b, U, V)
    crow = torch.zeros(P + 1, dtype=torch.int64, device=idx.device)
    crow[1:] = torch.cumsum(active.sum(1), 0)
    U_csr = torch.sparse_csr_tensor(crow, cols, vals, (P, K))
    out["torch.sparse CSR"] = lambda: torch.sparse.addmm(b, U_csr, V) if V.is_cuda else (U_csr @ V) + b
    safe = idx.clamp_min(0)
    w = val * active
    out["embedding_bag"] = lambda: F.embedding_bag(safe, V, per_sample_weights=w, mode="sum") + b
    return out


def bench_shape(name, shape, device, dtype, backward):
    P, s, K, C = shape["P"], shape["s"], shape["K"], shape["C"]
    idx, val = random_codes(P, s, K, dtype=dtype, device=device, pad_frac=0.0)
    V = torch.randn(K, C, dtype=dtype, device=device)
    b = torch.randn(C, dtype=dtype, device=device)
    shp = {"layer": name, "P": P, "K": K, "C": C, "s": s, "dtype": str(dtype).replace("torch.", "")}
    elem = V.element_size()
    ref_ms = None
    results, fwd_ms = {}, {}
    for label, fn in _baselines(idx, val, V, b).items():
        t = harness.time_ms(fn, device)
        results[label] = t["ms"]
        harness.record("sparse_reconstruct", label, device, shp, t)
    dense_ms = results.get("dense U@V")
    want = sparse_reconstruct_ref(idx, val, V, b).float()
    # every forward first, then every forward+backward, the slow pure-PyTorch reference last: on the CPU
    # the big temporaries of a backward (and of the reference) slowed the next timings ~2x in one process
    backends = [be for be in ("cpp", "triton", "cuda", "torch") if backend_runs_on(be, torch.device(device))
                and not (be == "triton" and device == "cpu")]
    for be in backends:
        out = sparse_reconstruct(idx, val, V, b, backend=be)
        err = (out.float() - want).abs().max().item()
        t = harness.time_ms(lambda: sparse_reconstruct(idx, val, V, b, backend=be), device)
        row = harness.record("sparse_reconstruct", be, device, shp, t, bytes_moved=_min_bytes(P, s, K, C, elem),
                             baseline="dense U@V" if dense_ms else "torch.sparse CSR",
                             baseline_ms=dense_ms or results["torch.sparse CSR"], extra={"max_abs_err": err})
        for other in ("torch.sparse CSR", "embedding_bag"):
            print(f"   {be}: {results[other] / row['ms']:.2f}x vs {other}")
        fwd_ms[be] = t["ms"]
        if be == "torch":
            ref_ms = t["ms"]
    for be in backends if backward else ():
        vv, VV = val.clone().requires_grad_(), V.clone().requires_grad_()
        go = torch.randn(P, C, dtype=dtype, device=device)

        def fwd_bwd():
            vv.grad = VV.grad = None
            sparse_reconstruct(idx, vv, VV, b, backend=be).backward(go)

        tb = harness.time_ms(fwd_bwd, device)
        harness.record("sparse_reconstruct_fwd+bwd", be, device, shp, tb,
                       extra={"bwd_over_fwd": (tb["ms"] - fwd_ms[be]) / fwd_ms[be]})
    return ref_ms


def run(device: str, quick: bool) -> None:
    print("backends:", available_backends())
    if device == "cpu":
        shapes = {"layer3-small": dict(P=4 * 196, K=8192, C=1024, s=30)} if quick else \
            {"layer3-16img": dict(P=16 * 196, K=8192, C=1024, s=30), "layer1-4img": dict(P=4 * 3136, K=2048, C=256, s=30)}
        for name, shape in shapes.items():
            bench_shape(name, shape, device, torch.float32, backward=not quick)
        return
    for name, shape in RECON_SHAPES.items():
        bench_shape(name, shape, device, torch.float32, backward=True)
    bench_shape("layer3", RECON_SHAPES["layer3"], device, torch.bfloat16, backward=False)


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--quick", action="store_true")
    a = ap.parse_args()
    run(a.device, a.quick)
