"""The op registry of `gig_fast.ops`: which backends each op has, and which one a call uses.

Every op module registers an :class:`OpSpec` (its backends, their order of preference per device, its
bare kernels and its ``torch.library`` custom op); :func:`spec` and :func:`kernel` are the public way to
reach them, e.g. for a k-means loop that validates its inputs once and then calls the bare kernels, or
for a test that runs ``torch.library.opcheck`` on the registered op.

Five backends exist: ``torch`` (pure-PyTorch reference: the oracle of every test, runs anywhere),
``cpp`` (C++/OpenMP on CPU tensors), ``triton`` (GPU, or CPU under ``TRITON_INTERPRET=1`` for tests),
``cuda`` (CUDA C++) and ``batched`` (pure PyTorch batched over many problems at once — e.g. all the
2-means splits of a round as segments — for the GPU; runs anywhere). Each op names the backends it implements and its order of preference per
device; the default is the first one that is built and runs on the tensors' device.

A backend can be forced with the context manager :func:`use_backend` or the environment variable
``GIG_FAST_BACKEND``. An op that has no implementation in the forced backend uses its default and says
so once in a warning; a forced backend that is not built, or cannot run on the device, is an error.
"""
from __future__ import annotations

import contextlib
import contextvars
import os
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch

from .. import _extensions as ext

BACKENDS = ("torch", "cpp", "triton", "cuda", "batched")
ENV_VAR = "GIG_FAST_BACKEND"

__all__ = ["BACKENDS", "OpSpec", "register", "spec", "specs", "kernel", "resolve", "available_backends",
           "backend_runs_on", "use_backend", "forced_backend"]

_forced: contextvars.ContextVar[str | None] = contextvars.ContextVar("gig_fast_backend", default=None)
_warned: set[tuple[str, str]] = set()


def available_backends() -> dict[str, str]:
    """What is built here: backend → ``"runs"`` (usable on a device of this machine),
    ``"compiled"`` (built but no device to run it on) or ``"missing"``.

    Example on a CPU-only machine with a CUDA toolkit: ``{'torch': 'runs', 'cpp': 'runs',
    'triton': 'runs (interpreter)' or 'compiled', 'cuda': 'compiled', 'batched': 'runs'}``.
    """
    gpu = torch.cuda.is_available()
    out = {"torch": "runs", "batched": "runs"}
    out["cpp"] = "runs" if ext.has_cpp_extension() else "missing"
    if not ext.has_triton():
        out["triton"] = "missing"
    elif gpu:
        out["triton"] = "runs"
    else:
        out["triton"] = "runs (interpreter)" if ext.triton_runs_on_cpu() else "compiled"
    if not ext.has_cuda_extension():
        out["cuda"] = "missing"
    else:
        out["cuda"] = "runs" if gpu else "compiled"
    return out


def backend_runs_on(backend: str, device: torch.device) -> bool:
    """Whether ``backend`` is built and can execute on tensors living on ``device``."""
    if backend in ("torch", "batched"):
        return True
    if backend == "cpp":
        return device.type == "cpu" and ext.has_cpp_extension()
    if backend == "cuda":
        return device.type == "cuda" and ext.has_cuda_extension()
    if backend == "triton":
        if not ext.has_triton():
            return False
        return device.type == "cuda" or (device.type == "cpu" and ext.triton_runs_on_cpu())
    raise ValueError(f"unknown backend {backend!r}; choose one of {BACKENDS}")


def _check_name(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose one of {BACKENDS}")
    return name


@contextlib.contextmanager
def use_backend(name: str | None) -> Iterator[None]:
    """Force every op inside the ``with`` block onto ``name`` (``None`` restores the default)."""
    token = _forced.set(None if name is None else _check_name(name))
    try:
        yield
    finally:
        _forced.reset(token)


def forced_backend() -> str | None:
    """The backend forced by :func:`use_backend` or ``GIG_FAST_BACKEND``, if any."""
    name = _forced.get()
    if name is None:
        env = os.environ.get(ENV_VAR, "").strip()
        name = _check_name(env) if env else None
    return name


def resolve(op: str, implemented: Sequence[str], preference: dict[str, Sequence[str]],
            device: torch.device, backend: str | None = None) -> str:
    """Pick the backend for one call of ``op``.

    Args:
        op: op name, for messages.
        implemented: backends this op has.
        preference: device type → backends in order of speed (first usable wins).
        device: where the op's tensors live.
        backend: an explicit choice for this call (beats the forced one).
    """
    name = backend if backend is not None else forced_backend()
    if name is not None:
        _check_name(name)
        if name in implemented:
            if not backend_runs_on(name, device):
                raise RuntimeError(
                    f"{op}: backend {name!r} cannot run on {device.type} tensors here "
                    f"(available: {available_backends()})")
            return name
        if (op, name) not in _warned:
            _warned.add((op, name))
            warnings.warn(f"{op} has no {name!r} backend; using its default", stacklevel=3)
    for cand in preference.get(device.type, ("torch",)):
        if cand in implemented and backend_runs_on(cand, device):
            return cand
    return "torch"


@dataclass(frozen=True)
class OpSpec:
    """What the registry knows of one op.

    Attributes:
        name: the op's name (``gig_fast.ops.<name>`` is its public function).
        implemented: the backends it has, a subset of :data:`BACKENDS` in that order.
        preference: device type → backends in order of speed (the first that runs is the default).
        kernels: backend → bare kernel: the computation without input checks or dispatch (callers
            validate once, then call it in their loops). Its signature is the op's own, documented in
            the op's module.
        custom_op: the ``torch.library`` op of the public function (``torch.ops.gig_fast.<name>``), for
            ``torch.library.opcheck``; its last argument is the backend name.
        defaults: the op's documented default settings (e.g. ``tol`` of ``sparse_code``).
    """
    name: str
    implemented: tuple[str, ...]
    preference: Mapping[str, tuple[str, ...]]
    kernels: Mapping[str, Callable] = field(default_factory=dict)
    custom_op: Any = None
    defaults: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        unknown = [b for b in self.implemented if b not in BACKENDS]
        if unknown or "torch" not in self.implemented:
            raise ValueError(f"{self.name}: implemented backends must include 'torch' and lie in {BACKENDS}, "
                             f"got {self.implemented}")


_REGISTRY: dict[str, OpSpec] = {}


def register(op_spec: OpSpec) -> OpSpec:
    """Add an op to the registry (each op module calls it once, at import)."""
    if op_spec.name in _REGISTRY:
        raise ValueError(f"op {op_spec.name!r} is already registered")
    _REGISTRY[op_spec.name] = op_spec
    return op_spec


def spec(op: str) -> OpSpec:
    """The :class:`OpSpec` of ``op`` (e.g. ``spec("sparse_code").defaults["tol"]``)."""
    if op not in _REGISTRY:
        raise ValueError(f"unknown op {op!r}; registered: {sorted(_REGISTRY)}")
    return _REGISTRY[op]


def specs() -> dict[str, OpSpec]:
    """Every registered op, by name."""
    return dict(_REGISTRY)


def kernel(op: str, device: torch.device | str, backend: str | None = None) -> tuple[str, Callable]:
    """``(backend, bare kernel)`` that a call of ``op`` on ``device`` would use (``backend`` forces one, as
    on the public function). The kernel skips the public function's input checks: validate first."""
    s = spec(op)
    name = resolve(op, s.implemented, s.preference, torch.device(device), backend)
    if name not in s.kernels:
        raise ValueError(f"{op} has no bare {name!r} kernel (it has {sorted(s.kernels)})")
    return name, s.kernels[name]
