"""End-to-end pipeline timing: the fast op backends vs the pipeline's pure-``torch`` path.

Same model, data, config and seed for both; each stage's time comes from the run's metrics.json.
cuda: torchvision ResNet-50 at 224×224, random weights (randomised BN statistics), 512 synthetic
images, all 16 blocks (K = C, 4 PFVs per image so K ≤ N at layer4; no iERF maps stored), a few
explained images. cpu (quick): the demo-shaped network at 28×28 on a handful of images, the last
four blocks (the torch Lasso dominates: keep the explained images few).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
if list(Path(__file__).resolve().parents[1].glob("gig_fast/_C*.so")):  # an in-place build: use the checkout
    sys.path.insert(1, str(Path(__file__).resolve().parents[1]))
from harness import record  # noqa: E402

from gig_fast.models import DemoResNet  # noqa: E402
from gig_fast.pipeline import Pipeline, PipelineConfig  # noqa: E402


def _randomise_bn(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.2, generator=g)
            m.running_var.uniform_(0.5, 2.0, generator=g)
            m.weight.data.normal_(1.0, 0.2, generator=g)
            m.bias.data.normal_(0.0, 0.2, generator=g)
    return model.eval()


def build_problem(device: str, quick: bool):
    """(model, dataset, config kwargs) for the benchmark."""
    torch.manual_seed(0)
    if device == "cuda" and not quick:
        import torchvision
        model = _randomise_bn(torchvision.models.resnet50(weights=None, num_classes=10))
        n, size, ch = 512, 224, 3
        cfg = dict(concept_images=512, pfvs_per_image=4, k_factor=1.0, explain_images=32, per_class=3,
                   gig_steps=16, batch_size=64, gig_batch_size=512, chunk_images=512, store_ierf=False)
    else:
        model = _randomise_bn(DemoResNet(base=2))
        n, size, ch = 48, 28, 1
        cfg = dict(concept_images=48, pfvs_per_image=2, k_factor=1.0, explain_images=4, per_class=0,
                   gig_steps=4, batch_size=24, chunk_images=48, store_ierf=False,
                   layers=["layer3.5", "layer4.0", "layer4.1", "layer4.2"])
    g = torch.Generator().manual_seed(1)
    data = torch.utils.data.TensorDataset(torch.randn(n, ch, size, size, generator=g), torch.arange(n) % 10)
    return model, data, cfg


def run(device: str = "cpu", quick: bool = True) -> None:
    model, data, kw = build_problem(device, quick)
    # warm-up (first-call costs of the model's convolutions) so neither timed run pays it
    from gig_fast.models import get_adapter
    from gig_fast.srd import explain
    explain(get_adapter(model.to(device)), data.tensors[0][:2].to(device))
    rows = {}
    for impl in ("torch", None):
        with tempfile.TemporaryDirectory() as out:
            cfg = PipelineConfig(model="bench", dataset="synthetic", device=device, backend=impl, out=out,
                                 progress=False, kmeans_mode="fast", **kw)
            t0 = time.perf_counter()
            Pipeline(cfg, model=model, dataset=data).run()
            total = time.perf_counter() - t0
            metrics = json.loads((Path(out) / "metrics.json").read_text())
        name = impl or "default (fastest)"
        rows[name] = {**metrics["timings_s"], "total": total}
    base = rows["torch"]
    shape = {"images": len(data), "hw": list(data.tensors[0].shape[-2:]), "concept_images": kw["concept_images"],
             "explain_images": kw["explain_images"], "steps": kw["gig_steps"]}
    for stage in base:
        for name, r in rows.items():
            ms = r[stage] * 1e3
            record(f"pipeline/{stage}", name, device, shape, {"ms": ms, "ms_p20": ms, "ms_p80": ms},
                   baseline="torch", baseline_ms=base[stage] * 1e3)
        print(f"{stage:22s} torch {base[stage]:8.2f} s   fast {rows['default (fastest)'][stage]:8.2f} s   "
              f"ratio {base[stage] / max(rows['default (fastest)'][stage], 1e-9):5.2f}×")


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true")
    a = ap.parse_args()
    run(a.device, a.quick)
