"""Error nodes (each layer's reconstruction residual as a graph node): with them an image graph's inputs sum
to the model's real change of each target, recomputed here from the model's own forward pass and direct
gig() calls; class graphs sum their images' error nodes; older graph.json files and stores still read."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from gig_fast import Run
from gig_fast.api.types import ERROR_SOURCE
from gig_fast.gig import ClassTarget, ConceptTarget, gig
from gig_fast.pipeline import Pipeline

from test_pipeline import tiny_config, tiny_data, tiny_model

pytestmark = pytest.mark.slow  # one tiny run (~15 s on two cores)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny run with error nodes, explained by the class logit (the tiny net's softmax is saturated at
    0/1, where every change of the last layer is invisible): ``(pipe, graph)``."""
    out = tmp_path_factory.mktemp("errors") / "run"
    pipe = Pipeline(tiny_config(out, class_probability=False), model=tiny_model(), dataset=tiny_data())
    pipe.run()
    return pipe, json.loads((out / "graph.json").read_text())


def _codes(pipe, image: int, layer: str):
    for path in sorted((pipe.work / "codes").glob("chunk_*.npz")):
        with np.load(path, allow_pickle=False) as z:
            rows = np.flatnonzero(z["image"] == image)
            if rows.size:
                return torch.from_numpy(z[f"{layer}|idx"][rows]), torch.from_numpy(z[f"{layer}|val"][rows])
    raise KeyError(image)


def _concepts(pipe, layer: str):
    with np.load(pipe.work / "concepts" / f"{layer}.npz", allow_pickle=False) as z:
        return torch.from_numpy(z["V"]), torch.from_numpy(z["beta"])


def test_error_node_closes_completeness_against_the_models_real_output(run):
    """For every sampled image, transition a → b and target t of its graph: Σ over every concept of a of
    GIG(q → t) (direct gig() calls on the stored codes) + the graph's error node of a = the model's real
    change T(X) − T(β), where T(X) comes from the model's own forward pass (the logit, or the projection
    of b's real pre-activation on v_t) — not from F_ab. Without the error node the gap is far larger."""
    pipe, graph = run
    tol = pipe.config.gig_tolerance
    closed, open_gaps, shares = [], [], {}
    for g in graph["images"]:
        x, _ = pipe.load_images([g["id"]])
        with torch.no_grad():
            rec = pipe.adapter.record(x, keep="preact")
        for a, node in g["errors"].items():
            b = node["edges"][0]["target"][0]
            V, beta = _concepts(pipe, a)
            targets = [e["target"][1] for e in node["edges"]]
            if b == "classes":
                tgt = [ClassTarget(t, probability=False) for t in targets]
                real = [float(rec.logits[0, t]) for t in targets]
            else:
                Vb, _ = _concepts(pipe, b)
                tgt = [ConceptTarget(Vb[t]) for t in targets]
                Xb = rec.preact(b)[0].flatten(1)  # [C_b, P_b]
                real = [float((Vb[t] / Vb[t].norm()) @ Xb.sum(1)) for t in targets]
            idx, val = _codes(pipe, g["id"], a)
            res = gig(pipe.adapter.f_ab(a, None if b == "classes" else b), (idx, val), V, beta, tgt,
                      spatial=pipe.spatial[a], **pipe.config.gig_options())
            for i, e in enumerate(node["edges"]):
                concepts = float(res.per_concept[i].sum())
                span = real[i] - float(res.value_at_baseline[i, 0])
                # relative to F_ab's own change (real − error node), the span gig()'s bar is set on: an
                # error node larger than the real change would otherwise magnify the quadrature gap
                closed.append(abs(concepts + e["weight"] - span) / abs(span - e["weight"]))
                open_gaps.append(abs(concepts - span) / abs(span))
                shares.setdefault(f"{a}->{b}", []).append(abs(e["weight"]) / abs(span))
    assert len(closed) >= 3 * len(graph["images"])
    # the concepts' own quadrature bar (1 %), float32 folding of F_ab's BNs and graph.json's 6 digits
    assert max(closed) <= tol + 1e-3, max(closed)
    assert np.median(open_gaps) > 5 * tol, np.median(open_gaps)  # the residual matters on this run
    metrics = json.loads((pipe.out / "metrics.json").read_text())["error_nodes"]
    assert set(metrics) == set(shares)
    for key, share in shares.items():  # metrics.json's error share, from the work files
        assert metrics[key]["n"] == len(share)
        assert metrics[key]["median_share"] == pytest.approx(float(np.median(share)), rel=1e-3), key


def test_class_graph_error_node_sums_its_images(run):
    """A class graph's error node of the last layer (target: the class) is the sum of its images' error
    nodes (each image's own target there is its class); every class graph has one per layer."""
    pipe, graph = run
    last = pipe.points[-1]
    assert graph["images_total"] == len(graph["images"])  # the sample holds every image of the tiny run
    for cid, cg in graph["class_graphs"].items():
        assert set(cg["errors"]) == set(pipe.points)
        mine = [g["errors"][last]["score"] for g in graph["images"] if g["class"] == int(cid)]
        assert cg["errors"][last]["score"] == pytest.approx(sum(mine), rel=1e-5)
        assert [e["target"] for e in cg["errors"][last]["edges"]] == [["classes", int(cid)]]
        for a, node in cg["errors"].items():
            assert all(0.0 <= e["normalized"] <= 1.0 for e in node["edges"])
            assert node["score"] == pytest.approx(sum(e["weight"] for e in node["edges"]), rel=1e-5, abs=1e-9)


def test_run_reads_error_nodes_from_the_store_and_old_files(run, tmp_path):
    """``Run.image_graph`` (the store) gives the same error nodes as graph.json; a version-1 graph.json and
    a version-2 store (no error nodes) still open, with no error nodes; a newer version is refused."""
    pipe, graph = run
    opened = Run.open(pipe.out, model=pipe.model, dataset=pipe.dataset)
    g = graph["images"][0]
    errors = opened.image_graph(g["id"]).graph.errors
    assert {e.layer: e.to_dict() for e in errors} == g["errors"]
    assert all(edge.source == ERROR_SOURCE for e in errors for edge in e.edges)
    assert opened.class_graph(g["class"]).errors

    old = tmp_path / "old"
    shutil.copytree(pipe.out, old)
    old_graph = json.loads((old / "graph.json").read_text())
    old_graph["version"] = 1
    for item in [*old_graph["images"], *old_graph["class_graphs"].values()]:
        del item["errors"]
    (old / "graph.json").write_text(json.dumps(old_graph))
    manifest = json.loads((old / "store" / "store.json").read_text())
    manifest["version"] = 2
    (old / "store" / "store.json").write_text(json.dumps(manifest))
    (old / "store" / "image_errors.parquet").unlink()
    opened = Run.open(old, model=pipe.model, dataset=pipe.dataset)
    assert opened.image_graph(g["id"]).graph.errors == [] and opened.class_graph(g["class"]).errors == []
    assert opened.image_graph(g["id"]).graph.edges  # the rest as before

    old_graph["version"] = 3
    (old / "graph.json").write_text(json.dumps(old_graph))
    with pytest.raises(ValueError, match="version 3"):
        Run.open(old)


def test_error_nodes_off_writes_none(tmp_path):
    """``error_nodes: false``: no error pass, no ``errors`` in graph.json (the run key is the same)."""
    cfg = tiny_config(tmp_path / "run", error_nodes=False, explain_images=3, per_class=1)
    assert cfg.key() == cfg.replace(error_nodes=True).key()
    out = Pipeline(cfg, model=tiny_model(), dataset=tiny_data()).run()
    graph = json.loads((out / "graph.json").read_text())
    assert graph["version"] == 2 and all("errors" not in g for g in graph["images"])
    assert all("errors" not in cg for cg in graph["class_graphs"].values())


def test_explain_gives_the_same_error_nodes_as_the_pipeline(run):
    """``Run.explain`` of an explained dataset image computes its error nodes as the pipeline's pass did."""
    pipe, graph = run
    opened = Run.open(pipe.out, model=pipe.model, dataset=pipe.dataset)
    g = graph["images"][2]
    x, _ = opened.load_dataset_images([g["id"]])
    got = opened.explain(x[0], target=g["class"]).graph.to_dict()
    assert set(got["errors"]) == set(g["errors"])
    for layer, node in g["errors"].items():
        assert [e["target"] for e in got["errors"][layer]["edges"]] == [e["target"] for e in node["edges"]]
        for mine, want in zip(got["errors"][layer]["edges"], node["edges"]):
            assert mine["weight"] == pytest.approx(want["weight"], rel=1e-4, abs=1e-6 * abs(node["score"]))
