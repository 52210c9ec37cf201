"""The pipeline's numbers, recomputed independently from the public API: a stage-3 code equals
``sparse_code`` on the same PFVs, β is the model's BN shift, the class graph's edge weights equal direct
``gig()`` calls with the stored codes and concepts, and metrics.json equals a recomputation.
(test_pipeline.py checks the artifacts' structure, resume and bad input.)"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from gig_fast import ops
from gig_fast.gig import ClassTarget, ConceptTarget, gig
from gig_fast.pipeline import Pipeline
from gig_fast.testing import dense_codes

from test_pipeline import tiny_config, tiny_data, tiny_model

pytestmark = pytest.mark.slow  # one tiny run and its recomputation: ~20 s on two cores

# graph.json rounds to 6 significant digits (half a unit of the 6th: 5e-6 relative); the recomputation
# repeats stage 4's arithmetic
GRAPH_RTOL = 5e-6


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A finished tiny run: ``(pipe, graph, metrics)``."""
    out = tmp_path_factory.mktemp("values") / "run"
    pipe = Pipeline(tiny_config(out), model=tiny_model(), dataset=tiny_data())
    pipe.run()
    graph = json.loads((out / "graph.json").read_text())
    metrics = json.loads((out / "metrics.json").read_text())
    return pipe, graph, metrics


def _concepts(pipe, layer: str) -> tuple[torch.Tensor, torch.Tensor]:
    with np.load(pipe.work / "concepts" / f"{layer}.npz", allow_pickle=False) as z:
        return torch.from_numpy(z["V"]), torch.from_numpy(z["beta"])


def _chunk_codes(path) -> dict:
    """One stage-3 file: ``image [n]``, ``label [n]``, ``prediction [n]`` and per layer ``idx``/``val`` ``[n, P, s]``."""
    with np.load(path, allow_pickle=False) as z:
        return {k: torch.from_numpy(z[k]) for k in z.files
                if k in ("image", "label", "prediction") or k.endswith("|idx") or k.endswith("|val")}


def _codes(pipe) -> dict:
    """Every explained image's stored codes (the chunks concatenated, padded to one width)."""
    chunks = [_chunk_codes(f) for f in sorted((pipe.work / "codes").glob("chunk_*.npz"))]
    out = {}
    for key in chunks[0]:
        parts = [ch[key] for ch in chunks]
        if key.endswith("|idx") or key.endswith("|val"):
            s = max(p.shape[-1] for p in parts)
            parts = [torch.nn.functional.pad(p, (0, s - p.shape[-1]), value=-1 if key.endswith("|idx") else 0.0)
                     for p in parts]
        out[key] = torch.cat(parts)
    return out


def _pfvs(pipe, images: torch.Tensor, layer: str) -> torch.Tensor:
    """``[n·P, C]`` the layer's PFVs of the given images, from a fresh forward pass."""
    x, _ = pipe.load_images(images.numpy())
    with torch.no_grad():
        v = pipe.adapter.record(x, keep="preact").preact(layer)
    return v.permute(0, 2, 3, 1).reshape(-1, v.shape[1])


def test_beta_is_the_models_bn_shift(run):
    pipe, _, _ = run
    for layer in pipe.points:
        _, beta = _concepts(pipe, layer)
        torch.testing.assert_close(beta, pipe.adapter.bn_shift(layer).float(), rtol=1e-6, atol=1e-7)


def test_stage3_codes_equal_sparse_code_on_the_same_pfvs(run):
    pipe, _, _ = run
    codes = _codes(pipe)
    for layer in pipe.points:
        V, beta = _concepts(pipe, layer)
        X = _pfvs(pipe, codes["image"], layer)
        idx, val = ops.sparse_code(X, V, bias=beta, **pipe.config.code_options())
        stored = dense_codes(codes[f"{layer}|idx"], codes[f"{layer}|val"], V.shape[0])
        torch.testing.assert_close(stored, dense_codes(idx, val, V.shape[0]), rtol=1e-5, atol=1e-6)


def _direct_gig(pipe, a: str, b: str, c: int, target):
    """``[T, K_a]`` float64: GIG of layer a's concepts summed over class c's explained images, by direct gig()
    calls on the stored codes, concepts and β, ``batch_size`` of the class's images of one chunk at a time.
    Stage 4 batches the whole chunk, so float32 rounding separates the two (within ``GRAPH_RTOL``)."""
    V, beta = _concepts(pipe, a)
    f_ab = pipe.adapter.f_ab(a, None if b == "classes" else b)
    total = torch.zeros(len(target), V.shape[0], dtype=torch.float64)
    for path in sorted((pipe.work / "codes").glob("chunk_*.npz")):
        codes = _chunk_codes(path)
        rows = torch.nonzero(codes["label"] == c).flatten()
        for r0 in range(0, len(rows), pipe.config.batch_size):
            sub = rows[r0:r0 + pipe.config.batch_size]
            res = gig(f_ab, (codes[f"{a}|idx"][sub], codes[f"{a}|val"][sub].to(V.dtype)), V, beta, target,
                      spatial=pipe.spatial[a], **pipe.config.gig_options())
            total += res.per_concept.reshape(len(target), len(sub), -1).double().sum(1)
    return total


def _class_pass_deltas(pipe, a: str) -> torch.Tensor:
    """``|delta|`` of every explained image to its own class (float64 ``[n]``), by direct gig() calls batched as
    stage 4's class pass batches them: every image of a chunk at once, ``batch_size`` at a time, each with
    its class as a per-image target. Batched per class instead, oneDNN's convolutions saw other batch
    sizes and the float32 deltas moved at 2e-5 relative on an Intel host."""
    V, beta = _concepts(pipe, a)
    f_ab = pipe.adapter.f_ab(a, None)
    deltas = []
    for path in sorted((pipe.work / "codes").glob("chunk_*.npz")):
        codes = _chunk_codes(path)
        classes = codes["label" if pipe.config.class_by == "label" else "prediction"]
        for r0 in range(0, len(classes), pipe.config.batch_size):
            sub = torch.arange(r0, min(len(classes), r0 + pipe.config.batch_size))
            target = ClassTarget(classes[sub].to(torch.int64), probability=pipe.config.class_probability)
            res = gig(f_ab, (codes[f"{a}|idx"][sub], codes[f"{a}|val"][sub].to(V.dtype)), V, beta, target,
                      spatial=pipe.spatial[a], **pipe.config.gig_options())
            deltas.append(res.delta.double().abs())
    return torch.cat(deltas)


def test_class_graph_edges_equal_direct_gig_calls(run):
    """Every edge of every class graph: its weight is Σ over the class's images of GIG(q → t), computed here
    by one gig() call per class and layer pair on the stored codes, concepts and β."""
    pipe, graph, _ = run
    checked = 0
    for cid, cg in graph["class_graphs"].items():
        c = int(cid)
        by_pair: dict[tuple[str, str], list] = {}
        for e in cg["edges"]:
            by_pair.setdefault((e["source"][0], e["target"][0]), []).append(e)
        for (a, b), edges in by_pair.items():
            targets = sorted({e["target"][1] for e in edges})
            if b == "classes":
                tgt = [ClassTarget(c, probability=pipe.config.class_probability)]
            else:
                Vb, _ = _concepts(pipe, b)
                tgt = [ConceptTarget(Vb[t]) for t in targets]
            sums = _direct_gig(pipe, a, b, c, tgt)
            for e in edges:
                want = float(sums[targets.index(e["target"][1]), e["source"][1]])
                assert e["weight"] == pytest.approx(want, rel=GRAPH_RTOL, abs=1e-12), (cid, a, b, e)
                checked += 1
    assert checked >= 3 * len(graph["class_graphs"])


def test_metrics_equal_a_recomputation(run):
    """Per layer rel-L2 and l0 ratio from the stored codes and fresh PFVs; the class transition's
    completeness from direct gig() calls; and the tiny run is complete (a sign error anywhere in GIG
    would put every delta at twice the span)."""
    pipe, _, metrics = run
    codes = _codes(pipe)
    for layer in pipe.points:
        V, beta = _concepts(pipe, layer)
        X = _pfvs(pipe, codes["image"], layer).double()
        idx, val = codes[f"{layer}|idx"].reshape(X.shape[0], -1), codes[f"{layer}|val"].reshape(X.shape[0], -1)
        recon = dense_codes(idx, val, V.shape[0]) @ V.double() + beta.double()
        rel = ((X - recon).norm(dim=1) / X.norm(dim=1).clamp_min(1e-12)).mean()
        l0 = 1 - (idx >= 0).sum(1).double().mean() / V.shape[0]
        m = metrics["layers"][layer]
        assert m["rel_l2"] == pytest.approx(float(rel), rel=1e-5) and m["pfvs"] == X.shape[0]
        assert m["l0_ratio"] == pytest.approx(float(l0), rel=1e-9)
    last = pipe.points[-1]
    deltas = _class_pass_deltas(pipe, last).numpy()
    comp = metrics["completeness"][f"{last}->classes"]
    assert comp["max_abs"] == pytest.approx(float(deltas.max()), rel=1e-9, abs=1e-15)
    assert comp["median_abs"] == pytest.approx(float(np.median(deltas)), rel=1e-9, abs=1e-15)
    for name, c in metrics["completeness"].items():  # a sign error would put the median at 2
        assert c["median_rel"] <= 0.1, (name, c)  # tiny float32 run, 3 nodes (24 when refined): 0.01–0.04
