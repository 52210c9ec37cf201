"""two_means_splits / two_means_step: the cpp kernel equals its pure-PyTorch reference (same algorithm,
same SplitMix64 draws), the reference follows the formulas, and bad input gets a named error."""
import pytest
import torch

from gig_fast import ops
from gig_fast.ops.reference import SplitMix64, two_means_step_ref
from gig_fast.testing import clustered_points

needs_cpp = pytest.mark.skipif(ops.available_backends()["cpp"] != "runs", reason="needs the compiled CPU extension")


def _unit(X: torch.Tensor) -> torch.Tensor:
    return (X / X.norm(dim=1, keepdim=True).clamp_min(1e-12)).contiguous()


def _data(n: int, C: int, k: int, dtype, seed: int) -> torch.Tensor:
    """Unit rows around k directions; every 97th row is zero (a PFV equal to β: it scores 0 everywhere
    and must go to side 0)."""
    g = torch.Generator().manual_seed(seed)
    U = _unit(clustered_points(n, C, k, dtype=torch.float64, generator=g) - 2.0)
    U[::97] = 0
    return U.to(dtype).contiguous()


def test_splitmix64_matches_the_published_stream():
    """SplitMix64 from seed 1234567: the first outputs of the reference implementation (Vigna's splitmix64.c)."""
    rng = SplitMix64(1234567)
    assert [rng.next() for _ in range(3)] == [6457827717110365317, 3203168211198807973, 9817491932198370423]


def test_step_reference_follows_the_formula():
    g = torch.Generator().manual_seed(3)
    U = _unit(torch.randn(50, 7, dtype=torch.float64, generator=g))
    members = torch.randperm(50, generator=g)[:31].sort().values
    for S in (torch.randn(2, 7, dtype=torch.float64, generator=g),
              torch.stack([torch.randn(7, dtype=torch.float64, generator=g), torch.zeros(7, dtype=torch.float64)])):
        side, sums = two_means_step_ref(U, members, S)
        unit = S / S.norm(dim=1, keepdim=True).clamp_min(1e-300)
        assert torch.equal(side, (U[members] @ (unit[1] - unit[0]) > 0).long())
        expect = torch.stack([U[members][side == k].sum(0) for k in (0, 1)])
        torch.testing.assert_close(sums, expect, rtol=1e-12, atol=1e-12)


# the C++ sums rows in the input dtype per chunk of 1,024 rows, the reference in float64: sums agree to
# the float32 rounding of ~1,000-term sums of unit vectors (~1e-4 absolute); sides are equal outright on
# this clustered data (no row lies within rounding of the splitting hyperplane)
SUM_TOL = {torch.float64: 1e-9, torch.float32: 1e-3}


@needs_cpp
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("refine", [True, False])
def test_cpp_splits_equal_the_reference(dtype, refine):
    U = _data(3000, 16, 20, dtype, seed=0)
    g = torch.Generator().manual_seed(1)
    members = [torch.arange(3000), torch.randperm(3000, generator=g)[:900].sort().values, torch.arange(5, 40),
               torch.tensor([3, 4])]
    seeds = [11, 2**62 + 12345, 7, 0]
    got = ops.two_means_splits(U, members, seeds, init_sample=256, refine=refine, backend="cpp")
    ref = ops.two_means_splits(U, members, seeds, init_sample=256, refine=refine, backend="torch")
    for b, (s_got, s_ref) in enumerate(zip(got[0], ref[0])):
        assert torch.equal(s_got, s_ref), (b, int((s_got != s_ref).sum()))
        n = members[b].shape[0] if refine or members[b].shape[0] <= 256 else 256
        assert s_got.shape == (n,) and 0 < int(s_got.sum()) < n
    torch.testing.assert_close(got[1], ref[1], rtol=0, atol=SUM_TOL[dtype])
    torch.testing.assert_close(got[2], ref[2], rtol=0, atol=SUM_TOL[dtype])
    assert torch.equal(got[3], ref[3])


@needs_cpp
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cpp_step_equals_the_reference(dtype):
    U = _data(2600, 40, 8, dtype, seed=2)
    g = torch.Generator().manual_seed(4)
    members = torch.randperm(2600, generator=g)[:2100].sort().values
    S = torch.randn(2, 40, dtype=torch.float64, generator=g)
    side, sums = ops.two_means_step(U, members, S, backend="cpp")
    side_ref, sums_ref = ops.two_means_step(U, members, S, backend="torch")
    assert torch.equal(side, side_ref)
    torch.testing.assert_close(sums, sums_ref, rtol=0, atol=SUM_TOL[dtype])


@pytest.mark.parametrize("backend", ["torch", "batched"] + (["cpp"] if ops.available_backends()["cpp"] == "runs" else []))
def test_split_sides_are_the_lloyd_fixed_point_and_inertia_is_consistent(backend):
    """A returned split is stable under one more step, its sums are its sides' sums, and its inertia is
    n − |S0| − |S1|; identical rows fall back to the member order."""
    U = _data(500, 12, 4, torch.float64, seed=5)
    sides, sums, inertia, fell_back = ops.two_means_splits(U, [torch.arange(500)], [9], backend=backend)
    side = sides[0]
    again, _ = two_means_step_ref(U, torch.arange(500), sums[0])
    assert torch.equal(again, side) and not bool(fell_back[0])
    torch.testing.assert_close(sums[0], torch.stack([U[side == k].sum(0) for k in (0, 1)]))
    assert float(inertia[0]) == pytest.approx(500 - float(sums[0].norm(dim=1).sum()), abs=1e-9)
    same = U[:1].expand(6, -1).contiguous()
    sides, _, _, fell_back = ops.two_means_splits(same, [torch.arange(6)], [1], backend=backend)
    assert bool(fell_back[0]) and sides[0].tolist() == [0, 0, 0, 1, 1, 1]


def test_registered_ops_pass_opcheck():
    U = _data(80, 6, 3, torch.float64, seed=7)
    backends = ["torch", "batched"] + (["cpp"] if ops.available_backends()["cpp"] == "runs" else [])
    for backend in backends:
        torch.library.opcheck(ops.spec("two_means_splits").custom_op,
                              (U, [torch.arange(80), torch.arange(10, 30)], [1, 2], 2, 10, 16, True, backend),
                              test_utils=("test_schema", "test_faketensor"))
        torch.library.opcheck(ops.spec("two_means_step").custom_op,
                              (U, torch.arange(0, 80, 2), torch.randn(2, 6, dtype=torch.float64), backend))


@pytest.mark.parametrize("bad", ["U_dtype", "U_dim", "one_member", "member_range", "seed_count", "seed_negative",
                                 "n_init", "init_sample", "sums_shape", "sums_dtype"])
def test_bad_input_is_a_named_error(bad):
    U = _data(20, 4, 2, torch.float64, seed=8)
    members, seeds, kw = [torch.arange(20)], [1], {}
    if bad == "U_dtype":
        U = U.half()
    elif bad == "U_dim":
        U = U[None]
    elif bad == "one_member":
        members = [torch.tensor([3])]
    elif bad == "member_range":
        members = [torch.tensor([3, 20])]
    elif bad == "seed_count":
        seeds = [1, 2]
    elif bad == "seed_negative":
        seeds = [-1]
    elif bad == "n_init":
        kw["n_init"] = 0
    elif bad == "init_sample":
        kw["init_sample"] = 1
    if bad.startswith("sums"):
        S = torch.zeros(3, 4, dtype=torch.float64) if bad == "sums_shape" else torch.zeros(2, 4)
        with pytest.raises(ValueError, match="sums"):
            ops.two_means_step(U, torch.arange(20), S)
        return
    with pytest.raises(ValueError):
        ops.two_means_splits(U, members, seeds, **kw)
