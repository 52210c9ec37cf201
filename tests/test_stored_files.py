"""A finished run's stored files read directly — ``graph.json`` as JSON, the store's Parquet tables with
pyarrow, the work folder's ``.npz`` chunks with numpy — against ``docs/graph_schema.md`` and against values
recomputed here from the stage-3 codes. Ranks and orders are checked as stored (the ``Run`` API re-sorts
some of them, which would hide an off-by-one in what is written)."""
from __future__ import annotations

import json

import numpy as np
import pytest

from _tiny_run import CLASS_NAMES, finished_run

pytestmark = pytest.mark.slow  # the shared tiny run (~15 s on two cores)
pq = pytest.importorskip("pyarrow.parquet")

TOP_KEYS = {"schema", "version", "run_key", "model", "settings", "classes", "layers", "concepts", "class_graphs",
            "pairs_total", "pair_graphs", "images", "images_total", "store"}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    pipe, out = finished_run(tmp_path_factory)
    return pipe, out, json.loads((out / "graph.json").read_text(encoding="utf-8"))


def _codes(pipe) -> dict:
    """Every explained image's stage-3 codes: ``{image: {layer: (idx [P, s], val [P, s])}}`` and labels."""
    out = {}
    for path in sorted((pipe.work / "codes").glob("chunk_*.npz")):
        with np.load(path, allow_pickle=False) as z:
            for r, img in enumerate(z["image"].tolist()):
                out[img] = {p: (z[f"{p}|idx"][r], z[f"{p}|val"][r]) for p in pipe.points}
    return out


def _descending(values) -> bool:
    return all(a >= b for a, b in zip(values, values[1:]))


def test_graph_json_top_level_and_orders(run):
    pipe, _, g = run
    assert set(g) == TOP_KEYS and g["schema"] == "gig_fast.graph" and g["version"] == 2
    assert g["run_key"] == pipe.config.key() and (pipe.out / f"work-{g['run_key']}").is_dir()
    assert [c["name"] for c in g["classes"]] == CLASS_NAMES and [c["id"] for c in g["classes"]] == [0, 1, 2]
    assert [lay["name"] for lay in g["layers"]] == pipe.points + ["classes"]
    assert g["layers"][-1]["n_concepts"] == 3 and g["pairs_total"] == 3 and g["images_total"] == 6
    for layer in pipe.points:
        items = g["concepts"][layer]
        assert [c["id"] for c in items] == list(range(len(items)))
    for cid, cg in g["class_graphs"].items():
        assert list(cg["nodes"]) == list(reversed(pipe.points))  # top-down, as stored
        for layer, nodes in cg["nodes"].items():
            scores = [n["score"] for n in nodes]
            assert len(nodes) == pipe.config.top_concepts and _descending(scores), (cid, layer, scores)
            peak = max(abs(s) for s in scores)
            np.testing.assert_allclose([n["normalized"] for n in nodes], [abs(s) / peak for s in scores], rtol=1e-5)
        for a in pipe.points:  # normalized = |w| / max |w| over one layer pair of one graph
            w = [e["weight"] for e in cg["edges"] if e["source"][0] == a]
            np.testing.assert_allclose([e["normalized"] for e in cg["edges"] if e["source"][0] == a],
                                       np.abs(w) / np.abs(w).max(), rtol=1e-5)
    for img in g["images"]:  # an image's nodes: strongest (signed) first
        for layer, nodes in img["nodes"].items():
            assert _descending([n["score"] for n in nodes]), (img["id"], layer)
    ids = [img["id"] for img in g["images"]]
    assert ids == sorted(ids)


def test_store_image_nodes_keep_the_graph_order_as_rank(run):
    _, out, g = run
    nodes = pq.read_table(out / "store" / "image_nodes.parquet").to_pylist()
    for img in g["images"]:
        for layer, items in img["nodes"].items():
            rows = sorted((r for r in nodes if r["image"] == img["id"] and r["layer"] == layer), key=lambda r: r["rank"])
            assert [r["rank"] for r in rows] == list(range(1, len(items) + 1))
            assert [r["concept"] for r in rows] == [n["concept"] for n in items]


def test_store_concept_rankings_equal_a_recomputation_from_the_codes(run):
    """``concept_images.parquet``: per (layer, concept) ranks 1, 2, … with usage = Σ of the concept's code
    values over the image's positions (positive only), largest first, ties to the smaller image id;
    ``peak`` its largest code value, ``active`` the positions coding it — recomputed from the codes."""
    pipe, out, _ = run
    table = pq.read_table(out / "store" / "concept_images.parquet").to_pylist()
    codes = _codes(pipe)
    depth = json.loads((out / "store" / "store.json").read_text())["rank_depth"]
    for layer in pipe.points:
        K = len(run[2]["concepts"][layer])
        for q in range(K):
            want = []
            for img, per_layer in codes.items():
                idx, val = per_layer[layer]
                hit = idx == q
                usage = float(val[hit].sum())
                if usage > 0:
                    want.append((-usage, img, float(val[hit].max()), int(hit.any(1).sum())))
            want = sorted(want)[:depth]
            rows = [r for r in table if r["layer"] == layer and r["concept"] == q]  # stored order
            assert [r["rank"] for r in rows] == list(range(1, len(want) + 1)), (layer, q)
            assert [r["image"] for r in rows] == [w[1] for w in want], (layer, q)
            np.testing.assert_allclose([r["usage"] for r in rows], [-w[0] for w in want], rtol=1e-5)
            np.testing.assert_allclose([r["peak"] for r in rows], [w[2] for w in want], rtol=1e-6)
            assert [r["active"] for r in rows] == [w[3] for w in want]


def test_npz_chunks_follow_the_documented_layout(run):
    pipe, _, g = run
    for path in sorted((pipe.work / "codes").glob("chunk_*.npz")):
        with np.load(path, allow_pickle=False) as z:
            for layer in pipe.points:
                idx, val = z[f"{layer}|idx"], z[f"{layer}|val"]
                K = len(g["concepts"][layer])
                H, W = pipe.spatial[layer]
                assert idx.dtype == np.int64 and idx.shape == val.shape and idx.shape[:2] == (len(z["image"]), H * W)
                assert idx.min() >= -1 and idx.max() < K
                assert np.all(val[idx < 0] == 0)  # padding carries no value
    # stage 4: the first n_top targets of each class are its top set of b (the class graph's nodes of b)
    pts = pipe.points
    for i, a in enumerate(pts[:-1]):
        b = pts[i + 1]
        for path in sorted((pipe.work / "gig" / f"{a}__{b}").glob("chunk_*.npz")):
            with np.load(path, allow_pickle=False) as z:
                classes, targets, n_top = z["classes"], z["targets"], int(z["n_top"])
                assert n_top == pipe.config.top_concepts and list(classes) == sorted(set(classes.tolist()))
                assert z["class_sum"].shape[:2] == targets.shape
                for c, row in zip(classes.tolist(), targets):
                    tops = [n["concept"] for n in g["class_graphs"][str(c)]["nodes"][b]]
                    assert row[:n_top].tolist() == tops
                    rest = [t for t in row[n_top:].tolist() if t >= 0]
                    assert rest == sorted(rest) and not set(rest) & set(tops)
