"""Models: demo network shape, adapters (points, β, forward walk, F_ab), weight loading, eval mode."""
import json
import warnings

import pytest
import torch
import torchvision

from gig_fast.models import DemoResNet, get_adapter, load_demo, load_model
from gig_fast.models.bn import bn_affine

RESNET50_POINTS = [f"layer{s}.{i}" for s, n in zip((1, 2, 3, 4), (3, 4, 6, 3)) for i in range(n)]


def _randomise_bn(model):
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.3)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.normal_(1.0, 0.3)
            m.bias.data.normal_(0.0, 0.3)
    return model


def test_demo_has_the_16_resnet50_blocks():
    model = DemoResNet(base=4).eval()
    adapter = get_adapter(model)
    assert adapter.points == RESNET50_POINTS
    x = torch.randn(3, 1, 28, 28)
    rec = adapter.record(x)
    assert torch.allclose(rec.logits, model(x), atol=1e-5)
    assert [adapter.channels(p) for p in ("layer1.0", "layer2.0", "layer3.0", "layer4.2")] == [16, 32, 64, 128]
    assert rec.preact("layer4.2").shape == (3, 128, 2, 2)


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_torchvision_adapter_preact_and_f_ab(arch):
    model = _randomise_bn(getattr(torchvision.models, arch)(weights=None, num_classes=7)).eval()
    adapter = get_adapter(model)
    n = (2, 2, 2, 2) if arch == "resnet18" else (3, 4, 6, 3)
    assert len(adapter.points) == sum(n)
    x = torch.randn(2, 3, 32, 32)
    rec = adapter.record(x)
    assert torch.allclose(rec.logits, model(x), atol=1e-4)
    # the pre-activation is the block output before its final ReLU: relu(v) is the block's output
    feats = {}
    hook = model.layer2[1].register_forward_hook(lambda m, i, o: feats.setdefault("out", o))
    try:
        model(x)
    finally:
        hook.remove()
    assert torch.allclose(torch.relu(rec.preact("layer2.1")), feats["out"], atol=1e-5)
    # F_ab from a point to the next and to the logits, no prefix recomputed
    a, b = adapter.points[2], adapter.points[3]
    assert torch.allclose(adapter.run_from(a, rec.preact(a), b), rec.preact(b), atol=1e-4)
    assert torch.allclose(adapter.run_from(a, rec.preact(a)), rec.logits, atol=1e-4)


def test_bn_shift_matches_formula():
    model = _randomise_bn(DemoResNet(base=4)).eval()
    adapter = get_adapter(model)
    bn = model.layer3[2].bn3
    expected = bn.bias - bn.weight * bn.running_mean / torch.sqrt(bn.running_var + bn.eps)
    # float32 rounding of two orders of the same formula: absolute tolerance, an entry may be near 0
    torch.testing.assert_close(adapter.bn_shift("layer3.2"), expected.detach())
    scale, shift = bn_affine(bn, bn.num_features, bn.weight)
    y = torch.randn(2, bn.num_features, 3, 3)
    assert torch.allclose(bn(y), y * scale[:, None, None] + shift[:, None, None], atol=1e-5)


def test_unknown_layer_lists_valid_names():
    adapter = get_adapter(DemoResNet(base=4).eval())
    with pytest.raises(ValueError, match="valid names: layer1.0, layer1.1"):
        adapter.check_points(["layer9.9"])
    assert adapter.check_points(["layer4.0", "layer1.2"]) == ["layer1.2", "layer4.0"]


def test_train_mode_model_is_switched_to_eval_with_warning():
    model = DemoResNet(base=4).train()
    with pytest.warns(UserWarning, match="train mode"):
        get_adapter(model)
    assert not model.training


def test_unsupported_model_is_a_clear_error():
    with pytest.raises(ValueError, match="no analysis points.*pass FX node names"):
        get_adapter(torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3)))


def test_weights_round_trip_through_local_files(tmp_path):
    model = _randomise_bn(DemoResNet(base=4)).eval()
    path = tmp_path / "demo.pt"
    torch.save({"base": 4, "state_dict": model.state_dict()}, path)
    loaded = load_demo(path)
    x = torch.randn(2, 1, 28, 28)
    assert torch.equal(loaded(x), model(x))
    tv = _randomise_bn(torchvision.models.resnet18(weights=None, num_classes=5)).eval()
    torch.save(tv.state_dict(), tmp_path / "r18.pt")
    again = load_model("resnet18", tmp_path / "r18.pt")
    assert not again.training and torch.equal(again(torch.randn(1, 3, 32, 32) * 0 + 1), tv(torch.ones(1, 3, 32, 32)))
    with pytest.raises(ValueError, match="unknown arch"):
        load_model("vgg11")
    with pytest.raises(FileNotFoundError, match="train-demo"):
        load_demo(tmp_path / "missing.pt")


def test_train_demo_caches_weights_and_accuracy(tmp_path, monkeypatch):
    import gig_fast.models.demo as demo

    images = torch.randn(64, 1, 28, 28)
    labels = torch.randint(0, 10, (64,))
    # where train_demo looks the data set up (patching gig_fast.data would leave it on the real 60,000)
    monkeypatch.setattr(demo, "fashion_mnist",
                        lambda split, root=None: torch.utils.data.TensorDataset(images, labels))
    from gig_fast.models import train_demo

    path = tmp_path / "w.pt"
    model, info = train_demo(path, epochs=1, base=2, batch_size=32, progress=False)
    meta = json.loads((tmp_path / "w.pt.json").read_text())
    assert 0.0 <= meta["test_accuracy"] <= 1.0 and meta == info and meta["train_images"] == 64
    assert [row["epoch"] for row in meta["curve"]] == [1] and meta["augment"] is True
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again, info2 = train_demo(path, progress=False)  # cached: loads, does not retrain
    assert info2 == info
    x = torch.randn(2, 1, 28, 28)
    assert torch.equal(again(x), model(x))


def test_augment_batch_flips_and_shifts_each_image():
    """Every augmented image is its original, maybe mirrored, shifted by at most 2 pixels on the black
    background; the draws come from the generator alone (a seed reproduces them)."""
    from gig_fast.models.demo import DEMO_MEAN, DEMO_STD, augment_batch

    x = torch.randn(16, 1, 28, 28)
    out = augment_batch(x, torch.Generator().manual_seed(5))
    assert torch.equal(out, augment_batch(x, torch.Generator().manual_seed(5)))
    black = (0.0 - DEMO_MEAN) / DEMO_STD
    padded = torch.nn.functional.pad(torch.cat([x, x.flip(-1)], 1), (2, 2, 2, 2), value=black)  # [16, 2, 32, 32]
    moved = 0
    for b in range(16):
        options = [(f, dy, dx) for f in range(2) for dy in range(5) for dx in range(5)
                   if torch.equal(out[b, 0], padded[b, f, dy:dy + 28, dx:dx + 28])]
        assert options, f"image {b} is not a flip/shift of its original"
        moved += (0, 2, 2) not in options
    assert moved > 8  # most images are changed (1 in 50 draws is the identity)


def test_shipped_demo_weights_are_what_their_record_says():
    """The package ships trained weights (loaded with weights_only=True) whose test accuracy is the
    recorded one (≥ 91%), with the record of how to reproduce them."""
    from gig_fast.data import fashion_mnist
    from gig_fast.models import DEMO_TRAINING, SHIPPED_DEMO_WEIGHTS, shipped_demo_info

    info = shipped_demo_info()
    assert info["test_accuracy"] >= 0.91 and info["train_images"] == 60000
    assert {k: info[k] for k in DEMO_TRAINING} == DEMO_TRAINING  # `gig-fast train-demo` defaults reproduce them
    assert {"seed", "epochs", "train_seconds", "torch"} <= info.keys()
    assert SHIPPED_DEMO_WEIGHTS.stat().st_size < 2 * 2**20
    model = load_demo()  # the shipped file
    x, y = fashion_mnist("test").tensors
    with torch.no_grad():
        correct = sum(int((model(x[i:i + 1000]).argmax(1) == y[i:i + 1000]).sum()) for i in range(0, len(y), 1000))
    assert abs(correct / len(y) - info["test_accuracy"]) <= 5e-4  # threads may flip a near-tie or two


def test_package_ships_the_demo_weights():
    import tomllib
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    shipped = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["gig_fast.models"]
    assert set(shipped) == {"weights/demo_resnet.pt", "weights/demo_resnet.pt.json"}
    assert all((root / "gig_fast" / "models" / f).exists() for f in shipped)
    assert "gig_fast/models/weights/demo_resnet.pt" in (root / "MANIFEST.in").read_text()


def test_adapter_agrees_with_fx_slicing():
    """The adapter's pre-activations and β are the points `gig_fast.slicing` slices at."""
    from gig_fast.slicing import bn_shift, make_f_ab

    model = _randomise_bn(DemoResNet(base=2)).eval()
    adapter = get_adapter(model)
    rec = adapter.record(torch.randn(2, 1, 28, 28))
    f = make_f_ab(model, "layer2.3", "layer3.0")
    torch.testing.assert_close(f(rec.preact("layer2.3")), rec.preact("layer3.0"))
    torch.testing.assert_close(make_f_ab(model, "layer4.2", "logits")(rec.preact("layer4.2")), rec.logits)
    for point in ("layer1.0", "layer1.1", "layer2.0", "layer4.0"):  # with and without a downsample branch
        torch.testing.assert_close(bn_shift(model, point), adapter.bn_shift(point))


def test_adapter_bn_shift_of_a_downsample_block_is_the_net_shift():
    """At a block with a downsample branch the pre-activation is bn3(·) + bn_ds(·): β is both shifts,
    so silencing the two convs that feed them leaves exactly β (paper Eq. 8)."""
    model = _randomise_bn(DemoResNet(base=2)).eval()
    adapter = get_adapter(model)
    block = model.layer3[0]
    shifts = [bn_affine(bn, bn.num_features, bn.weight)[1] for bn in (block.bn3, block.downsample[1])]
    torch.testing.assert_close(adapter.bn_shift("layer3.0"), (shifts[0] + shifts[1]).detach())
    with torch.no_grad():
        block.conv3.weight.zero_()
        block.downsample[0].weight.zero_()
    v = adapter.record(torch.randn(2, 1, 28, 28)).preact("layer3.0")  # [2, C, 4, 4]
    torch.testing.assert_close(v, adapter.bn_shift("layer3.0")[None, :, None, None].expand_as(v))


def test_folded_f_ab_is_the_same_function_without_batchnorms():
    from gig_fast.models.bn import fold_batchnorm
    from gig_fast.slicing import make_f_ab

    model = _randomise_bn(DemoResNet(base=4)).eval()
    adapter = get_adapter(model)
    f = make_f_ab(model, "layer2.0", "layer3.1")
    folded = adapter.f_ab("layer2.0", "layer3.1")
    def bn_calls(gm):
        return sum(n.op == "call_module" and isinstance(gm.get_submodule(n.target), torch.nn.BatchNorm2d)
                   for n in gm.graph.nodes)

    assert bn_calls(folded) == 0 and bn_calls(f) > 0  # the cached slice itself is untouched
    x = torch.randn(3, adapter.channels("layer2.0"), 4, 4)
    torch.testing.assert_close(folded(x), f(x), rtol=1e-5, atol=1e-5)
    x.requires_grad_(True)
    (g_folded,) = torch.autograd.grad(folded(x).square().sum(), x)
    (g_plain,) = torch.autograd.grad(f(x).square().sum(), x)
    torch.testing.assert_close(g_folded, g_plain, rtol=1e-4, atol=1e-4)
    model.train()  # train mode: nothing is folded (BN would use batch statistics)
    assert bn_calls(fold_batchnorm(make_f_ab(model, "layer2.0", "layer3.1"))) > 0
