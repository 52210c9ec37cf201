"""Peak memory of a pipeline run vs the number of explained images (docs/design.md §6).

    OMP_NUM_THREADS=1 python benchmarks/pipeline_memory.py --explain 5000 --out mem5k
    OMP_NUM_THREADS=1 python benchmarks/pipeline_memory.py --explain 50000 --out mem50k

Runs the demo network (the weights shipped in the package) on the Fashion-MNIST train split
(60k images) in a reduced configuration sized for two CPU cores — layers ``layer4.1,layer4.2``,
``k=16``, ``gig_steps=2``, 2,000 concept images (the per-layer PFV sample: 2,000 × 256 float32 per
layer) — and prints one JSON line: the peak RSS of the whole process (``ru_maxrss``: it includes
loading torch, the model and the 60k-image data set), the peak RSS during ``Pipeline.run()`` alone
(``VmHWM`` after resetting it through ``/proc/self/clear_refs`` once the data are loaded) and of each
stage alone (reset before each), the RSS after loading, the stage timings and the graph size.
With ``--old-graph`` it afterwards also times the previous in-memory graph assembly
(``save_json(build_graph(...))``) on the same stage files, in a fresh process (its own peak).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path


def _rss_mib() -> float:
    """Current resident set size (Linux ``/proc/self/statm``) in MiB."""
    import os
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def _reset_hwm() -> float:
    """Hand freed heap back to the OS (``malloc_trim``: else what an earlier step freed stays resident
    and blurs the next step's figure), reset the kernel's peak-RSS mark of this process (Linux ≥ 4.0)
    so that :func:`_hwm_mib` measures from here on; returns the RSS now."""
    import ctypes
    import gc

    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5")
    return _rss_mib()


def _hwm_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def config(explain: int, out: str):
    from gig_fast.pipeline import PipelineConfig

    return PipelineConfig(model="demo", weights=None, dataset="fashion-mnist", split="train",  # the shipped weights
                          layers=["layer4.1", "layer4.2"], concept_images=2000, explain_images=explain,
                          per_class=explain // 10, k=16, kmeans_mode="fast", gig_steps=2, top_concepts=3,
                          batch_size=250, chunk_images=500, out=out, progress=False)


def run(explain: int, out: str) -> dict:
    """``Pipeline.run()`` and the publishing step after it, step by step (the same calls), the peak RSS of
    each step on its own."""
    from gig_fast.pipeline import Pipeline, attribute, decompose, extract_concepts, pfv_dataset
    from gig_fast.report import publish

    t0 = time.perf_counter()
    pipe = Pipeline(config(explain, out))
    loaded, load_peak = _rss_mib(), _hwm_mib()  # before the first reset: torch, model and data loading
    pipe._check_work()
    timings, stage_peak, stage_start = {}, {}, {}
    steps = (("stage1_pfv_dataset", pfv_dataset), ("stage2_concepts", extract_concepts),
             ("stage3_decomposition", decompose), ("stage4_gig", attribute))
    for name, stage in steps:
        stage_start[name] = round(_reset_hwm(), 1)
        t1 = time.perf_counter()
        stage(pipe)
        timings[name] = round(time.perf_counter() - t1, 2)
        stage_peak[name] = round(_hwm_mib(), 1)
    stage_start["outputs"] = round(_reset_hwm(), 1)
    pipe._write_outputs(timings)  # graph.json (streamed), metrics.json
    publish(pipe)  # report.html, concept_samples/ (as gig-fast run does)
    stage_peak["outputs"] = round(_hwm_mib(), 1)
    m = json.loads((Path(out) / "metrics.json").read_text())
    # (ru_maxrss and /usr/bin/time follow the resets: the process peak is the max of these)
    return {"explain_images": explain, "peak_rss_mib": max(load_peak, *stage_peak.values()),
            "peak_rss_loading_mib": round(load_peak, 1), "rss_after_load_mib": round(loaded, 1),
            "peak_rss_per_step_mib": stage_peak, "rss_at_step_start_mib": stage_start,
            "graph_json_mib": round((Path(out) / "graph.json").stat().st_size / 2**20, 1),
            "wall_s": round(time.perf_counter() - t0, 1), "timings_s": m["timings_s"]}


def old_graph(explain: int, out: str) -> dict:
    """The previous way: the whole graph (every image's entry) as one dict, then one json.dumps."""
    from gig_fast.pipeline import Pipeline, build_graph
    from gig_fast.pipeline.files import save_json

    pipe = Pipeline(config(explain, out))
    before = _reset_hwm()
    t0 = time.perf_counter()
    save_json(Path(out) / "graph_old.json", build_graph(pipe), compact=True)
    peak, dt = _hwm_mib(), time.perf_counter() - t0
    same = (Path(out) / "graph_old.json").read_bytes() == (Path(out) / "graph.json").read_bytes()
    _reset_hwm()
    from gig_fast.pipeline import write_graph
    write_graph(pipe, Path(out) / "graph_new.json")
    return {"explain_images": explain, "rss_before_graph_mib": round(before, 1),
            "old_graph_peak_rss_mib": round(peak, 1), "old_graph_s": round(dt, 1),
            "streamed_graph_peak_rss_mib": round(_hwm_mib(), 1), "same_bytes": same}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--explain", type=int, required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--old-graph", action="store_true", help="also measure the previous graph assembly")
    ap.add_argument("--only-old-graph", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.only_old_graph:
        print(json.dumps(old_graph(args.explain, args.out)))
        return
    print(json.dumps(run(args.explain, args.out)), flush=True)
    if args.old_graph:  # a fresh process: its peak is the old assembly's alone
        subprocess.run([sys.executable, __file__, "--explain", str(args.explain), "--out", args.out,
                        "--only-old-graph"], check=True)


if __name__ == "__main__":
    main()
