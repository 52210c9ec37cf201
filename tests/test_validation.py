"""Validation suite: each metric pinned on hand-computed cases, baselines, and one tiny end-to-end run."""
import json

import numpy as np
import pytest
import torch

from gig_fast.cli import main
from gig_fast.validation import (ValidationOptions, auc, class_score, concept_curve, edit_codes, max_projection,
                                 reconstruction_quality, step_counts, top_overlap, validate)
from gig_fast.validation import experiments as ex
from gig_fast.validation.baselines import fit_dictionary_learning, fit_sae, load_decomposition
from gig_fast.validation.metrics import dense_to_padded

from test_pipeline import run_tiny, tiny_config, tiny_data, tiny_model


# ------------------------------------------------------------------ curves and AUC
def test_auc_of_known_curves():
    assert auc([1.0, 1.0, 1.0]) == pytest.approx(1.0)
    assert auc(np.linspace(0, 1, 11)) == pytest.approx(0.5)
    assert auc(np.linspace(1, 0, 4)) == pytest.approx(0.5)
    assert auc([0.0, 1.0, 0.0]) == pytest.approx(0.5)
    assert auc([0.3]) == pytest.approx(0.3)
    np.testing.assert_allclose(auc(np.array([[0, 1.0], [1.0, 1.0]])), [0.5, 1.0])


def test_step_counts():
    np.testing.assert_array_equal(step_counts(20, 20), np.arange(21))
    np.testing.assert_array_equal(step_counts(10, 4), [0, 2, 5, 8, 10])  # round-half-even of 2.5 / 7.5
    np.testing.assert_array_equal(step_counts(3, 20), [0, 1, 2, 3])
    np.testing.assert_array_equal(step_counts(0, 5), [0])
    with pytest.raises(ValueError):
        step_counts(3, 0)


def test_edit_codes_by_hand():
    idx = torch.tensor([[0, 2, -1], [1, 2, 3]])
    val = torch.tensor([[1.0, 2.0, 0.0], [3.0, 4.0, 5.0]])
    order = torch.tensor([2, 1])
    d = edit_codes(idx, val, order, [0, 1, 2], "deletion")
    np.testing.assert_array_equal(d[0], val)
    np.testing.assert_array_equal(d[1], [[1, 0, 0], [3, 0, 5]])
    np.testing.assert_array_equal(d[2], [[1, 0, 0], [0, 0, 5]])
    i = edit_codes(idx, val, order, [0, 1, 2], "insertion")
    np.testing.assert_array_equal(i[0], np.zeros((2, 3)))
    np.testing.assert_array_equal(i[2], [[0, 2, 0], [3, 4, 0]])
    with pytest.raises(ValueError, match="mode"):
        edit_codes(idx, val, order, [0], "swap")


def _linear_case():
    """V = I₃, bias (0.5, 0, 0), two positions; pos0 codes (1, 2, 3) on concepts 0..2, pos1 code 4 on concept 0.
    "Rest of the network" = sum of every entry: score = Σ_p Σ_c X̃_pc, so concept totals are 5, 2, 3."""
    V = torch.eye(3, dtype=torch.float64)
    bias = torch.tensor([0.5, 0.0, 0.0], dtype=torch.float64)
    idx = torch.tensor([[0, 1, 2], [0, -1, -1]])
    val = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]], dtype=torch.float64)
    return V, bias, idx, val


def test_deletion_and_insertion_curve_of_a_linear_model_in_closed_form():
    V, bias, idx, val = _linear_case()
    rest = lambda X: X.sum((1, 2, 3))  # noqa: E731
    score = lambda out: out  # noqa: E731
    order, counts = torch.tensor([0, 2, 1]), step_counts(3, 20)
    d = concept_curve(rest, idx, val, V, bias, order, counts, "deletion", score, (1, 2))
    i = concept_curve(rest, idx, val, V, bias, order, counts, "insertion", score, (1, 2))
    np.testing.assert_allclose(d, [11, 6, 3, 1])  # 2·0.5 + 10, then −5, −3, −2
    np.testing.assert_allclose(i, [1, 6, 9, 11])
    assert auc(d) == pytest.approx(5.0) and auc(i) == pytest.approx(7.0)


def test_class_score_and_max_projection():
    logits = torch.tensor([[0.0, np.log(3.0)], [2.0, 1.0]])
    np.testing.assert_allclose(class_score(logits, 1), [0.75, 1 / (1 + np.e)], rtol=1e-6)
    np.testing.assert_allclose(class_score(logits, 0, probability=False), [0.0, 2.0])
    out = torch.zeros(1, 2, 1, 3)
    out[0, 0, 0] = torch.tensor([1.0, 5.0, -2.0])
    out[0, 1, 0] = torch.tensor([4.0, 0.0, 0.0])
    # v = (3, 4): projections (1·3 + 4·4)/5 = 3.8, 15/5 = 3, −6/5
    assert float(max_projection(out, torch.tensor([3.0, 4.0]))[0]) == pytest.approx(3.8)


def test_inter_layer_curves_on_a_linear_map_by_hand():
    """f_ab = identity, target v_t = 2·e₀; v0 = e₀, v1 = e₀ + e₁, v2 = e₂; pos0 = v0 + 2·v1 = (3, 2, 0),
    pos1 = v1 + 5·v2 = (1, 1, 5): max projection 3 before any edit."""
    V = torch.tensor([[1.0, 0, 0], [1, 1, 0], [0, 0, 1]], dtype=torch.float64)
    dec = type("D", (), {"V": V, "bias": torch.zeros(3, dtype=torch.float64)})
    idx = torch.tensor([[0, 1], [1, 2]])
    val = torch.tensor([[1.0, 2.0], [1.0, 5.0]], dtype=torch.float64)
    orders = {"gig": torch.tensor([1, 0, 2]), "random": torch.tensor([2, 0, 1])}
    got = ex._inter_pair_curves(lambda X: X, idx, val, dec, torch.tensor([2.0, 0, 0], dtype=torch.float64), orders,
                                step_counts(3, 10), (1, 2))
    np.testing.assert_allclose(got[("gig", "deletion")], [1, 1 / 3, 0, 0])
    np.testing.assert_allclose(got[("gig", "insertion")], [0, 2 / 3, 1, 1])
    np.testing.assert_allclose(got[("random", "deletion")], [1, 1, 2 / 3, 0])
    np.testing.assert_allclose(got[("random", "insertion")], [0, 0, 1 / 3, 1])
    d_gain = auc(got[("random", "deletion")]) - auc(got[("gig", "deletion")])
    i_gain = auc(got[("gig", "insertion")]) - auc(got[("random", "insertion")])
    assert d_gain == pytest.approx((0.5 + 1 + 2 / 3) / 3 - (0.5 + 1 / 3) / 3) and d_gain > 0  # 8/18
    assert i_gain == pytest.approx((2 / 3 + 1 + 0.5) / 3 - (1 / 3 + 0.5) / 3) and i_gain > 0
    # nothing projects positively on −e₀: the pair is skipped, not divided by ≤ 0
    assert ex._inter_pair_curves(lambda X: X, idx, val, dec, torch.tensor([-1.0, 0, 0], dtype=torch.float64),
                                 orders, step_counts(3, 10), (1, 2)) is None


def test_reconstruction_quality_and_top_overlap_by_hand():
    q = reconstruction_quality(torch.tensor([[3.0, 4.0], [1.0, 0.0]]), torch.tensor([[3.0, 0.0], [1.0, 0.0]]),
                               torch.tensor([1, 3]), K=4)
    assert q["rel_l2"] == pytest.approx((0.8 + 0.0) / 2) and q["l0_ratio"] == pytest.approx((0.75 + 0.25) / 2)
    assert top_overlap([5, 4, 3, 2, 1], [5, 1, 3, 4, 0], 2) == pytest.approx(0.5)  # {0,1} vs {0,3}
    assert top_overlap([5, 4, 3, 2, 1], [5, 4, 3, 2, 1], 3) == 1.0
    assert top_overlap([1, 2], [2, 1], 1) == 0.0
    with pytest.raises(ValueError):
        top_overlap([1, 2], [1, 2, 3], 1)


def test_dense_to_padded_roundtrip():
    U = torch.tensor([[0.0, 2.0, 0.0, -1.0], [0.0, 0.0, 0.0, 0.0], [3.0, 0.0, 0.0, 0.0]])
    idx, val = dense_to_padded(U)
    np.testing.assert_array_equal(idx, [[1, 3], [-1, -1], [0, -1]])
    np.testing.assert_array_equal(val, [[2, -1], [0, 0], [3, 0]])


# ------------------------------------------------------------------ baselines
def test_baselines_reconstruct_and_reload():
    g = torch.Generator().manual_seed(0)
    D = torch.nn.functional.normalize(torch.randn(6, 5, generator=g), dim=1)
    U = torch.rand(200, 6, generator=g) * (torch.rand(200, 6, generator=g) < 0.3)
    beta = torch.randn(5, generator=g)
    X = U @ D + beta
    from gig_fast.ops import sparse_reconstruct
    for dec in (fit_dictionary_learning(X, beta, 6, lam_rel=0.01, max_iter=20), fit_sae(X, 12, lam=0.1, steps=300)):
        idx, val = dec.encode(X)
        rec = sparse_reconstruct(idx, val, dec.V, dec.bias)
        rel = float(((X - rec).norm(dim=1) / X.norm(dim=1)).mean())
        assert dec.V.shape[1] == 5 and rel < 0.5, (dec.name, rel)
        again = load_decomposition(dec.name, {k: np.asarray(v) for k, v in dec.state.items()})
        i2, v2 = again.encode(X)
        torch.testing.assert_close(sparse_reconstruct(i2, v2, again.V, again.bias), rec)
    with pytest.raises(ValueError, match="unknown baseline"):
        load_decomposition("pca", {})


# ------------------------------------------------------------------ end to end
def _opts(**kw):
    base = dict(images=6, inter_images=3, noise_images=6, curve_steps=4, inter_steps=4, sae_steps=30,
                baseline_train=0, dl_iter=1, k_factors=[0.05, 0.1], progress=False)
    base.update(kw)
    return ValidationOptions(**base)


def test_tiny_validate_writes_outputs_and_resumes(tmp_path, monkeypatch):
    from gig_fast.pipeline import Pipeline

    out = run_tiny(tmp_path / "run")
    pipe = Pipeline(tiny_config(tmp_path / "run"), model=tiny_model(), dataset=tiny_data())
    doc = validate(pipe, _opts())
    for name in ("validation.json", "validation.md", "validation_section.html"):
        assert (out / name).exists(), name
    assert len(list((out / "validation_plots").glob("*.png"))) == 6
    saved = json.loads((out / "validation.json").read_text())
    assert {"c_deletion", "inter_layer", "ablation", "noise", "timings_s", "options", "layers"} <= set(saved)
    layers = saved["layers"]["layers"]
    assert layers == ["layer4.0", "layer4.2"]  # the paper's Table-1 layers among the analysed ones
    assert saved["layers"]["baseline_layers"] == ["layer4.2"]  # one block per stage by default
    for m in ("ours", "dictionary_learning", "sae"):
        for p in (layers if m == "ours" else ["layer4.2"]):
            r = saved["c_deletion"][m][p]
            assert 0 <= r["deletion"]["auc"] <= 1 and 0 <= r["insertion"]["auc"] <= 1
            assert r["auc_difference"] == pytest.approx(r["insertion"]["auc"] - r["deletion"]["auc"])
            assert len(r["deletion"]["curve"]) == 5 and 0 <= r["quality"]["rel_l2"]
    assert set(saved["inter_layer"]) == {"images", "layer3.5->layer4.0", "layer4.0->layer4.2"}
    assert saved["ablation"]["layer3.5"]["0.1"]["K"] == 3
    assert "Table 1" in (out / "validation.md").read_text() and 'id="validation"' in (out / "report.html").read_text()
    # resume: every unit is on disk, so no experiment runs again and the results are the same; other
    # inter-layer options recompute only the inter-layer units
    def boom(*a, **k):
        raise AssertionError("recomputed")
    for fn in ("c_deletion", "noise_robustness", "ablation_point"):
        monkeypatch.setattr(ex, fn, boom)
    other = validate(pipe, _opts(inter_steps=3))
    assert len(other["inter_layer"]["layer4.0->layer4.2"]["gig"]["deletion"]["curve"]) == 4
    monkeypatch.setattr(ex, "inter_layer", boom)
    again = validate(pipe, _opts())
    for key in ("c_deletion", "inter_layer", "ablation", "noise"):
        assert again[key] == doc[key]
    assert (out / "report.html").read_text().count('id="validation"') == 1


def test_bad_options_and_missing_outputs(tmp_path):
    from gig_fast.pipeline import Pipeline

    with pytest.raises(ValueError, match="unknown baseline"):
        ValidationOptions(baselines=["pca"])
    with pytest.raises(ValueError, match="unknown validation option.*bogus"):
        ValidationOptions.from_dict({"bogus": 1})
    with pytest.raises(ValueError, match="images must be"):
        ValidationOptions(images=0)
    pipe = Pipeline(tiny_config(tmp_path / "none"), model=tiny_model(), dataset=tiny_data())
    with pytest.raises(ValueError, match="missing pipeline outputs"):
        validate(pipe, _opts())
    pipe.run()
    with pytest.raises(ValueError, match=r"unknown layer.*layer1\.0.*analysed points: layer3\.5"):
        validate(pipe, _opts(layers=["layer1.0"]))
    assert main(["validate"]) == 2
    (tmp_path / "c.yaml").write_text(f"out: {tmp_path}\nvalidation:\n  bogus: 1\n")
    assert main(["validate", "--config", str(tmp_path / "c.yaml")]) == 2
