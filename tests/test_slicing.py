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


def test_bn_shift_bottleneck_is_bn3():
    model = tiny_resnet()
    for point, block in (("layer1.1", model.layer1[1]), ("layer2.0", model.layer2[0])):
        bn = block.bn3
        expected = bn.bias - bn.weight * bn.running_mean / torch.sqrt(bn.running_var + bn.eps)
        torch.testing.assert_close(bn_shift(model, point), expected.detach())
        assert bn_shift(model, point).abs().max() > 0


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
