"""Faithfulness of the edges: on a linear network the drop of a removal equals GIG exactly; on a tiny run
the validation's drops equal a per-image recomputation through ``Run.intervene``."""
import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from gig_fast import ClassTarget, ConceptTarget, Run, gig
from gig_fast.models.fx_adapter import FXAdapter
from gig_fast.pipeline import Pipeline
from gig_fast.validation import ValidationOptions, validate
from gig_fast.validation.baselines import ours
from gig_fast.validation.experiments import flat_codes
from gig_fast.validation.faithfulness import class_edges, transition_summary

from test_interventions import TwoMaps, _orthonormal, C, H, W, N_CLASSES
from test_pipeline import tiny_config, tiny_data, tiny_model


def test_on_a_linear_network_the_removal_drop_is_the_gig_weight(seed):
    g = torch.Generator().manual_seed(seed)
    model = TwoMaps(*(torch.randn(*s, generator=g, dtype=torch.float64) for s in ((C, C), (C, C), (N_CLASSES, C),
                                                                                   (N_CLASSES,)))).eval()
    adapter = FXAdapter(model, points=["a", "b"])
    dec_a = ours(_orthonormal(g) * 2.0, torch.randn(C, generator=g, dtype=torch.float64), 0.05, "lasso", False)
    dec_b = ours(_orthonormal(g), torch.randn(C, generator=g, dtype=torch.float64), 0.05, "lasso", False)
    pipe = SimpleNamespace(adapter=adapter, config=SimpleNamespace(class_probability=False))
    x = torch.randn(5, C, H, W, generator=g, dtype=torch.float64)
    with torch.no_grad():
        Xa = model.a(x)
    _, idx, val = flat_codes(dec_a, Xa)
    c = 1
    for b, targets in (("b", [0, 2, 3]), (None, [c])):
        edges = [{"source": ["a", q], "target": [b or "classes", t], "weight": 0.0} for q in range(C) for t in targets]
        got = class_edges(pipe, "a", b, dec_a, dec_b if b else None, Xa, c, edges)
        f_ab = adapter.f_ab("a", b)
        tgt = [ConceptTarget(dec_b.V[t]) for t in targets] if b else [ClassTarget(c, probability=False)]
        res = gig(f_ab, (idx, val), dec_a.V, dec_a.bias, tgt, spatial=(H, W), steps=4)
        gig_w = res.per_concept.detach().double().reshape(len(targets), -1, C).sum(1)  # [T, K]: Σ over images
        for (q, t, _, drop_t, drop_c), e in zip(got, edges):
            assert drop_t == pytest.approx(float(gig_w[targets.index(t), q]), rel=1e-9, abs=1e-9), (b, q, t)
            assert (drop_c is None) == (b is None)
        summary = transition_summary([[q, t, float(gig_w[targets.index(t), q]), d, dc] for q, t, _, d, dc in got])
        assert summary["target"]["sign_agreement"] == 1.0 and summary["target"]["magnitude_ratio"] == pytest.approx(1.0)
        assert summary["target"]["spearman"] == pytest.approx(1.0)


def test_summary_by_hand():
    edges = [[0, 0, 1.0, 2.0, -1.0], [1, 0, 2.0, 3.0, 1.0], [2, 0, -1.0, 1.0, 0.5], [3, 0, 0.0, 5.0, 5.0]]
    s = transition_summary(edges)
    assert s["edges"] == 3  # the weight-0 edge is left out
    assert s["target"]["spearman"] == pytest.approx(1.0) and s["target"]["sign_agreement"] == pytest.approx(2 / 3)
    assert s["target"]["magnitude_ratio"] == pytest.approx(6.0 / 4.0)
    assert s["code"]["spearman"] == pytest.approx(0.5) and s["code"]["sign_agreement"] == pytest.approx(1 / 3)


@pytest.fixture(scope="module")
def faithful(tmp_path_factory):
    root = tmp_path_factory.mktemp("faithful")
    pipe = Pipeline(tiny_config(root / "run"), model=tiny_model(), dataset=tiny_data())
    out = pipe.run()
    doc = validate(pipe, ValidationOptions(experiments=["faithfulness"], faithfulness_images=2, progress=False))
    return out, doc


def test_the_validation_drops_equal_run_intervene_image_by_image(faithful):
    out, doc = faithful
    res = doc["faithfulness"]
    graph = json.loads((out / "graph.json").read_text())
    assert res["classes"] == sorted(int(c) for c in graph["class_graphs"])
    run = Run.open(out, model=tiny_model(), dataset=tiny_data())
    probability = run.config.class_probability
    checked = 0
    for c, per in res["per_class"].items():
        x, _ = run.load_dataset_images(per["images"])
        assert len(per["images"]) == 2
        for key, edges in per["edges"].items():
            a, b = key.split("->")
            want_edges = [e for e in graph["class_graphs"][c]["edges"] if e["source"][0] == a and e["target"][0] == b]
            assert [(q, t, w) for q, t, w, _, _ in edges] == [(e["source"][1], e["target"][1], e["weight"]) for e in want_edges]
            for q, t, _, drop_t, drop_c in edges[:4]:
                ivs = [run.intervene(xi, [(a, q, 0.0)], targets=None if b == "classes" else [(b, t)]) for xi in x]
                if b == "classes":
                    score = (lambda r, which: float(getattr(r, f"probabilities_{which}")[t])) if probability else \
                        (lambda r, which: float(getattr(r, f"logits_{which}")[t]))
                    want = sum(score(r, "before") - score(r, "after") for r in ivs)
                    assert drop_t == pytest.approx(want, rel=1e-4, abs=1e-6)
                else:
                    want = sum(r.concepts[0].before - r.concepts[0].after for r in ivs)
                    assert drop_c == pytest.approx(want, rel=1e-3, abs=1e-5)
                checked += 1
    assert checked > 0
    md = (out / "validation.md").read_text()
    assert "## Faithfulness of the class graphs' edges" in md
    for key, s in res["transitions"].items():
        assert key in md and s["edges"] > 0
        assert -1 <= (s["target"]["spearman"] if s["target"]["spearman"] is not None else 0) <= 1
        assert 0 <= s["target"]["sign_agreement"] <= 1 and np.isfinite(s["target"]["magnitude_ratio"])
