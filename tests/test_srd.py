"""SRD: conservation layer to layer, iERFs inside the theoretical receptive field, exactness on a
linear network, batching, gradient×input shapes and clear errors."""
import pytest
import torch
import torchvision
from torch import nn

from gig_fast.models import DemoResNet, get_adapter
from gig_fast.srd import conv_step_ratios, explain, gradxinput_explain, propagate, srd_explain


def _randomise_bn(model):
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.3)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.normal_(1.0, 0.3)
            m.bias.data.normal_(0.0, 0.3)
    return model.eval()


def _argmax_select(name, contrib):
    return contrib.flatten(1).argmax(1)


@pytest.mark.parametrize("arch", ["demo", "resnet18_maxpool"])
def test_relevance_is_conserved_layer_to_layer(arch):
    if arch == "demo":
        model, x = _randomise_bn(DemoResNet(base=2)).double(), torch.randn(3, 1, 28, 28, dtype=torch.float64)
    else:  # torchvision stem: 7×7 stride-2 conv + max-pool; BasicBlocks
        model = _randomise_bn(torchvision.models.resnet18(weights=None, num_classes=5)).double()
        x = torch.randn(2, 3, 40, 40, dtype=torch.float64)
    adapter = get_adapter(model)
    res = srd_explain(adapter, x, select=_argmax_select)
    z = res.logits.gather(1, res.target[:, None])[:, 0]
    for name, contrib in res.contributions.items():  # every layer and the input pixels sum to z_c
        torch.testing.assert_close(contrib.flatten(1).sum(1), z, rtol=1e-6, atol=1e-7, msg=name)
    for name, ierf in res.ierf.items():  # an iERF carries relevance 1 down to the pixels
        torch.testing.assert_close(ierf.flatten(1).sum(1), torch.ones_like(z), rtol=1e-6, atol=1e-7, msg=name)
    assert all(torch.isfinite(c).all() for c in res.contributions.values())


def _theoretical_rf(model, point, pos, in_hw):
    """Receptive field of one output position, found by autograd on a model with all-positive weights."""
    probe = _randomise_bn(type(model)(base=model.base)).double() if isinstance(model, DemoResNet) else None
    adapter = get_adapter(probe)
    x = torch.zeros(1, 1, *in_hw, dtype=torch.float64, requires_grad=True)
    for p in probe.parameters():
        p.data.abs_().add_(0.1)
    for m in probe.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.zero_()
    with torch.enable_grad():
        h = torch.relu(probe.bn1(probe.conv1(x)) + 10.0)  # keep every ReLU open
        for name, block in adapter.blocks.items():
            v = adapter._block_preact(block, h)
            if name == point:
                v.flatten(2)[0, :, pos].sum().backward()
                break
            h = torch.relu(v + 10.0)
    return x.grad[0, 0] != 0


@pytest.mark.parametrize("point", ["layer1.1", "layer2.0"])
def test_ierf_is_zero_outside_the_theoretical_receptive_field(point):
    model = _randomise_bn(DemoResNet(base=2)).double()
    adapter = get_adapter(model)
    x = torch.randn(2, 1, 28, 28, dtype=torch.float64)
    H, W = adapter.record(x).preact(point).shape[-2:]
    pos = torch.tensor([0, (H // 2) * W + W // 2])  # a corner and the centre
    res = srd_explain(adapter, x, select=lambda n, c: pos if n == point else None, points=[point])
    ierf = res.ierf[point]
    for b in range(2):
        rf = _theoretical_rf(model, point, int(pos[b]), (28, 28))
        assert not rf.all(), "receptive field should not cover the whole image at this depth"
        assert (ierf[b][~rf] == 0).all()
        assert (ierf[b][rf] != 0).any()


def test_linear_single_channel_net_equals_exact_linear_decomposition():
    """With one channel per layer and no shifts, μ = u/v, so SRD is the exact linear split."""
    torch.manual_seed(torch.initial_seed() % 1000)
    convs = [nn.Conv2d(1, 1, 3, stride=s, padding=1, bias=False).double() for s in (1, 2, 1)]
    # μ = u/v divides by every intermediate output: one within ~1e-10 of 0 (a few % of random draws)
    # magnifies rounding to ~1e-6, so the check draws inputs whose outputs keep away from 0
    while True:
        x = torch.randn(2, 1, 9, 9, dtype=torch.float64)
        acts = [x]
        for c in convs:
            acts.append(c(acts[-1]))
        if all(bool(a.abs().min() > 1e-3 * a.abs().max()) for a in acts[1:]):
            break
    out = acts[-1]
    R = out[:, :1]  # relevance of each final position = its value; total = Σ out
    for conv, inp, o in zip(reversed(convs), reversed(acts[:-1]), reversed(acts[1:])):
        mu = conv_step_ratios(inp, conv, None, o.detach(), eps=1e-15)
        R = propagate(R, mu, conv.kernel_size, conv.stride, conv.padding, conv.dilation, inp.shape[-2:])
    # exact linear decomposition: the network is x ↦ A x, contribution of pixel i = Σ_j A_ji x_i
    xg = x.clone().requires_grad_(True)
    y = xg
    for c in convs:
        y = c(y)
    (grad,) = torch.autograd.grad(y.sum(), xg)
    exact = grad * x
    torch.testing.assert_close(R, exact, rtol=1e-9, atol=1e-9 * float(exact.abs().max()))


def test_batched_equals_one_image_at_a_time():
    model = _randomise_bn(DemoResNet(base=2))
    adapter = get_adapter(model)
    x = torch.randn(3, 1, 28, 28)
    full = srd_explain(adapter, x, select=_argmax_select, points=["layer2.1", "layer4.0"])
    for b in range(3):
        one = srd_explain(adapter, x[b:b + 1], select=_argmax_select, points=["layer2.1", "layer4.0"])
        for name in ("layer2.1", "layer4.0"):
            torch.testing.assert_close(one.contributions[name][0], full.contributions[name][b], rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(one.ierf[name][0], full.ierf[name][b], rtol=1e-4, atol=1e-5)


def test_no_nan_on_dead_regions_and_zero_skips():
    model = _randomise_bn(DemoResNet(base=2))
    adapter = get_adapter(model)
    x = torch.zeros(2, 1, 28, 28)
    x[1, :, 10:14, 10:14] = 3.0
    res = srd_explain(adapter, x, select=_argmax_select)
    assert all(torch.isfinite(v).all() for v in list(res.contributions.values()) + list(res.ierf.values()))


def test_gradxinput_shapes_and_dispatch():
    model = _randomise_bn(DemoResNet(base=2))
    adapter = get_adapter(model)
    x = torch.randn(2, 1, 28, 28)
    sel = lambda n, c: torch.stack([c.flatten(1).argmax(1), c.flatten(1).argmin(1)], 1)  # noqa: E731
    res = explain(adapter, x, method="gradxinput", select=sel, points=["layer3.0"])
    assert res.ierf["layer3.0"].shape == (2, 2, 28, 28)
    assert res.contributions["layer3.0"].shape == (2, 4, 4)
    # gradient×input contributions of the last layer equal the logit minus the fc bias (linear head)
    last = gradxinput_explain(adapter, x, target=torch.tensor([3, 3]), points=["layer4.2"])
    z = last.logits[:, 3] - model.fc.bias[3]
    torch.testing.assert_close(last.contributions["layer4.2"].flatten(1).sum(1), z, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="unknown attribution method"):
        explain(adapter, x, method="lrp")


def test_bad_inputs_are_clear_errors():
    model = _randomise_bn(DemoResNet(base=2))
    adapter = get_adapter(model)
    x = torch.randn(2, 1, 28, 28)
    with pytest.raises(ValueError, match="valid names"):
        srd_explain(adapter, x, points=["layer5.0"])
    with pytest.raises(ValueError, match="out of range"):
        srd_explain(adapter, x, target=torch.tensor([0, 10]))
    with pytest.raises(ValueError, match="positions out of range"):
        srd_explain(adapter, x, select=lambda n, c: torch.full((2,), 10_000))
    x[0, 0, 3, 3] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        srd_explain(adapter, x)
