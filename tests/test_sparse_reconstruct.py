"""sparse_reconstruct: every backend against the reference, forward and gradients, plus bad input."""
import numpy as np
import pytest
import torch

from gig_fast import ops
from gig_fast.ops import sparse_reconstruct
from gig_fast.ops.reference import sparse_reconstruct_ref
from gig_fast.testing import random_codes

from _grids import TOL, backend_params

SHAPES = [  # (P, s, K, C)
    (1, 1, 1, 1),
    (7, 1, 5, 3),
    (33, 5, 17, 129),
    (129, 12, 64, 40),
    (64, 30, 300, 257),
]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _inputs(P, s, K, C, dtype, device, bias=True, **kw):
    idx, val = random_codes(P, s, K, dtype=dtype, device=device, **kw)
    V = torch.randn(K, C, dtype=dtype, device=device)
    b = torch.randn(C, dtype=dtype, device=device) if bias else None
    return idx, val, V, b


def test_reference_matches_float64_numpy():
    """The oracle itself, checked by an independent dense computation: X̃ = U V + b."""
    P, s, K, C = 23, 6, 13, 9
    idx, val, V, b = _inputs(P, s, K, C, torch.float64, "cpu", duplicates=True, all_padding_rows=2)
    U = np.zeros((P, K))
    for p in range(P):
        for j in range(s):
            if idx[p, j] >= 0:
                U[p, idx[p, j]] += val[p, j].item()  # duplicates add up
    expect = U @ V.numpy() + b.numpy()
    np.testing.assert_allclose(sparse_reconstruct_ref(idx, val, V, b).numpy(), expect, rtol=1e-12, atol=1e-12)
    # its explicit backward equals autograd through the dense formula
    g = np.random.randn(P, C)
    Ut = torch.tensor(U, requires_grad=True)
    Vt = V.clone().requires_grad_()
    (Ut @ Vt).backward(torch.tensor(g))
    from gig_fast.ops.reference import sparse_reconstruct_backward_ref
    gval, gV = sparse_reconstruct_backward_ref(torch.tensor(g), idx, val, V)
    np.testing.assert_allclose(gV.numpy(), Vt.grad.numpy(), rtol=1e-10, atol=1e-10)
    for p in range(P):
        for j in range(s):
            want = Ut.grad[p, idx[p, j]].item() if idx[p, j] >= 0 else 0.0
            assert abs(gval[p, j].item() - want) < 1e-10


@pytest.mark.parametrize("backend,device", backend_params(ops.spec("sparse_reconstruct").implemented))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_forward_and_gradients_match_reference(backend, device, dtype, shape):
    P, s, K, C = shape
    if backend == "triton" and device == "cpu" and P * s * C > 40_000:
        pytest.skip("Triton interpreter: small shapes only")
    idx, val, V, b = _inputs(P, s, K, C, dtype, device, duplicates=(P % 2 == 1), all_padding_rows=min(2, P))
    rtol, atol = TOL[dtype]
    scale = max(1.0, s ** 0.5)

    vals = [val.clone().requires_grad_(), val.clone().requires_grad_()]
    Vs = [V.clone().requires_grad_(), V.clone().requires_grad_()]
    bs = [b.clone().requires_grad_(), b.clone().requires_grad_()]
    grad_out = torch.randn(P, C, dtype=dtype, device=device)

    out = sparse_reconstruct(idx, vals[0], Vs[0], bs[0], backend=backend)
    # the oracle: autograd through the pure reference (no custom op at all)
    ref = sparse_reconstruct_ref(idx, vals[1].float(), Vs[1].float(), bs[1].float())
    torch.testing.assert_close(out.float(), ref, rtol=rtol, atol=atol * scale)
    out.backward(grad_out)
    ref.backward(grad_out.float())
    torch.testing.assert_close(vals[0].grad.float(), vals[1].grad.float(), rtol=rtol, atol=atol * max(1.0, C ** 0.5))
    torch.testing.assert_close(Vs[0].grad.float(), Vs[1].grad.float(), rtol=rtol, atol=atol * max(1.0, (P * s / K) ** 0.5))
    torch.testing.assert_close(bs[0].grad.float(), bs[1].grad.float(), rtol=rtol, atol=atol * max(1.0, P ** 0.5))
    # padding never receives a gradient
    assert (vals[0].grad[idx < 0] == 0).all()


@pytest.mark.parametrize("backend,device", backend_params(ops.spec("sparse_reconstruct").implemented))
def test_all_padding_rows_give_bias(backend, device):
    idx = torch.full((5, 4), -1, dtype=torch.int64, device=device)
    val = torch.zeros(5, 4, device=device)
    V = torch.randn(8, 6, device=device)
    b = torch.randn(6, device=device)
    out = sparse_reconstruct(idx, val, V, b, backend=backend)
    torch.testing.assert_close(out, b.expand(5, 6))
    assert (sparse_reconstruct(idx, val, V, backend=backend) == 0).all()


@pytest.mark.parametrize("backend,device", backend_params(ops.spec("sparse_reconstruct").implemented))
def test_grad_V_is_bit_identical_across_runs(backend, device):
    idx, val, V, _ = _inputs(200, 16, 10, 33, torch.float32, device, duplicates=True)  # heavy collisions
    grads = []
    for _ in range(2):
        VV = V.clone().requires_grad_()
        sparse_reconstruct(idx, val, VV, backend=backend).backward(torch.ones(200, 33, device=device))
        grads.append(VV.grad)
    assert torch.equal(grads[0], grads[1])


def test_leading_batch_dims_and_s_zero():
    idx, val, V, b = _inputs(12, 3, 9, 5, torch.float32, "cpu")
    out = sparse_reconstruct(idx.reshape(3, 4, 3), val.reshape(3, 4, 3), V, b)
    assert out.shape == (3, 4, 5)
    torch.testing.assert_close(out.reshape(12, 5), sparse_reconstruct_ref(idx, val, V, b))
    empty = sparse_reconstruct(torch.empty(4, 0, dtype=torch.int64), torch.empty(4, 0), V, b)
    torch.testing.assert_close(empty, b.expand(4, 5))


@pytest.mark.parametrize("backend,device", backend_params(["torch", "cpp"]))
def test_opcheck(backend, device):
    idx, val, V, b = _inputs(9, 4, 7, 6, torch.float32, device)
    val.requires_grad_()
    V.requires_grad_()
    torch.library.opcheck(ops.spec("sparse_reconstruct").custom_op, (idx, val, V, b, backend))
    torch.library.opcheck(ops.spec("sparse_reconstruct").custom_op, (idx, val, V, None, backend))


def test_torch_compile():
    idx, val, V, b = _inputs(9, 4, 7, 6, torch.float32, "cpu")
    f = torch.compile(lambda i, v, W, bb: sparse_reconstruct(i, v, W, bb) * 2, backend="eager", fullgraph=False)
    torch.testing.assert_close(f(idx, val, V, b), 2 * sparse_reconstruct_ref(idx, val, V, b))


@pytest.mark.parametrize("change,match", [
    (lambda a: {**a, "idx": a["idx"].masked_fill(a["idx"] == a["idx"].max(), 7)}, "K=7"),
    (lambda a: {**a, "idx": a["idx"].masked_fill(a["idx"] == -1, -2)}, "-2"),
    (lambda a: {**a, "val": a["val"][:, :-1]}, "same shape"),
    (lambda a: {**a, "val": a["val"].long()}, "val must have dtype"),
    (lambda a: {**a, "idx": a["idx"].int()}, "idx must have dtype"),
    (lambda a: {**a, "V": a["V"].double()}, "dtype"),
    (lambda a: {**a, "bias": torch.zeros(4)}, "bias has 4"),
    (lambda a: {**a, "V": a["V"][None]}, "V must have 2 dimensions"),
    (lambda a: {**a, "idx": a["idx"].to("meta")}, "idx is on meta"),
])
def test_bad_input_raises_value_error(change, match):
    idx, val, V, b = _inputs(6, 3, 7, 5, torch.float32, "cpu", pad_frac=0.5, all_padding_rows=1)
    args = change({"idx": idx, "val": val, "V": V, "bias": b})
    with pytest.raises(ValueError, match=match):
        sparse_reconstruct(**args)
