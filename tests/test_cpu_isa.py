"""The CPU kernels' AVX2 builds (csrc/common.h: GIG_TARGET_AVX2, picked at run time) agree with their
baseline x86-64 builds, which a process started with ``GIG_FAST_CPU_ISA=baseline`` runs: this machine
runs the AVX2 path in every other test, so the baseline path is checked here."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from _children import child_env
from gig_fast.ops import available_backends

pytestmark = pytest.mark.skipif(available_backends()["cpp"] != "runs", reason="needs the compiled CPU extension")

CHILD = r"""
import sys
import numpy as np
import torch
from gig_fast.concepts import bisecting_spherical_kmeans
from gig_fast.ops import sparse_reconstruct
from gig_fast.testing import random_codes
from gig_fast.testing import clustered_points

g = torch.Generator().manual_seed(0)
idx, val = random_codes(300, 7, 50, dtype=torch.float32, generator=g)
V = torch.randn(50, 37, generator=g)
val.requires_grad_(True)
V.requires_grad_(True)
out = sparse_reconstruct(idx, val, V, torch.randn(37, generator=g), backend="cpp")
out.backward(torch.randn(300, 37, generator=g))
# C = 300: the forward's register blocks of 64 (baseline, AVX2) or 256 (AVX-512) channels, then 16s, then single
wide = {}
for dtype in (torch.float32, torch.bfloat16, torch.float64):
    i2, v2 = random_codes(200, 9, 60, dtype=dtype, generator=g)
    wide[str(dtype)] = sparse_reconstruct(i2, v2, torch.randn(60, 300, generator=g).to(dtype),
                                          torch.randn(300, generator=g).to(dtype), backend="cpp").float().numpy()
X = clustered_points(2000, 24, 30, generator=g)
_, labels, info = bisecting_spherical_kmeans(X, 40, beta=torch.full((24,), 2.0), init_sample=200, return_info=True)
from gig_fast.ops import sparse_code
from gig_fast.testing import dense_codes, random_problem
Y, D = random_problem(40, 32, 256, dtype=torch.float64, generator=g)
codes = {}
for method, kw in (("lasso", dict(tol=1e-10)), ("omp", dict(n_nonzero=6))):
    i, v = sparse_code(Y, D, method=method, backend="cpp", **kw)
    codes[method] = dense_codes(i, v, 256).numpy()
from gig_fast.ops import centroid_update
P = torch.randn(5000, 40, generator=g)
sums = {K: centroid_update(P, torch.randint(K, (5000,), generator=g), K, backend="cpp")[0].numpy() for K in (2, 300)}
np.savez(sys.argv[1], **{f"wide_{k}": v for k, v in wide.items()}, out=out.detach().numpy(), grad_val=val.grad.numpy(), grad_V=V.grad.numpy(),
         inertia=np.array([info.inertia]), lasso=codes["lasso"], omp=codes["omp"], sums2=sums[2], sums300=sums[300])
"""


def _run(tmp_path: Path, isa: str | None) -> dict:
    env = child_env()
    env.pop("GIG_FAST_CPU_ISA", None)
    if isa:
        env["GIG_FAST_CPU_ISA"] = isa
    path = tmp_path / f"{isa or 'default'}.npz"
    subprocess.run([sys.executable, "-c", CHILD, str(path)], env=env, cwd=tmp_path, check=True, timeout=300)
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


def test_baseline_and_default_isa_agree(tmp_path):
    base, default = _run(tmp_path, "baseline"), _run(tmp_path, None)
    # per-channel sums run in the same order on both paths (no FMA contraction): bit-identical
    np.testing.assert_array_equal(base["out"], default["out"])
    for key in (k for k in base if k.startswith("wide_")):
        np.testing.assert_array_equal(base[key], default[key], err_msg=key)
    np.testing.assert_array_equal(base["grad_V"], default["grad_V"])
    np.testing.assert_array_equal(base["sums2"], default["sums2"])  # centroid_update, both schedules
    np.testing.assert_array_equal(base["sums300"], default["sums300"])
    # dot products reduce over more SIMD lanes on AVX2: equal up to rounding
    np.testing.assert_allclose(base["grad_val"], default["grad_val"], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(base["inertia"], default["inertia"], rtol=1e-3)
    # sparse_code: the same converged Lasso codes (tight tolerance) and the same OMP codes
    np.testing.assert_allclose(base["lasso"], default["lasso"], atol=1e-6)
    np.testing.assert_allclose(base["omp"], default["omp"], atol=1e-9)


def test_sparse_reconstruct_avx2_and_avx512_builds_agree(tmp_path):
    """The forward's AVX-512 build (256-channel blocks, where the CPU has it: the default) and its AVX2
    build (64-channel blocks, ``GIG_FAST_CPU_ISA=avx2``) sum in the same order: bit-identical."""
    avx2, default = _run(tmp_path, "avx2"), _run(tmp_path, None)
    for key in ["out"] + [k for k in avx2 if k.startswith("wide_")]:
        np.testing.assert_array_equal(avx2[key], default[key], err_msg=key)
