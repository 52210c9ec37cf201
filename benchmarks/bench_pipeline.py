"""The pipeline end to end: the default (fastest) op backends against the pipeline on the pure-``torch`` ops.

Same model, data, configuration and seed for both routes; one timed run each (a run is seconds to
minutes), from an empty output folder (a run resumes from what it finds). Each stage's time comes
from the run's own ``metrics.json`` (``timings_s``) and is kept in ``extra_info["stages_s"]``; the results
file gets one ``pipeline/<stage>`` row per stage beside the whole run's row.

Checks: a finished run (``metrics.json``), finite per-layer rel-L2 and l0 ratio, and the default route's
rel-L2 and l0 ratio within 5% (relative) of the torch route's on every layer (the backends solve the
same problems; k-means splits may differ by rounding).

Sizes: cuda (full): torchvision ResNet-50 at 224×224, random weights (randomised BN statistics), 512
synthetic images, all 16 blocks (K = C, 4 PFVs per image so K ≤ N at layer4; no iERF maps stored), 32
explained images. CPU: the demo-shaped network at 28×28 on 48 images, the last block (smoke, quick) or
the last four (full), 1, 2 or 4 explained images (the torch Lasso dominates the torch route).

**The scale run** (a script, not a pytest benchmark): one call, time-boxed stages, rows
``pipeline_scale/<stage>`` in the results file and a JSON summary::

    python benchmarks/bench_pipeline.py --scale gpu --device cuda --budget 420 --out DIR --results FILE
    python benchmarks/bench_pipeline.py --scale cpu --budget 240 --out DIR      # the same code, small, on a CPU

``gpu``: torchvision ResNet-50 at 224×224 (random weights, randomised BN statistics, 10 classes), all
16 blocks, K = 8·C (2,048…16,384 concepts per block), the pipeline's defaults (GIG rule, steps and
adaptive refinement, top targets, λ), except ``store_ierf=False`` (the iERF maps of 20,000 samples × 16
blocks would be 32 GB of disk); up to 20,480 concept images (one PFV each: 20,480 samples) and 2,048
explained images of a lazily made synthetic set (:class:`SyntheticImages`). Each stage gets a share of
``--budget`` (:data:`SHARES`): stage 1 runs a first chunk, then as many more as its share allows (never
fewer than the largest K needs); stages 3 + 4 run a first chunk end to end, then as many chunks as
their share allows (stage 4 again over all of them: its targets are sums over every chunk). Stage 2
and the outputs are not cut (their time is reported and counted). Then the pipeline on the first
``subset`` explained images, on the same concepts, twice in child processes — the default backends and
the pure-``torch`` ones, each killed at its time box (the torch ratio is then a lower bound) — gives
the speed-up on the same images in the same run. Images/s per stage, peak GPU memory
(``max_memory_allocated``) and host memory (``VmHWM``, reset per stage) and the extrapolated wall time
of the 50,000-image graph (stages 3, 4 and the outputs scale with the explained images; stages 1–2 are
taken at 20,000 samples, scaled linearly where fewer ran) are printed and written.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch

if __name__ == "__main__":  # run as a script: this checkout's gig_fast (under pytest, conftest.py decides)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gig_fast.models import DemoResNet, get_adapter
from gig_fast.pipeline import Pipeline, PipelineConfig
from gig_fast.report import publish
from gig_fast.srd import explain
from gig_fast.testing import randomize_bn

import harness


def build_problem(size: str, device: str):
    """(model, dataset, config keyword arguments)."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    if device.startswith("cuda") and size == "full":
        import torchvision
        model = randomize_bn(torchvision.models.resnet50(weights=None, num_classes=10), g).eval()
        n, px, ch = 512, 224, 3
        cfg = dict(concept_images=512, pfvs_per_image=4, k_factor=1.0, explain_images=32, per_class=3,
                   gig_steps=16, batch_size=64, gig_batch_size=512, chunk_images=512, store_ierf=False)
    else:
        model = randomize_bn(DemoResNet(base=2), g).eval()
        n, px, ch = 48, 28, 1
        # the torch route's Lasso dominates (~30 s of a loaded quick run at two layers): one layer below full
        layers = ["layer4.2"] if size in ("smoke", "quick") else ["layer3.5", "layer4.0", "layer4.1", "layer4.2"]
        explained = {"smoke": 1, "quick": 2}.get(size, 4)
        cfg = dict(concept_images=n, pfvs_per_image=2, k_factor=1.0, explain_images=explained, per_class=0,
                   gig_steps=4, batch_size=24, chunk_images=n, store_ierf=False, layers=layers)
    data = torch.utils.data.TensorDataset(torch.randn(n, ch, px, px, generator=g), torch.arange(n) % 10)
    return model.to(device), data, cfg


class Problem:
    def __init__(self, size: str, device: str):
        self.model, self.data, self.kw = build_problem(size, device)
        self.device = device
        # first-call costs of the model's convolutions, so neither timed run pays them
        explain(get_adapter(self.model), self.data.tensors[0][:2].to(device))
        self.metrics: dict[str, dict] = {}
        self.shape = {"images": len(self.data), "hw": list(self.data.tensors[0].shape[-2:]),
                      "concept_images": self.kw["concept_images"], "explain_images": self.kw["explain_images"],
                      "steps": self.kw["gig_steps"], "layers": len(self.kw.get("layers") or []) or 16}

    def run(self, backend: str | None) -> dict:
        """One run from an empty folder, published as ``gig-fast run`` does (``report.html``); returns its
        metrics.json."""
        out = tempfile.mkdtemp(prefix="gig_bench_pipeline_")
        try:
            cfg = PipelineConfig(model="bench", dataset="synthetic", device=self.device, backend=backend, out=out,
                                 progress=False, kmeans_mode="fast", **self.kw)
            pipe = Pipeline(cfg, model=self.model, dataset=self.data)
            pipe.run()
            publish(pipe)
            return json.loads((Path(out) / "metrics.json").read_text())
        finally:
            shutil.rmtree(out, ignore_errors=True)

    def reference(self) -> dict:
        """The torch route's metrics: from its benchmark when it ran first, else from a run of its own."""
        if "torch" not in self.metrics:
            self.metrics["torch"] = self.run("torch")
        return self.metrics["torch"]

    def check(self, name: str):
        def check(metrics):
            for layer, m in metrics["layers"].items():
                assert math.isfinite(m["rel_l2"]) and 0 <= m["l0_ratio"] <= 1, f"{name}: {layer} {m}"
            self.metrics.setdefault(name, metrics)
            figures = {"completeness_max_rel": metrics.get("completeness_max_rel"),
                       "rel_l2": {k: v["rel_l2"] for k, v in metrics["layers"].items()}}
            if name != "torch":
                ref = self.reference()["layers"]
                for layer, m in metrics["layers"].items():
                    for key in ("rel_l2", "l0_ratio"):
                        rel = abs(m[key] - ref[layer][key]) / max(abs(ref[layer][key]), 1e-12)
                        assert rel <= 0.05, f"{name}: {layer} {key} {m[key]:.4f} vs torch's {ref[layer][key]:.4f}"
            return figures
        return check


@pytest.fixture(scope="module")
def problem(device, gig_size):
    return Problem(gig_size, device)


ROUTES = [("torch", "torch", "baseline"), ("default (fastest)", None, "ours")]


@pytest.mark.parametrize("impl,backend,role", ROUTES, ids=["torch", "default"])
def bench_pipeline(bench, problem, impl, backend, role):
    p = problem
    case = " ".join(f"{k}={v}" for k, v in p.shape.items())
    metrics = bench(lambda: p.run(backend), op="pipeline", impl=impl, role=role, case=case, shape=p.shape,
                    check=p.check("torch" if backend == "torch" else impl), once=True)
    bench.benchmark.extra_info["stages_s"] = metrics["timings_s"]


# ---------------------------------------------------------------------------------------------------
# The scale run: one call, time-boxed stages


@dataclasses.dataclass
class ScalePlan:
    """Sizes of a scale run; the budgets are shares of the call's ``--budget`` (:data:`SHARES`)."""
    arch: str                # "resnet50" (torchvision, 3×224×224) or "demo" (DemoResNet(base=2), 1×28×28)
    px: int
    channels: int
    concept_images: int      # at most (stage 1 stops at its share)
    explain_images: int      # at most (stages 3 + 4 stop at their share)
    chunk_images: int
    batch_size: int
    subset: int              # explained images of the default-vs-torch comparison
    classes: int = 10
    bank: int = 256          # distinct random images behind the synthetic set


PLANS = {"gpu": ScalePlan("resnet50", 224, 3, concept_images=20480, explain_images=2048, chunk_images=256,
                          batch_size=128, subset=16),
         "cpu": ScalePlan("demo", 28, 1, concept_images=1024, explain_images=128, chunk_images=32, batch_size=32,
                          subset=2, bank=64)}

# shares of the budget: stage 1, stages 3 + 4, each subset route; stage 2, the outputs and the set-up
# take the rest (not cut: reported as they come)
SHARES = {"stage1": 0.2, "stage34": 0.35, "subset": 0.1}
TARGET_IMAGES, TARGET_SAMPLES = 50_000, 20_000  # the headline graph of the scale run


class SyntheticImages(torch.utils.data.Dataset):
    """``n`` images made on the fly from a bank of ``bank`` random ones (image i: bank image ``i % bank``
    rolled by ``i // bank`` pixels), label ``i % classes``: a data set of ImageNet-val size without its
    12 GB in memory. ``targets`` lists the labels (the pipeline reads them without making images)."""

    def __init__(self, n: int, channels: int, px: int, classes: int, bank: int, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.bank = torch.randn(bank, channels, px, px, generator=g)
        self.n, self.n_classes = n, classes
        self.targets = [i % classes for i in range(n)]

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        b = len(self.bank)
        return torch.roll(self.bank[i % b], shifts=i // b, dims=-1), i % self.n_classes


def scale_problem(plan: ScalePlan, device: str):
    """(model on ``device``, data set), the same in every process that builds them."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    if plan.arch == "resnet50":
        import torchvision
        model = torchvision.models.resnet50(weights=None, num_classes=plan.classes)
    else:
        model = DemoResNet(base=2)
    model = randomize_bn(model, g).eval().to(device)
    n = max(plan.concept_images, plan.explain_images * 4)
    return model, SyntheticImages(n, plan.channels, plan.px, plan.classes, plan.bank)


def scale_config(plan: ScalePlan, device: str, out: str, backend: str | None = None) -> PipelineConfig:
    """The pipeline's defaults (K = 8·C, GIG rule/steps/refinement, top targets), all blocks; no iERF maps."""
    return PipelineConfig(model=f"bench-{plan.arch}", dataset="synthetic", device=device, backend=backend, out=out,
                          progress=False, concept_images=plan.concept_images, explain_images=plan.explain_images,
                          chunk_images=plan.chunk_images, batch_size=plan.batch_size, store_ierf=False)


def _reset_peaks(device: str) -> None:
    """Start a stage's peaks: CUDA's allocator peak, the kernel's VmHWM (Linux; else the process's)."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def _peaks(device: str) -> dict:
    out = {"peak_host_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                out["peak_host_mib"] = round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        out["peak_gpu_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return out


def _timed(device: str, fn) -> tuple[float, dict]:
    """Seconds of ``fn()`` (device work included) and its peaks."""
    _reset_peaks(device)
    t0 = time.perf_counter()
    fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - t0, _peaks(device)


def _codes_quality(pipe) -> dict:
    """Per layer the mean rel-L2 and l0 ratio of the codes in the work folder (stage 3's sums)."""
    sums: dict[str, list] = {}
    for path in sorted((pipe.work / "codes").glob("chunk_*.npz")):
        with np.load(path, allow_pickle=False) as z:
            for p in pipe.points:
                s = sums.setdefault(p, [0.0, 0.0, 0])
                s[0] += float(z[f"{p}|rel_l2_sum"].sum())
                s[1] += float(z[f"{p}|l0_sum"].sum())
                s[2] += int(z[f"{p}|count"].sum())
    return {p: {"rel_l2": a / max(n, 1), "l0_ratio": b / max(n, 1)} for p, (a, b, n) in sums.items()}


def run_scale(plan: ScalePlan, device: str, out: Path, budget: float) -> dict:
    """The scale run (see the module docstring); returns the summary."""
    from gig_fast.pipeline import attribute, decompose, extract_concepts, pfv_dataset
    from gig_fast.pipeline.stages import n_concepts

    t_call = time.perf_counter()
    remaining = lambda: budget - (time.perf_counter() - t_call)  # noqa: E731
    model, data = scale_problem(plan, device)
    explain(get_adapter(model), torch.stack([data[i][0] for i in range(2)]).to(device))  # first-call costs
    pipe = Pipeline(scale_config(plan, device, str(out / "run")), model=model, dataset=data)
    pipe._check_work()
    stages: dict[str, dict] = {}
    note = lambda: (out / "stages.json").write_text(json.dumps(stages, indent=1))  # noqa: E731 (kept if the call is cut)

    # stage 1: a first chunk, then as many as its share allows (at least the samples the largest K needs)
    concept_ids, chunk = pipe.concept_ids, plan.chunk_images
    k_max = max(n_concepts(pipe, p) for p in pipe.points)
    need = min(len(concept_ids), math.ceil(k_max / pipe.config.pfvs_per_image / chunk) * chunk)
    pipe.concept_ids = concept_ids[:chunk]
    t_first, _ = _timed(device, lambda: pfv_dataset(pipe))
    fit = int((SHARES["stage1"] * budget - t_first) / t_first) * chunk + chunk
    pipe.concept_ids = concept_ids[:min(len(concept_ids), max(need, fit))]
    t_rest, peaks = _timed(device, lambda: pfv_dataset(pipe))
    n1 = len(pipe.concept_ids)
    stages["stage1_pfv_dataset"] = {"s": t_first + t_rest, "images": n1, **peaks}
    note()

    t2, peaks = _timed(device, lambda: extract_concepts(pipe))
    stages["stage2_concepts"] = {"s": t2, "samples": n1 * pipe.config.pfvs_per_image, **peaks}
    note()

    # stages 3 + 4: one chunk end to end, then as many chunks as their share allows (stage 4 again over all)
    explain_ids = pipe.explain_ids
    pipe.explain_ids = explain_ids[:chunk]
    t3_first, pilot3 = _timed(device, lambda: decompose(pipe))
    t4_first, pilot4 = _timed(device, lambda: attribute(pipe))
    per_chunk = t3_first + t4_first
    chunks = max(1, min(math.ceil(len(explain_ids) / chunk),
                        int((min(SHARES["stage34"] * budget, remaining() - 2 * SHARES["subset"] * budget)
                             - t4_first) / per_chunk)))
    pipe.explain_ids = explain_ids[:chunks * chunk]
    n3 = len(pipe.explain_ids)
    t3_rest, peaks3 = _timed(device, lambda: decompose(pipe)) if chunks > 1 else (0.0, pilot3)
    if chunks > 1:  # the first chunk's targets were its own sums: stage 4 again over every chunk
        shutil.rmtree(pipe.work / "gig")
        t4, peaks4 = _timed(device, lambda: attribute(pipe))
    else:
        t4, peaks4 = t4_first, pilot4
    stages["stage3_decomposition"] = {"s": t3_first + t3_rest, "images": n3, **peaks3,
                                      "first_chunk": {"images": chunk, **pilot3}}
    stages["stage4_gig"] = {"s": t4, "images": n3, **peaks4, "first_chunk": {"images": chunk, "s": t4_first, **pilot4}}
    note()

    timings = {k: round(v["s"], 2) for k, v in stages.items()}
    t_out, peaks = _timed(device, lambda: pipe._write_outputs(timings))
    stages["outputs"] = {"s": t_out, "images": n3, **peaks}
    note()
    quality = _codes_quality(pipe)
    for layer, m in quality.items():  # the run's own check (the subset routes compare it with torch's)
        assert math.isfinite(m["rel_l2"]) and 0 <= m["l0_ratio"] <= 1, f"{layer}: {m}"

    # each subset route: its share, less when the stages ran over theirs (at least 20 s of timing)
    box = max(20.0, min(SHARES["subset"] * budget, remaining() / 2))
    subset = _subset_routes(plan, device, out, pipe, box)
    for v in stages.values():
        if v.get("images"):
            v["images_per_s"] = v["images"] / v["s"]
    return {"plan": dataclasses.asdict(plan), "device": device, "budget_s": budget, "layers": len(pipe.points),
            "K": {p: n_concepts(pipe, p) for p in pipe.points}, "stages": stages, "codes": quality,
            "subset": subset, "extrapolated": extrapolate(stages), "call_s": time.perf_counter() - t_call}


def extrapolate(stages: dict) -> dict:
    """Wall time of the headline graph: 50,000 explained images, 20,000 concept samples. Stages 3, 4 and
    the outputs at their measured images/s; stage 1 at its images/s to 20,000 images (one PFV each);
    stage 2 scaled linearly in the samples when fewer than 20,000 ran (k-means cost ∝ N·K per round)."""
    s1, s2 = stages["stage1_pfv_dataset"], stages["stage2_concepts"]
    est = {"stage1_pfv_dataset": TARGET_SAMPLES / s1["images"] * s1["s"],
           "stage2_concepts": s2["s"] * max(1.0, TARGET_SAMPLES / s2["samples"])}
    for name in ("stage3_decomposition", "stage4_gig", "outputs"):
        est[name] = TARGET_IMAGES / stages[name]["images"] * stages[name]["s"]
    total = sum(est.values())
    return {"images": TARGET_IMAGES, "samples": TARGET_SAMPLES, "total_s": total, "total_min": total / 60,
            "stages_s": est, "shares": {k: v / total for k, v in est.items()}}


SETUP_S = 90.0  # most seconds a subset child may take to start (imports, CUDA context, model) before its box


def _subset_routes(plan: ScalePlan, device: str, out: Path, pipe, box: float) -> dict:
    """Stages 3 + 4 on the first ``plan.subset`` explained images, on this run's concepts, with the
    default and with the pure-``torch`` backends, each in a child process killed ``box`` seconds after it
    starts timing (its set-up is not counted)."""
    res = {}
    for route in ("default", "torch"):
        report = out / f"subset_{route}.json"
        ready = report.with_suffix(".ready")
        ready.unlink(missing_ok=True)
        cmd = [sys.executable, __file__, "--subset-route", route, "--plan", plan_name(plan), "--device", device,
               "--concepts", str(pipe.work / "concepts"), "--out", str(out / f"subset_{route}"), "--report", str(report)]
        child, t0 = subprocess.Popen(cmd), time.perf_counter()
        started = None
        while child.poll() is None:
            now = time.perf_counter()
            if started is None and ready.exists():
                started = now
            if (started is None and now - t0 > SETUP_S) or (started is not None and now - started > box):
                child.kill()
                child.wait()
                break
            time.sleep(0.2)
        if child.returncode == 0:
            res[route] = json.loads(report.read_text())
        elif started is not None and child.returncode < 0:
            res[route] = {"timed_out_s": round(time.perf_counter() - started, 1)}
        else:
            raise RuntimeError(f"the {route} subset route failed (status {child.returncode}; its output is above)")
    d, t = res["default"], res["torch"]
    if "s" in d:
        if "s" in t:
            res["speedup"] = t["s"] / d["s"]
            res["check"] = _same_quality(d["codes"], t["codes"])
        else:
            res["speedup_at_least"] = t["timed_out_s"] / d["s"]
    return res


def plan_name(plan: ScalePlan) -> str:
    return next(k for k, v in PLANS.items() if v == plan)


def _same_quality(ours: dict, torch_codes: dict) -> dict:
    """The default route's per-layer rel-L2 and l0 ratio within 5% (relative) of the torch route's."""
    worst = max(abs(ours[p][key] - torch_codes[p][key]) / max(abs(torch_codes[p][key]), 1e-12)
                for p in ours for key in ("rel_l2", "l0_ratio"))
    assert worst <= 0.05, f"default vs torch codes differ by {worst:.3f} (relative) on some layer"
    return {"max_rel_diff": worst}


def subset_route(plan: ScalePlan, route: str, device: str, concepts: Path, out: Path, report: Path) -> None:
    """A child of :func:`_subset_routes`: stages 3 + 4 of one route on the first ``plan.subset`` explained
    images (the same selection as the parent's: same config and data), on the parent's concepts."""
    from gig_fast.ops import use_backend
    from gig_fast.pipeline import attribute, decompose

    model, data = scale_problem(plan, device)
    explain(get_adapter(model), torch.stack([data[i][0] for i in range(2)]).to(device))
    backend = "torch" if route == "torch" else None
    pipe = Pipeline(scale_config(plan, device, str(out), backend), model=model, dataset=data)
    shutil.copytree(concepts, pipe.work / "concepts", dirs_exist_ok=True)
    pipe.explain_ids = pipe.explain_ids[:plan.subset]
    report.with_suffix(".ready").touch()  # the parent's time box starts now
    with use_backend(backend) if backend else contextlib.nullcontext():
        t3, _ = _timed(device, lambda: decompose(pipe))
        t4, peaks = _timed(device, lambda: attribute(pipe))
    report.write_text(json.dumps({"images": plan.subset, "s": t3 + t4, "stage3_s": t3, "stage4_s": t4, **peaks,
                                  "codes": _codes_quality(pipe)}))


def scale_rows(summary: dict) -> list[dict]:
    """Results-file rows: ``pipeline_scale/<stage>`` (images/s, peaks), ``pipeline_scale/extrapolated_50k``
    and ``pipeline_scale/subset_stage3+4`` per route (the torch row is the baseline)."""
    device = summary["device"]
    meta = {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "device": harness.device_name(device),
            **harness.versions(), **harness.commit(), "threads": torch.get_num_threads()}
    plan = summary["plan"]
    shape = {"arch": plan["arch"], "hw": [plan["px"], plan["px"]], "layers": summary["layers"], "k_factor": 8,
             "samples": summary["stages"]["stage2_concepts"]["samples"],
             "explain_images": summary["stages"]["stage4_gig"]["images"], "budget_s": summary["budget_s"]}
    rows = []
    for stage, v in summary["stages"].items():
        extra = {k: v[k] for k in ("images", "images_per_s", "peak_gpu_mib", "peak_host_mib", "samples") if k in v}
        rows.append({**meta, "op": f"pipeline_scale/{stage}", "impl": "default (fastest)", "shape": shape,
                     "ms": v["s"] * 1e3, "rounds": 1, **extra})
    ex = summary["extrapolated"]
    rows.append({**meta, "op": "pipeline_scale/extrapolated_50k", "impl": "default (fastest)", "shape": shape,
                 "ms": ex["total_s"] * 1e3, "rounds": 1, "extrapolated": True,
                 "stage_shares": {k: round(v, 3) for k, v in ex["shares"].items()}})
    sub = summary["subset"]
    for route, impl in (("torch", "torch"), ("default", "default (fastest)")):
        r = sub.get(route, {})
        row = {**meta, "op": "pipeline_scale/subset_stage3+4", "impl": impl, "role": "baseline" if route == "torch" else "ours",
               "shape": {**shape, "explain_images": plan["subset"]}, "rounds": 1}
        if "s" in r:
            row.update(ms=r["s"] * 1e3, peak_gpu_mib=r.get("peak_gpu_mib"))
        else:
            row.update(ms=r.get("timed_out_s", 0) * 1e3, timed_out=True)
        if route == "default" and ("speedup" in sub or "speedup_at_least" in sub):
            row.update(baseline="torch", speedup=sub.get("speedup", sub.get("speedup_at_least")),
                       speedup_is_lower_bound="speedup" not in sub)
        rows.append(row)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="The pipeline's scale run: see the module docstring.")
    ap.add_argument("--scale", choices=sorted(PLANS), help="run the scale run of this plan")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--budget", type=float, default=420.0, help="seconds for the whole call (stages get shares)")
    ap.add_argument("--out", required=True, help="work folder (the run, the subset runs, summary.json)")
    ap.add_argument("--results", default=None, help="append the rows to this results file")
    ap.add_argument("--subset-route", choices=("default", "torch"), help=argparse.SUPPRESS)
    ap.add_argument("--plan", choices=sorted(PLANS), help=argparse.SUPPRESS)
    ap.add_argument("--concepts", help=argparse.SUPPRESS)
    ap.add_argument("--report", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.subset_route:
        subset_route(PLANS[args.plan], args.subset_route, args.device, Path(args.concepts), Path(args.out),
                     Path(args.report))
        return 0
    if not args.scale:
        ap.error("--scale PLAN is required")
    if args.device.startswith("cuda"):
        torch.backends.cudnn.allow_tf32 = False  # fp32 means fp32 (as the suite's conftest)
        torch.backends.cuda.matmul.allow_tf32 = False
    out = Path(args.out)
    if (out / "run").exists():
        shutil.rmtree(out / "run")  # a scale run times a run from nothing
    out.mkdir(parents=True, exist_ok=True)
    summary = run_scale(PLANS[args.scale], args.device, out, args.budget)
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    rows = scale_rows(summary)
    for row in rows:
        print(harness.format_row(row))
    for stage, v in summary["stages"].items():
        rate = f"{v['images_per_s']:8.1f} images/s" if "images_per_s" in v else " " * 17
        print(f"{stage:<22} {v['s']:8.1f} s {rate}  peak GPU {v.get('peak_gpu_mib', '-')} MiB, host {v['peak_host_mib']} MiB")
    sub = summary["subset"]
    if "speedup" in sub or "speedup_at_least" in sub:
        print(f"stages 3+4 on {summary['plan']['subset']} images: default {sub['speedup' if 'speedup' in sub else 'speedup_at_least']:.1f}x "
              f"{'' if 'speedup' in sub else 'at least (the torch route hit its time box) '}the pure-torch route")
    ex = summary["extrapolated"]
    print(f"extrapolated: {ex['images']:,} images, {ex['samples']:,} samples: {ex['total_min']:.1f} min "
          + ", ".join(f"{k} {v:.0%}" for k, v in ex["shares"].items()))
    if args.results:
        with open(args.results, "a") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
