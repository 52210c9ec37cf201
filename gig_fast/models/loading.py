"""Load a model by name: the demo networks, EfficientNet-Lite0, torchvision and timm models (weights by name
or from a local file).

Names: ``demo`` (the demo ResNet), ``demo-vit`` (the demo ViT), ``efficientnet-lite0``, a torchvision
ResNet (``resnet50``), ViT (``vit_b_16``) or ConvNeXt (``convnext_tiny``) by its bare name, any torchvision
classifier as ``torchvision:<name>``, and any timm model as ``timm:<name>`` (``timm:vit_small_patch16_224``,
``timm:convnext_atto``). Nothing is downloaded: ``weights`` is a local file (``.safetensors``, or a torch
file read with ``weights_only=True``), a torchvision weights name (needs a warm torch hub cache), or None
(random initialisation; demo: the weights shipped in the package; demo-vit: its cached trained weights).
"""
from __future__ import annotations

import difflib
import os
from pathlib import Path

import torch
from torch import nn

from .demo import load_demo
from .demo_vit import load_demo_vit

__all__ = ["load_model", "load_state_dict", "model_preprocessing", "TORCHVISION_RESNETS", "TORCHVISION_BY_NAME"]

TORCHVISION_RESNETS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152",
                       "wide_resnet50_2", "wide_resnet101_2", "resnext50_32x4d")
# torchvision models accepted by their bare name (any other classifier: "torchvision:<name>")
TORCHVISION_BY_NAME = TORCHVISION_RESNETS + ("vit_b_16", "vit_b_32", "vit_l_16", "vit_l_32", "vit_h_14",
                                             "convnext_tiny", "convnext_small", "convnext_base", "convnext_large")


def load_model(arch: str, weights: str | os.PathLike | None = None, num_classes: int | None = None,
               image_size: int | None = None) -> nn.Module:
    """Build ``arch`` and load its weights; the result is in eval mode.

    Args:
        arch: a name of the module docstring (``demo``, ``demo-vit``, ``timm:<name>``, …).
        weights: a local file (a state dict or ``{"state_dict": …}``: ``.safetensors`` or a torch file
            read with ``weights_only=True``), a torchvision weights name (``IMAGENET1K_V2``; needs internet
            or a warm torch hub cache), or None (demo: the trained weights shipped in the package;
            demo-vit: its cached trained weights; others: random init).
        num_classes: output classes of a randomly initialised model (with a file: read from the file).
        image_size: input side of a randomly initialised transformer (its position embedding), e.g. 32
            for small tests; None: the model's default.

    Raises:
        ValueError: an unknown name (with the close names), or a file that does not fit the model.
    """
    if arch == "demo":
        return load_demo(weights)
    if arch == "demo-vit":
        return load_demo_vit(weights)
    if arch == "efficientnet-lite0":
        from .efficientnet import load_efficientnet_lite0
        return load_efficientnet_lite0(weights)
    if arch.startswith("timm:"):
        return _load_timm(arch[len("timm:"):], weights, num_classes, image_size)
    if arch.startswith("torchvision:") or arch in TORCHVISION_BY_NAME:
        return _load_torchvision(arch.split(":", 1)[-1], weights, num_classes, image_size)
    hint = " (any other torchvision classifier as torchvision:<name>)"
    raise ValueError(f"unknown arch {arch!r}; valid: demo, demo-vit, efficientnet-lite0, timm:<name>, "
                     f"{', '.join(TORCHVISION_BY_NAME)}{hint}")


def load_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A state dict from a local file: ``.safetensors``, or a torch file read with ``weights_only=True``
    (a state dict, or ``{"state_dict": …}`` / ``{"model": …}`` around one). Never unpickles objects."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        return load_file(str(path), device="cpu")
    state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path} holds no state dict (a mapping of parameter names to tensors)")
    return state


def _classifier_outputs(model: nn.Module, state: dict) -> int | None:
    """Number of classes of the checkpoint: the rows of the weight of the model's last nn.Linear."""
    names = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    if names and f"{names[-1]}.weight" in state:
        return int(state[f"{names[-1]}.weight"].shape[0])
    return None


def _fill(model: nn.Module, state: dict, path) -> nn.Module:
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{path} does not fit the model: missing {sorted(missing)[:5]}, unexpected "
                         f"{sorted(unexpected)[:5]}")
    return model.eval()


def _load_timm(name: str, weights, num_classes, image_size) -> nn.Module:
    try:
        import timm
    except ImportError as e:
        raise ValueError("timm:<name> models need the timm package (pip install timm)") from e
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=5)
        raise ValueError(f"unknown timm model {name!r}" + (f"; close names: {', '.join(close)}" if close else "")
                         + " (timm.list_models() lists them all)")
    kw = {"img_size": image_size} if image_size is not None else {}

    def build(n_classes):
        try:
            return timm.create_model(name, pretrained=False, num_classes=n_classes, **kw)
        except TypeError as e:  # e.g. img_size for a CNN
            raise ValueError(f"timm model {name!r} does not take these options {kw}: {e}") from e

    if weights is None:
        return build(num_classes or 1000).eval()
    path = Path(weights)
    if not path.exists():
        raise FileNotFoundError(f"weights file {path} does not exist (timm models load local files only)")
    state = load_state_dict(path)
    probe = build(num_classes or 1000)
    n = _classifier_outputs(probe, state)
    model = probe if n is None or n == (num_classes or 1000) else build(n)
    return _fill(model, state, path)


def _load_torchvision(name: str, weights, num_classes, image_size) -> nn.Module:
    import torchvision

    known = torchvision.models.list_models(module=torchvision.models)
    if name not in known:
        close = difflib.get_close_matches(name, known, n=5)
        raise ValueError(f"unknown torchvision classifier {name!r}" + (f"; close names: {', '.join(close)}" if close else ""))
    kw = {"image_size": image_size} if image_size is not None else {}
    builder = torchvision.models.get_model_builder(name)
    if weights is not None and Path(weights).exists():
        state = load_state_dict(weights)
        probe = builder(weights=None, num_classes=num_classes or 1000, **kw)
        n = _classifier_outputs(probe, state)
        model = probe if n is None or n == (num_classes or 1000) else builder(weights=None, num_classes=n, **kw)
        return _fill(model, state, weights)
    if weights is not None:
        return builder(weights=_torchvision_weights(name, weights)).eval()
    return builder(weights=None, num_classes=num_classes or 1000, **kw).eval()


def model_preprocessing(arch: str) -> dict:
    """The model's own input normalisation ``{"mean", "std"}`` where its name says it (timm models'
    pretrained configuration), else ``{}``."""
    if not arch.startswith("timm:"):
        return {}
    try:
        import timm
    except ImportError:
        return {}
    name = arch[len("timm:"):]
    if not timm.is_model(name):
        return {}
    cfg = timm.get_pretrained_cfg(name)
    if cfg is None:
        return {}
    return {"mean": tuple(cfg.mean), "std": tuple(cfg.std)}


_WEIGHT_FILE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".safetensors", ".tar")


def _torchvision_weights(arch: str, weights) -> str:
    """``weights`` as a torchvision weights name of ``arch``; a path that does not exist, or a name that is
    not one of the model's, is an error that says which (torchvision itself raises a bare KeyError)."""
    import torchvision

    name = str(weights)
    if os.sep in name or "/" in name or name.lower().endswith(_WEIGHT_FILE_SUFFIXES):
        raise FileNotFoundError(f"weights file {name} does not exist")
    enum = torchvision.models.get_model_weights(arch)
    valid = [w.name for w in enum]
    if name.split(".")[-1] not in valid and name != "DEFAULT":
        raise ValueError(f"weights {name!r} is neither an existing file nor a torchvision weights name of {arch} "
                         f"(valid: {', '.join(valid + ['DEFAULT'])})")
    return name

