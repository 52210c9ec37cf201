"""The benchmark suite's set-up: which gig_fast it imports, its options, the ``bench`` fixture and the
pytest-benchmark hooks that add what the tool does not know (device, versions, bounds, speed-ups).

    python -m pytest benchmarks --benchmark-only                    # this device, its default size
    python -m pytest benchmarks --benchmark-only --gig-size quick   # small sizes (the CPU default)
    python -m pytest benchmarks --gig-size smoke --benchmark-disable   # CI: every benchmark once, checked

Every benchmark times one route (ours or a baseline) of one case after checking its result against the
reference; a wrong result fails the test and leaves no timing behind. Routes of one case share a
pytest-benchmark group, so one table shows them side by side; the speed-ups are printed after the tables
and stored in each benchmark's ``extra_info``.
"""
from __future__ import annotations

import math
import os
import sys
import time
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def _choose_gig_fast() -> None:
    """The one place that decides which gig_fast the benchmarks import: the checkout when it holds a
    build of the C++ extension (development, the GPU campaign), else the installed package (CI after
    ``pip install .``). ``python -m pytest`` from the root puts the checkout first on ``sys.path``: a
    checkout without a build would then shadow the installed package, so it is dropped."""
    built = any((ROOT / "gig_fast").glob("_C*.so"))
    rest = [p for p in sys.path if Path(p or os.getcwd()).resolve() != ROOT]
    sys.path[:] = ([str(ROOT)] if built else []) + rest
    if str(HERE) not in sys.path:
        sys.path.insert(1 if built else 0, str(HERE))


_choose_gig_fast()

import torch  # noqa: E402

if not torch.cuda.is_available():
    # Triton kernels run under the interpreter on the CPU (before any import of triton): only the smoke
    # size calls them there, to check the benchmark code; interpreted kernels are never timed.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import harness  # noqa: E402
import gig_fast  # noqa: E402
from gig_fast.ops import available_backends  # noqa: E402
from gig_fast.ops.registry import backend_runs_on  # noqa: E402

SIZES = ("smoke", "quick", "full")


def pytest_addoption(parser):
    group = parser.getgroup("gig_fast benchmarks")
    group.addoption("--gig-size", choices=SIZES, default=None,
                    help="problem sizes: smoke (tiny, CI), quick (CPU default: the suite in a few minutes on "
                         "two cores), full (GPU default: the shapes of the GPU issues; on a CPU the larger "
                         "CPU shapes)")
    group.addoption("--gig-device", choices=("cpu", "cuda"), default=None,
                    help="where to run (default: cuda when a GPU is visible, else cpu)")


def _device(config) -> str:
    return config.getoption("gig_device") or ("cuda" if torch.cuda.is_available() else "cpu")


def _size(config) -> str:
    return config.getoption("gig_size") or ("full" if _device(config) == "cuda" else "quick")


def cuda_timer() -> float:
    """pytest-benchmark's clock on the GPU: synchronise, then read the host clock, so each round times
    the kernels it queued (the iterations of a round queue back to back, as in a real loop)."""
    torch.cuda.synchronize()
    return time.perf_counter()


def pytest_configure(config):
    device = _device(config)
    if device == "cuda" and not torch.cuda.is_available():
        raise pytest.UsageError("--gig-device cuda: no CUDA device is visible")
    # Saved reference runs live per machine kind (benchmarks/saved/<kind>/), so --benchmark-compare
    # without a path compares against the last saved run of this kind of machine.
    if config.getoption("benchmark_storage", None) == "file://./.benchmarks":
        config.option.benchmark_storage = "file://" + str(HERE / "saved" / harness.machine_kind(device))
    # TF32: PyTorch's defaults stay (cuDNN convolutions in TF32, matmuls not). Each route says what it
    # computes in: gig sets IEEE fp32 itself (tf32=False), Captum's routes run in bench_gig.fp32_exact,
    # the "tf32" rows enable it explicitly (TF32 convolutions made Captum and gig_fast differ
    # by 2e-3..1.3e-2 on the H200).
    config.gig_registry = []
    if _size(config) == "smoke":  # tiny shapes check the benchmark code; their timings would mean nothing
        config.option.benchmark_disable = True
    config.gig_device, config.gig_size = device, _size(config)  # what the modules parametrise on


def pytest_collection_modifyitems(config, items):
    if _device(config) != "cuda":
        return
    # GPU: the synchronising clock, a warm-up, and rounds of at least 1 ms (a round of one short kernel
    # would mostly time the synchronisation).
    mark = pytest.mark.benchmark(timer=cuda_timer, warmup=True, warmup_iterations=10, min_time=1e-3)
    for item in items:
        if "benchmark" in getattr(item, "fixturenames", ()):
            item.add_marker(mark)


@pytest.fixture(scope="session")
def device(pytestconfig) -> str:
    return _device(pytestconfig)


@pytest.fixture(scope="session")
def gig_size(pytestconfig) -> str:
    return _size(pytestconfig)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


class Bench:
    """Check one route of a case against the reference, then time it with pytest-benchmark.

    ``bench(fn, op=..., impl=..., case=..., shape=..., role=..., check=...)``: ``fn()`` runs once and
    ``check(result)`` must pass (it raises AssertionError with the figures otherwise, and returns a dict
    of them, e.g. ``{"max_abs_err": ...}``, kept in ``extra_info``); then warm-up calls (GPU: three,
    CPU: one; none when a call takes more than 0.1 s: the checked call warmed it) and pytest-benchmark's
    rounds. Calls longer than 0.1 s run ``max(--benchmark-min-rounds, --benchmark-max-time / call)``
    rounds of one call each (pedantic mode: no calibration call).
    """

    SLOW_S = 0.1

    def __init__(self, benchmark, request, device: str, size: str):
        self.benchmark, self.request, self.device, self.size = benchmark, request, device, size

    def skip_unless_runs(self, backend: str, interpreted: bool = True) -> None:
        """Skip (with the reason) a backend that cannot run here, or one only timed on a GPU;
        ``interpreted=False``: a Triton route too slow for the interpreter even at the smoke size."""
        if not backend_runs_on(backend, torch.device(self.device)):
            pytest.skip(f"backend {backend!r} does not run on {self.device} here ({available_backends()[backend]})")
        if backend == "triton" and self.device == "cpu" and (self.size != "smoke" or not interpreted):
            pytest.skip("triton runs on the CPU only under its interpreter: never timed there"
                        + (", checked at --gig-size smoke" if interpreted else
                           " (this route takes minutes interpreted: the op's tests check it)"))

    def gpu_only(self, what: str) -> None:
        """A GPU route (tf32, bf16 tensor cores, a GPU package): on the CPU only in the smoke run."""
        if self.device == "cpu" and self.size != "smoke":
            pytest.skip(f"{what}: a GPU route (run on the CPU only at --gig-size smoke, to check the code)")

    def _meta(self, *, op, impl, label, role, case, shape, dtype, bytes_moved, flops, flops_dtype) -> dict:
        meta = {"op": op, "impl": impl, "label": label or impl, "role": role, "case": case, "shape": shape,
                "dtype": dtype or shape.get("dtype", "float32"),
                "device": harness.device_name(self.device), "device_kind": harness.machine_kind(self.device),
                "threads": torch.get_num_threads(), **harness.versions(), **self.request.config.gig_commit}
        for key, value in (("bytes_moved", bytes_moved), ("flops", flops), ("flops_dtype", flops_dtype)):
            if value is not None:
                meta[key] = value
        if self.device.startswith("cuda"):
            meta["peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
        else:
            meta["cpu"] = harness.cpu_id()
        return meta

    def __call__(self, fn, *, op: str, impl: str, case: str, shape: dict, role: str = "ours",
                 label: str | None = None, check=None, dtype: str | None = None, bytes_moved: float | None = None,
                 flops: float | None = None, flops_dtype: str | None = None, rounds: int | None = None,
                 once: bool = False, **info):
        """Check, warm up and time ``fn`` (see the class). ``rounds`` forces that many single-call rounds
        (routes of seconds a call); ``once``: one timed call, checked after the timing (a whole pipeline
        run: a failed check drops the timing); ``dtype``: what the route computes in (default: the shape's
        ``dtype``, else float32); ``info`` goes to ``extra_info``. Returns ``fn``'s result."""
        if role not in ("ours", "baseline", "floor", "ceiling"):
            raise ValueError(f"unknown role {role!r}")
        bm = self.benchmark
        bm.group = f"{op} | {case}"
        meta = dict(op=op, impl=impl, label=label, role=role, case=case, shape=shape, dtype=dtype,
                    bytes_moved=bytes_moved, flops=flops, flops_dtype=flops_dtype)
        if once:
            return self._once(fn, check, meta, info)
        if self.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        try:
            out = fn()
        except NotImplementedError as exc:  # e.g. an outside route without this dtype on this device
            if role == "ours":
                raise
            pytest.skip(f"{impl}: {exc}")
        sync(self.device)
        first_s = time.perf_counter() - t0
        figures = check(out) if check is not None else {}
        bm.extra_info.update(self._meta(**meta), **info, **(figures or {}))
        if not bm.enabled:  # --benchmark-disable: nothing is timed; mark the fixture used, no second call
            return bm.pedantic(lambda: out)
        # a call of SLOW_S or more was warmed by the checked call (GPU routes of seconds: bisecting, the
        # per-cluster 2-means reference); three more would only eat the campaign's time box
        warm = 0 if first_s >= self.SLOW_S else (3 if self.device.startswith("cuda") else 1)
        for _ in range(warm):
            fn()
        sync(self.device)
        if rounds is not None or first_s >= self.SLOW_S:
            cfg = self.request.config
            rounds = rounds or max(cfg.getoption("benchmark_min_rounds"),
                                   math.ceil(float(cfg.getoption("benchmark_max_time")) / first_s))
            result = bm.pedantic(fn, rounds=rounds, iterations=1)
        else:
            result = bm(fn)
        self._register()
        return result

    def _once(self, fn, check, meta: dict, info: dict):
        bm = self.benchmark
        if self.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        out = bm.pedantic(fn, rounds=1, iterations=1)
        bm.extra_info.update(self._meta(**meta), **info)
        try:
            figures = check(out) if check is not None else {}
        except AssertionError:
            bm.has_error = True  # pytest-benchmark leaves benchmarks with errors out of its JSON
            raise
        bm.extra_info.update(figures or {})
        self._register()
        return out

    def _register(self) -> None:
        bm = self.benchmark
        if bm.enabled and bm.stats is not None:
            self.request.config.gig_registry.append(
                {"group": bm.group, "extra_info": bm.extra_info,
                 "stats": {"median": bm.stats["median"], "min": bm.stats["min"]}})


@pytest.fixture
def bench(benchmark, request, device, gig_size) -> Bench:
    return Bench(benchmark, request, device, gig_size)


def pytest_sessionstart(session):
    session.config.gig_commit = harness.commit()


def _package() -> str:
    """Where gig_fast was imported from, without this machine's paths: the checkout or the installed package."""
    return "<root>/gig_fast" if Path(gig_fast.__file__).resolve().parent == ROOT / "gig_fast" else "installed"


def pytest_benchmark_update_machine_info(config, machine_info):
    device = _device(config)
    machine_info["gig_fast"] = {"device": harness.device_name(device), "kind": harness.machine_kind(device),
                                "threads": torch.get_num_threads(), "size": _size(config),
                                "package": _package(), **harness.versions()}


def pytest_benchmark_update_json(config, benchmarks, output_json):
    harness.derive(output_json["benchmarks"])


def pytest_terminal_summary(terminalreporter, config):
    entries = getattr(config, "gig_registry", None)
    if not entries:
        return
    harness.derive(entries)
    tr = terminalreporter
    tr.section("gig_fast: speed-ups against the fastest baseline of each group (medians)", sep="-")
    for group in dict.fromkeys(e["group"] for e in entries):
        lines = []
        for e in entries:
            info = e["extra_info"]
            if e["group"] != group or info.get("role") != "ours":
                continue
            text = f"  {info['label']:<26} {info['ms']:11.4f} ms"
            if "speedup" in info:
                text += f"  {info['speedup']:6.2f}x vs {info['baseline']}"
                others = [f"{k} {v:.2f}x" for k, v in info["speedup_vs"].items() if k != info["baseline"]]
                text += f" ({', '.join(others)})" if others else ""
            if "x_floor" in info:
                text += "  " + ", ".join(f"{v:.2f}x {k}" for k, v in info["x_floor"].items())
            if "x_relative" in info:
                text += "  " + ", ".join(f"time {v:.2f}x {k}'s" for k, v in info["x_relative"].items())
            if "GB_per_s" in info:
                text += f"  {info['GB_per_s']:.1f} GB/s"
            if "pct_bound" in info:
                text += f" ({info['pct_bound']:.1f}% of the {info['bound']})"
            lines.append(text)
        if lines:
            tr.write_line(group)
            for line in lines:
                tr.write_line(line)
