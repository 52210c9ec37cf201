"""The adaptive refinement when its bar cannot be met within ``max_steps``: each image keeps whichever
result is more complete — the fixed rule's, unchanged, or the capped adaptive one — and says which
(``refined``) and with how many nodes (``steps``). test_gig.py covers a bar that is met."""
from __future__ import annotations

import torch

from gig_fast.gig import ConceptTarget, gig
from gig_fast.slicing import bn_shift, make_f_ab, preactivation
from gig_fast.testing import fitted_codes, tiny_resnet


def _problem(seed: int):
    """A tiny float64 ResNet, layer1.1 → layer2.0, fitted codes of 4 images, two concept targets."""
    g = torch.Generator().manual_seed(seed)
    model = tiny_resnet(dtype=torch.float64)
    x = torch.randn(4, 3, 12, 12, generator=g, dtype=torch.float64)
    xa = preactivation(model, "layer1.1", x)
    beta = bn_shift(model, "layer1.1").to(torch.float64)
    V, idx, val = fitted_codes(xa, beta, 3 * xa.shape[1], 4, g)
    f = make_f_ab(model, "layer1.1", "layer2.0")
    with torch.no_grad():
        out = f(xa)
    targets = [ConceptTarget(out.sum((0, 2, 3))), ConceptTarget(torch.randn(out.shape[1], generator=g, dtype=torch.float64))]
    return f, (idx, val), V, beta, targets, tuple(xa.shape[2:])


def test_an_unreachable_bar_keeps_the_more_complete_result_per_image():
    # seeds 0-2 with 8 nodes and a cap of 12 (one bisection round): some images are better after it,
    # some are not (measured: 3 of the 12 images keep the fixed rule)
    kept_seen = refined_seen = 0
    for seed in range(3):
        f, codes, V, beta, targets, hw = _problem(seed)
        fixed = gig(f, codes, V, beta, targets, steps=8, tolerance=None, spatial=hw)
        capped = gig(f, codes, V, beta, targets, steps=8, tolerance=1e-9, max_steps=12, spatial=hw)
        worst_fixed, worst = fixed.relative_delta().amax(0), capped.relative_delta().amax(0)  # [B]
        assert torch.all(worst > 1e-9), seed  # the bar is out of reach for every image
        assert torch.all(capped.steps <= 12)
        assert torch.all(worst <= worst_fixed), (seed, worst, worst_fixed)  # never less complete than the fixed rule
        kept, refined = ~capped.refined, capped.refined
        # kept: the fixed rule's numbers exactly, with its node count
        torch.testing.assert_close(capped.per_position[:, kept], fixed.per_position[:, kept], rtol=0, atol=0)
        assert torch.all(capped.steps[kept] == 8)
        # refined: strictly more complete, with the nodes it spent
        assert torch.all(worst[refined] < worst_fixed[refined]) and torch.all(capped.steps[refined] == 12)
        kept_seen += int(kept.sum())
        refined_seen += int(refined.sum())
    assert kept_seen and refined_seen  # both outcomes occur, so both branches are checked


def test_a_cap_below_the_fixed_rule_never_loses_to_it():
    """``max_steps`` smaller than ``steps``: no bisection fits, and the adaptive rule that starts with as
    many nodes as the fixed one is kept only where it is more complete."""
    f, codes, V, beta, targets, hw = _problem(0)
    fixed = gig(f, codes, V, beta, targets, steps=8, tolerance=None, spatial=hw)
    capped = gig(f, codes, V, beta, targets, steps=8, tolerance=1e-9, max_steps=4, spatial=hw)
    assert torch.all(capped.relative_delta().amax(0) <= fixed.relative_delta().amax(0))
    kept = ~capped.refined
    torch.testing.assert_close(capped.per_concept[:, kept], fixed.per_concept[:, kept], rtol=0, atol=0)
