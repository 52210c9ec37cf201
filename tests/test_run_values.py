"""A finished run's class and pair graphs against an independent computation: direct ``gig()`` calls on the
stored codes and concepts give every class's concept scores (Σ over its images of GIG to its top concepts
of the layer above, or to the class), from which the top sets, node scores, shared concepts of each pair
and the edges into shared concepts follow by the rules of ``docs/graph_schema.md``, computed here.

The run (``_tiny_run``) has ``top_concepts < k``, so a class's shared concepts can lie outside its top set
and stage 4's shared pass runs (asserted). test_pipeline_values.py checks the class graphs' edges."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from gig_fast.gig import ClassTarget, ConceptTarget, gig

from _tiny_run import finished_run

pytestmark = pytest.mark.slow  # the shared tiny run (~15 s on two cores) and a few dozen gig() calls

RTOL = 1e-4  # graph.json rounds to 6 digits; stage 4 batches a chunk's classes together, here one class


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    pipe, out = finished_run(tmp_path_factory)
    return pipe, json.loads((out / "graph.json").read_text())


def _load(path, keys):
    with np.load(path, allow_pickle=False) as z:
        return {k: torch.from_numpy(z[k]) for k in keys}


def _concepts(pipe, layer):
    c = _load(pipe.work / "concepts" / f"{layer}.npz", ("V", "beta"))
    return c["V"], c["beta"]


def _direct(pipe, a, b, c, targets, tolerance_default=True):
    """``[T, K_a]`` Σ over class c's explained images of GIG(concept of a → each target), float64."""
    V, beta = _concepts(pipe, a)
    f_ab = pipe.adapter.f_ab(a, None if b == "classes" else b)
    options = pipe.config.gig_options() if tolerance_default else pipe.config.shared_gig_options()
    total = torch.zeros(len(targets), V.shape[0], dtype=torch.float64)
    for path in sorted((pipe.work / "codes").glob("chunk_*.npz")):
        z = _load(path, ("label", f"{a}|idx", f"{a}|val"))
        rows = torch.nonzero(z["label"] == c).flatten()
        if len(rows):
            res = gig(f_ab, (z[f"{a}|idx"][rows], z[f"{a}|val"][rows].to(V.dtype)), V, beta, targets,
                      spatial=pipe.spatial[a], **options)
            total += res.per_concept.reshape(len(targets), len(rows), -1).double().sum(1)
    return total


def _targets(pipe, b, c, concepts):
    if b == "classes":
        return [ClassTarget(c, probability=pipe.config.class_probability)]
    Vb, _ = _concepts(pipe, b)
    return [ConceptTarget(Vb[t]) for t in concepts]


@pytest.fixture(scope="module")
def direct_scores(run):
    """``{(layer, class): [K] score}`` and ``{layer: [n_classes, K]}`` from direct gig() calls, top-down:
    each class's top set of the layer above is taken from these scores too (not from the graph)."""
    pipe, graph = run
    pts, k = pipe.points, pipe.config.top_concepts
    classes = sorted(int(c) for c in graph["class_graphs"])
    scores = {p: np.zeros((pipe.num_classes, len(graph["concepts"][p]))) for p in pts}
    tops = {}
    for i in range(len(pts) - 1, -1, -1):
        a, b = pts[i], "classes" if i == len(pts) - 1 else pts[i + 1]
        for c in classes:
            tgt = _targets(pipe, b, c, tops.get((b, c)))
            scores[a][c] = _direct(pipe, a, b, c, tgt).sum(0).numpy()
            tops[(a, c)] = [int(q) for q in np.argsort(-scores[a][c], kind="stable")[:k]]
    return scores, tops


def test_class_graph_nodes_are_the_top_concepts_of_direct_scores(run, direct_scores):
    _, graph = run
    scores, tops = direct_scores
    for cid, cg in graph["class_graphs"].items():
        c = int(cid)
        for layer, nodes in cg["nodes"].items():
            assert [n["concept"] for n in nodes] == tops[(layer, c)], (c, layer)
            want = scores[layer][c][tops[(layer, c)]]
            got = [n["score"] for n in nodes]
            np.testing.assert_allclose(got, want, rtol=RTOL, atol=RTOL * np.abs(scores[layer][c]).max())
            np.testing.assert_allclose([n["normalized"] for n in nodes], np.abs(want) / np.abs(want).max(),
                                       rtol=RTOL, atol=1e-6)


def _shared(s1, s2, k):
    """The schema's rule, written out: min of the positive parts over their maxima, top k positive."""
    s1, s2 = np.maximum(s1, 0), np.maximum(s2, 0)
    if s1.max() <= 0 or s2.max() <= 0:
        return []
    both = np.minimum(s1 / s1.max(), s2 / s2.max())
    order = sorted(range(len(both)), key=lambda q: (-both[q], q))
    return [(q, both[q]) for q in order[:k] if both[q] > 0]


def test_pair_graphs_share_the_concepts_the_rule_picks_on_direct_scores(run, direct_scores):
    pipe, graph = run
    scores, tops = direct_scores
    assert set(graph["pair_graphs"]) == {"0-1", "0-2", "1-2"}
    outside_top = 0
    for key, pg in graph["pair_graphs"].items():
        c1, c2 = map(int, key.split("-"))
        for layer in pipe.points:
            want = _shared(scores[layer][c1], scores[layer][c2], pipe.config.top_shared)
            got = pg["shared"].get(layer, [])
            assert [s["concept"] for s in got] == [q for q, _ in want], (key, layer)
            np.testing.assert_allclose([s["score"] for s in got], [v for _, v in want], rtol=RTOL, atol=1e-6)
            outside_top += sum(q not in tops[(layer, c)] for q, _ in want for c in (c1, c2))
    assert outside_top > 0  # some shared concept lies outside a class's top set: the shared pass ran


def test_edges_into_shared_concepts_equal_direct_gig(run, direct_scores):
    """A pair graph's edges into a class's shared concepts outside its top set come from stage 4's shared
    pass (the plain fixed rule); the others from its class pass (with refinement)."""
    pipe, graph = run
    _, tops = direct_scores
    pts = pipe.points
    checked_shared, sums = 0, {}
    for key, pg in graph["pair_graphs"].items():
        for e in pg["edges"]:
            (a, q), (b, t), c = e["source"], e["target"], int(e["class"])
            in_top = b == "classes" or t in tops[(b, c)]
            if (a, c, t) not in sums:  # [K_a] GIG of every concept of a to t, over class c's images
                tgt = _targets(pipe, b, c, None if b == "classes" else [t])
                sums[(a, c, t)] = _direct(pipe, a, b, c, tgt, tolerance_default=in_top)[0]
            checked_shared += not in_top
            assert e["weight"] == pytest.approx(float(sums[(a, c, t)][q]), rel=RTOL, abs=1e-7), (key, e)
    assert checked_shared > 0 and len(pts) == 3
