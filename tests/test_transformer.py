"""Vision transformers and timm models: the token adapter, GIG on a transformer slice against Captum's
LayerIntegratedGradients, tokens through the same ops and stages, weights by name, clear errors."""
from __future__ import annotations

import zlib

import numpy as np
import pytest
import timm  # noqa: F401  (a dependency: these tests fail, not skip, without it)
import torch
from torch import nn

from gig_fast.gig import ClassTarget, ConceptTarget, gig
from gig_fast.models import TransformerAdapter, get_adapter, load_model
from gig_fast.models.transformer import position_grid, row_to_tokens
from gig_fast.ops import sparse_reconstruct
from gig_fast.srd import explain, gradxinput_explain
from gig_fast.testing import fitted_codes


@pytest.fixture
def seed(request):
    """A seed derived from the test id (printed on failure by the assertion messages that use it)."""
    return zlib.crc32(request.node.nodeid.encode()) % (2 ** 31)


def tiny_timm_vit(dtype=torch.float64, seed=0, reg_tokens=0, global_pool="token", num_classes=3):
    """A timm ViT on 16×16 RGB inputs: 4×4 patches of 4×4 pixels + class token, width 24, three blocks."""
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(seed)
    m = VisionTransformer(img_size=16, patch_size=4, in_chans=3, num_classes=num_classes, embed_dim=24, depth=3,
                          num_heads=2, mlp_ratio=2.0, reg_tokens=reg_tokens, global_pool=global_pool)
    with torch.no_grad():  # timm initialises the class token and position embedding near 0: make them count
        m.cls_token.normal_(0, 1.0)
        m.pos_embed.normal_(0, 0.5)
    return m.to(dtype).eval()


def tiny_torchvision_vit(dtype=torch.float64, seed=0):
    from torchvision.models.vision_transformer import VisionTransformer

    torch.manual_seed(seed)
    return VisionTransformer(image_size=16, patch_size=4, num_layers=2, num_heads=2, hidden_dim=16, mlp_dim=32,
                             num_classes=3).to(dtype).eval()


# ---------------------------------------------------------------------------------------------
# the adapter
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("build, points, prefix", [
    (tiny_timm_vit, ["blocks.0", "blocks.1", "blocks.2"], 1),
    (lambda: tiny_timm_vit(reg_tokens=2, global_pool="avg"), ["blocks.0", "blocks.1", "blocks.2"], 3),
    (tiny_torchvision_vit, ["encoder.layers.encoder_layer_0", "encoder.layers.encoder_layer_1"], 1),
])
def test_adapter_records_token_rows_and_slices_without_the_prefix(build, points, prefix, seed):
    model = build()
    adapter = get_adapter(model)
    assert isinstance(adapter, TransformerAdapter) and adapter.points == points and adapter.prefix == prefix
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    rec = adapter.record(x)
    # rounding only: torchvision's attention takes another kernel under no_grad (its inference fast path)
    torch.testing.assert_close(rec.logits, model(x), rtol=1e-12, atol=1e-12)
    N = prefix + 16
    for p in points:
        assert rec.preact(p).shape == (2, adapter.channels(p), 1, N)
    assert position_grid(adapter, points[0], (1, N)) == (prefix, (4, 4))
    # the row is the block output itself: tokens in the model's order (prefix first)
    blocks = dict(model.named_modules())
    got = {}
    handle = blocks[points[0]].register_forward_hook(lambda m, i, o: got.setdefault("t", o.detach()))
    model(x)
    handle.remove()
    torch.testing.assert_close(row_to_tokens(rec.preact(points[0])), got["t"], rtol=1e-12, atol=1e-12)
    # F_ab from a point's tokens: the next point, and the logits (float64: same ops, tiny rounding only)
    torch.testing.assert_close(adapter.run_from(points[0], rec.preact(points[0]), points[1]), rec.preact(points[1]),
                               rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(adapter.run_from(points[0], rec.preact(points[0])), rec.logits, rtol=1e-12, atol=1e-12)
    f = adapter.f_ab(points[-1], None)
    assert len(f.blocks) == 0 and {id(p) for p in f.parameters()} <= {id(p) for p in model.parameters()}
    assert not any(m._forward_hooks for m in model.modules())  # the recording hooks came off


def test_hooks_come_off_after_an_error():
    model = tiny_timm_vit()
    adapter = get_adapter(model)
    with pytest.raises(RuntimeError):
        adapter.record(torch.randn(1, 5, 16, 16, dtype=torch.float64))  # 5 channels: patch_embed fails
    assert not any(m._forward_hooks for m in model.modules())


def test_bad_points_and_options_are_clear_errors():
    model = tiny_timm_vit()
    with pytest.raises(ValueError, match=r"valid names \(the transformer blocks\): blocks.0, blocks.1, blocks.2"):
        get_adapter(model, points=["blocks.7"])
    adapter = get_adapter(model, points=["blocks.2", "blocks.0"])
    assert adapter.points == ["blocks.0", "blocks.2"]
    with pytest.raises(ValueError, match="not after"):
        adapter.f_ab("blocks.2", "blocks.0")
    with pytest.raises(ValueError, match="class_token must be one of"):
        get_adapter(model, class_token="maybe")
    with pytest.raises(ValueError, match="applies to vision transformers"):
        get_adapter(torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3)), class_token="drop")
    with pytest.raises(ValueError, match="mean token of the concept dataset"):
        adapter.bn_shift("blocks.0")
    assert TransformerAdapter(model, baseline="zero").bn_shift("blocks.0").abs().max() == 0


def test_unsliceable_model_says_why_and_which_points_it_offers():
    model = load_model("timm:mixer_s16_224", num_classes=3)  # MLP-Mixer: tokens, but not a VisionTransformer
    adapter = get_adapter(model)
    with pytest.raises(ValueError, match=r"not a \[B, C, H, W\] feature map.*offers \(blocks.0, blocks.1, .*blocks.7\)"):
        adapter.record(torch.randn(1, 3, 224, 224))


# ---------------------------------------------------------------------------------------------
# β, gradient × input, token-grid iERFs
# ---------------------------------------------------------------------------------------------
def test_baseline_is_the_mean_token_of_the_concept_dataset(seed):
    adapter = get_adapter(tiny_timm_vit())
    pfvs = torch.randn(50, 24, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)) + 3.0
    torch.testing.assert_close(adapter.baseline("blocks.1", pfvs), pfvs.mean(0))
    zero = TransformerAdapter(adapter.model, baseline="zero").baseline("blocks.1", pfvs)
    assert zero.shape == (24,) and zero.abs().max() == 0


def test_gradxinput_on_tokens_and_token_grid_ierfs(seed):
    model = tiny_timm_vit()
    adapter = get_adapter(model)
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    picks = torch.tensor([0, 7])  # the class token of image 0, patch token 6 of image 1
    res = gradxinput_explain(adapter, x, select=lambda p, c: picks)
    # contributions: Σ_c v · ∂z/∂v for every token, by an independent route (autograd on F_ab)
    rec = adapter.record(x)
    v = rec.preact("blocks.1").detach().requires_grad_(True)
    z = adapter.run_from("blocks.1", v).gather(1, res.target[:, None]).sum()
    (g,) = torch.autograd.grad(z, v)
    torch.testing.assert_close(res.contributions["blocks.1"], (g * v).sum(1).detach(), rtol=1e-10, atol=1e-12)
    assert res.positions["blocks.1"].tolist() == [0, 7]
    # iERF of token p: input gradient × input of ⟨v_p, v̂_p⟩/‖v_p‖², summed per 4×4 patch
    xin = x.clone().requires_grad_(True)
    vs, _ = adapter.forward_points(xin)
    row = vs["blocks.1"][1, :, 0, 7]
    (gx,) = torch.autograd.grad((row * row.detach()).sum() / (row.detach() ** 2).sum(), xin)
    per_patch = (gx * xin).sum(1)[1].detach().reshape(4, 4, 4, 4).sum((1, 3))
    ierf = res.ierf["blocks.1"][1]
    torch.testing.assert_close(ierf.reshape(4, 4, 4, 4)[:, 0, :, 0] * 16, per_patch, rtol=1e-8, atol=1e-12)
    assert torch.equal(ierf.reshape(4, 4, 4, 4), ierf.reshape(4, 4, 4, 4)[:, :1, :, :1].expand(-1, 4, -1, 4))


def test_dropped_class_token_is_never_sampled(seed):
    model = tiny_timm_vit()
    keep, drop = get_adapter(model), get_adapter(model, class_token="drop")
    x = torch.randn(3, 3, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    first = lambda p, c: torch.zeros(c.shape[0], dtype=torch.long)  # noqa: E731  (the first offered position)
    assert explain(keep, x, method="gradxinput", select=first).positions["blocks.2"].tolist() == [0, 0, 0]
    res = explain(drop, x, method="gradxinput", select=first)
    assert res.positions["blocks.2"].tolist() == [1, 1, 1]  # patch token 0 is position 1 of the row
    assert res.contributions["blocks.2"].shape == (3, 1, 17)  # still reported for every token


# ---------------------------------------------------------------------------------------------
# GIG on a transformer slice = Captum's LayerIntegratedGradients on the same function
# ---------------------------------------------------------------------------------------------
class _Reconstruct(nn.Module):
    """``val [n, P, s] ↦`` the token row ``β + U V`` ``[n, C, 1, P]`` of fixed codes' indices."""

    def __init__(self, idx, V, beta):
        super().__init__()
        self.idx, self.V, self.beta = idx, V, beta

    def forward(self, val):
        n, P, s = val.shape
        idx = self.idx.repeat(n // self.idx.shape[0], 1, 1)  # Captum stacks the α-points along the batch
        X = sparse_reconstruct(idx.reshape(-1, s), val.reshape(-1, s), self.V, self.beta, backend="torch")
        return X.reshape(n, 1, P, -1).permute(0, 3, 1, 2)


class _Attributed(nn.Module):
    """T(F_ab(reconstruct(val))): the function GIG integrates, as a module Captum can hook."""

    def __init__(self, recon, f_ab, target_fn):
        super().__init__()
        self.recon, self.f_ab, self.target_fn = recon, f_ab, target_fn

    def forward(self, val):
        return self.target_fn(self.f_ab(self.recon(val)))


def _codes_of(adapter, point, x, seed, K_factor=3, s=5):
    xa = adapter.record(x).preact(point)
    beta = xa.permute(0, 2, 3, 1).reshape(-1, xa.shape[1]).mean(0)  # the mean token: the adapter's β
    V, idx, val = fitted_codes(xa, beta, K_factor * xa.shape[1], s, torch.Generator().manual_seed(seed))
    return (idx, val), V, beta, xa


@pytest.mark.parametrize("a, b", [("blocks.0", "blocks.2"), ("blocks.1", None)])
def test_gig_equals_captum_layer_integrated_gradients(a, b, seed):
    captum_attr = pytest.importorskip("captum.attr")
    model = tiny_timm_vit()
    adapter = get_adapter(model)
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    (idx, val), V, beta, xa = _codes_of(adapter, a, x, seed)
    f_ab = adapter.f_ab(a, b)
    if b is None:
        cls = torch.tensor([2, 0])
        target = ClassTarget(cls)
        target_fn = lambda out: torch.softmax(out, 1).gather(1, cls.repeat(out.shape[0] // 2)[:, None])[:, 0]  # noqa: E731
    else:
        vec = torch.randn(V.shape[1], dtype=torch.float64, generator=torch.Generator().manual_seed(seed + 1))
        target = ConceptTarget(vec)
        target_fn = lambda out: torch.einsum("nchw,c->n", out, vec / vec.norm())  # noqa: E731
    steps = 24
    res = gig(f_ab, (idx, val), V, beta, target, steps=steps, rule="gausslegendre", tolerance=None, spatial=(1, 17))
    recon = _Reconstruct(idx, V, beta)
    lig = captum_attr.LayerIntegratedGradients(_Attributed(recon, f_ab, target_fn), recon, multiply_by_inputs=True)
    # per (token, concept): LayerIG on the reconstruction's input (the codes; baseline 0 ↦ X(0) = β)
    expected = lig.attribute(val, baselines=torch.zeros_like(val), n_steps=steps, method="gausslegendre",
                             attribute_to_layer_input=True)
    err = (res.per_position - expected).abs().max() / expected.abs().max()
    assert err <= 1e-4, f"seed {seed}: relative error {err:.3e} against Captum LayerIG"
    # per (token, channel) on the token row itself, summed over channels = GIG summed over the token's concepts
    on_row = lig.attribute(val, baselines=torch.zeros_like(val), n_steps=steps, method="gausslegendre")
    per_token = on_row.sum(1)[:, 0]  # [B, P]
    err = (res.per_position.sum(2) - per_token).abs().max() / per_token.abs().max()
    assert err <= 1e-4, f"seed {seed}: per-token relative error {err:.3e}"
    # completeness, reported by GIG: Σ attributions = T(X(1)) − T(X(0)) up to the quadrature error
    rel = res.relative_delta()
    print(f"seed {seed} {a}→{b or 'logits'}: completeness |delta| {res.delta.abs().max():.3e}, relative {rel.max():.3e}")
    assert rel.max() < 1e-3, f"seed {seed}: completeness {rel.tolist()}"
    with torch.no_grad():
        span = target_fn(f_ab(recon(val))) - target_fn(f_ab(recon(torch.zeros_like(val))))
    torch.testing.assert_close(res.value_at_input - res.value_at_baseline, span, rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# weights by name: timm and torchvision, local files only
# ---------------------------------------------------------------------------------------------
def test_timm_and_torchvision_models_by_name_with_local_weights(tmp_path, seed):
    from safetensors.torch import save_file

    model = load_model("timm:vit_tiny_patch16_224", image_size=32, num_classes=4)
    assert isinstance(get_adapter(model), TransformerAdapter) and not model.training
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=torch.Generator().manual_seed(seed)))
    save_file(model.state_dict(), str(tmp_path / "vit.safetensors"))
    torch.save({"state_dict": model.state_dict()}, tmp_path / "vit.pt")
    x = torch.randn(2, 3, 32, 32)
    for name in ("vit.safetensors", "vit.pt"):
        again = load_model("timm:vit_tiny_patch16_224", tmp_path / name, image_size=32)
        assert torch.equal(again(x), model(x)), name  # the class count (4) comes from the file
    tv = load_model("vit_b_16", image_size=32, num_classes=3)
    assert isinstance(get_adapter(tv), TransformerAdapter)
    torch.save(tv.state_dict(), tmp_path / "tv.pt")
    assert torch.equal(load_model("vit_b_16", tmp_path / "tv.pt", image_size=32)(x), tv(x))
    convnext = load_model("torchvision:convnext_tiny", num_classes=3)
    assert type(get_adapter(convnext)).__name__ == "FXAdapter"
    from gig_fast.pipeline import PipelineConfig
    assert PipelineConfig(model="timm:vit_small_patch16_224").preprocessing()["std"] == (0.5, 0.5, 0.5)  # timm's own
    assert PipelineConfig(model="resnet50").preprocessing()["std"] == (0.229, 0.224, 0.225)  # ImageNet's
    with pytest.raises(ValueError, match="close names: vit_small_patch16_224"):
        load_model("timm:vit_smal_patch16_224")
    with pytest.raises(ValueError, match="unknown torchvision classifier 'vit_b_61'"):
        load_model("torchvision:vit_b_61")
    with pytest.raises(FileNotFoundError, match="local files only"):
        load_model("timm:resnet18", tmp_path / "missing.safetensors")
    with pytest.raises(ValueError, match="does not fit the model"):
        load_model("timm:resnet18", tmp_path / "vit.safetensors")


def test_pickled_objects_are_refused(tmp_path):
    torch.save({"state_dict": {"w": torch.zeros(1)}, "obj": np.dtype}, tmp_path / "evil.pt")  # not weights_only
    with pytest.raises(Exception, match="[Ww]eights only load failed|Unsupported global"):
        load_model("timm:resnet18", tmp_path / "evil.pt")


def test_gradxinput_contributions_do_not_depend_on_the_sampled_ierfs(seed):
    """The iERF backward passes of the upper points run through the lower points' tensors; the lower
    points' contributions must still be the class logit's gradient × input alone (CNNs and ViTs)."""
    from gig_fast.models import DemoResNet

    torch.manual_seed(seed)
    for adapter, x in ((get_adapter(DemoResNet(base=2).eval()), torch.randn(2, 1, 28, 28)),
                       (get_adapter(tiny_timm_vit()), torch.randn(2, 3, 16, 16, dtype=torch.float64))):
        alone = gradxinput_explain(adapter, x)
        sampled = gradxinput_explain(adapter, x, select=lambda p, c: c.flatten(1).argmax(1))
        for p in adapter.points:
            assert torch.equal(alone.contributions[p], sampled.contributions[p]), f"seed {seed}: {p}"
