"""F_ab's affine tail (gig_fast.gig.tail): the cut, the targets' gradients at its boundary, and GIG through it
equal to GIG with every backward through the whole of F_ab."""
from __future__ import annotations

import re

import pytest
import torch
from torch import fx

from gig_fast.gig import ConceptTarget, gig
from gig_fast.gig.tail import TailAdjoints, split_affine_tail
from gig_fast.models.bn import fold_batchnorm
from gig_fast.slicing import bn_shift, make_f_ab, preactivation
from gig_fast.testing import random_codes, tiny_resnet

# (a, b, the folded slice's tail, the BNs it has besides when unfolded): a block with a downsample branch,
# one with an identity shortcut, the logits
TRANSITIONS = [("layer1.1", "layer2.0", {"layer2_0_conv3", "layer2_0_downsample_0", "add"},
                {"layer2_0_bn3", "layer2_0_downsample_1"}),
               ("layer1.0", "layer1.1", {"layer1_1_conv3", "add"}, {"layer1_1_bn3"}),
               ("layer2.0", "layer3.0", {"layer3_0_conv3", "layer3_0_downsample_0", "add"},
                {"layer3_0_bn3", "layer3_0_downsample_1"}),
               ("layer3.0", "logits", {"avgpool", "flatten", "fc"}, set())]

def _f_ab(a, b, folded):
    f = make_f_ab(tiny_resnet(), a, b)
    return fold_batchnorm(f) if folded else f


def _tail_layers(split):
    """The names of the tail's nodes (the residual sum's ``add_<i>`` as ``add``: its number depends on the model)."""
    names = {n.name for n in split.tail.graph.nodes if n.op not in ("placeholder", "output")}
    return {"add" if re.fullmatch(r"add(_\d+)?", n) else n for n in names}


@pytest.mark.parametrize("a,b,layers,bns", TRANSITIONS)
@pytest.mark.parametrize("folded", [True, False], ids=["folded", "with_bn"])
def test_head_then_tail_is_f_ab(a, b, layers, bns, folded):
    """The cut: the layers after the last ReLUs (with their eval-mode BNs when not folded), and
    head then tail computes F_ab exactly."""
    f = _f_ab(a, b, folded)
    split = split_affine_tail(f)
    assert _tail_layers(split) == (layers if folded else layers | bns)
    x = preactivation(tiny_resnet(), a, torch.randn(3, 3, 12, 12, dtype=torch.float64))
    boundary = split.head(x)
    torch.testing.assert_close(split.tail(*boundary), f(x), rtol=0, atol=0)


def test_what_the_tail_takes():
    f = _f_ab("layer1.1", "layer2.0", True)
    assert split_affine_tail(lambda x: f(x)) is None  # a plain callable: no graph to cut

    class EndsInReLU(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(4, 4, 1)

        def forward(self, x):
            return torch.relu(self.conv(x))

    assert split_affine_tail(fx.symbolic_trace(EndsInReLU())) is None

    class WeightlessTail(torch.nn.Module):
        def forward(self, x):
            return torch.relu(x) + x

    assert split_affine_tail(fx.symbolic_trace(WeightlessTail())) is None  # nothing to save

    class TrainModeBN(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = torch.nn.Conv2d(4, 4, 1), torch.nn.BatchNorm2d(4)

        def forward(self, x):
            return self.bn(self.conv(torch.relu(x)))

    module = TrainModeBN()
    assert split_affine_tail(fx.symbolic_trace(module.train())) is None  # batch statistics are not affine
    assert _tail_layers(split_affine_tail(fx.symbolic_trace(module.eval()))) == {"conv", "bn"}

    class DropoutHead(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.drop, self.fc = torch.nn.Dropout(0.5), torch.nn.Linear(4, 3)

        def forward(self, x):
            return self.fc(self.drop(torch.flatten(torch.relu(x), 1)))

    module = DropoutHead()
    assert _tail_layers(split_affine_tail(fx.symbolic_trace(module.eval()))) == {"drop", "fc", "flatten"}
    assert _tail_layers(split_affine_tail(fx.symbolic_trace(module.train()))) == {"fc"}  # random masks


@pytest.mark.parametrize("a,b,layers,bns", TRANSITIONS)
def test_boundary_gradients_are_autograds(a, b, layers, bns):
    """Each target's gradient at the boundary (computed once on zeros, one position kept where it is the
    same everywhere) equals autograd's through the tail at the boundary of a real input, per image."""
    g = torch.Generator().manual_seed(3)
    f = _f_ab(a, b, True)
    split = split_affine_tail(f)
    x = preactivation(tiny_resnet(), a, torch.randn(4, 3, 12, 12, dtype=torch.float64, generator=g))
    boundary = tuple(h.detach().requires_grad_(True) for h in split.head(x))
    out = split.tail(*boundary)
    C_b = out.shape[1]
    per_image = torch.randn(3, C_b, generator=g, dtype=torch.float64)
    per_image = torch.cat([per_image, per_image[:1]])  # two images share a target: computed once
    vectors = [per_image, torch.randn(C_b, generator=g, dtype=torch.float64)]
    adjoints = TailAdjoints(split, [v / v.norm(dim=-1, keepdim=True) for v in vectors], torch.float64)
    image = torch.tensor([0, 3, 1, 2])  # row i belongs to image image[i]
    for t, vec in enumerate(vectors):
        unit = vec / vec.norm(dim=-1, keepdim=True)
        rows = unit[image] if vec.dim() == 2 else unit.expand(4, -1)
        seed = rows.reshape(4, C_b, *([1] * (out.dim() - 2))).expand(out.shape)
        want = torch.autograd.grad(out, boundary, seed, retain_graph=True, allow_unused=True)
        for got, w, h in zip(adjoints.seeds(t, boundary, image), want, boundary):
            assert got.shape == h.shape
            torch.testing.assert_close(got, torch.zeros_like(h) if w is None else w, rtol=1e-12, atol=1e-14)
    assert adjoints.units[0].shape[0] == 3  # the shared target once
    # behind a stride-1 1×1 convolution (or the pooling before fc) the gradient is one vector per channel
    kept = [field.shape[2:] for field in adjoints.fields[0]]
    assert (1, 1) in kept, kept


@pytest.mark.parametrize("a,b,layers,bns", TRANSITIONS)
@pytest.mark.parametrize("rule", ["adaptive", "gausslegendre"])
def test_gig_through_the_tail_equals_the_whole_backward(a, b, layers, bns, rule):
    """gig() on the traced slice (the backwards start at the tail's boundary) against gig() on the same
    function as a plain callable (every backward through the whole of F_ab): the same nodes, and
    attributions equal to float64 rounding; per-image targets with a repeated vector and a shared one."""
    g = torch.Generator().manual_seed(11)
    model = tiny_resnet()
    f = fold_batchnorm(make_f_ab(model, a, b))
    x = torch.randn(4, 3, 12, 12, dtype=torch.float64, generator=g)
    xa = preactivation(model, a, x)
    _, C, H, W = xa.shape
    K = 3 * C
    V = torch.randn(K, C, dtype=torch.float64, generator=g) / C ** 0.5
    codes = random_codes((4, H * W), 4, K, dtype=torch.float64, pad_frac=0.25, scale=0.5, generator=g)
    C_b = f(xa).shape[1]
    per_image = torch.randn(4, C_b, generator=g, dtype=torch.float64)
    per_image[2] = per_image[0]
    targets = [ConceptTarget(per_image), ConceptTarget(torch.randn(C_b, generator=g, dtype=torch.float64))]
    options = dict(steps=5 if rule == "adaptive" else 6, rule=rule, tolerance=0.01, max_steps=24, spatial=(H, W))
    beta = bn_shift(model, a).to(torch.float64)
    assert split_affine_tail(f) is not None
    got = gig(f, codes, V, beta, targets, **options)
    want = gig(lambda t: f(t), codes, V, beta, targets, **options)
    assert torch.equal(got.steps, want.steps)
    scale = want.per_position.abs().max()
    torch.testing.assert_close(got.per_position, want.per_position, rtol=0, atol=1e-12 * float(scale))
    torch.testing.assert_close(got.delta, want.delta, rtol=0, atol=1e-12 * float(scale))
    assert (got.value_at_input == want.value_at_input).all()  # the forward is F_ab's own
