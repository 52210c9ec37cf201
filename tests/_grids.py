"""Backends and tolerances shared by the op tests."""
import pytest
import torch

from gig_fast.ops import available_backends
from gig_fast.ops.registry import backend_runs_on

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])

# (rtol, atol) against an fp32-accumulating reference, per input dtype
TOL = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (1e-5, 1e-5),
    torch.float16: (1e-2, 1e-2),
    torch.bfloat16: (2e-2, 2e-2),
}


def backend_params(implemented):
    """pytest params (backend, device) for every implemented backend, skipped where it cannot run."""
    out = []
    for dev in ["cpu", "cuda"]:
        for be in implemented:
            runs = torch.cuda.is_available() if dev == "cuda" else True
            ok = runs and backend_runs_on(be, torch.device(dev))
            out.append(pytest.param(be, dev, id=f"{be}-{dev}",
                                    marks=() if ok else pytest.mark.skip(reason=f"{be} cannot run on {dev} here "
                                                                              f"({available_backends()})")))
    return out


def device_backend_pairs():
    """``(device, backend)`` pairs that run here: CPU rows always, CUDA rows where there is a GPU."""
    avail = available_backends()
    out = [("cpu", b) for b in ("torch", "cpp", "triton") if avail[b].startswith("runs")]
    if torch.cuda.is_available():
        out += [("cuda", b) for b in ("torch", "triton", "cuda") if avail[b] == "runs"]
    return out
