"""Transformers with several prefix tokens (register tokens, DeiT's distillation token) under
``class_token="drop"``: stage 1 must never sample any prefix token, only patch tokens, and its sampler must
see the patch tokens' contributions (``contributions[..., prefix:]``), numbered in the row's own order.
(test_transformer.py covers the single class token.)"""
from __future__ import annotations

import pytest
import torch

from gig_fast.models import get_adapter
from gig_fast.models.transformer import position_grid
from gig_fast.srd import explain

timm = pytest.importorskip("timm")


def _vit_with_registers(reg_tokens: int):
    from timm.models.vision_transformer import VisionTransformer

    m = VisionTransformer(img_size=16, patch_size=4, in_chans=3, num_classes=3, embed_dim=24, depth=2, num_heads=2,
                          mlp_ratio=2.0, reg_tokens=reg_tokens, global_pool="avg")
    return m


def _deit_distilled():
    from timm.models.deit import VisionTransformerDistilled

    return VisionTransformerDistilled(img_size=16, patch_size=4, in_chans=3, num_classes=3, embed_dim=24, depth=2,
                                      num_heads=2, mlp_ratio=2.0)


@pytest.fixture(params=[("registers", 4), ("distilled", 2)], ids=["class-and-3-registers", "class-and-distillation"])
def model_and_prefix(request):
    torch.manual_seed(0)
    kind, prefix = request.param
    model = _vit_with_registers(prefix - 1) if kind == "registers" else _deit_distilled()
    with torch.no_grad():  # timm starts its prefix tokens near 0: make them count in the attention
        for name, p in model.named_parameters():
            if name in ("cls_token", "reg_token", "dist_token", "pos_embed"):
                p.normal_(0, 1.0)
    return model.double().eval(), prefix


def test_dropped_prefix_tokens_are_never_sampled(model_and_prefix, seed):
    model, prefix = model_and_prefix
    drop = get_adapter(model, class_token="drop")
    assert drop.prefix == prefix and drop.unsampled_prefix("blocks.1") == prefix
    x = torch.randn(3, 3, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    seen = {}

    def first(point, contrib):  # the first position offered, after recording what was offered
        seen[point] = contrib.clone()
        return torch.zeros(contrib.shape[0], dtype=torch.long)

    res = explain(drop, x, method="gradxinput", select=first)
    for point in drop.points:
        assert res.contributions[point].shape[-1] == prefix + 16  # every token is still reported
        torch.testing.assert_close(seen[point], res.contributions[point][..., prefix:], rtol=0, atol=0)
        assert res.positions[point].tolist() == [prefix] * 3  # patch token 0 is position `prefix` of the row
    # random draws over the offered positions: every one lands on a patch token
    draw = lambda point, c: torch.randint(0, c.shape[-1], (c.shape[0], 5))  # noqa: E731
    res = explain(drop, x, method="gradxinput", select=draw)
    for point in drop.points:
        pos = res.positions[point]
        assert int(pos.min()) >= prefix and int(pos.max()) < prefix + 16


def test_kept_prefix_tokens_are_offered_and_the_grid_starts_after_them(model_and_prefix, seed):
    model, prefix = model_and_prefix
    keep = get_adapter(model)
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    last = lambda point, c: torch.zeros(c.shape[0], dtype=torch.long)  # noqa: E731
    res = explain(keep, x, method="gradxinput", select=last)
    assert res.positions["blocks.1"].tolist() == [0, 0]  # kept: the class token is position 0 and offered
    assert position_grid(keep, "blocks.1", (1, prefix + 16)) == (prefix, (4, 4))
