"""Input builders shared by the GIG tests and benchmarks: tiny models and fitted codes.

Not part of the public API. The models are small enough for float64 on two CPU cores, keep torchvision's
point names (``layer1.0`` …) where they are ResNets, and get random BN statistics so that the BN shift
β is non-zero — with default BN statistics a ReLU network without biases is positively homogeneous, the
path X(α) = β + α·UV is then a straight line through 0 and every quadrature rule is exact, which would
make the completeness checks vacuous.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..gig import ClassTarget, ConceptTarget
from ..slicing import bn_shift, make_f_ab, preactivation

__all__ = ["fitted_codes", "tiny_resnet", "tiny_residual_cnn", "TinyResidualCNN", "randomize_bn", "captum_rule",
           "two_kinds_of_targets"]


def randomize_bn(model: nn.Module, generator: torch.Generator | None = None) -> nn.Module:
    """Random running statistics and affine parameters in every BatchNorm (so β ≠ 0); returns ``model``."""
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, nn.modules.batchnorm._BatchNorm):
                n = mod.num_features
                mod.running_mean.copy_(0.5 * torch.randn(n, generator=generator))
                mod.running_var.copy_(0.5 + torch.rand(n, generator=generator))
                mod.weight.copy_(1.0 + 0.3 * torch.randn(n, generator=generator))
                mod.bias.copy_(0.3 * torch.randn(n, generator=generator))
    return model


class _TinyResNet(nn.Module):
    """A torchvision-style ResNet with Bottleneck blocks (same module names), a few channels wide."""

    def __init__(self, widths=(2, 4, 4), blocks=(2, 1, 1), num_classes: int = 5):
        from torchvision.models.resnet import Bottleneck
        super().__init__()
        inplanes = 4 * widths[0]
        self.conv1 = nn.Conv2d(3, inplanes, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(inplanes)
        self.relu = nn.ReLU(inplace=True)
        layers = []
        for i, (planes, count) in enumerate(zip(widths, blocks)):
            stride = 1 if i == 0 else 2
            mods = []
            for b in range(count):
                down = None
                if b == 0 and (stride != 1 or inplanes != 4 * planes):
                    down = nn.Sequential(nn.Conv2d(inplanes, 4 * planes, 1, stride=stride, bias=False),
                                         nn.BatchNorm2d(4 * planes))
                mods.append(Bottleneck(inplanes, planes, stride=stride if b == 0 else 1, downsample=down))
                inplanes = 4 * planes
            layers.append(nn.Sequential(*mods))
        self.layer1, self.layer2, self.layer3 = layers
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(inplanes, num_classes)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def tiny_resnet(num_classes: int = 5, dtype: torch.dtype = torch.float64, seed: int = 0) -> nn.Module:
    """Bottleneck ResNet: points layer1.0, layer1.1 (C=8), layer2.0 (C=16), layer3.0 (C=16), logits; eval mode."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = _TinyResNet(num_classes=num_classes)
    return randomize_bn(model, g).to(dtype).eval()


class TinyResidualCNN(nn.Module):
    """A non-ResNet CNN with BN and one residual sum (FX nodes ``add``, ``down_bn``, output ``head``)."""

    def __init__(self, num_classes: int = 4):
        super().__init__()
        self.stem = nn.Conv2d(3, 6, 3, padding=1)
        self.stem_bn = nn.BatchNorm2d(6)
        self.branch = nn.Sequential(nn.Conv2d(6, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6), nn.ReLU(),
                                    nn.Conv2d(6, 6, 1, bias=False), nn.BatchNorm2d(6))
        self.down = nn.Conv2d(6, 8, 3, stride=2, padding=1, bias=False)
        self.down_bn = nn.BatchNorm2d(8)
        self.head = nn.Linear(8, num_classes)

    def forward(self, x):
        x = F.relu(self.stem_bn(self.stem(x)))
        x = x + self.branch(x)
        x = F.relu(x)
        x = F.relu(self.down_bn(self.down(x)))
        return self.head(x.mean((2, 3)))


def tiny_residual_cnn(num_classes: int = 4, dtype: torch.dtype = torch.float64, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    return randomize_bn(TinyResidualCNN(num_classes), g).to(dtype).eval()


def captum_rule(rule: str) -> str:
    """Captum's name of a quadrature rule (its trapezoid is ``riemann_trapezoid``, with other weights)."""
    return "riemann_trapezoid" if rule == "trapezoid" else rule


def fitted_codes(xa: torch.Tensor, beta: torch.Tensor, K: int, s: int, generator: torch.Generator | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Codes that reconstruct a real pre-activation: random unit concepts ``V [K, C]``, s random atoms per
    position and least-squares coefficients of ``X^a − β`` on them (so X(1) ≈ X^a, as after §1.4).

    Args: xa ``[B, C, H, W]``, beta ``[C]``. Returns ``(V [K, C], idx [B, P, s], val [B, P, s])``.
    """
    B, C, H, W = xa.shape
    V = torch.randn(K, C, dtype=xa.dtype, generator=generator)
    V = V / V.norm(dim=1, keepdim=True)
    idx = torch.argsort(torch.rand(B * H * W, K, generator=generator), 1)[:, :s].reshape(B, H * W, s)
    target = (xa - beta[:, None, None]).permute(0, 2, 3, 1).reshape(B, H * W, C)
    val = torch.linalg.lstsq(V[idx].transpose(-1, -2), target[..., None]).solution[..., 0]
    return V, idx, val.detach()


def two_kinds_of_targets(a: str, b: str, generator: torch.Generator, B: int = 4):
    """A random :func:`tiny_resnet` (float64) from ``a`` to ``b`` with fitted codes for ``B`` images of
    12×12 px and two targets of each kind: each image's top and bottom class (probability, logit) for
    ``b = "logits"``, else the images' summed output and a random concept of b.

    Returns ``(f_ab, (idx, val), V, beta, targets, (H_a, W_a))``."""
    model = tiny_resnet(dtype=torch.float64)
    x = torch.randn(B, 3, 12, 12, generator=generator, dtype=torch.float64)
    xa = preactivation(model, a, x)
    beta = bn_shift(model, a).to(torch.float64)
    V, idx, val = fitted_codes(xa, beta, 3 * xa.shape[1], 4, generator)
    f = make_f_ab(model, a, b)
    with torch.no_grad():
        out = f(xa)
    if b == "logits":
        targets = [ClassTarget(out.argmax(1)), ClassTarget(out.argmin(1), probability=False)]
    else:
        targets = [ConceptTarget(out.sum((0, 2, 3))),
                   ConceptTarget(torch.randn(out.shape[1], generator=generator, dtype=torch.float64))]
    return f, (idx, val), V, beta, targets, tuple(xa.shape[2:])
