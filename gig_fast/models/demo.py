"""The demo network: a ResNet-50-shaped net for 28×28 grey images (docs/design.md §5).

Same 16 bottleneck blocks ``layer1.0 … layer4.2`` as torchvision's ResNet-50 (its own ``Bottleneck``
class, so every ResNet adapter and slicing helper works unchanged), with narrower widths and a stem
for 28×28 single-channel inputs. The trained weights ship inside the package
(``weights/demo_resnet.pt``, loaded with ``weights_only=True``) with their training record
(``demo_resnet.pt.json``); :func:`train_demo` (``gig-fast train-demo``) reproduces them with
:data:`DEMO_TRAINING` on all 60,000 Fashion-MNIST training images.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch
from torch import nn
from torchvision.models.resnet import Bottleneck

__all__ = ["DemoResNet", "FASHION_CLASSES", "default_demo_path", "train_demo", "load_demo", "DEMO_MEAN", "DEMO_STD",
           "SHIPPED_DEMO_WEIGHTS", "DEMO_TRAINING", "shipped_demo_info", "augment_batch"]

from ..data import FASHION_CLASSES, FASHION_MNIST_MEAN, FASHION_MNIST_STD, fashion_mnist

# The demo network's input normalisation: Fashion-MNIST's own pixel statistics.
DEMO_MEAN, DEMO_STD = FASHION_MNIST_MEAN, FASHION_MNIST_STD


class DemoResNet(nn.Module):
    """ResNet-50 layout (blocks [3, 4, 6, 3], torchvision ``Bottleneck``) at width ``base``.

    Input ``[B, 1, 28, 28]`` (normalised); stem = 3×3 conv stride 2 + BN + ReLU (no max-pool), so the
    stages run at 14×14, 7×7, 4×4 and 2×2. Block output channels are ``4·base·{1, 2, 4, 8}``.
    Module names match torchvision's (``conv1``, ``bn1``, ``layer3.5``, ``fc``).
    """

    def __init__(self, base: int = 8, num_classes: int = 10, in_channels: int = 1):
        super().__init__()
        self.base = base
        self.inplanes = 2 * base
        self.conv1 = nn.Conv2d(in_channels, self.inplanes, 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(self.inplanes)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.Identity()
        self.layer1 = self._make_layer(base, 3, 1)
        self.layer2 = self._make_layer(2 * base, 4, 2)
        self.layer3 = self._make_layer(4 * base, 6, 2)
        self.layer4 = self._make_layer(8 * base, 3, 2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8 * base * Bottleneck.expansion, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        for m in self.modules():
            if isinstance(m, Bottleneck):  # zero-init the last BN of each block: trains faster
                nn.init.zeros_(m.bn3.weight)

    def _make_layer(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        out = planes * Bottleneck.expansion
        downsample = None
        if stride != 1 or self.inplanes != out:
            downsample = nn.Sequential(nn.Conv2d(self.inplanes, out, 1, stride=stride, bias=False),
                                       nn.BatchNorm2d(out))
        layers = [Bottleneck(self.inplanes, planes, stride, downsample)]
        self.inplanes = out
        layers += [Bottleneck(out, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


# The trained weights ship inside the package (package data, ~1.6 MB) with their training record
# (``demo_resnet.pt.json``: epochs, seed, accuracy, seconds, torch version); `gig-fast train-demo`
# reproduces them with the defaults below.
SHIPPED_DEMO_WEIGHTS = Path(__file__).resolve().parent / "weights" / "demo_resnet.pt"

# The schedule the shipped weights were trained with (`gig-fast train-demo` defaults). Measured on two
# shared CPU cores: see gig_fast/models/weights/README.md for the epoch time and the accuracy curve.
DEMO_TRAINING = {"epochs": 15, "batch_size": 128, "lr": 3e-3, "seed": 0, "augment": True}


def default_demo_path() -> Path:
    """Where `gig-fast train-demo` writes retrained weights (``$GIG_FAST_CACHE`` or ``~/.cache/gig_fast``)."""
    root = Path(os.environ.get("GIG_FAST_CACHE", Path.home() / ".cache" / "gig_fast"))
    return root / "demo_resnet_fmnist.pt"


def shipped_demo_info() -> dict:
    """The training record of the shipped weights (epochs, seed, test accuracy, seconds, torch version)."""
    meta = SHIPPED_DEMO_WEIGHTS.with_suffix(SHIPPED_DEMO_WEIGHTS.suffix + ".json")
    if not meta.exists():
        raise FileNotFoundError(f"no shipped demo weights at {SHIPPED_DEMO_WEIGHTS}; run `gig-fast train-demo`")
    return json.loads(meta.read_text())


def _evaluate(model: nn.Module, loader) -> float:
    model.eval()
    correct = total = 0
    with torch.no_grad():
        for x, y in loader:
            correct += (model(x).argmax(1) == y).sum().item()
            total += len(y)
    return correct / max(total, 1)


def augment_batch(x: torch.Tensor, generator: torch.Generator, pad: int = 2) -> torch.Tensor:
    """Random horizontal flips and random ``pad``-pixel shifts (crops of the padded image), per image.

    ``x``: ``[B, C, H, W]`` normalised images; the padding is the normalised value of a black pixel
    (Fashion-MNIST's background), so a shifted garment sits on the same background. Draws from
    ``generator`` only, so a seed reproduces the training run.
    """
    b, _, h, w = x.shape
    flip = torch.rand(b, generator=generator) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    black = (0.0 - DEMO_MEAN) / DEMO_STD
    padded = nn.functional.pad(x, (pad, pad, pad, pad), value=black)
    dy = torch.randint(0, 2 * pad + 1, (b,), generator=generator)
    dx = torch.randint(0, 2 * pad + 1, (b,), generator=generator)
    rows = (dy[:, None] + torch.arange(h))[:, :, None]            # [B, H, 1]
    cols = (dx[:, None] + torch.arange(w))[:, None, :]            # [B, 1, W]
    batch = torch.arange(b)[:, None, None]
    return padded[batch, :, rows, cols].permute(0, 3, 1, 2).contiguous()  # indexing puts C last


def train_demo(path: str | os.PathLike | None = None, *, epochs: int = DEMO_TRAINING["epochs"], base: int = 8,
               batch_size: int = DEMO_TRAINING["batch_size"], lr: float = DEMO_TRAINING["lr"],
               seed: int = DEMO_TRAINING["seed"], augment: bool = DEMO_TRAINING["augment"],
               train_limit: int | None = None, data_root: str | None = None, force: bool = False,
               progress: bool = True, log=None) -> tuple[nn.Module, dict]:
    """Train (or load, if cached) the demo network on Fashion-MNIST.

    Args:
        path: weights file (default :func:`default_demo_path`); ``<path>.json`` gets the training
            record (test accuracy, epochs, seed, width, seconds, torch version, per-epoch accuracy).
        epochs, base, batch_size, lr, seed: training knobs (AdamW + one-cycle schedule); the defaults
            reproduce the shipped weights (:data:`DEMO_TRAINING`).
        augment: random flips and 2-pixel shifts (:func:`augment_batch`).
        train_limit: use only the first N training images (tests).
        force: retrain even if a cached file exists.
        log: optional callable receiving one line of text per epoch (loss, test accuracy, seconds).

    Returns:
        ``(model in eval mode, info dict)``.
    """
    from tqdm import tqdm

    path = Path(path) if path is not None else default_demo_path()
    meta_path = path.with_suffix(path.suffix + ".json")
    if path.exists() and meta_path.exists() and not force:
        return load_demo(path), json.loads(meta_path.read_text())
    torch.manual_seed(seed)
    train = fashion_mnist("train", root=data_root)
    test = fashion_mnist("test", root=data_root)
    if train_limit is not None:
        train = torch.utils.data.Subset(train, range(min(train_limit, len(train))))
    gen = torch.Generator().manual_seed(seed)
    aug_gen = torch.Generator().manual_seed(seed + 1)
    loader = torch.utils.data.DataLoader(train, batch_size=batch_size, shuffle=True, generator=gen)
    test_loader = torch.utils.data.DataLoader(test, batch_size=512)
    model = DemoResNet(base=base)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * len(loader))
    t0 = time.perf_counter()
    curve = []
    for epoch in range(epochs):
        model.train()
        loss_sum = n_seen = 0.0
        for x, y in tqdm(loader, desc=f"train-demo epoch {epoch + 1}/{epochs}", disable=not progress):
            if augment:
                x = augment_batch(x, aug_gen)
            loss = nn.functional.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            loss_sum += loss.item() * len(y)
            n_seen += len(y)
        acc = _evaluate(model, test_loader)
        curve.append({"epoch": epoch + 1, "train_loss": round(loss_sum / max(n_seen, 1), 4),
                      "test_accuracy": acc, "seconds": round(time.perf_counter() - t0, 1)})
        if log is not None:
            log(json.dumps(curve[-1]))
    seconds = time.perf_counter() - t0
    info = {"test_accuracy": curve[-1]["test_accuracy"] if curve else _evaluate(model, test_loader),
            "epochs": epochs, "base": base, "train_images": len(train), "batch_size": batch_size, "lr": lr,
            "augment": augment, "train_seconds": round(seconds, 1), "seed": seed, "torch": torch.__version__,
            "threads": torch.get_num_threads(), "curve": curve}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save({"base": base, "state_dict": model.state_dict()}, tmp)
    os.replace(tmp, path)
    tmp_meta = meta_path.with_suffix(".tmp")
    tmp_meta.write_text(json.dumps(info, indent=2))
    os.replace(tmp_meta, meta_path)
    return model.eval(), info


def load_demo(path: str | os.PathLike | None = None) -> nn.Module:
    """Load demo weights (``weights_only=True``; default: the shipped ones) into a :class:`DemoResNet` in eval mode."""
    path = Path(path) if path is not None else SHIPPED_DEMO_WEIGHTS
    if not path.exists():
        raise FileNotFoundError(f"no demo weights at {path}; run `gig-fast train-demo` first")
    blob = torch.load(path, map_location="cpu", weights_only=True)
    model = DemoResNet(base=int(blob["base"]))
    model.load_state_dict(blob["state_dict"])
    return model.eval()
