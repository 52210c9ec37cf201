"""Shared benchmark harness: time callables side by side, record rows, render tables.

Every benchmark script (``benchmarks/bench_<op>.py``) defines ``run(device: str, quick: bool)`` which
builds inputs with :mod:`gig_fast.testing`, times every backend of its op together with the reference
and the outside baselines *on the same inputs in the same process*, and calls :func:`record` for each.
:func:`record` appends a JSON line to ``benchmarks/results.jsonl`` (or ``$GIG_FAST_RESULTS``) with the
device name, versions and commit, so figures from a lent GPU survive the machine.

Timing: ``triton.testing.do_bench`` (median, 20th/80th percentiles) on CUDA; on the CPU
``torch.utils.benchmark.Timer.blocked_autorange`` (median and IQR over many runs).
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import subprocess
from typing import Callable

import torch

RESULTS = os.environ.get("GIG_FAST_RESULTS", os.path.join(os.path.dirname(os.path.abspath(__file__)), "results.jsonl"))

# Peak figures used for "% of roofline" (H200 measured in shared/device/baselines-h200.json;
# H100 SXM datasheet). Unknown devices report no roofline share.
PEAKS = {
    "NVIDIA H200": {"bytes_per_s": 4.06e12, "bf16_flops": 780e12, "tf32_flops": 431e12, "fp32_flops": 51e12},
    "NVIDIA H100 80GB HBM3": {"bytes_per_s": 3.0e12, "bf16_flops": 700e12, "tf32_flops": 380e12, "fp32_flops": 50e12},
}


def device_name(device: str) -> str:
    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"CPU {platform.processor() or platform.machine()} x{torch.get_num_threads()} threads"


def _commit() -> str:
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True,
                              text=True, timeout=5).stdout.strip() or "unknown"
    except Exception:
        return "unknown"


def versions() -> dict:
    out = {"torch": torch.__version__, "python": platform.python_version(), "commit": _commit()}
    try:
        import triton
        out["triton"] = triton.__version__
    except Exception:
        pass
    return out


def time_ms(fn: Callable[[], object], device: str, *, warmup: int = 3, min_run_time: float = 0.5) -> dict:
    """Median (and 20th/80th percentile) milliseconds of ``fn()``."""
    if device.startswith("cuda"):
        import triton.testing
        med, p20, p80 = triton.testing.do_bench(fn, quantiles=[0.5, 0.2, 0.8], warmup=25, rep=100)
        return {"ms": med, "ms_p20": p20, "ms_p80": p80}
    import torch.utils.benchmark as tb
    for _ in range(warmup):
        fn()
    m = tb.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads()).blocked_autorange(
        min_run_time=min_run_time)
    return {"ms": m.median * 1e3, "ms_p20": m._p25 * 1e3 if hasattr(m, "_p25") else m.median * 1e3,
            "ms_p80": m._p75 * 1e3 if hasattr(m, "_p75") else m.median * 1e3}


def record(op: str, impl: str, device: str, shape: dict, timing: dict, *, bytes_moved: float | None = None,
           flops: float | None = None, baseline: str | None = None, baseline_ms: float | None = None,
           extra: dict | None = None) -> dict:
    """Append one result row and return it.

    Args:
        op: op or pipeline stage ("sparse_reconstruct", ...).
        impl: what was timed ("cuda", "triton", "cpp", "torch", "dense U@V", "captum", ...).
        device: "cpu" or "cuda".
        shape: the problem size (P, K, C, s, ...).
        timing: from :func:`time_ms`.
        bytes_moved / flops: minimal traffic / work, for GB/s, TFLOP/s and % of roofline.
        baseline, baseline_ms: the reference timed in the same run; the row carries ``speedup``.
    """
    name = device_name(device)
    row = {"time": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "op": op, "impl": impl,
           "device": name, **versions(), "shape": shape, **timing}
    sec = timing["ms"] / 1e3
    peaks = PEAKS.get(name, {})
    if bytes_moved:
        row["GB_per_s"] = bytes_moved / sec / 1e9
        if "bytes_per_s" in peaks:
            row["pct_hbm_roofline"] = 100 * bytes_moved / sec / peaks["bytes_per_s"]
    if flops:
        row["TFLOP_per_s"] = flops / sec / 1e12
    if baseline is not None and baseline_ms:
        row["baseline"] = baseline
        row["speedup"] = baseline_ms / timing["ms"]
    if extra:
        row.update(extra)
    os.makedirs(os.path.dirname(RESULTS) or ".", exist_ok=True)
    with open(RESULTS, "a") as f:
        f.write(json.dumps(row) + "\n")
    print(format_row(row), flush=True)
    return row


def format_row(row: dict) -> str:
    parts = [f"{row['op']:<20}", f"{row['impl']:<22}", f"{row['ms']:10.4f} ms"]
    if "GB_per_s" in row:
        parts.append(f"{row['GB_per_s']:8.1f} GB/s")
    if "pct_hbm_roofline" in row:
        parts.append(f"{row['pct_hbm_roofline']:5.1f}% HBM")
    if "TFLOP_per_s" in row:
        parts.append(f"{row['TFLOP_per_s']:7.2f} TFLOP/s")
    if "speedup" in row:
        parts.append(f"{row['speedup']:7.2f}x vs {row['baseline']}")
    shape = ",".join(f"{k}={v}" for k, v in row["shape"].items())
    return "  ".join(parts) + f"  [{shape}]"


def load_rows(path: str = RESULTS) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def render_table(rows: list[dict]) -> str:
    """A Markdown table of the rows (latest first per device/op/impl/shape)."""
    lines = ["| device | op | impl | shape | ms | GB/s | % HBM | TFLOP/s | speedup | vs | commit |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        shape = " ".join(f"{k}={v}" for k, v in r["shape"].items())
        fmt = lambda key, spec: format(r[key], spec) if key in r else ""  # noqa: E731
        lines.append(f"| {r['device']} | {r['op']} | {r['impl']} | {shape} | {r['ms']:.4f} | {fmt('GB_per_s', '.1f')} | "
                     f"{fmt('pct_hbm_roofline', '.1f')} | {fmt('TFLOP_per_s', '.2f')} | {fmt('speedup', '.2f')} | "
                     f"{r.get('baseline', '')} | {r.get('commit', '')} |")
    return "\n".join(lines)
