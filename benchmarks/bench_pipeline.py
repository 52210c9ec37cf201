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
"""
from __future__ import annotations

import json
import math
import shutil
import tempfile
from pathlib import Path

import pytest
import torch

from gig_fast.models import DemoResNet, get_adapter
from gig_fast.pipeline import Pipeline, PipelineConfig
from gig_fast.srd import explain
from gig_fast.testing import randomize_bn


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
        """One run from an empty folder; returns its metrics.json."""
        out = tempfile.mkdtemp(prefix="gig_bench_pipeline_")
        try:
            cfg = PipelineConfig(model="bench", dataset="synthetic", device=self.device, backend=backend, out=out,
                                 progress=False, kmeans_mode="fast", **self.kw)
            Pipeline(cfg, model=self.model, dataset=self.data).run()
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
