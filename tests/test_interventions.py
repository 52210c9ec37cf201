"""Interventions: a hand-built linear network whose response to a concept edit is known in closed form,
no-op edits that give the model's logits bit for bit on a real (tiny) run, and bad edits refused by name."""
import pytest
import torch
from torch import nn

from gig_fast import Run
from gig_fast.interventions import Edit, EditError, intervene, parse_edits
from gig_fast.models.fx_adapter import FXAdapter
from gig_fast.pipeline import Pipeline

from test_pipeline import LAYERS, tiny_config, tiny_data, tiny_model

C, H, W, N_CLASSES = 4, 3, 3, 3


class TwoMaps(nn.Module):
    """``logits = fc(mean_p b(a(x)))``: two 1×1 convs (the analysed points ``a`` and ``b``) and a linear head,
    linear end to end, so an edit's effect is a matrix product."""

    def __init__(self, Wa, Wb, fc_w, fc_b):
        super().__init__()
        self.a = nn.Conv2d(C, C, 1, bias=False, dtype=torch.float64)
        self.b = nn.Conv2d(C, C, 1, bias=False, dtype=torch.float64)
        self.fc = nn.Linear(C, N_CLASSES, dtype=torch.float64)
        with torch.no_grad():
            self.a.weight.copy_(Wa[:, :, None, None])
            self.b.weight.copy_(Wb[:, :, None, None])
            self.fc.weight.copy_(fc_w)
            self.fc.bias.copy_(fc_b)

    def forward(self, x):
        return self.fc(self.b(self.a(x)).mean((2, 3)))


class ProjectionBank:
    """Concepts ``V [K, C]`` (orthonormal rows) whose code of a PFV is its projection ``(x − β)·v_q``, kept
    where ``|·| > threshold`` (so "where the concept is active" is known exactly)."""

    def __init__(self, V, beta, threshold=0.0):
        self.V, self.beta, self.threshold = V, beta, threshold

    def code(self, X):
        z = (X - self.beta) @ self.V.T
        keep = z.abs() > self.threshold
        idx = torch.where(keep, torch.arange(z.shape[1]).expand_as(z), torch.full_like(z, -1, dtype=torch.long))
        return idx, torch.where(keep, z, torch.zeros_like(z))

    def projections(self, X):
        """``[P, K]`` the codes as a dense matrix (0 where inactive)."""
        idx, val = self.code(X)
        return torch.where(idx >= 0, val, torch.zeros_like(val))


def _orthonormal(g):
    return torch.linalg.qr(torch.randn(C, C, generator=g, dtype=torch.float64))[0].T.contiguous()


@pytest.fixture
def linear_case(seed):
    """The network, its adapter, banks, an image, and ``pi``: concept j of ``a`` maps to concept pi[j] of ``b``
    (``Wb = V_bᵀ P_pi V_a``), so an edit of a-concept q reaches b-concept pi[q] and no other."""
    g = torch.Generator().manual_seed(seed)
    Va, Vb = _orthonormal(g), _orthonormal(g)
    pi = torch.randperm(C, generator=g)
    Wb = Vb[pi].T @ Va  # Wb v^a_j = v^b_{pi[j]}
    model = TwoMaps(torch.randn(C, C, generator=g, dtype=torch.float64), Wb,
                    torch.randn(N_CLASSES, C, generator=g, dtype=torch.float64),
                    torch.randn(N_CLASSES, generator=g, dtype=torch.float64)).eval()
    banks = {"a": ProjectionBank(Va, torch.randn(C, generator=g, dtype=torch.float64), threshold=0.5),
             "b": ProjectionBank(Vb, torch.randn(C, generator=g, dtype=torch.float64))}
    x = torch.randn(1, C, H, W, generator=g, dtype=torch.float64)
    return model, FXAdapter(model, points=["a", "b"]), banks, x, pi


def _rows(t):
    return t[0].permute(1, 2, 0).reshape(-1, t.shape[1])


def _logits_from_a(model, Xa_rows):
    """The head applied to a-PFVs ``[P, C]`` by hand: ``fc(mean_p Wb x_p)``."""
    Wb = model.b.weight[:, :, 0, 0]
    return model.fc(Xa_rows.mean(0) @ Wb.T)


def test_removing_a_concept_changes_what_the_linear_map_says_and_nothing_else(linear_case):
    model, adapter, banks, x, pi = linear_case
    Xa = _rows(model.a(x)).detach()
    Za = banks["a"].projections(Xa)
    q = int(Za.ne(0).sum(0).argmax())  # the concept active at the most positions
    assert 0 < int(Za[:, q].ne(0).sum()) < H * W  # active at some positions, not all: the mask matters
    res = intervene(adapter, banks, x, [("a", q, 0.0)])
    delta_a = -Za[:, q:q + 1] * banks["a"].V[q]  # [P, C]: −u_pq v_q where active, 0 elsewhere
    with torch.no_grad():
        want = _logits_from_a(model, Xa + delta_a)
        torch.testing.assert_close(res.logits_before, model(x)[0], rtol=0, atol=0)
    torch.testing.assert_close(res.logits_after, want, rtol=1e-12, atol=1e-12)
    # b's concepts: only pi[q] moves, by Σ_p ⟨v^b_{pi q}, Wb Δx_p⟩ = −Σ_p u_pq
    changes = {c.concept: c.change for c in res.concepts if c.layer == "b"}
    assert set(changes) == set(range(C)) and all(c.layer == "b" for c in res.concepts)
    for t, d in changes.items():
        expected = -float(Za[:, q].sum()) if t == int(pi[q]) else 0.0
        assert d == pytest.approx(expected, abs=1e-12), (t, d, expected)
    assert abs(changes[int(pi[q])]) > 1e-3


def test_scaling_adding_and_edits_at_two_layers_in_layer_order(linear_case):
    model, adapter, banks, x, pi = linear_case
    Xa = _rows(model.a(x)).detach()
    Za = banks["a"].projections(Xa)
    q = int(Za.ne(0).sum(0).argmax())
    Va, Vb = banks["a"].V, banks["b"].V
    Wb = model.b.weight[:, :, 0, 0].detach()
    with torch.no_grad():
        # scale by 3 where active
        res = intervene(adapter, banks, x, [Edit("a", q, factor=3.0)])
        torch.testing.assert_close(res.logits_after, _logits_from_a(model, Xa + 2.0 * Za[:, q:q + 1] * Va[q]),
                                   rtol=1e-12, atol=1e-12)
        # add at two positions, active there or not
        res = intervene(adapter, banks, x, [("a", q, [1.5, -2.0], [0, 7])])
        Xe = Xa.clone()
        Xe[0] += 1.5 * Va[q]
        Xe[7] -= 2.0 * Va[q]
        torch.testing.assert_close(res.logits_after, _logits_from_a(model, Xe), rtol=1e-12, atol=1e-12)
        # remove q at a, then double concept t at b: b's codes come from the edited activations
        t = int(pi[q])  # the b-concept the removal reaches: its codes must be the edited pass's
        Xa2 = Xa - Za[:, q:q + 1] * Va[q]
        Xb = Xa2 @ Wb.T
        Zb = banks["b"].projections(Xb)
        want = model.fc((Xb + Zb[:, t:t + 1] * Vb[t]).mean(0))
        for edits in ([("a", q, 0.0), ("b", t, 2.0)], [("b", t, 2.0), ("a", q, 0.0)]):
            res = intervene(adapter, banks, x, edits)
            assert [e.layer for e in res.edits] == ["a", "b"]
            torch.testing.assert_close(res.logits_after, want, rtol=1e-12, atol=1e-12)


def test_edits_that_change_nothing_give_the_logits_bit_for_bit(linear_case):
    model, adapter, banks, x, _ = linear_case
    with torch.no_grad():
        want = model(x)[0]
    for edits in ([], [("a", 0, 1.0)], [("b", 2, 1.0)], [("a", 1, [0.0] * (H * W))], [("a", 3, 1.0), ("b", 0, 1.0)]):
        res = intervene(adapter, banks, x, edits)
        assert torch.equal(res.logits_after, want) and torch.equal(res.logits_before, want), edits


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("interventions") / "run"
    Pipeline(tiny_config(out, concept_images=24, report_images=2), model=tiny_model(), dataset=tiny_data()).run()
    return Run.open(out, model=tiny_model(), dataset=tiny_data())


def test_no_op_edits_on_a_real_run_give_the_models_logits_bit_for_bit(tiny):
    x = tiny_data().tensors[0][3]
    with torch.no_grad():
        want = tiny.model(x[None])[0].double()
    d = tiny.decompose(x, LAYERS[0])
    active = sorted(set(d.idx[d.idx >= 0].tolist()))
    inactive = sorted(set(range(tiny.layer(LAYERS[0]).n_concepts)) - set(active))
    for edits in ([], [(LAYERS[0], active[0], 1.0)], [(LAYERS[0], active[0], 1.0), (LAYERS[1], 0, 1.0)]) + \
            (([(LAYERS[0], inactive[0], 0.0)],) if inactive else ()):
        res = tiny.intervene(x, edits)
        assert torch.equal(res.logits_after, want) and torch.equal(res.logits_before, want), edits
        assert all(c.before == c.after for c in res.concepts)
    # a real removal moves the logits, and the later concepts' codes are those of the edited pass
    res = tiny.intervene(x, [(LAYERS[0], active[0], 0.0)], targets=[LAYERS[2]])
    assert not torch.equal(res.logits_after, want)
    assert {c.layer for c in res.concepts} == {LAYERS[2]} and len(res.concepts) == tiny.layer(LAYERS[2]).n_concepts
    top = res.top_classes(2)
    assert len(top) == 2 and all(0 <= b <= 1 and 0 <= a <= 1 for _, b, a in top)
    assert res.to_dict()["edits"] == [{"layer": LAYERS[0], "concept": active[0], "factor": 0.0}]


@pytest.mark.parametrize("edit, message", [
    (("layer9.9", 0, 0.0), "unknown layer 'layer9.9'"),
    ((LAYERS[0], 99, 0.0), "concept 99 is out of range for layer3.5: valid ids are 0..3"),
    ((LAYERS[0], -1, 0.0), "concept -1 is out of range"),
    ((LAYERS[0], 1.5, 0.0), "concept 1.5 is out of range"),
    ((LAYERS[0], 0, float("nan")), "the factor of layer3.5 concept 0 must be a finite number"),
    ((LAYERS[0], 0, "half"), "must be a finite number, got 'half'"),
    ((LAYERS[0], 0, [1.0, 2.0]), "has 2 values; without positions it needs one per position (4)"),
    ((LAYERS[0], 0, [1.0, 2.0], [0]), "has 2 values for 1 positions"),
    ((LAYERS[0], 0, [1.0], [4]), "positions [4] are out of range for layer3.5: valid 0..3"),
    ((LAYERS[0], 0, [1.0, 1.0], [1, 1]), "repeat"),
    ((LAYERS[0], 0, [float("inf")], [0]), "an added coefficient of layer3.5 concept 0 must be a finite number"),
    ({"layer": LAYERS[0], "concept": 0}, "exactly one of factor and add"),
    ({"layer": LAYERS[0], "concept": 0, "scale": 2}, "unknown edit field(s) ['scale']"),
    ("layer3.5", "an edit is (layer, concept, factor)"),
])
def test_bad_edits_are_refused_by_name(edit, message):
    layers = {LAYERS[0]: (4, 4), LAYERS[1]: (4, 1)}
    with pytest.raises(EditError) as e:
        parse_edits([edit], layers)
    assert message in str(e.value)
    assert isinstance(e.value, ValueError)


def test_bad_edits_and_targets_on_a_run(tiny):
    x = tiny_data().tensors[0][0]
    with pytest.raises(EditError, match="edits must be a list"):
        tiny.intervene(x, (LAYERS[0], 0, 0.0).__str__())
    with pytest.raises(EditError, match="is not an analysed layer after layer4.0"):
        tiny.intervene(x, [(LAYERS[1], 0, 0.0)], targets=[LAYERS[0]])
    with pytest.raises(EditError, match="target concept 50 is out of range"):
        tiny.intervene(x, [(LAYERS[0], 0, 0.0)], targets=[(LAYERS[2], 50)])
    with pytest.raises(ValueError, match="image must be"):
        tiny.intervene(x[0], [])
