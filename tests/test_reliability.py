"""Bad and extreme inputs to the ops and the GIG engine.

The policy under test (``gig_fast/ops/__init__.py``): every public op checks the finiteness of each float
input it reads, all of them in one host sync, and answers with a ValueError that names the input; the
engine checks codes, V and β once per call; padding never reads V; every backend agrees on the edge
cases (K = 0, C = 0, B = 0, rows of extreme scale).
"""
import math

import pytest
import torch

from _grids import device_backend_pairs
from gig_fast import ClassTarget, ConceptTarget, gig
from gig_fast import ops
from gig_fast.ops import centroid_update, gig_accumulate, sparse_code, sparse_reconstruct, spherical_assign
from gig_fast.ops.reference import gig_accumulate_ref, sparse_reconstruct_backward_ref, sparse_reconstruct_ref
from gig_fast.ops.two_means import two_means_step

PAIRS = device_backend_pairs()
PAIR_IDS = [f"{b}-{d}" for d, b in PAIRS]


def _codes(P, s, K, device, pad=0.4):
    idx = torch.randint(0, K, (P, s), device=device)
    idx[torch.rand(P, s, device=device) < pad] = -1
    val = torch.where(idx >= 0, torch.randn(P, s, device=device), torch.zeros((), device=device))
    return idx, val


def _poison(t, where, value):
    t = t.clone()
    t.view(-1)[where] = value
    return t


# ------------------------------------------------------------------------------------------ NaN / Inf
NONFINITE = [float("nan"), float("inf"), -float("inf")]


@pytest.mark.parametrize("value", NONFINITE, ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("device,backend", PAIRS, ids=PAIR_IDS)
def test_sparse_reconstruct_rejects_nonfinite_inputs(device, backend, value):
    idx, val = _codes(9, 4, 6, device)
    idx[0, 0] = 2  # an active entry to poison
    V, bias = torch.randn(6, 5, device=device), torch.randn(5, device=device)
    for name, args in (("val", (idx, _poison(val, 0, value), V, bias)), ("V", (idx, val, _poison(V, 7, value), bias)),
                       ("bias", (idx, val, V, _poison(bias, 3, value)))):
        with pytest.raises(ValueError, match=rf"^{name} contains 1 NaN or infinite"):
            sparse_reconstruct(*args, backend=backend)


@pytest.mark.parametrize("value", NONFINITE, ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("device,backend", PAIRS, ids=PAIR_IDS)
def test_gig_accumulate_rejects_nonfinite_inputs(device, backend, value):
    idx, val = _codes(8, 3, 5, device)
    idx[0, 0] = 1
    grads, w, V = torch.randn(2, 4, 8, 6, device=device), torch.rand(4, device=device), torch.randn(5, 6, device=device)
    cases = {"grads": (_poison(grads, 11, value), w, idx, val, V), "weights": (grads, _poison(w, 2, value), idx, val, V),
             "val": (grads, w, idx, _poison(val, 0, value), V), "V": (grads, w, idx, val, _poison(V, 4, value))}
    for name, args in cases.items():
        with pytest.raises(ValueError, match=rf"^{name} contains 1 NaN or infinite"):
            gig_accumulate(*args, backend=backend)


@pytest.mark.parametrize("device,backend", PAIRS, ids=PAIR_IDS)
def test_other_ops_reject_nonfinite_inputs(device, backend):
    X, C = torch.randn(10, 4, device=device), torch.randn(3, 4, device=device)
    with pytest.raises(ValueError, match="^X contains 1 NaN"):
        spherical_assign(_poison(X, 5, float("nan")), C, backend=backend)
    with pytest.raises(ValueError, match="^centroids contains 1 NaN"):
        spherical_assign(X, _poison(C, 1, float("inf")), backend=backend)
    with pytest.raises(ValueError, match="^X contains 1 NaN"):
        centroid_update(_poison(X, 0, float("nan")), torch.zeros(10, dtype=torch.long, device=device), 2,
                        backend=backend)
    if backend in ("torch", "cpp", "triton"):  # sparse_code's backends
        for name, args in (("X", (_poison(X, 3, float("nan")), C, None)), ("V", (X, _poison(C, 3, float("inf")), None)),
                           ("bias", (X, C, _poison(torch.zeros(4, device=device), 1, float("nan"))))):
            with pytest.raises(ValueError, match=f"^{name} contains 1 NaN"):
                sparse_code(args[0], args[1], bias=args[2], backend=backend)
    if device == "cpu" and backend in ("torch", "cpp"):  # two_means' backends
        U = torch.nn.functional.normalize(torch.randn(10, 4, dtype=torch.float64), dim=1)
        with pytest.raises(ValueError, match="^U contains 1 NaN"):
            two_means_step(_poison(U, 2, float("nan")), torch.arange(10), torch.zeros(2, 4, dtype=torch.float64),
                           backend=backend)


def test_padding_never_reads_V_in_the_references():
    """An inf in a concept that no code uses must not become NaN through 0·inf (the compiled backends
    skip padding): the references gather padding from a zero row instead."""
    idx = torch.tensor([[1, -1], [2, -1], [-1, -1]])
    val = torch.tensor([[0.5, 0.0], [2.0, 0.0], [0.0, 0.0]])
    V = torch.randn(3, 4)
    V_inf = V.clone()
    V_inf[0] = float("inf")  # concept 0: used by no code, read by every padding entry before the fix
    bias = torch.randn(4)
    torch.testing.assert_close(sparse_reconstruct_ref(idx, val, V_inf, bias), sparse_reconstruct_ref(idx, val, V, bias))
    assert torch.isfinite(sparse_reconstruct_ref(idx, val, V_inf, bias)).all()
    g = torch.randn(3, 4)
    for a, b in zip(sparse_reconstruct_backward_ref(g, idx, val, V_inf), sparse_reconstruct_backward_ref(g, idx, val, V)):
        assert torch.equal(torch.isfinite(a), torch.isfinite(b))
    grads, w = torch.randn(2, 3, 4), torch.rand(2)
    torch.testing.assert_close(gig_accumulate_ref(grads, w, idx, val, V_inf), gig_accumulate_ref(grads, w, idx, val, V))
    # the bare compiled kernels (no input checks) agree with the reference on the same inputs
    for d, b in PAIRS:
        if d == "cpu" and b != "torch":
            out = ops.kernel("sparse_reconstruct", "cpu", b)[1](idx, val, V_inf, bias)
            torch.testing.assert_close(out, sparse_reconstruct_ref(idx, val, V_inf, bias))


def test_gig_rejects_nonfinite_codes_concepts_and_shift_before_any_work():
    torch.manual_seed(0)
    calls = []

    def f_ab(x):
        calls.append(x.shape[0])
        return x.mean(dim=(2, 3))

    idx, val = _codes(2 * 4, 3, 5, "cpu")
    idx, val = idx.reshape(2, 4, 3), val.reshape(2, 4, 3)
    idx[0, 0, 0] = 1
    V, beta = torch.randn(5, 6), torch.randn(6)
    target = ClassTarget(0, probability=False)
    for name, args in (("val", ((idx, _poison(val, 0, float("nan"))), V, beta)),
                       ("V", ((idx, val), _poison(V, 3, float("inf")), beta)),
                       ("beta", ((idx, val), V, _poison(beta, 2, float("nan"))))):
        with pytest.raises(ValueError, match=f"^{name} contains 1 NaN"):
            gig(f_ab, *args, target, steps=4)
    assert calls == []  # refused before f_ab ran


def test_gig_blames_f_ab_for_nonfinite_results():
    idx, val = _codes(8, 3, 5, "cpu", pad=0.0)
    V, beta = torch.randn(5, 6), torch.randn(6)
    with pytest.raises(ValueError, match="f_ab gives NaN/Inf"):
        gig(lambda x: x.mean(dim=(2, 3)) * float("nan"), (idx.reshape(2, 4, 3), val.reshape(2, 4, 3)), V, beta,
            ClassTarget(0, probability=False), steps=4, tolerance=None)


# ------------------------------------------------------------------------------------------ edge cases
@pytest.mark.parametrize("device,backend", PAIRS, ids=PAIR_IDS)
@pytest.mark.parametrize("s", [0, 3])
def test_sparse_reconstruct_with_no_concepts_gives_the_bias(device, backend, s):
    idx = torch.full((5, s), -1, dtype=torch.long, device=device)
    val = torch.zeros(5, s, device=device)
    bias = torch.randn(4, device=device)
    out = sparse_reconstruct(idx, val, torch.zeros(0, 4, device=device), bias, backend=backend)
    torch.testing.assert_close(out, bias.expand(5, 4))


@pytest.mark.parametrize("device,backend", PAIRS, ids=PAIR_IDS)
def test_zero_channels_give_defined_results(device, backend):
    labels, best = spherical_assign(torch.zeros(2, 3, 0, device=device), torch.zeros(4, 0, device=device),
                                    backend=backend)
    assert labels.shape == (2, 3) and not labels.any() and best.shape == (2, 3) and not best.any()
    if backend in ("torch", "cpp", "triton"):
        idx, val, info = sparse_code(torch.zeros(2, 3, 0, device=device), torch.zeros(4, 0, device=device),
                                     backend=backend, return_info=True)
        assert idx.shape == (2, 3, 0) and val.shape == (2, 3, 0) and info.converged and info.gap.shape == (6,)


def _unit_scale_labels(X, C):
    """The labels of X scaled row by row to unit max-abs, in float64 (the answer every backend must give)."""
    Xu = X.double() / X.double().abs().amax(1, keepdim=True)
    Cu = C.double() / C.double().abs().amax(1, keepdim=True)
    return spherical_assign(Xu, Cu, backend="torch")[0]


@pytest.mark.parametrize("device,backend", PAIRS, ids=PAIR_IDS)
@pytest.mark.parametrize("scale", [1e19, 1e30, 3e37, 1e-20, 1e-40, 1e-44], ids=lambda s: f"{s:g}")
def test_spherical_assign_is_scale_free(device, backend, scale):
    """Rows of norm ≳ 1e19 used to overflow in fp32 (label 0 everywhere) and denormal rows disagreed on
    Triton: every backend now gives the labels of the unit-scaled rows, for X and for the centroids."""
    g = torch.Generator().manual_seed(round(-math.log10(scale)) % 1000)
    X, C = torch.randn(40, 16, generator=g), torch.randn(5, 16, generator=g)
    want = _unit_scale_labels(X, C)
    big = (X.double() * scale).float()
    assert torch.isfinite(big).all() and big.abs().amax(1).gt(0).all()
    got, best = spherical_assign(big.to(device), C.to(device), backend=backend)
    assert torch.equal(got.cpu(), _unit_scale_labels(big, C)), f"X scaled by {scale:g}"
    assert torch.isfinite(best).all() and (best.abs() <= 1 + 1e-5).all()
    assert (_unit_scale_labels(big, C) == want).float().mean() > 0.9  # denormals lose a few bits
    got = spherical_assign(X.to(device), (C.double() * scale).float().to(device), backend=backend)[0]
    assert torch.equal(got.cpu(), want), f"centroids scaled by {scale:g}"


@pytest.mark.parametrize("device,backend", PAIRS, ids=PAIR_IDS)
def test_spherical_assign_scale_free_in_float64(device, backend):
    X, C = torch.randn(30, 8, dtype=torch.float64), torch.randn(4, 8, dtype=torch.float64)
    want = spherical_assign(X, C, backend="torch")[0]
    for scale in (1e200, 1e-200, 1e-310):
        assert torch.equal(spherical_assign((X * scale).to(device), C.to(device), backend=backend)[0].cpu(), want)


def test_centroid_update_rejects_a_bool_k():
    with pytest.raises(ValueError, match="K must be a positive int, got True"):
        centroid_update(torch.randn(4, 3), torch.zeros(4, dtype=torch.long), True)


@pytest.mark.parametrize("target", ["concept", "class", "both"])
def test_gig_with_no_images(target):
    V, beta = torch.randn(5, 6), torch.randn(6)
    idx, val = torch.zeros(0, 4, 2, dtype=torch.long), torch.zeros(0, 4, 2)
    conv = torch.nn.Conv2d(6, 3, 1)
    f_ab = conv if target == "concept" else lambda x: conv(x).mean(dim=(2, 3))
    tgt = {"concept": ConceptTarget(torch.randn(3)), "class": ClassTarget(1),
           "both": [ClassTarget(1), ClassTarget(0)]}[target]
    res = gig(f_ab, (idx, val), V, beta, tgt, steps=4)
    lead = (2,) if target == "both" else ()
    assert res.per_concept.shape == lead + (0, 5) and res.per_position.shape == lead + (0, 4, 2)
    assert res.delta.shape == lead + (0,) and res.steps.shape == (0,)
