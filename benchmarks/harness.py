"""The bound model and the row format of the benchmark suite (timing is pytest-benchmark's).

* Bound model: the ceilings a time is measured against (:data:`PEAKS`: HBM bandwidth and GEMM rates of
  the GPUs it was measured on; the memory-copy bandwidth measured in the same run by ``bench_ceilings.py``
  where the suite ran it), and :func:`derive`, which turns each benchmark's median into GB/s, TFLOP/s,
  % of its bound and its speed-up against the fastest baseline of its group.
* Row format: one JSON line per measurement in ``benchmarks/results.jsonl`` (device, versions, commit,
  shape, ms, GB/s, % of the bound, speed-up, the correctness figures of the check), built from
  pytest-benchmark's JSON by :func:`row_from_benchmark`, rendered by :func:`render_table`.

Roles (``extra_info["role"]``) in a group: ``ours`` (a gig_fast route), ``baseline`` (what a user would
otherwise run; the speed-up is against the fastest of them), ``floor`` (a lower bound of the same work,
e.g. the bare bf16 GEMM of an assignment or the bare kernel of a public op: ours is reported as a
multiple of it) and ``ceiling`` (a machine figure: the memory copy).
"""
from __future__ import annotations

import json
import os
import platform
import re
import statistics
import subprocess
from collections import defaultdict

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.environ.get("GIG_FAST_RESULTS", os.path.join(HERE, "results.jsonl"))

# Ceilings for "% of the bound" where the run measured none itself (H200: measured, see
# shared/device/baselines-h200.json; H100 SXM: datasheet). FLOP rates are dense GEMM peaks.
PEAKS = {
    "NVIDIA H200": {"bytes_per_s": 4.06e12, "bfloat16_flops": 780e12, "tf32_flops": 431e12, "float32_flops": 51e12},
    "NVIDIA H100 80GB HBM3": {"bytes_per_s": 3.0e12, "bfloat16_flops": 700e12, "tf32_flops": 380e12,
                              "float32_flops": 50e12},
}
# Paths whose changes do not make a measurement come from "another" tree (the records themselves).
RECORD_PATHS = ("benchmarks/results.jsonl", "benchmarks/RESULTS.md", "benchmarks/saved")


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_id() -> str:
    """The CPU's model name with its family and model numbers (``AMD EPYC, family 25 model 17``): hosts
    with one model name differ in kind (AMD's family 25 is Zen 3/4, whose AVX-512 runs on 256-bit units;
    26 is Zen 5, with 512-bit FMA units), and a CPU row's ratios depend on it."""
    fields = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key in ("model name", "cpu family", "model") and key not in fields:
                    fields[key] = value.strip()
                if not line.strip() and fields:
                    break
    except OSError:
        pass
    name = fields.get("model name") or platform.processor() or platform.machine()
    if "cpu family" in fields and "model" in fields:
        name += f", family {fields['cpu family']} model {fields['model']}"
    return name


def device_name(device: str) -> str:
    """The name rows carry: the GPU's, or ``CPU <arch> x<threads> threads`` (the results file's form)."""
    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"CPU {platform.processor() or platform.machine()} x{torch.get_num_threads()} threads"


def machine_kind(device: str) -> str:
    """A file-name slug of the machine kind, the folder of its saved reference runs
    (``nvidia-h200``, ``cpu-amd-epyc-x2``): runs compare only against runs of the same kind."""
    if device.startswith("cuda") and torch.cuda.is_available():
        name = torch.cuda.get_device_name()
    else:
        name = f"cpu {_cpu_model()} x{torch.get_num_threads()}"
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=HERE, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def commit() -> dict:
    """``{"commit": short hash or "unknown", "dirty": bool}``; dirty = tracked files other than the
    records differ from that commit (rows of a dirty tree are kept but never rendered)."""
    sha = _git("rev-parse", "--short", "HEAD") or "unknown"
    # `top`: the record paths are relative to the repository root, and git runs in benchmarks/ (a plain
    # exclude would name benchmarks/benchmarks/..., so every run after one that wrote rows was "dirty")
    changes = _git("status", "--porcelain", "--untracked-files=no", "--", ".",
                   *(f":(top,exclude){p}" for p in RECORD_PATHS)) if sha != "unknown" else ""
    return {"commit": sha, "dirty": bool(changes)}


def versions() -> dict:
    out = {"torch": torch.__version__, "python": platform.python_version()}
    try:
        import triton
        out["triton"] = triton.__version__
    except ImportError:
        pass
    return out


# ---------------------------------------------------------------------------------------------------
# Derived figures


def _label(info: dict) -> str:
    return info.get("label") or info.get("impl", "?")


def derive(entries: list[dict]) -> None:
    """Fill each entry's ``extra_info`` with the figures its median implies, in place.

    ``entries``: pytest-benchmark's benchmark dicts (``group``, ``extra_info``, ``stats`` with ``median``
    and ``min`` in seconds). Adds ``ms``; ``GB_per_s`` and ``pct_bound`` (against the memory copy of the
    same run, else :data:`PEAKS`) where ``bytes_moved`` is known; ``TFLOP_per_s`` and ``pct_peak_flops``
    where ``flops`` is; for ``ours``: ``speedup`` (median against the fastest ``baseline`` of the group,
    named in ``baseline``), ``speedup_min`` (the same on the fastest rounds), ``speedup_vs`` (every
    baseline) and ``x_floor`` (ours / each ``floor``); an entry whose ``relative_to`` names another impl of
    its group gets ``x_relative`` (its median over that impl's: e.g. the adaptive rule over the fixed one).
    """
    copy_bps = {}
    for e in entries:
        info = e.get("extra_info") or {}
        if info.get("role") == "ceiling" and info.get("bytes_moved") and e["stats"]["min"] > 0:
            copy_bps[info.get("device")] = max(copy_bps.get(info.get("device"), 0.0),
                                               info["bytes_moved"] / e["stats"]["min"])
    groups = defaultdict(list)
    for e in entries:
        info = e.get("extra_info")
        if not info or "op" not in info or not e.get("stats") or e["stats"].get("median") is None:
            continue
        groups[e.get("group")].append(e)
        med = e["stats"]["median"]
        info["ms"] = med * 1e3
        peaks = PEAKS.get(info.get("device"), {})
        if info.get("bytes_moved") and med > 0:
            info["GB_per_s"] = info["bytes_moved"] / med / 1e9
            bps, source = copy_bps.get(info.get("device")), "memory copy of this run"
            if bps is None and "bytes_per_s" in peaks:
                bps, source = peaks["bytes_per_s"], "peak bandwidth (harness.PEAKS)"
            if bps and info.get("role") != "ceiling":
                info["pct_bound"] = 100 * info["bytes_moved"] / med / bps
                info["bound"] = source
        if info.get("flops") and med > 0:
            info["TFLOP_per_s"] = info["flops"] / med / 1e12
            peak = peaks.get(f"{info.get('flops_dtype', 'float32')}_flops")
            if peak:
                info["pct_peak_flops"] = 100 * info["flops"] / med / peak
    for members in groups.values():
        baselines = [e for e in members if e["extra_info"].get("role") == "baseline"]
        floors = [e for e in members if e["extra_info"].get("role") == "floor"]
        for e in members:
            info = e["extra_info"]
            if info.get("role") != "ours":
                continue
            med, best = e["stats"]["median"], e["stats"]["min"]
            if baselines:
                fastest = min(baselines, key=lambda b: b["stats"]["median"])
                info["baseline"] = _label(fastest["extra_info"])
                info["speedup"] = fastest["stats"]["median"] / med
                info["speedup_min"] = min(b["stats"]["min"] for b in baselines) / best
                info["speedup_vs"] = {_label(b["extra_info"]): b["stats"]["median"] / med for b in baselines}
            if floors:
                info["x_floor"] = {_label(f["extra_info"]): med / f["stats"]["median"] for f in floors}
            other = [o for o in members if o["extra_info"].get("impl") == info.get("relative_to")]
            if other and other[0]["stats"]["median"] > 0:
                info["x_relative"] = {info["relative_to"]: med / other[0]["stats"]["median"]}
            stages, base_stages = info.get("stages_s"), (fastest["extra_info"].get("stages_s")
                                                          if baselines else None)
            if stages and base_stages:
                info["stage_speedup"] = {k: base_stages[k] / v for k, v in stages.items() if k in base_stages and v}


# ---------------------------------------------------------------------------------------------------
# Rows

_COPIED = ("baseline", "speedup", "speedup_min", "speedup_vs", "x_floor", "x_relative", "relative_to", "GB_per_s", "pct_bound", "bound",
           "TFLOP_per_s", "pct_peak_flops")
_META = {"op", "impl", "label", "role", "device", "device_kind", "shape", "case", "commit", "dirty", "torch",
         "python", "triton", "threads", "bytes_moved", "flops", "flops_dtype", "ms", "stages_s",
         "stage_speedup", *_COPIED}


def row_from_benchmark(bench: dict, when: str) -> dict:
    """One results-file row from one benchmark of pytest-benchmark's JSON (after :func:`derive`).

    ``ms`` is the median over the rounds; ``ms_p20``/``ms_p80`` are the 20th/80th percentiles of the
    per-round times (only when the JSON carries them: ``--benchmark-json`` does), ``ms_min`` the fastest
    round, ``rounds`` how many there were. The check's figures (``max_abs_err``, ``agreement``, ...)
    travel as they are.
    """
    info, st = bench["extra_info"], bench["stats"]
    row = {"time": when, "op": info["op"], "impl": info["impl"], "device": info["device"]}
    for key in ("torch", "python", "triton", "commit", "dirty", "threads"):
        if key in info:
            row[key] = info[key]
    row["shape"] = info.get("shape", {})
    row.update(ms=st["median"] * 1e3, ms_min=st["min"] * 1e3, rounds=st["rounds"])
    data = st.get("data") or []
    if len(data) >= 2:
        q = statistics.quantiles(data, n=5, method="inclusive")
        row.update(ms_p20=q[0] * 1e3, ms_p80=q[3] * 1e3)
    for key in _COPIED:
        if key in info:
            row[key] = info[key]
    row.update({k: v for k, v in info.items() if k not in _META})
    return row


def stage_rows(bench: dict, when: str) -> list[dict]:
    """Rows ``pipeline/<stage>`` from a pipeline run's own stage timings (``extra_info["stages_s"]``,
    read from its ``metrics.json``: one run each, so no percentiles)."""
    info = bench["extra_info"]
    out = []
    for stage, seconds in (info.get("stages_s") or {}).items():
        row = {"time": when, "op": f"pipeline/{stage}", "impl": info["impl"], "device": info["device"]}
        row.update({k: info[k] for k in ("torch", "python", "triton", "commit", "dirty", "threads") if k in info})
        row.update(shape=info.get("shape", {}), ms=seconds * 1e3, rounds=1)
        if stage in (info.get("stage_speedup") or {}):
            row.update(baseline=info.get("baseline"), speedup=info["stage_speedup"][stage])
        out.append(row)
    return out


def load_rows(path: str = RESULTS) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def renderable(row: dict) -> bool:
    """Rows measured on a committed tree: a hex commit, not marked dirty or excluded."""
    return bool(re.fullmatch(r"[0-9a-f]{7,40}", str(row.get("commit", "")))) and not row.get("dirty") \
        and not row.get("not_rendered")


def format_row(row: dict) -> str:
    parts = [f"{row['op']:<20}", f"{row['impl']:<22}", f"{row['ms']:10.4f} ms"]
    if "GB_per_s" in row:
        parts.append(f"{row['GB_per_s']:8.1f} GB/s")
    pct = row.get("pct_bound", row.get("pct_hbm_roofline"))
    if pct is not None:
        parts.append(f"{pct:5.1f}% bound")
    if "TFLOP_per_s" in row:
        parts.append(f"{row['TFLOP_per_s']:7.2f} TFLOP/s")
    if "speedup" in row:
        parts.append(f"{row['speedup']:7.2f}x vs {row['baseline']}")
    shape = ",".join(f"{k}={v}" for k, v in row["shape"].items())
    return "  ".join(parts) + f"  [{shape}]"


def render_table(rows: list[dict]) -> str:
    """A Markdown table of the renderable rows, in file order.

    ``ms`` is the median; ``p20–p80`` the spread of the rounds where the row has it (rows of one run,
    ``rounds`` = 1, have none); ``% bound`` is against the row's bound (``pct_bound``: the memory copy of
    its run or the peak bandwidth; older GPU rows: ``pct_hbm_roofline``).
    """
    lines = ["| device | op | impl | shape | ms | p20–p80 | GB/s | % bound | TFLOP/s | speedup | vs | commit |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if not renderable(r):
            continue
        shape = " ".join(f"{k}={v}" for k, v in r["shape"].items())
        fmt = lambda key, spec: format(r[key], spec) if r.get(key) is not None else ""  # noqa: E731
        spread = f"{r['ms_p20']:.4g}–{r['ms_p80']:.4g}" if "ms_p20" in r and "ms_p80" in r else ""
        pct = r.get("pct_bound", r.get("pct_hbm_roofline"))
        lines.append(f"| {r['device']} | {r['op']} | {r['impl']} | {shape} | {r['ms']:.4f} | {spread} | "
                     f"{fmt('GB_per_s', '.1f')} | {'' if pct is None else format(pct, '.1f')} | "
                     f"{fmt('TFLOP_per_s', '.2f')} | {fmt('speedup', '.2f')} | {r.get('baseline', '')} | "
                     f"{r.get('commit', '')} |")
    return "\n".join(lines)
