"""f_ab slicing helpers: point names, pre-activations, F_ab = the rest of the network, β of the BN."""
from __future__ import annotations

import pytest
import torch
import torchvision

from gig_fast.slicing import bn_shift, make_f_ab, preact_points, preactivation
from gig_fast.testing import randomize_bn, tiny_residual_cnn, tiny_resnet


def _resnet18():
    return randomize_bn(torchvision.models.resnet18(num_classes=7)).eval()


def test_points_of_torchvision_resnets():
    assert preact_points(torchvision.models.resnet50()) == [
        f"layer{i}.{j}" for i, n in zip(range(1, 5), (3, 4, 6, 3)) for j in range(n)] + ["logits"]
    assert preact_points(_resnet18())[:3] == ["layer1.0", "layer1.1", "layer2.0"]


def test_preactivation_is_block_output_before_relu():
    """X^a = bn3(conv3(·)) + identity, captured with a hook on the block's inputs (independent route)."""
    model = tiny_resnet()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    block = model.layer2[0]
    seen = {}
    handle = block.register_forward_hook(lambda mod, inp, out: seen.update(inp=inp[0]))
    try:
        with torch.no_grad():
            model(x)
    finally:
        handle.remove()
    with torch.no_grad():
        h = block.relu(block.bn1(block.conv1(seen["inp"])))
        h = block.relu(block.bn2(block.conv2(h)))
        expected = block.bn3(block.conv3(h)) + block.downsample(seen["inp"])
        got = preactivation(model, "layer2.0", x)
    torch.testing.assert_close(got, expected)
    assert (got < 0).any(), "a pre-activation has negative entries (no ReLU applied)"


@pytest.mark.parametrize("a,b", [("layer1.0", "layer2.0"), ("layer1.1", "logits"), ("layer2.0", "layer3.0"),
                                 ("layer1.0", "fc"), ("layer1.0", "layer1.1.add")])
def test_f_ab_composes_to_the_model(a, b):
    model = tiny_resnet()
    x = torch.randn(3, 3, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        xa = preactivation(model, a, x)
        xa_copy = xa.clone()
        out = make_f_ab(model, a, b)(xa)
        expected = model(x) if b in ("logits", "fc") else preactivation(model, b, x)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(xa, xa_copy, msg="F_ab must not modify its input (in-place ReLU)")


def test_f_ab_does_not_run_the_prefix():
    model = tiny_resnet()
    f = make_f_ab(model, "layer2.0", "logits")
    calls = []
    handle = model.layer1.register_forward_hook(lambda *a: calls.append(1))
    try:
        f(torch.randn(1, 16, 4, 4, dtype=torch.float64))
    finally:
        handle.remove()
    assert not calls
    assert f.point_a == "layer2.0.add" and f.point_b == "fc"


def test_f_ab_shares_parameters_and_is_differentiable():
    model = tiny_resnet()
    f = make_f_ab(model, "layer1.1", "layer2.0")
    xa = torch.randn(2, 8, 8, 8, dtype=torch.float64, requires_grad=True)
    y1 = f(xa).sum()
    with torch.no_grad():
        model.layer2[0].conv3.weight.mul_(2.0)
    y2 = f(xa).sum()
    assert not torch.allclose(y1, y2), "F_ab must use the model's live parameters, not a copy"
    (grad,) = torch.autograd.grad(f(xa).sum(), xa)
    assert grad.shape == xa.shape and torch.isfinite(grad).all()


def test_resnet18_logits_and_basicblock_beta():
    model = _resnet18()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        xa = preactivation(model, "layer3.1", x)
        torch.testing.assert_close(make_f_ab(model, "layer3.1", "logits")(xa), model(x), rtol=1e-4, atol=1e-5)
    bn = model.layer3[1].bn2  # BasicBlock: bn2 feeds the residual sum
    expected = bn.bias - bn.weight * bn.running_mean / torch.sqrt(bn.running_var + bn.eps)
    torch.testing.assert_close(bn_shift(model, "layer3.1"), expected.detach())


def _shift(bn):
    return (bn.bias - bn.weight * bn.running_mean / torch.sqrt(bn.running_var + bn.eps)).detach()


def test_bn_shift_bottleneck_is_bn3_at_an_identity_block():
    model = tiny_resnet()
    bn = model.layer1[1].bn3
    torch.testing.assert_close(bn_shift(model, "layer1.1"), _shift(bn))
    assert bn_shift(model, "layer1.1").abs().max() > 0


class _TwoBranchSum(torch.nn.Module):
    """A block built by hand: ``bn_a(conv_a(x)) + bn_b(conv_b(x))`` (a ResNet block with a downsample
    branch), then a third BN output added, then a head."""

    def __init__(self):
        super().__init__()
        self.stem = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.conv_a, self.bn_a = torch.nn.Conv2d(4, 6, 3, padding=1, bias=False), torch.nn.BatchNorm2d(6)
        self.conv_b, self.bn_b = torch.nn.Conv2d(4, 6, 1, bias=False), torch.nn.BatchNorm2d(6)
        self.conv_c, self.bn_c = torch.nn.Conv2d(4, 6, 1, bias=False), torch.nn.BatchNorm2d(6)
        self.head = torch.nn.Linear(6, 3)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        two = self.bn_a(self.conv_a(x)) + self.bn_b(self.conv_b(x))
        three = two + self.bn_c(self.conv_c(x))
        return self.head(torch.relu(three).mean((2, 3)))


def test_bn_shift_of_a_sum_of_bn_outputs_is_the_sum_of_their_shifts():
    """β is "no concept present": with every conv feeding a BN silenced, the point's value is β itself.

    Today's rule took the first BN's shift alone; the sum of two (a downsample block) or three BN outputs
    gets the sum of their shifts.
    """
    model = randomize_bn(_TwoBranchSum(), torch.Generator().manual_seed(1)).double().eval()
    expected_two = _shift(model.bn_a) + _shift(model.bn_b)
    torch.testing.assert_close(bn_shift(model, "add"), expected_two)
    torch.testing.assert_close(bn_shift(model, "add_1"), expected_two + _shift(model.bn_c))
    with torch.no_grad():
        for conv in (model.conv_a, model.conv_b, model.conv_c):
            conv.weight.zero_()
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    for point in ("add", "add_1"):
        value = preactivation(model, point, x)  # [2, 6, 5, 5], constant β per channel
        torch.testing.assert_close(value, bn_shift(model, point)[None, :, None, None].expand_as(value))


def test_bn_shift_of_a_downsample_block_adds_the_downsample_bn():
    model = tiny_resnet()
    block = model.layer2[0]  # bn3(conv3(·)) + downsample = bn(conv1x1(·))
    torch.testing.assert_close(bn_shift(model, "layer2.0"), _shift(block.bn3) + _shift(block.downsample[1]))
    with torch.no_grad():
        block.conv3.weight.zero_()
        block.downsample[0].weight.zero_()
    value = preactivation(model, "layer2.0", torch.randn(2, 3, 8, 8, dtype=torch.float64))
    torch.testing.assert_close(value, bn_shift(model, "layer2.0")[None, :, None, None].expand_as(value))


def test_bn_shift_other_nodes():
    model = tiny_residual_cnn()
    bn = model.branch[4]
    torch.testing.assert_close(bn_shift(model, "add"),
                               (bn.bias - bn.weight * bn.running_mean / torch.sqrt(bn.running_var + bn.eps)).detach())
    bn = model.down_bn
    torch.testing.assert_close(bn_shift(model, "down_bn"),
                               (bn.bias - bn.weight * bn.running_mean / torch.sqrt(bn.running_var + bn.eps)).detach())
    zero = bn_shift(model, "down")  # a conv output: no BN feeds it
    assert zero.shape == (8,) and torch.all(zero == 0)


def test_generic_fx_model():
    model = tiny_residual_cnn()
    assert preact_points(model) == ["logits"]
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        xa = preactivation(model, "add", x)
        torch.testing.assert_close(make_f_ab(model, "add", "logits")(xa), model(x))
        assert make_f_ab(model, "add", "down_bn")(xa).shape == (2, 8, 4, 4)


def test_errors():
    model = tiny_resnet()
    with pytest.raises(ValueError, match=r"unknown point 'layer9.9'.*layer1.0"):
        make_f_ab(model, "layer9.9", "logits")
    with pytest.raises(ValueError, match="unknown point"):
        preactivation(model, "nope", torch.randn(1, 3, 8, 8, dtype=torch.float64))
    with pytest.raises(ValueError, match="unknown point"):
        bn_shift(model, "nope")
    with pytest.raises(ValueError, match="same node"):
        make_f_ab(model, "layer2.0", "layer2.0.add")
    with pytest.raises(ValueError, match="does not depend on the input through"):
        make_f_ab(model, "layer2.0", "layer1.1")
    with pytest.raises(ValueError, match="must be a string"):
        make_f_ab(model, 3, "logits")
