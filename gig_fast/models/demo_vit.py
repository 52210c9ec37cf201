"""The demo vision transformer: a small timm ``VisionTransformer`` for 28×28 grey images.

A timm ViT (so the transformer adapter and ``timm:`` models share one code path) with a class token,
patch-embedding, pre-norm blocks and a token-pooled head, sized to train on Fashion-MNIST on two CPU
cores in under three minutes (:func:`train_demo_vit`; measurements in the README). The weights are cached
to a file loaded with ``weights_only=True``; the test accuracy is recorded in a JSON file beside it.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch
from torch import nn

from ..data import fashion_mnist

__all__ = ["demo_vit", "DEMO_VIT_SHAPE", "default_demo_vit_path", "train_demo_vit", "load_demo_vit"]

# 4×4 patches of 7×7 pixels + the class token = 17 tokens of width 64, four blocks. Side by side on the
# shared 2-core machine (one thread each, load ≈ 9): 4×4-pixel patches (50 tokens) cost 2.7× the time
# per batch and reached 80.8 % after one epoch, these 84.6 % after two and 86.5 % after three epochs.
DEMO_VIT_SHAPE = {"patch_size": 7, "embed_dim": 64, "depth": 4, "num_heads": 4, "mlp_ratio": 2.0}


def demo_vit(num_classes: int = 10, in_channels: int = 1, img_size: int = 28, **shape) -> nn.Module:
    """A randomly initialised demo ViT (``DEMO_VIT_SHAPE`` unless ``shape`` overrides it)."""
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer(img_size=img_size, in_chans=in_channels, num_classes=num_classes,
                             class_token=True, global_pool="token", **{**DEMO_VIT_SHAPE, **shape})


def default_demo_vit_path() -> Path:
    """Where the trained demo ViT is cached (``$GIG_FAST_CACHE`` or ``~/.cache/gig_fast``)."""
    root = Path(os.environ.get("GIG_FAST_CACHE", Path.home() / ".cache" / "gig_fast"))
    return root / "demo_vit_fmnist.pt"


def _accuracy(model: nn.Module, data) -> float:
    model.eval()
    correct = 0
    with torch.no_grad():
        for x, y in torch.utils.data.DataLoader(data, batch_size=1000):
            correct += (model(x).argmax(1) == y).sum().item()
    return correct / max(len(data), 1)


def train_demo_vit(path: str | os.PathLike | None = None, *, epochs: int = 3, batch_size: int = 128,
                   lr: float = 2e-3, seed: int = 0, train_limit: int | None = None, data_root: str | None = None,
                   threads: int | None = 1, force: bool = False, progress: bool = True) -> tuple[nn.Module, dict]:
    """Train (or load, if cached) the demo ViT on Fashion-MNIST.

    Args:
        path: weights file (default :func:`default_demo_vit_path`); ``<path>.json`` gets the metadata
            (test accuracy, epochs, shape, wall and CPU seconds of training, threads).
        epochs, batch_size, lr, seed: AdamW (weight decay 0.05) with a one-cycle schedule, label smoothing 0.1.
        train_limit: use only the first N training images (tests).
        threads: torch threads while training (restored after). 1 by default: on the shared 2-core
            machine two threads ran a batch 2.5–4× *slower* than one when the other core was busy (OpenMP
            threads waiting on each other; measured side by side, README); None keeps torch's setting.
        force: retrain even if a cached file exists.

    Returns:
        ``(model in eval mode, info dict)``.
    """
    from tqdm import tqdm

    path = Path(path) if path is not None else default_demo_vit_path()
    meta_path = path.with_suffix(path.suffix + ".json")
    if path.exists() and meta_path.exists() and not force:
        return load_demo_vit(path), json.loads(meta_path.read_text())
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        torch.manual_seed(seed)
        train, test = fashion_mnist("train", root=data_root), fashion_mnist("test", root=data_root)
        if train_limit is not None:
            train = torch.utils.data.Subset(train, range(min(train_limit, len(train))))
        loader = torch.utils.data.DataLoader(train, batch_size=batch_size, shuffle=True,
                                             generator=torch.Generator().manual_seed(seed))
        model = demo_vit()
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * len(loader), pct_start=0.15)
        t0, cpu0 = time.perf_counter(), time.process_time()
        for epoch in range(epochs):
            model.train()
            for x, y in tqdm(loader, desc=f"train-demo --arch vit epoch {epoch + 1}/{epochs}", disable=not progress):
                loss = nn.functional.cross_entropy(model(x), y, label_smoothing=0.1)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
        seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - cpu0
        acc = _accuracy(model, test)
    finally:
        torch.set_num_threads(before)
    info = {"arch": "vit", "test_accuracy": acc, "epochs": epochs, "shape": DEMO_VIT_SHAPE,
            "train_images": len(train), "train_seconds": round(seconds, 1),
            "train_cpu_seconds": round(cpu_seconds, 1), "threads": threads, "seed": seed,
            "torch": torch.__version__}
    _save(path, meta_path, model, info)
    return model.eval(), info


def _save(path: Path, meta_path: Path, model: nn.Module, info: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save({"shape": DEMO_VIT_SHAPE, "state_dict": model.state_dict()}, tmp)
    os.replace(tmp, path)
    tmp_meta = meta_path.with_suffix(".tmp")
    tmp_meta.write_text(json.dumps(info, indent=2))
    os.replace(tmp_meta, meta_path)


def load_demo_vit(path: str | os.PathLike | None = None) -> nn.Module:
    """Load cached demo ViT weights (``weights_only=True``) into :func:`demo_vit`, in eval mode."""
    path = Path(path) if path is not None else default_demo_vit_path()
    if not path.exists():
        raise FileNotFoundError(f"no demo ViT weights at {path}; run `gig-fast train-demo --arch vit` first")
    blob = torch.load(path, map_location="cpu", weights_only=True)
    model = demo_vit(**blob["shape"])
    model.load_state_dict(blob["state_dict"])
    return model.eval()
