"""Validation suite: each metric pinned on hand-computed cases, baselines, and one tiny end-to-end run."""
import json

import numpy as np
import pytest
import torch

from gig_fast.cli import main
from gig_fast.validation import (ValidationOptions, auc, class_score, concept_curve, concept_trajectory, curve_grid,
                                 edit_codes, interpolate_at, label_hits, max_projection, reconstruction_quality,
                                 step_counts, targeted_pgd, top_overlap, validate)
from gig_fast.validation import experiments as ex
from gig_fast.validation.baselines import (dictionary_objective, fit_dictionary_learning, fit_sae, load_decomposition,
                                           ours, sae_schedule)
from gig_fast.validation.metrics import dense_to_padded

from test_pipeline import tiny_config, tiny_data, tiny_model


# ------------------------------------------------------------------ curves and AUC
def test_auc_of_known_curves():
    assert auc([1.0, 1.0, 1.0]) == pytest.approx(1.0)
    # on sample positions: a step from 1 to 0 between x = 0.1 and x = 0.2, then flat
    assert auc([1.0, 1.0, 0.0, 0.0], x=[0, 0.1, 0.2, 1.0]) == pytest.approx(0.1 + 0.05)
    np.testing.assert_allclose(auc(np.array([[0.0, 1.0, 1.0], [1.0, 1.0, 1.0]]), x=[0, 0.5, 1]), [0.75, 1.0])
    for bad in ([0, 0.5, 0.4], [0.1, 0.5, 1.0], [0, 1]):
        with pytest.raises(ValueError, match="x must increase"):
            auc([1.0, 1.0, 1.0], x=bad)
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


def test_curve_grid():
    # one concept at a time over the first 5, then quarters of K = 100
    np.testing.assert_array_equal(curve_grid(100, 5, 5, 4), [0, 1, 2, 3, 4, 5, 25, 50, 75, 100])
    np.testing.assert_array_equal(curve_grid(4, 4, 20, 20), [0, 1, 2, 3, 4])
    np.testing.assert_array_equal(curve_grid(10, 0, 1, 2), [0, 5, 10])
    with pytest.raises(ValueError, match="top"):
        curve_grid(3, 5, 5, 5)


def test_label_hits_and_interpolate_at():
    logits = torch.tensor([[0.0, 2.0, 1.0], [3.0, 0.0, 0.0], [0.0, 0.0, 5.0]])
    np.testing.assert_array_equal(label_hits(logits, 1), [1.0, 0.0, 0.0])
    # rel-L2 0.5 at 2 active, 0.3 at 8: halfway in log(active) is 4 → 0.4
    np.testing.assert_allclose(interpolate_at([2, 4, 8, 1, 16], [8, 2], [0.3, 0.5]), [0.5, 0.4, 0.3, np.nan, np.nan])


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



def test_c_deletion_accuracy_curve_of_a_linear_model_by_hand():
    """Two classes, logits = (Σ X̃, −Σ X̃) over a 1×2 map; V = I₃, bias (−0.25, 0, 0) (−0.5 over both positions).
    Image 0 (class 0) has code totals 5, 2, −3 on concepts 0, 1, 2; image 1 (class 1) has −4 on concept 0 and
    1 on concept 2. The importance orders class 0's concepts (0, 1, 2) and class 1's (2, 0, 1)."""
    from types import SimpleNamespace

    V = torch.eye(3, dtype=torch.float64)
    bias = torch.tensor([-0.25, 0.0, 0.0], dtype=torch.float64)
    rest = lambda X: torch.stack([X.sum((1, 2, 3)), -X.sum((1, 2, 3))], 1)  # noqa: E731
    pipe = SimpleNamespace(adapter=SimpleNamespace(f_ab=lambda a, b: rest), num_classes=2)
    dec = SimpleNamespace(V=V, bias=bias, encode=lambda rows: dense_to_padded((rows - bias) @ torch.linalg.inv(V)))
    U = torch.zeros(2, 3, 1, 2, dtype=torch.float64)
    U[0, :, 0, 0] = torch.tensor([5.0, 2.0, 0.0])
    U[0, :, 0, 1] = torch.tensor([0.0, 0.0, -3.0])
    U[1, :, 0, 0] = torch.tensor([-4.0, 0.0, 1.0])
    X = U + bias.view(1, 3, 1, 1)
    importance = np.array([[3.0, 2.0, 1.0], [2.0, 1.0, 3.0]])
    opts = SimpleNamespace(curve_concepts=2, curve_steps=2, accuracy_steps=1, curve_batch=1)
    res = ex.c_deletion(pipe, "a", dec, X, torch.tensor([0, 1]), importance, opts)
    assert res["grid"] == [0, 1, 2, 3]
    # deletion: image 0 Σ = 3.5, −1.5, −3.5, −0.5 → hits 1, 0, 0, 0; image 1 Σ = −3.5, −4.5, −0.5, −0.5 → 1, 1, 1, 1
    np.testing.assert_allclose(res["accuracy"]["deletion"]["curve"], [1, 0.5, 0.5, 0.5])
    # insertion: image 0 Σ = −0.5, 4.5, 6.5, 3.5 → 0, 1, 1, 1; image 1 Σ = −0.5, 0.5, −3.5, −3.5 → 1, 0, 1, 1
    np.testing.assert_allclose(res["accuracy"]["insertion"]["curve"], [0.5, 0.5, 1, 1])
    x = np.array([0, 1, 2, 3]) / 3
    assert res["accuracy"]["deletion"]["x"] == pytest.approx(x.tolist())
    assert res["accuracy"]["deletion"]["auc"] == pytest.approx(auc([1, 0.5, 0.5, 0.5], x))
    assert res["accuracy"]["auc_difference"] == pytest.approx(auc([0.5, 0.5, 1, 1], x) - auc([1, 0.5, 0.5, 0.5], x))
    assert res["reconstruction_accuracy"] == 1.0
    # the probability over the top N = 2 concepts comes from the same forward passes, x = k / N
    p0 = 1 / (1 + np.exp(-2 * np.array([3.5, -1.5, -3.5])))
    p1 = 1 / (1 + np.exp(2 * np.array([-3.5, -4.5, -0.5])))
    np.testing.assert_allclose(res["probability"]["deletion"]["curve"], (p0 + p1) / 2, rtol=1e-5)
    assert res["probability"]["deletion"]["x"] == [0, 0.5, 1]
    assert res["quality"]["rel_l2"] == pytest.approx(0.0, abs=1e-12) and res["quality"]["active"] == pytest.approx(5 / 4)


def test_concept_trajectory_by_hand():
    """v = e₀; members at 0°, 20°, 40° and 60° from v in the (e₀, e₁) plane, and one at 30° towards e₂:
    the farthest is the 60° one (cos 0.5); the path from v towards it picks the in-plane members in order."""
    deg = np.deg2rad
    members = [[np.cos(deg(a)), np.sin(deg(a)), 0.0] for a in (0, 20, 40, 60)] + [[np.cos(deg(30)), 0, np.sin(deg(30))]]
    Xc = torch.tensor(members, dtype=torch.float64) * torch.tensor([[1.0], [2.0], [0.5], [3.0], [1.0]])  # norms do not matter
    tr = concept_trajectory(Xc, torch.tensor([2.0, 0.0, 0.0]), points=4)
    assert tr["farthest"] == 3 and tr["cosine_distance"] == pytest.approx(0.5)
    assert tr["path"] == [0, 1, 2, 3]  # targets at 0°, 20°, 40°, 60° of the chord: nearest are those members
    np.testing.assert_allclose(tr["path_cosine"], np.cos(deg([0, 20, 40, 60])), atol=1e-4)
    np.testing.assert_allclose(tr["coords"][2], [np.cos(deg(40)), np.sin(deg(40))], atol=1e-4)
    assert concept_trajectory(Xc[:1], torch.tensor([1.0, 0, 0]), 3)["path"] == [0]
    with pytest.raises(ValueError, match="at least one member"):
        concept_trajectory(Xc[:0], torch.tensor([1.0, 0, 0]))


# ------------------------------------------------------------------ baselines
def _planted(seed, N=400, C=8, K=12, density=0.25):
    g = torch.Generator().manual_seed(seed)
    D = torch.nn.functional.normalize(torch.randn(K, C, generator=g, dtype=torch.float64), dim=1)
    U = torch.rand(N, K, generator=g, dtype=torch.float64) * (torch.rand(N, K, generator=g) < density)
    beta = torch.randn(C, generator=g, dtype=torch.float64)
    return U @ D + beta, beta


def test_dictionary_learning_fits_with_lars_and_reaches_sklearns_objective():
    """LARS fit + Lasso-LARS codes on x − β: the objective falls at every iteration and ends as low as scikit-learn's
    own DictionaryLearning (LARS, its default start) reaches on x − β in as many iterations; the codes are Lasso
    optima (scikit-learn's coordinate-descent Lasso, tight tol, gets the same objective)."""
    from sklearn.decomposition import DictionaryLearning
    from sklearn.linear_model import Lasso

    seed = int(torch.randint(2**31, (1,)))
    X, beta = _planted(seed)
    K, iters = 10, 20
    dec = fit_dictionary_learning(X.float(), beta.float(), K, lam_rel=0.05, seed=seed, max_iter=iters, tol=0)
    info = dec.info
    assert info["fit_algorithm"] == "lars" and info["train_vectors"] == 400 and dec.V.shape == (K, 8)
    assert info["iterations"] == iters and np.all(np.diff(info["objective"]) <= 1e-9), info["objective"]
    alpha = info["alpha"]
    Xc = (X.float() - beta.float()).double().numpy()
    D = dec.state["D"]
    idx, val = dec.encode(X.float())
    U = np.zeros((len(Xc), K))
    np.add.at(U, (np.arange(len(Xc))[:, None], idx.clamp_min(0).numpy()), np.where(idx.numpy() >= 0, val.numpy(), 0))
    ours_obj = dictionary_objective(Xc, D, U, alpha)
    assert ours_obj <= info["objective"][-1] + 1e-6  # re-coding on the final atoms can only lower it
    ref = DictionaryLearning(K, alpha=alpha, fit_algorithm="lars", transform_algorithm="lasso_lars", transform_alpha=alpha,
                             max_iter=iters, tol=0, random_state=seed)
    U_ref = ref.fit_transform(Xc)
    ref_obj = dictionary_objective(Xc, ref.components_, U_ref, alpha)
    assert ours_obj <= ref_obj * 1.05, (seed, ours_obj, ref_obj)
    # the codes are Lasso optima on the learned dictionary: λ = α in ½‖x − Dᵀu‖² + λ‖u‖₁ (sklearn: α/C)
    lasso = Lasso(alpha=alpha / Xc.shape[1], fit_intercept=False, tol=1e-12, max_iter=100000)
    U_cd = np.stack([lasso.fit(D.T, x).coef_ for x in Xc[:40]])
    cd_obj = dictionary_objective(Xc[:40], D, U_cd, alpha)
    assert dictionary_objective(Xc[:40], D, U[:40], alpha) == pytest.approx(cd_obj, rel=1e-4), seed
    with pytest.raises(ValueError, match="more training PFVs than atoms"):
        fit_dictionary_learning(X[:10].float(), beta.float(), 10, 0.1)


def test_sae_schedule_and_eq11_loss():
    # 100 steps: λ reaches full strength after 5 steps; the rate falls linearly over the last 20
    assert sae_schedule(0, 100) == (0.2, 1.0) and sae_schedule(4, 100)[0] == 1.0 and sae_schedule(79, 100)[1] == 1.0
    assert sae_schedule(80, 100)[1] == pytest.approx(1.0) and sae_schedule(90, 100)[1] == pytest.approx(0.5)
    seed = int(torch.randint(2**31, (1,)))
    X, _ = _planted(seed, N=300, C=6, K=8, density=0.2)
    dec = fit_sae(X.float(), 16, lam=0.2, steps=3000, batch_size=64, lr=3e-3, seed=seed)
    info = dec.info
    curve = info["loss_curve"]
    assert len(curve["step"]) == 50 and curve["step"][-1] == 3000 and curve["loss"][-1] < 0.2 * curve["loss"][0]
    # trained to a plateau: ≤ 0.011 on 8 seeds at 3000 steps (0.012–0.054 at 1500, still falling)
    assert info["converged_rel_change"] < 0.03, (seed, info["converged_rel_change"])
    # encode/decode are Eq. 11's f and x̂, in the raw PFV scale: recompute the loss by hand from the weights
    st = {k: torch.as_tensor(v, dtype=torch.float32) for k, v in dec.state.items()}
    s = float(st["scale"])
    Xs = X.float() * s
    f = torch.relu(Xs @ st["We"].T + st["be"])
    xh = f @ st["Wd"].T + st["bd"]
    idx, val = dec.encode(X.float())
    from gig_fast.ops import sparse_reconstruct
    torch.testing.assert_close(sparse_reconstruct(idx, val, dec.V, dec.bias) * s, xh, rtol=1e-4, atol=1e-4)
    full = float(((Xs - xh) ** 2).sum(1).mean() + 0.2 * (f * st["Wd"].norm(dim=0)).sum(1).mean())
    assert full == pytest.approx(np.mean(curve["loss"][-5:]), rel=0.15), seed  # the logged mini-batch means
    # a stronger λ, started from this SAE: fewer active units
    more = fit_sae(X.float(), 16, lam=1.0, steps=300, batch_size=64, lr=3e-3, seed=seed, init=dec)
    act = lambda d: float((d.encode(X.float())[0] >= 0).sum(1).double().mean())  # noqa: E731
    assert act(more) < act(dec) and more.info["started_from_lambda"] == 0.2
    with pytest.raises(ValueError, match="init"):
        fit_sae(X.float()[:, :5], 16, init=dec)


def test_baselines_reconstruct_and_reload():
    seed = int(torch.randint(2**31, (1,)))
    X, beta = _planted(seed, N=200, C=5, K=6, density=0.3)
    X, beta = X.float(), beta.float()
    from gig_fast.ops import sparse_reconstruct
    for dec in (fit_dictionary_learning(X, beta, 6, lam_rel=0.01, max_iter=20), fit_sae(X, 12, lam=0.1, steps=300)):
        idx, val = dec.encode(X)
        rec = sparse_reconstruct(idx, val, dec.V, dec.bias)
        rel = float(((X - rec).norm(dim=1) / X.norm(dim=1)).mean())
        assert dec.V.shape[1] == 5 and rel < 0.5, (seed, dec.name, rel)
        again = load_decomposition(dec.name, {k: np.asarray(v) for k, v in dec.state.items()}, dec.info)
        i2, v2 = again.encode(X)
        torch.testing.assert_close(sparse_reconstruct(i2, v2, again.V, again.bias), rec)
        assert again.info == dec.info
    with pytest.raises(ValueError, match="unknown baseline"):
        load_decomposition("pca", {})


def test_decomposition_quality_counts_active_concepts():
    V = torch.eye(3)
    dec = ours(V, torch.zeros(3), lam=0.5)
    rows = torch.tensor([[4.0, 0.1, 0.0], [3.0, 3.0, 0.2]])
    q = ex.decomposition_quality(dec, rows)
    # relative λ = 0.5·max|x|: row 0 keeps only concept 0 (4 − 2), row 1 keeps 0 and 1 (3 − 1.5 each)
    assert q["active"] == pytest.approx(1.5) and q["l0_ratio"] == pytest.approx(1 - 1.5 / 3)
    rel0 = np.linalg.norm([2.0, 0.1, 0.0]) / np.linalg.norm([4.0, 0.1, 0.0])
    rel1 = np.linalg.norm([1.5, 1.5, 0.2]) / np.linalg.norm([3.0, 3.0, 0.2])
    assert q["rel_l2"] == pytest.approx((rel0 + rel1) / 2, rel=1e-5)


# ------------------------------------------------------------------ adversarial attack
def fitted_tiny_model():
    """The tests' tiny net with its classifier refitted (least squares on its features) to tell the 24 tiny
    images' 3 classes apart: the random net predicts one class for every input by a margin of ~300, which
    no attack within a sane radius moves."""
    m = tiny_model()
    x, y = tiny_data().tensors
    feats = []
    hook = m.fc.register_forward_hook(lambda mod, inp, out: feats.append(inp[0]))
    with torch.no_grad():
        m(x)
    hook.remove()
    F = torch.cat([feats[0], torch.ones(len(x), 1)], 1).double()
    W = torch.linalg.lstsq(F, 10 * torch.nn.functional.one_hot(y, 3).double()).solution
    m.fc.weight.data, m.fc.bias.data = W[:-1].T.float().contiguous(), W[-1].float()
    return m.eval()


def test_targeted_pgd_matches_captum_and_reaches_the_target():
    from captum.robust import PGD

    model = fitted_tiny_model()
    g = torch.Generator().manual_seed(int(torch.randint(2**31, (1,))))
    x = tiny_data().tensors[0] + 0.1 * torch.randn(24, 1, 28, 28, generator=g)
    with torch.no_grad():
        target = model(x).argmin(1)  # each image's least likely class
    ref = PGD(model, torch.nn.CrossEntropyLoss(reduction="none"), lower_bound=-2.0, upper_bound=2.5).perturb(
        x, radius=0.3, step_size=0.02, step_num=15, target=target, targeted=True)
    adv, info = targeted_pgd(model, x, target, eps=0.3, step_size=0.02, steps=15, lower=-2.0, upper=2.5,
                             stop_at_target=False)
    torch.testing.assert_close(adv, ref, rtol=0, atol=1e-6)
    assert (info["steps"] == 15).all()
    x = x.clamp(-2.0, 2.5)
    adv, info = targeted_pgd(model, x, target, eps=1.0, step_size=0.05, steps=200, lower=-2.0, upper=2.5)
    with torch.no_grad():
        pred = model(adv).argmax(1)
    assert info["success"].all() and (pred == target).all(), info["steps"]
    assert float((adv - x).abs().max()) <= 1.0 + 1e-6 and float(adv.max()) <= 2.5 and float(adv.min()) >= -2.0
    torch.testing.assert_close(info["linf"], (adv - x).abs().flatten(1).amax(1))
    assert (info["steps"] < 200).all()  # stopped once there
    # one step less and the target is not reached yet (the stop is at the first step that reaches it)
    first = int(info["steps"][0])
    _, short = targeted_pgd(model, x[:1], target[:1], eps=1.0, step_size=0.05, steps=first - 1, lower=-2.0, upper=2.5)
    assert first == 0 or not bool(short["success"][0])
    with pytest.raises(ValueError, match="step_size"):
        targeted_pgd(model, x, target, eps=0.1, step_size=0, steps=3)


# ------------------------------------------------------------------ end to end
def _opts(**kw):
    base = dict(images=3, importance_images=3, inter_images=3, noise_images=6, curve_steps=4, inter_steps=4,
                accuracy_steps=4, sae_steps=40, sae_sweep_steps=20, baseline_k_factor=0.2, dl_iter=1,
                k_factors=[0.05, 0.1], lam_levels=[0.1, 0.3], sae_lambdas=[1.0, 5.0], trajectory_k_factors=[0.05, 0.1],
                attack_steps=10, attack_eps=0.5, attack_step_size=0.05, progress=False)
    base.update(kw)
    return ValidationOptions(**base)


@pytest.fixture(scope="module")
def validated(tmp_path_factory):
    """The tiny pipeline run (3 classes, layers 3.5, 4.0, 4.2, K = 4; the net with a fitted classifier, so it
    classifies the images and can be attacked), validated once with every experiment."""
    from gig_fast.pipeline import Pipeline
    from gig_fast.report import publish

    root = tmp_path_factory.mktemp("validated")
    pipe = Pipeline(tiny_config(root / "run"), model=fitted_tiny_model(), dataset=tiny_data())
    out = pipe.run()
    publish(pipe)  # the page the validation section goes into
    return out, pipe, validate(pipe, _opts())


def test_tiny_validate_writes_every_table_and_plot(validated):
    out, pipe, doc = validated
    for name in ("validation.json", "validation.md", "validation_section.html", "validation_figures.json"):
        assert (out / name).exists(), name
    plots = sorted(p.name for p in (out / "validation_plots").glob("*.png"))
    assert plots == sorted(["c_deletion_accuracy_curves.png", "c_deletion_probability_curves.png", "fig4_auc_by_layer.png",
                            "sae_loss_curves.png", "sparsity_error.png", "fig5_inter_layer_curves.png",
                            "fig5_inter_layer_auc_difference.png", "fig5_paper_transitions_curves.png",
                            "fig5_paper_transitions_auc_difference.png", "table3_k_ablation.png",
                            "noise_robustness.png", "appJ_attack.png", "appE_decomposition.png", "appI_trajectory.png"])
    saved = json.loads((out / "validation.json").read_text())
    assert saved == json.loads(json.dumps(doc)) and "crop" not in (out / "validation.json").read_text()
    assert "graph" not in saved["attack"]["attacks"][0]
    L = saved["layers"]
    assert L["layers"] == ["layer4.0", "layer4.2"] and L["baseline_layers"] == ["layer4.2"]
    assert L["dl_layers"] == ["layer4.2"] and L["paper_points"] == ["layer3.5", "layer4.2"]
    assert L["decomposition_layers"] == ["layer4.2", "layer3.5"] and L["trajectory_layer"] == "layer3.5"
    for m in ("ours", "dictionary_learning", "sae"):
        for p in (L["layers"] if m == "ours" else ["layer4.2"]):
            r = saved["c_deletion"][m][p]
            for score in ("accuracy", "probability", "probability_all"):
                assert 0 <= r[score]["deletion"]["auc"] <= 1 and 0 <= r[score]["insertion"]["auc"] <= 1
                assert r[score]["auc_difference"] == pytest.approx(r[score]["insertion"]["auc"] - r[score]["deletion"]["auc"])
            assert r["grid"][0] == 0 and r["grid"][-1] == r["K"] and len(r["probability"]["deletion"]["curve"]) == 5
    assert saved["c_deletion"]["sae"]["layer4.2"]["fit"]["loss_curve"]["step"][-1] == 40
    for m, levels in (("ours", [0.1, 0.3]), ("dictionary_learning", [0.1, 0.3]), ("sae", [1.0, 5.0])):
        pts = saved["sparsity"][m]["layer4.2"]
        assert [r["level"] for r in pts] == levels and all(r["active"] >= 0 for r in pts)
    # a larger λ gives sparser codes for the coders with a fixed dictionary
    for m in ("ours", "dictionary_learning"):
        a = [r["active"] for r in saved["sparsity"][m]["layer4.2"]]
        assert a[1] <= a[0], (m, a)
    assert set(saved["inter_layer"]) == {"images", "layer3.5->layer4.0", "layer4.0->layer4.2"}
    assert set(saved["inter_layer_paper"]) == {"images", "layer3.5->layer4.2"}
    assert saved["ablation"]["layer3.5"]["0.1"]["K"] == 3
    md = (out / "validation.md").read_text()
    for title in ("Table 1", "Table 2 —", "Table 2b", "Baselines", "Sparsity–error", "Table 3", "consecutive blocks",
                  "Fig. 5 transitions", "Noise", "adversarial attack", "PFV decomposition", "Concept trajectory"):
        assert title in md, title
    page = (out / "report.html").read_text()
    assert page.count('id="validation"') == 1 and page.count('id="gig-decompositions"') == 1


def test_c_deletion_curves_equal_a_direct_recomputation(validated):
    """The stored accuracy and probability curves of ours at layer4.2: concepts ordered by the Eq. 7 importance
    of the *held-out* images, codes edited by hand, the dense reconstruction run through the adapter's
    ``run_from`` (not the FX slice the suite uses) — the same numbers."""
    from gig_fast.pipeline.stages import load_concepts

    out, pipe, doc = validated
    cd = doc["c_deletion"]
    ids, held = cd["images"], cd["importance_images"]
    assert len(ids) == 3 and len(held) == 3 and not set(ids) & set(held)
    assert sorted(pipe.labels[ids].tolist()) == [0, 1, 2] and sorted(pipe.labels[held].tolist()) == [0, 1, 2]
    point = "layer4.2"
    c = load_concepts(pipe, point)
    cfg = pipe.config
    dec = ours(c["V"], c["beta"], cfg.lam, cfg.code_method, cfg.positive)
    with torch.enable_grad():
        Xh, yh, _ = ex.layer_inputs(pipe, held, [point])
        importance = ex.class_importance(pipe, point, dec, Xh[point], yh)  # [n_classes, K]
    X, y, _ = ex.layer_inputs(pipe, ids, [point])
    X = X[point]
    K = c["V"].shape[0]
    res = cd["ours"][point]
    grid = res["grid"]
    hits, probs = np.zeros((2, len(ids), len(grid))), np.zeros((2, len(ids), len(grid)))
    B, C, H, W = X.shape
    for i in range(len(ids)):
        rows = X[i].permute(1, 2, 0).reshape(-1, C)
        idx, val = dec.encode(rows)
        U = torch.zeros(rows.shape[0], K, dtype=torch.float64)
        U.scatter_add_(1, idx.clamp_min(0), torch.where(idx >= 0, val.double(), torch.zeros((), dtype=torch.float64)))
        order = np.argsort(-importance[int(y[i])], kind="stable")
        for j, n in enumerate(grid):
            for k, mode in enumerate(("deletion", "insertion")):
                keep = torch.zeros(K, dtype=torch.bool)
                keep[torch.from_numpy(order[:n].copy())] = True
                Ue = U * (~keep if mode == "deletion" else keep)
                Xe = (Ue @ c["V"].double() + c["beta"].double()).float().reshape(1, H, W, C).permute(0, 3, 1, 2)
                with torch.no_grad():
                    logits = pipe.adapter.run_from(point, Xe)
                hits[k, i, j] = float(logits.argmax(1) == int(y[i]))
                probs[k, i, j] = float(torch.softmax(logits, 1)[0, int(y[i])])
    for k, mode in enumerate(("deletion", "insertion")):
        np.testing.assert_allclose(res["accuracy"][mode]["curve"], hits[k].mean(0), atol=1e-6)
        np.testing.assert_allclose(res["probability_all"][mode]["curve"], probs[k].mean(0), atol=2e-4)
        assert res["accuracy"][mode]["auc"] == pytest.approx(auc(hits[k].mean(0), np.array(grid) / K), abs=1e-6)


def test_paper_transition_spans_blocks_and_ends_at_the_bias(validated):
    """layer3.5 → layer4.2 skips layer4.0/4.1: the GIG-order deletion curve starts at 1 and, with every active
    concept of layer3.5 deleted, ends at the max projection of F_ab(β) on the target over its unedited value."""
    out, pipe, doc = validated
    r = doc["inter_layer_paper"]["layer3.5->layer4.2"]
    assert r["pairs"] + r["skipped"] == 3 * 4  # 3 images × the top-4 (K = 4) targets
    assert r["gig"]["deletion"]["curve"][0] == pytest.approx(1.0) and r["gig"]["insertion"]["curve"][-1] == pytest.approx(1.0)
    assert r["deletion_auc_difference"] == pytest.approx(r["random"]["deletion"]["auc"] - r["gig"]["deletion"]["auc"])
    # both orders end with nothing but β at layer3.5: the same last value
    assert r["gig"]["deletion"]["curve"][-1] == pytest.approx(r["random"]["deletion"]["curve"][-1])
    assert r["gig"]["insertion"]["curve"][0] == pytest.approx(r["random"]["insertion"]["curve"][0])


def test_attack_graph_shares_recomputed(validated):
    from gig_fast.pipeline.selection import top_sets

    out, pipe, doc = validated
    attacks = doc["attack"]["attacks"]
    pictures = json.loads((out / "validation_figures.json").read_text())["attack"]["attacks"]
    assert len(attacks) == 3 and len({a["source"] for a in attacks}) == 3
    assert all(a["success"] and a["prediction"] == a["target"] for a in attacks)  # reached on the tiny net
    for a, pics in zip(attacks, pictures):
        assert a["target"] != a["source"] and a["clean_prediction"] == a["source"]
        assert a["linf_pixels"] <= 0.5 + 1e-5 and a["success"] == (a["prediction"] == a["target"])
        assert pics["pictures"]["attacked"].startswith("data:image/png;base64,")
        for p, r in a["layers"].items():
            tops = top_sets(pipe, p)
            q = [n["concept"] for n in r["attacked"]]
            assert r["target_share_attacked"] == pytest.approx(np.mean([x in tops[a["target"]] for x in q]))
            assert r["source_share_clean"] == pytest.approx(np.mean([x in tops[a["source"]] for x in r["clean"]]))
            assert [n["in_clean"] for n in r["attacked"]] == [x in r["clean"] for x in q]
        for key, sources in a["origins"].items():
            layer, concept = key.split("|")
            edges = [e for e in pics["graph"]["edges"] if e["target"] == [layer, int(concept)]]
            best = sorted(edges, key=lambda e: -e["weight"])[:3]
            assert [s["concept"] for s in sources] == [e["source"][1] for e in best]


def test_decomposition_cards_recomputed(validated):
    from gig_fast.explorer import check_decomposition_card
    from gig_fast.pipeline.stages import load_concepts, load_pfvs

    out, pipe, doc = validated
    cards = json.loads((out / "validation_figures.json").read_text())["decomposition"]
    for point, card in cards.items():
        check_decomposition_card(card)
        c, data = load_concepts(pipe, point), load_pfvs(pipe, point)
        x = torch.from_numpy(data["pfv"][card["row"]]).float()
        assert card["image"] == int(data["image"][card["row"]]) and card["position"] == int(data["position"][card["row"]])
        cfg = pipe.config
        idx, val = ours(c["V"], c["beta"], cfg.lam, cfg.code_method, cfg.positive).encode(x[None])
        recon = c["beta"] + val[0][idx[0] >= 0] @ c["V"][idx[0][idx[0] >= 0]]
        assert card["rel_l2"] == pytest.approx(float((x - recon).norm() / x.norm()), abs=1e-4)
        shares = [t["share"] for t in card["terms"]]
        assert shares == sorted(shares, reverse=True) and sum(shares) <= 1 + 1e-3
        for t in card["terms"]:
            v = c["V"][t["concept"]].double()
            Xc = torch.from_numpy(data["pfv"]).double() - c["beta"].double()
            cos = (Xc @ v / Xc.norm(dim=1) / v.norm()).numpy()
            np.testing.assert_allclose([s["cosine"] for s in t["samples"]], np.sort(cos)[::-1][:len(t["samples"])],
                                       atol=1e-4)
            assert all(s["crop"].startswith("data:image/png;base64,") for s in t["samples"])


def test_trajectory_follows_one_sample_across_k(validated):
    out, pipe, doc = validated
    tr = doc["trajectory"]
    assert tr["layer"] == "layer3.5" and tr["K"] == [2, 3]
    rows = [a["anchor_row"] for a in tr["anchors"]]
    assert len(rows) == len(set(rows)) >= 1
    for a in tr["anchors"]:
        assert [k["K"] for k in a["per_k"]] == [2, 3]
        for k in a["per_k"]:
            assert k["path_cosine"][-1] == pytest.approx(1 - k["cosine_distance"], abs=1e-4)
            assert min(k["path_cosine"]) == pytest.approx(k["path_cosine"][-1])
            assert k["size"] >= len(k["rows"])


def test_tiny_validate_resumes(validated, monkeypatch):
    """Every unit is on disk: nothing is computed again and the numbers are the same; other inter-layer
    options recompute only the inter-layer units."""
    from gig_fast.validation import appendix as ap

    out, pipe, doc = validated

    def boom(*a, **k):
        raise AssertionError("recomputed")
    from gig_fast.validation import faithfulness as fa

    for mod, fn in ((ex, "c_deletion"), (ex, "noise_robustness"), (ex, "decomposition_quality"),
                    (ap, "adversarial_graph"), (ap, "pfv_decomposition"), (ap, "trajectory"), (fa, "class_edges")):
        monkeypatch.setattr(mod, fn, boom)
    other = validate(pipe, _opts(inter_steps=3))
    assert len(other["inter_layer"]["layer4.0->layer4.2"]["gig"]["deletion"]["curve"]) == 4
    monkeypatch.setattr(ex, "inter_layer", boom)
    again = validate(pipe, _opts())
    for key in ("c_deletion", "sparsity", "inter_layer", "inter_layer_paper", "ablation", "noise", "attack",
                "decomposition", "trajectory", "faithfulness"):
        assert again[key] == doc[key], key
    assert (out / "report.html").read_text().count('id="validation"') == 1


def test_bad_options_and_missing_outputs(tmp_path):
    from gig_fast.pipeline import Pipeline

    with pytest.raises(ValueError, match="unknown baseline"):
        ValidationOptions(baselines=["pca"])
    with pytest.raises(ValueError, match="unknown validation option.*bogus"):
        ValidationOptions.from_dict({"bogus": 1})
    with pytest.raises(ValueError, match="images must be"):
        ValidationOptions(images=0)
    with pytest.raises(ValueError, match="unknown experiment"):
        ValidationOptions(experiments=["attack", "magic"])
    with pytest.raises(ValueError, match="sae_lambdas"):
        ValidationOptions(sae_lambdas=[1.0, 0.0])
    pipe = Pipeline(tiny_config(tmp_path / "none"), model=tiny_model(), dataset=tiny_data())
    with pytest.raises(ValueError, match="missing pipeline outputs"):
        validate(pipe, _opts())
    pipe.run()
    with pytest.raises(ValueError, match=r"unknown layer.*layer1\.0.*analysed points: layer3\.5"):
        validate(pipe, _opts(layers=["layer1.0"]))
    assert main(["validate"]) == 2
    (tmp_path / "c.yaml").write_text(f"out: {tmp_path}\nvalidation:\n  bogus: 1\n")
    assert main(["validate", "--config", str(tmp_path / "c.yaml")]) == 2
