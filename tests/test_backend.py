"""Backend dispatch: what is built, forcing a backend, and defaults per device."""
import warnings

import pytest
import torch

import gig_fast
from gig_fast.ops import available_backends, forced_backend, sparse_reconstruct, use_backend
from gig_fast.ops.registry import resolve


def test_available_backends_lists_all_five():
    av = available_backends()
    assert set(av) == {"torch", "cpp", "triton", "cuda", "batched"}
    assert av["torch"] == "runs" and av["batched"] == "runs"
    assert av["cpp"] == "runs", gig_fast._extensions.extension_errors()
    assert av["triton"] != "missing"


def test_cuda_extension_is_compiled_where_nvcc_exists():
    import shutil
    import os
    if os.environ.get("GIG_FAST_SKIP_CUDA") == "1" or not (shutil.which("nvcc") or os.path.exists("/usr/local/cuda/bin/nvcc")):
        pytest.skip("no CUDA toolkit: the CUDA extension is not built")
    assert available_backends()["cuda"] in ("compiled", "runs"), gig_fast._extensions.extension_errors()


def test_default_on_cpu_is_cpp():
    assert resolve("x", ("torch", "cpp"), {"cpu": ("cpp", "torch")}, torch.device("cpu")) == "cpp"


def test_context_manager_and_env_var(monkeypatch):
    assert forced_backend() is None
    with use_backend("torch"):
        assert forced_backend() == "torch"
        assert resolve("x", ("torch", "cpp"), {"cpu": ("cpp", "torch")}, torch.device("cpu")) == "torch"
    assert forced_backend() is None
    monkeypatch.setenv("GIG_FAST_BACKEND", "torch")
    assert resolve("x", ("torch", "cpp"), {"cpu": ("cpp", "torch")}, torch.device("cpu")) == "torch"
    monkeypatch.setenv("GIG_FAST_BACKEND", "fortran")
    with pytest.raises(ValueError, match="unknown backend 'fortran'"):
        forced_backend()


def test_forcing_a_backend_that_cannot_run_is_an_error():
    if torch.cuda.is_available():
        pytest.skip("this machine can run cuda")
    with use_backend("cuda"):
        with pytest.raises(RuntimeError, match="cannot run on cpu"):
            sparse_reconstruct(torch.zeros(2, 1, dtype=torch.long), torch.ones(2, 1), torch.randn(3, 4))


def test_missing_backend_falls_back_with_one_warning():
    with use_backend("cuda"), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert resolve("only_torch_op", ("torch",), {"cpu": ("torch",)}, torch.device("cpu")) == "torch"
        resolve("only_torch_op", ("torch",), {"cpu": ("torch",)}, torch.device("cpu"))
    assert sum("no 'cuda' backend" in str(w.message) for w in caught) == 1
