"""Backends, devices and tolerances shared by the op tests.

Tolerances follow from the dtype and the accumulation, not from what happened to pass:

* ``TOL`` — an op whose kernel and reference both accumulate in float32 (float64 for float64) but
  return the input dtype: the output is rounded once to that dtype (half an ulp: 2^-11 for float16,
  2^-8 for bfloat16, relative) after a float32 sum whose order differs (≈ √n·2^-24 of the terms' size),
  so the bound is a few ulps of the output dtype: ``rtol = atol = 4·ulp`` (float16 ~1e-3 is written
  2e-3, bfloat16 2e-2 …). float64 and float32 outputs: the sum order alone.
* :func:`accumulation_bound` — an op that returns its float32 (float64) accumulator: the kernel and the
  reference see the same low-precision inputs, so only the summation order differs; the bound is
  ``4·n·u·Σ|terms|`` (Higham's γ_n with a safety factor), ``u`` the accumulation type's unit roundoff.
  A kernel that accumulated in the input's half precision would miss it by ~10^5.
"""
import pytest
import torch

from gig_fast.ops import available_backends
from gig_fast.ops.registry import backend_runs_on

HAS_CUDA = torch.cuda.is_available()
DEVICES = ["cpu"] + (["cuda"] if HAS_CUDA else [])

# (rtol, atol) of an output in the given dtype against a float32-accumulating reference (see above)
TOL = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (1e-5, 1e-5),
    torch.float16: (4e-3, 4e-3),    # 4 ulps of 2^-10
    torch.bfloat16: (3e-2, 3e-2),   # 4 ulps of 2^-7
}

# where each backend can run at all: a (backend, device) pair outside this is never generated
_DEVICES_OF = {"torch": ("cpu", "cuda"), "cpp": ("cpu",), "triton": ("cpu", "cuda"), "cuda": ("cuda",),
               "batched": ("cpu", "cuda")}


def unit_roundoff(dtype: torch.dtype) -> float:
    """``u = eps / 2`` of the accumulation type of ``dtype`` (float64 stays float64, the rest float32)."""
    return torch.finfo(torch.float64 if dtype == torch.float64 else torch.float32).eps / 2


def accumulation_bound(abs_terms: torch.Tensor, n_terms: int, dtype: torch.dtype) -> torch.Tensor:
    """Largest difference two summation orders of ``n_terms`` terms may make: ``4·n·u·Σ|terms|``.

    Args: abs_terms: ``Σ |term|`` of each output element (float64); dtype: the inputs' dtype.
    """
    return 4 * n_terms * unit_roundoff(dtype) * abs_terms + torch.finfo(torch.float64).tiny


def backend_params(implemented):
    """pytest params ``(backend, device)`` for every implemented backend on every device it can exist on;
    CUDA rows are marked ``gpu`` and skip cleanly where no GPU is visible, and a backend that is not built
    here skips with the reason."""
    out = []
    for be in implemented:
        for dev in _DEVICES_OF[be]:
            marks = [pytest.mark.gpu] if dev == "cuda" else []  # skipped without a GPU (conftest.py)
            if (dev == "cpu" or HAS_CUDA) and not backend_runs_on(be, torch.device(dev)):
                marks.append(pytest.mark.skip(reason=f"{be} is not built here ({available_backends()})"))
            out.append(pytest.param(be, dev, id=f"{be}-{dev}", marks=marks))
    return out


def device_backend_pairs():
    """``(device, backend)`` pairs that run here: CPU rows always, CUDA rows where there is a GPU."""
    avail = available_backends()
    out = [("cpu", b) for b in ("torch", "cpp", "triton") if avail[b].startswith("runs")]
    if HAS_CUDA:
        out += [("cuda", b) for b in ("torch", "triton", "cuda") if avail[b] == "runs"]
    return out
