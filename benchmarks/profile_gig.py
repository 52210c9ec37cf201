"""Where the time of one ``gig()`` call goes: torch.profiler over the two headline cases.

    python benchmarks/profile_gig.py --out docs/gig_profile                 # CPU: 32 px (the quick bench size)
    python benchmarks/profile_gig.py --device cuda --out "$OUT" --trace     # GPU: 224 px, one chrome trace

Cases: layer3.5 → logits and layer1.2 → layer2.0 of bench_gig's ResNet-50 (random weights, the same
inputs as its rows), m = 50, B = 32 and B = 2, the fixed rule (``tolerance=None``: what Captum computes)
and the adaptive refinement at the pipeline's default tolerance (0.01). Each case is warmed by one call,
timed unprofiled (median of ``--repeats`` calls), then profiled once.

Writes ``<out>/gig_profile.md``: per case, the share of the call's wall time of each named region of
``gig_fast.gig`` (``gig.forward``: F_ab's forward, ``gig.backward``: its backward and the gradient's copy
into the T-target buffer, ``gig.accumulate``: our fused op, ``gig.targets``, ``gig.path``,
``gig.reconstruct``, ``gig.check``, ``gig.finish``, ``gig.refine``: the refinement's own bookkeeping
outside those), and of op categories over the whole call (self time: host syncs, allocation, copies,
our ops, the rest of aten; "Python" is the wall time outside every op). On a GPU each region also gets
the device time of its kernels, and "GPU busy" says how much of the wall time any kernel ran: a low
share means the call is bound by the host (launches, syncs, Python), not by the GPU.
With ``--trace``, the first case's chrome trace goes to ``<out>/gig_trace.json.gz`` (chrome://tracing,
https://ui.perfetto.dev).
"""
from __future__ import annotations

import argparse
import gzip
import shutil
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]  # the checkout's gig_fast (built in place), then bench_gig

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from bench_gig import EngineCase, engine_inputs  # noqa: E402

REGIONS = ("gig.forward", "gig.backward", "gig.accumulate", "gig.targets", "gig.path", "gig.reconstruct",
           "gig.check", "gig.finish", "gig.refine")
# ops whose host time is a wait for the device (on the CPU: the read-back itself)
SYNC_OPS = {"aten::item", "aten::_local_scalar_dense", "aten::nonzero", "aten::is_nonzero", "aten::equal",
            "cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaMemcpy", "cudaEventSynchronize"}
ALLOC_OPS = {"aten::empty", "aten::empty_strided", "aten::empty_like", "aten::zeros", "aten::zeros_like",
             "aten::full", "aten::full_like", "aten::ones", "aten::ones_like", "aten::new_empty", "aten::new_zeros",
             "aten::new_full", "aten::resize_", "aten::arange", "aten::scalar_tensor", "cudaMalloc", "cudaFree"}
COPY_OPS = {"aten::copy_", "aten::to", "aten::_to_copy", "aten::contiguous", "aten::clone", "aten::cat",
            "aten::stack", "aten::repeat", "aten::index", "aten::index_put_", "cudaMemcpyAsync"}


def category(name: str) -> str:
    if "gig_fast" in name:
        return "our ops (gig_fast::*)"
    if name in SYNC_OPS:
        return "host syncs (read-backs)"
    if name in ALLOC_OPS:
        return "allocation / tensor creation"
    if name in COPY_OPS:
        return "copies, gathers, cat/stack"
    if name.startswith("cuda") or name.startswith("cu"):
        return "CUDA runtime (launches)"
    return "compute (aten: conv, bn, relu, matmul, ...)"


def cases(device: str, sizes: list[int]) -> list[EngineCase]:
    px, s = (224, 30) if device == "cuda" else (32, 16)
    return [EngineCase(a, b, 50, B, px, s) for B in sizes for a, b in (("layer3.5", "logits"), ("layer1.2", "layer2.0"))]


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn, device: str) -> float:
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def summarise(prof, wall_s: float, device: str) -> dict:
    """Shares of the profiled call's wall time by region and by op category (see the module docstring)."""
    events = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CPU]
    regions = [e for e in events if e.name in REGIONS]
    ops = [e for e in events if e.name not in REGIONS and not e.name.startswith("ProfilerStep")]
    wall_us = wall_s * 1e6
    # a region nested in another (forward/backward/... inside gig.refine) counts for itself only
    by_region = defaultdict(lambda: [0.0, 0.0, 0])  # name -> [CPU us, device us, calls]
    for e in regions:
        inner = [o for o in regions if o is not e and e.time_range.start <= o.time_range.start
                 and o.time_range.end <= e.time_range.end]
        by_region[e.name][0] += e.cpu_time_total - sum(o.cpu_time_total for o in inner)
        by_region[e.name][1] += e.device_time_total - sum(o.device_time_total for o in inner)
        by_region[e.name][2] += 1
    outside = wall_us - sum(v[0] for v in by_region.values())
    by_category = defaultdict(float)
    for e in ops:
        by_category[category(e.name)] += e.self_cpu_time_total
    by_category["Python (outside every op)"] = wall_us - sum(by_category.values())
    kernels = [e for e in prof.events() if e.device_type != torch.autograd.DeviceType.CPU]
    busy_us = sum(e.self_device_time_total for e in kernels)
    top = defaultdict(lambda: [0.0, 0])
    for e in ops:
        top[e.name][0] += e.self_cpu_time_total
        top[e.name][1] += 1
    # on the CPU only item()/nonzero show as ops (tolist() does not); on a GPU every read-back waits in a
    # stream synchronisation, so those count them all
    syncs = sum(1 for e in ops if e.name in (("cudaStreamSynchronize", "cudaDeviceSynchronize") if device == "cuda"
                                             else ("aten::_local_scalar_dense", "aten::nonzero")))
    return {"wall_us": wall_us, "regions": dict(by_region), "outside_regions_us": outside,
            "categories": dict(by_category), "busy_us": busy_us if device == "cuda" else None,
            "top": sorted(top.items(), key=lambda kv: -kv[1][0])[:8], "syncs": syncs}


def render(case: EngineCase, mode: str, unprofiled_s: float, figures: dict) -> str:
    wall = figures["wall_us"]
    gpu = figures["busy_us"] is not None
    lines = [f"### {case.a} → {case.b}, m = {case.m}, B = {case.B}, {case.size} px, s = {case.s}: {mode} rule", "",
             f"Unprofiled: {unprofiled_s * 1e3:.1f} ms (median); profiled call: {wall / 1e3:.1f} ms; "
             f"{figures['syncs']} read-backs ("
             + ("stream synchronisations" if gpu else "`_local_scalar_dense`/`nonzero` ops; `tolist()` is not seen") + ")"
             + (f"; GPU busy {100 * figures['busy_us'] / wall:.1f}% of the wall time" if gpu else "") + ".", "",
             "| region | host ms | share of wall | " + ("GPU ms | " if gpu else "") + "calls |",
             "|---|---:|---:|" + ("---:|" if gpu else "") + "---:|"]
    for name in REGIONS:
        if name in figures["regions"]:
            cpu, dev, calls = figures["regions"][name]
            lines.append(f"| {name} | {cpu / 1e3:.2f} | {100 * cpu / wall:.1f}% | "
                         + (f"{dev / 1e3:.2f} | " if gpu else "") + f"{calls} |")
    lines.append(f"| outside the regions (argument checks, set-up) | {figures['outside_regions_us'] / 1e3:.2f} | "
                 f"{100 * figures['outside_regions_us'] / wall:.1f}% | " + ("| " if gpu else "") + "|")
    lines += ["", "| op category (self host time) | ms | share of wall |", "|---|---:|---:|"]
    for name, us in sorted(figures["categories"].items(), key=lambda kv: -kv[1]):
        lines.append(f"| {name} | {us / 1e3:.2f} | {100 * us / wall:.1f}% |")
    lines += ["", "Top ops by self host time: " + ", ".join(
        f"`{name}` {us / 1e3:.1f} ms ×{n}" for name, (us, n) in figures["top"]), ""]
    return "\n".join(lines)


def profile_case(case: EngineCase, mode: str, device: str, repeats: int, trace: Path | None) -> str:
    inputs = engine_inputs(case, device)
    tolerance = None if mode == "fixed" else 0.01
    call = lambda: inputs.gig(case.m, tolerance=tolerance)  # noqa: E731
    call()  # warm-up: allocator, cuDNN algorithm choice, lazy initialisation
    unprofiled = statistics.median(timed(call, device) for _ in range(repeats))
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities) as prof:
        wall = timed(call, device)
    if trace is not None:
        with tempfile.TemporaryDirectory() as tmp:
            raw = Path(tmp) / "trace.json"
            prof.export_chrome_trace(str(raw))
            with open(raw, "rb") as src, gzip.open(trace, "wb") as dst:
                shutil.copyfileobj(src, dst)
    return render(case, mode, unprofiled, summarise(prof, wall, device))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", required=True, help="folder for gig_profile.md (and gig_trace.json.gz)")
    ap.add_argument("--B", type=int, nargs="+", default=[32, 2], help="images per call (default: 32 2)")
    ap.add_argument("--modes", nargs="+", choices=("fixed", "adaptive"), default=["fixed", "adaptive"])
    ap.add_argument("--repeats", type=int, default=3, help="unprofiled calls timed per case (median)")
    ap.add_argument("--trace", action="store_true", help="keep the chrome trace of the first case")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    header = (f"# Where one gig() call's time goes ({torch.cuda.get_device_name() if args.device == 'cuda' else 'CPU'}, "
              f"{torch.get_num_threads()} threads, torch {torch.__version__})\n\n"
              f"Written by `python benchmarks/profile_gig.py {' '.join(sys.argv[1:] if argv is None else argv)}`."
              " Shares are of the profiled call's wall time (the profiler adds its own overhead per op).\n")
    sections, trace = [header], (out / "gig_trace.json.gz") if args.trace else None
    for case in cases(args.device, args.B):
        for mode in args.modes:
            text = profile_case(case, mode, args.device, args.repeats, trace)
            trace = None
            print(text, flush=True)
            sections.append(text)
    tmp = out / "gig_profile.md.tmp"
    tmp.write_text("\n".join(sections))
    tmp.replace(out / "gig_profile.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
