"""Probes for the compiled extensions and for Triton.

The package imports without any of them; `gig_fast.ops.available_backends()` reports what is here.
Importing an extension registers its ops under ``torch.ops.gig_fast_cpp`` / ``torch.ops.gig_fast_cuda``.
"""
from __future__ import annotations

import importlib
import os

import torch

__all__ = ["has_cpp_extension", "has_cuda_extension", "has_triton", "triton_runs_on_cpu", "extension_errors"]

_errors: dict[str, str] = {}


_loaded: dict[str, bool] = {}


def _import(name: str) -> bool:
    """Import an extension once; a plain dict cache (not lru_cache) keeps torch.compile tracing quiet."""
    if name not in _loaded:
        try:
            importlib.import_module(name)
            _loaded[name] = True
        except Exception as exc:  # an ImportError, or an undefined symbol from a stale build
            _errors[name] = f"{type(exc).__name__}: {exc}"
            _loaded[name] = False
    return _loaded[name]


def has_cpp_extension() -> bool:
    """True when the CPU C++ extension ``gig_fast._C`` is built and loads."""
    return _import("gig_fast._C")


def has_cuda_extension() -> bool:
    """True when the CUDA extension ``gig_fast._C_cuda`` is built and loads (it may still lack a GPU)."""
    return _import("gig_fast._C_cuda")


def has_triton() -> bool:
    """True when Triton imports (kernels run on a GPU, or on the CPU under ``TRITON_INTERPRET=1``)."""
    return _import("triton.language")


def triton_runs_on_cpu() -> bool:
    """Triton's interpreter runs kernels on CPU tensors; it is for tests, never a default."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def extension_errors() -> dict[str, str]:
    """Why an extension failed to load (module name → error), for diagnostics."""
    has_cpp_extension(), has_cuda_extension(), has_triton()
    return dict(_errors)


