"""The whole pipeline on tokens and on timm models: a timm ViT and timm CNNs (randomly initialised, small
inputs), tokens through the same ops, β of models without BN. The demo ViT: tests/test_transformer_explorer.py."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import timm  # noqa: F401  (a dependency: these tests fail, not skip, without it)
import torch

from gig_fast.models import load_model
from gig_fast.pipeline import Pipeline, PipelineConfig
from gig_fast.pipeline import stages as stages_module
from gig_fast.report import publish


def tiny_images(n=24, size=32, seed=3):
    g = torch.Generator().manual_seed(seed)
    return torch.utils.data.TensorDataset(torch.randn(n, 3, size, size, generator=g), torch.arange(n) % 3)


def tiny_config(out, layers, **kw):
    base = dict(model="timm", dataset="tiny", layers=layers, concept_images=18, explain_images=6, per_class=2,
                k=4, gig_steps=4, chunk_images=6, batch_size=6, out=str(out), progress=False,
                attribution="gradxinput", report_images=3, report_crops=3)
    base.update(kw)
    return PipelineConfig(**base)


def _work(out: Path) -> Path:
    return next(out.glob("work-*"))


class _Spy:
    """Counts the calls of an op and the row counts it saw, calling through to it."""

    def __init__(self, fn):
        self.fn, self.rows = fn, []

    def __call__(self, X, *args, **kw):
        self.rows.append(X.shape[0])
        return self.fn(X, *args, **kw)


def _check_run(out: Path, layers: list[str], positions: dict[str, int]):
    graph = json.loads((out / "graph.json").read_text())
    metrics = json.loads((out / "metrics.json").read_text())
    assert [lay["name"] for lay in graph["layers"]] == layers + ["classes"]
    assert (out / "report.html").stat().st_size > 10_000
    for layer in layers:
        m = metrics["layers"][layer]
        # ‖x − x̃‖/‖x‖ may pass 1 with a centre β away from 0 (the mean token) and only k=4 concepts
        assert np.isfinite(m["rel_l2"]) and m["rel_l2"] >= 0 and 0 <= m["l0_ratio"] <= 1
        with np.load(sorted((_work(out) / "codes").glob("chunk_*.npz"))[0]) as z:
            assert z[f"{layer}|idx"].shape[:2] == (6, positions[layer])  # one code row per position (token)
    assert len(metrics["completeness"]) == len(layers)
    return graph, metrics


def test_timm_vit_runs_the_whole_pipeline_on_tokens(tmp_path, monkeypatch):
    torch.manual_seed(0)  # timm initialises from torch's global generator
    model = load_model("timm:vit_tiny_patch16_224", image_size=32, num_classes=3)  # 2×2 patches + class token
    layers = ["blocks.3", "blocks.7", "blocks.11"]
    coder = _Spy(stages_module.sparse_code)
    monkeypatch.setattr(stages_module, "sparse_code", coder)
    pipe = Pipeline(tiny_config(tmp_path / "run", layers), model=model, dataset=tiny_images())
    assert pipe.spatial == {p: (1, 5) for p in layers}  # a token row: 1 class token + 4 patches
    out = pipe.run()
    publish(pipe)
    graph, metrics = _check_run(out, layers, positions={p: 5 for p in layers})
    print("timings (s):", metrics["timings_s"])
    # stage 3 coded every token of every explained image through the sparse coder (6 images × 5 tokens)
    assert coder.rows == [30] * len(layers)
    for layer in layers:  # β is the mean of the stage-1 PFVs (the concept dataset's mean token)
        with np.load(_work(out) / "concepts" / f"{layer}.npz") as c:
            X = stages_module.load_pfvs(pipe, layer)["pfv"]
            np.testing.assert_allclose(c["beta"], X.astype(np.float64).mean(0), rtol=1e-5, atol=1e-6)
    # the stored GIG results: completeness of every (image, target) pair within the refinement bar or refined
    for a, b in stages_module.transitions(pipe):
        with np.load(stages_module.trans_dir(pipe, a, b) / "chunk_00000.npz") as z:
            assert np.isfinite(z["class_sum"]).all() and (z["refined"] | (z["rel_delta"].max(0) <= 0.01)).all()
    # heat-maps of the report: drawn on the 2×2 patch grid (the class token lies on no patch)
    page = (out / "report.html").read_text()
    pics = json.loads(page.split('id="gig-pictures">', 1)[1].split("</script>", 1)[0])
    import base64
    import io

    from PIL import Image
    heat = next(uri for img in pics["images"].values() for uri in img["heat"].values())
    assert Image.open(io.BytesIO(base64.b64decode(heat.split(",", 1)[1]))).size == (2, 2)


def test_dropped_class_token_is_not_in_the_concept_dataset(tmp_path):
    torch.manual_seed(1)
    model = load_model("timm:vit_tiny_patch16_224", image_size=32, num_classes=3)
    layers = ["blocks.10", "blocks.11"]  # the last block: only the class token reaches the head
    pipe = Pipeline(tiny_config(tmp_path / "run", layers, class_token="drop", gig_steps=2), model=model,
                    dataset=tiny_images())
    stages_module.pfv_dataset(pipe)
    for layer in layers:
        assert stages_module.load_pfvs(pipe, layer)["position"].min() >= 1
    with pytest.raises(ValueError, match="class_token 'drop' needs store_ierf"):
        tiny_config(tmp_path, layers, class_token="drop", store_ierf=False)
    keep = Pipeline(tiny_config(tmp_path / "keep", layers), model=model, dataset=tiny_images())
    assert keep.config.key() != pipe.config.key()
    stages_module.pfv_dataset(keep)
    kept = stages_module.load_pfvs(keep, "blocks.11")
    # the head reads only the class token: it is sampled wherever it contributes positively (else uniform)
    from gig_fast.srd import gradxinput_explain
    x, y = keep.load_images(kept["image"])
    contrib = gradxinput_explain(keep.adapter, x, y, points=["blocks.11"]).contributions["blocks.11"][:, 0]
    assert (contrib[:, 1:] == 0).all()
    positive = (contrib[:, 0] > 0).numpy()
    assert positive.any() and (kept["position"][positive] == 0).all()


@pytest.mark.parametrize("name, layers, bn", [
    ("timm:resnet18", ["layer3.1", "layer4.0", "layer4.1"], True),
    ("timm:convnext_atto", ["stages.2.blocks.5", "stages.3.blocks.0", "stages.3.blocks.1"], False),
])
def test_timm_cnns_run_the_whole_pipeline(tmp_path, name, layers, bn):
    torch.manual_seed(2)
    model = load_model(name, num_classes=3)
    pipe = Pipeline(tiny_config(tmp_path / "run", layers), model=model, dataset=tiny_images())
    assert type(pipe.adapter).__name__ == "FXAdapter"  # timm's ResNet blocks are not torchvision's: FX slicing
    out = pipe.run()
    publish(pipe)
    _check_run(out, layers, positions={p: int(np.prod(pipe.spatial[p])) for p in layers})
    for layer in layers:
        with np.load(_work(out) / "concepts" / f"{layer}.npz") as c:
            if bn:  # the BN shift, as for any CNN with BN
                np.testing.assert_allclose(c["beta"], pipe.adapter.bn_shift(layer).numpy(), rtol=1e-6)
            else:  # ConvNeXt: no BN feeds its blocks' sums: the mean PFV of the concept dataset, like a ViT
                X = stages_module.load_pfvs(pipe, layer)["pfv"].astype(np.float64)
                np.testing.assert_allclose(c["beta"], X.mean(0), rtol=1e-5, atol=1e-6)
                with pytest.raises(ValueError, match="no BatchNorm, conv or linear"):
                    pipe.adapter.bn_shift(layer)
