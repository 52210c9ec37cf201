"""The head's T backward passes as one (gig_fast.gig.head.BatchedHead): what it takes, its forward equal to
the head's, every target's gradient equal to autograd's, and gig() through it equal to gig() through
autograd."""
from __future__ import annotations

import pytest
import torch
from torch import fx, nn

from gig_fast.gig import ConceptTarget, gig
from gig_fast.gig import head as batched_head
from gig_fast.gig.head import BatchedHead, Unsupported
from gig_fast.gig.tail import split_affine_tail
from gig_fast.models.bn import fold_batchnorm
from gig_fast.slicing import bn_shift, make_f_ab, preactivation
from gig_fast.testing import random_codes, tiny_resnet

# a block with a downsample branch, one with an identity shortcut, two blocks (a residual sum inside the
# head, whose cotangent two branches share), the logits
TRANSITIONS = [("layer1.1", "layer2.0"), ("layer1.0", "layer1.1"), ("layer1.0", "layer2.0"), ("layer3.0", "logits")]


class EveryStep(nn.Module):
    """A head with each kind of step the batched backward takes: an eval-mode BN, a dropout, an identity, a
    copy, a constant added, a grouped strided convolution, residual sums; an affine tail after it."""

    def __init__(self, C: int = 6):
        super().__init__()
        self.bn, self.drop, self.same = nn.BatchNorm2d(C), nn.Dropout(0.3), nn.Identity()
        self.conv = nn.Conv2d(C, C, 3, stride=2, padding=1, groups=2)
        self.skip = nn.Conv2d(C, C, 1, stride=2)
        self.out = nn.Conv2d(C, 4, 1)
        with torch.no_grad():
            self.bn.running_mean.normal_()
            self.bn.running_var.uniform_(0.5, 2.0)
            self.bn.weight.normal_()

    def forward(self, x):
        h = torch.relu(self.same(self.bn(x)).clone() + 0.25)
        k = self.conv(h)
        # a ReLU's output summed with its own input: both operands get one cotangent, which neither may overwrite
        h = torch.relu(self.drop(torch.nn.functional.relu(k)) + k) + self.skip(h)
        return self.out(h.relu())


def _head(f):
    split = split_affine_tail(f)
    assert split is not None
    head = BatchedHead.build(split.head)
    assert head is not None
    return split, head


def _backward(head, saved, seeds, m, align=1):
    """The gradients handed on block by block, put together: ``[T, m, P, C]``, and the blocks' row ranges."""
    parts, blocks = [], []

    def consume(grads, r0, r1):
        parts.append(grads.clone())
        blocks.append((r0, r1))

    head.backward(saved, lambda r0, r1: [s[:, r0:r1] for s in seeds], seeds[0].shape[0], m, consume, align)
    return torch.cat(parts, 1), blocks


def _check_against_autograd(split, head, x, generator, T=3, m=3):
    """The forward's boundary equals the head's; the T gradients at the first m rows equal autograd's."""
    boundary, saved = head.forward(x)
    for got, want in zip(boundary, split.head(x)):
        assert torch.equal(got, want)
    seeds = []
    for i, h in enumerate(boundary):  # one seed a full tensor, one broadcast from a vector per channel
        shape = (T, m, h.shape[1]) + ((1,) * (h.dim() - 2) if i % 2 else tuple(h.shape[2:]))
        seeds.append(torch.randn(shape, dtype=h.dtype, generator=generator).expand(T, m, *h.shape[1:]))
    got, _ = _backward(head, saved, seeds, m)
    leaf = x.detach().requires_grad_(True)
    out = split.head(leaf)
    n, C, H, W = x.shape
    for t in range(T):
        rows = [torch.cat([s[t], s.new_zeros(n - m, *s.shape[2:])]) for s in seeds]
        (want,) = torch.autograd.grad(out, leaf, rows, retain_graph=True)
        want = want[:m].permute(0, 2, 3, 1).reshape(m, H * W, C)
        torch.testing.assert_close(got[t], want, rtol=1e-12, atol=1e-12 * float(want.abs().max()))


@pytest.mark.parametrize("a,b", TRANSITIONS)
@pytest.mark.parametrize("folded", [True, False], ids=["folded", "with_bn"])
@pytest.mark.parametrize("block_bytes", [batched_head.BLOCK_BYTES, 1], ids=["one_block", "row_blocks"])
def test_gradients_equal_autograds(a, b, folded, block_bytes, monkeypatch):
    """ResNet slices, BNs folded or not: the T gradients at once equal autograd's one target at a time, for
    the first rows of a channels-last input (as gig() passes the path), in one block or one row per block."""
    monkeypatch.setattr(batched_head, "BLOCK_BYTES", block_bytes)
    g = torch.Generator().manual_seed(5)
    model = tiny_resnet()
    f = make_f_ab(model, a, b)
    split, head = _head(fold_batchnorm(f) if folded else f)
    x = preactivation(model, a, torch.randn(5, 3, 12, 12, dtype=torch.float64, generator=g))
    _check_against_autograd(split, head, x.contiguous(memory_format=torch.channels_last), g)


@pytest.mark.parametrize("m,rows,align,want", [
    (10, 4, 1, [(0, 4), (4, 8), (8, 10)]),
    (12, 8, 3, [(0, 6), (6, 12)]),                    # whole groups of 3 rows
    (7, 2, 3, [(0, 2), (2, 3), (3, 5), (5, 6), (6, 7)]),  # pieces of one group each
])
def test_row_blocks(m, rows, align, want, monkeypatch):
    """The blocks cover the rows once, at most the budget's rows each, never across a group boundary
    unless they hold whole groups; the gradients put together are the same."""
    g = torch.Generator().manual_seed(7)
    conv = nn.Conv2d(2, 2, 1).double()
    split, head = _head(fx.symbolic_trace(nn.Sequential(nn.ReLU(), conv).eval()))
    x = torch.randn(m, 2, 3, 3, dtype=torch.float64, generator=g).contiguous(memory_format=torch.channels_last)
    boundary, saved = head.forward(x)
    seeds = [torch.randn(2, m, 2, 3, 3, dtype=torch.float64, generator=g)]
    whole, blocks = _backward(head, saved, seeds, m)
    assert blocks == [(0, m)]
    monkeypatch.setattr(batched_head, "BLOCK_BYTES", 2 * 2 * 9 * 8 * rows)  # T · widest row · 8 bytes · rows
    pieces, blocks = _backward(head, saved, seeds, m, align)
    assert blocks == want
    torch.testing.assert_close(pieces, whole, rtol=0, atol=0)


def test_every_step_kind_equals_autograd():
    g = torch.Generator().manual_seed(6)
    f = fx.symbolic_trace(EveryStep().double().eval())
    split, head = _head(f)
    assert [s.kind for s in head.steps].count("scale") == 1 and any(s.kind == "add_constant" for s in head.steps)
    x = torch.randn(4, 6, 8, 8, dtype=torch.float64, generator=g).contiguous(memory_format=torch.channels_last)
    _check_against_autograd(split, head, x, g, T=2, m=4)


def _traced_head(body, extra: nn.Module | None = None):
    """The batched head of ``body(self, x)`` followed by a 1×1 convolution (an affine tail); ``self.first``
    is a convolution, ``self.extra`` the given module."""
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.first, self.out = nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 2, 1)
            self.extra = extra if extra is not None else nn.Identity()

        def forward(self, x):
            return self.out(body(self, x))

    split = split_affine_tail(fx.symbolic_trace(Net()))  # the modes as given
    return BatchedHead.build(split.head)


def test_what_the_batched_head_takes():
    """Only operations whose backward it runs: anything else leaves the head to autograd."""
    assert _traced_head(lambda self, x: torch.relu(self.first(x)) + torch.relu(x)) is not None
    assert _traced_head(lambda self, x: torch.relu(x).clone().contiguous()) is not None
    for body in (lambda self, x: torch.nn.functional.max_pool2d(torch.relu(x), 3, 1, 1),  # max-pooling
                 lambda self, x: torch.nn.functional.gelu(x),                           # another non-linearity
                 lambda self, x: x.relu_(),                                             # written in place
                 lambda self, x: torch.relu(torch.add(self.first(x), x, alpha=2.0)),     # a scaled sum
                 lambda self, x: torch.relu(x * 2.0)):                                  # a product
        assert _traced_head(body) is None
    through_extra = lambda self, x: torch.relu(self.extra(x))  # noqa: E731
    assert _traced_head(through_extra, nn.BatchNorm2d(4).eval()) is not None
    assert _traced_head(through_extra, nn.BatchNorm2d(4).train()) is None  # batch statistics
    assert _traced_head(through_extra, nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect")) is None


class BroadcastSum(nn.Module):
    """A head with a sum that broadcasts (a whole-image convolution's ``[n, C, 1, 1]`` added to every position)."""

    def __init__(self, C: int = 4, side: int = 5):
        super().__init__()
        self.whole, self.out = nn.Conv2d(C, C, side), nn.Conv2d(C, 3, 1)

    def forward(self, x):
        return self.out(torch.relu(x + self.whole(x)))


def _gig_pair(f, C, H, W, generator, **options):
    """gig() on the traced module and on the same function as a plain callable (autograd, whole backward)."""
    K = 3 * C
    V = torch.randn(K, C, dtype=torch.float64, generator=generator) / C ** 0.5
    codes = random_codes((3, H * W), 3, K, dtype=torch.float64, pad_frac=0.25, scale=0.5, generator=generator)
    beta = torch.randn(C, dtype=torch.float64, generator=generator) * 0.1
    C_b = f(torch.zeros(1, C, H, W, dtype=torch.float64)).shape[1]
    # per-image, shared and per-image again: each target's seeds are picked from its own fields
    targets = [ConceptTarget(torch.randn(3, C_b, dtype=torch.float64, generator=generator)),
               ConceptTarget(torch.randn(C_b, dtype=torch.float64, generator=generator)),
               ConceptTarget(torch.randn(3, C_b, dtype=torch.float64, generator=generator))]
    options = dict(spatial=(H, W), **options)
    return gig(f, codes, V, beta, targets, **options), gig(lambda t: f(t), codes, V, beta, targets, **options)


def _assert_same_gig(got, want):
    assert torch.equal(got.steps, want.steps)
    scale = float(want.per_position.abs().max())
    torch.testing.assert_close(got.per_position, want.per_position, rtol=0, atol=1e-12 * scale)
    torch.testing.assert_close(got.delta, want.delta, rtol=0, atol=1e-12 * scale)
    assert torch.equal(got.value_at_input, want.value_at_input)


def test_a_broadcasting_sum_falls_back_to_autograd():
    """The shapes of a sum are seen only when it runs: the batched forward refuses it by name, and gig()
    goes on with autograd from that batch, with the same result."""
    g = torch.Generator().manual_seed(8)
    f = fx.symbolic_trace(BroadcastSum().double().eval())
    split = split_affine_tail(f)
    head = BatchedHead.build(split.head)
    with pytest.raises(Unsupported, match=r"shapes \(2, 4, 5, 5\) and \(2, 4, 1, 1\)"):
        head.forward(torch.randn(2, 4, 5, 5, dtype=torch.float64))
    _assert_same_gig(*_gig_pair(f, 4, 5, 5, g, steps=5, rule="adaptive", tolerance=0.01, max_steps=16))


@pytest.mark.parametrize("rule", ["adaptive", "gausslegendre"])
@pytest.mark.parametrize("block_bytes", [batched_head.BLOCK_BYTES, 40_000, 1], ids=["one_block", "two_nodes", "rows"])
def test_gig_through_every_step_kind(rule, block_bytes, monkeypatch):
    """gig() through :class:`EveryStep` (rows without a gradient in the same batches as the others; the
    backward in one block, in blocks of two of the fixed rule's nodes (3 images each), or row by row)
    against gig() on the same function through autograd."""
    monkeypatch.setattr(batched_head, "BLOCK_BYTES", block_bytes)
    g = torch.Generator().manual_seed(9)
    f = fx.symbolic_trace(EveryStep().double().eval())
    options = dict(steps=5, rule="adaptive", tolerance=0.01, max_steps=16) if rule == "adaptive" else \
        dict(steps=6, rule=rule, tolerance=None, batch_size=24)
    _assert_same_gig(*_gig_pair(f, 6, 8, 8, g, **options))
