"""Model adapters: name the analysed points of a network, their BN shift β, and walk its forward.

An analysed point of a ResNet is a residual block (``layer3.5``); its PFVs are the block output
*before* the final ReLU (``bn3(conv3(·)) + identity``, docs/design.md §1.1) and its β is the net shift of
the BN feeding that sum. :meth:`ResNetAdapter.record` runs the forward once and keeps every
intermediate that SRD (``gig_fast.srd``) needs; :meth:`ResNetAdapter.run_from` runs the network from
one point's pre-activation to another's (or to the logits) without recomputing the prefix.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import fx, nn
from torchvision.models.resnet import BasicBlock, Bottleneck

from .bn import bn_affine, branch_modules, ensure_eval, fold_batchnorm, residual_sum_bns
from .fx_adapter import FXAdapter
from .transformer import CLASS_TOKEN, TransformerAdapter, is_transformer

__all__ = ["BlockRecord", "ForwardRecord", "ResNetAdapter", "get_adapter"]


@dataclass
class BlockRecord:
    """Intermediates of one residual block: ``x`` block input (post-ReLU), ``pre``/``post`` of each
    main-branch conv+BN, ``r`` main-branch output, ``s`` skip, ``v = r + s`` (the analysed PFVs)."""
    x: torch.Tensor
    pre: list[torch.Tensor]
    post: list[torch.Tensor]
    s: torch.Tensor
    v: torch.Tensor


@dataclass
class ForwardRecord:
    """One forward pass: the image, the stem, every block, the final feature map and the logits."""
    image: torch.Tensor
    stem_pre: torch.Tensor
    stem_post: torch.Tensor
    pooled: torch.Tensor
    pool_indices: torch.Tensor | None
    blocks: dict[str, BlockRecord] = field(default_factory=dict)
    logits: torch.Tensor | None = None

    def preact(self, point: str) -> torch.Tensor:
        """``[B, C, H, W]`` pre-activation of a block point."""
        return self.blocks[point].v


class ResNetAdapter:
    """Adapter for torchvision-style ResNets (18 … 152, wide/ResNeXt layouts) and the demo network.

    Attributes:
        points: analysed points in forward order (``layer1.0 … layer4.2`` for ResNet-50).
        classifier: name of the class layer (``fc``), the last target of GIG.
    """

    supports_srd = True

    def __init__(self, model: nn.Module):
        self.model = ensure_eval(model)
        self.blocks: dict[str, nn.Module] = {}
        for stage in ("layer1", "layer2", "layer3", "layer4"):
            for i, block in enumerate(getattr(model, stage)):
                if not isinstance(block, (Bottleneck, BasicBlock)):
                    raise ValueError(f"{stage}.{i} is a {type(block).__name__}, not a ResNet block")
                self.blocks[f"{stage}.{i}"] = block
        self.points = list(self.blocks)
        self.classifier = "fc"

    # -- naming -------------------------------------------------------------------------------
    def check_points(self, names) -> list[str]:
        """Validate point names (None → all) and return them in forward order."""
        if names is None:
            return list(self.points)
        names = [names] if isinstance(names, str) else list(names)
        unknown = [n for n in names if n not in self.blocks]
        if unknown:
            raise ValueError(f"unknown layer name(s) {unknown}; valid names: {', '.join(self.points)}")
        return sorted(set(names), key=self.points.index)

    def channels(self, point: str) -> int:
        """Number of channels C of a point's PFVs."""
        return branch_modules(self.blocks[point])[-1][1].num_features

    def bn_shift(self, point: str) -> torch.Tensor:
        """β ``[C]``: the net BN shift of the block's residual sum (paper Eq. 8, docs/design.md §1.1).

        The sum of the shifts of the BNs summed into the pre-activation: ``bn3``'s at an identity
        block, ``bn3``'s plus the downsample BN's at a block with a downsample branch — the same rule
        as :func:`gig_fast.slicing.bn_shift` (and so :class:`FXAdapter`).
        """
        conv = branch_modules(self.blocks[point])[-1][0]
        with torch.no_grad():
            shifts = [bn_affine(bn, conv.out_channels, conv.weight)[1] for bn in residual_sum_bns(self.blocks[point])]
            return torch.stack(shifts).sum(0).detach().clone()

    def baseline(self, point: str, pfvs: torch.Tensor) -> torch.Tensor:
        """β ``[C]`` of the GIG path and of concept extraction: the BN shift (``pfvs [N, C]`` give its dtype)."""
        return self.bn_shift(point).to(pfvs)

    @property
    def num_classes(self) -> int:
        return self.model.fc.out_features

    # -- forward ------------------------------------------------------------------------------
    @torch.no_grad()
    def record(self, x: torch.Tensor, keep: str = "all") -> ForwardRecord:
        """Run the forward once, keeping intermediates.

        Args:
            x: ``[B, C_in, H, W]`` images (normalised as the model expects).
            keep: ``"all"`` (everything SRD needs) or ``"preact"`` (only the block pre-activations).
        """
        m = self.model
        stem_pre = m.bn1(m.conv1(x))
        stem_post = torch.relu(stem_pre)
        indices = None
        if isinstance(m.maxpool, nn.MaxPool2d):
            mp = m.maxpool
            pooled, indices = nn.functional.max_pool2d(stem_post, mp.kernel_size, mp.stride, mp.padding,
                                                       mp.dilation, ceil_mode=mp.ceil_mode, return_indices=True)
        else:
            pooled = m.maxpool(stem_post)
        rec = ForwardRecord(image=x, stem_pre=stem_pre, stem_post=stem_post, pooled=pooled, pool_indices=indices)
        h = pooled
        for name, block in self.blocks.items():
            pre, post, y = [], [], h
            branch = branch_modules(block)
            for k, (conv, bn) in enumerate(branch):
                p = bn(conv(y))
                pre.append(p)
                if k < len(branch) - 1:
                    y = torch.relu(p)
                    post.append(y)
            s = block.downsample(h) if block.downsample is not None else h
            v = pre[-1] + s
            if keep == "all":
                rec.blocks[name] = BlockRecord(x=h, pre=pre, post=post, s=s, v=v)
            else:
                rec.blocks[name] = BlockRecord(x=None, pre=[], post=[], s=None, v=v)
            h = torch.relu(v)
        rec.logits = m.fc(torch.flatten(m.avgpool(h), 1))
        return rec

    def forward_points(self, x: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Differentiable forward: ``({point: pre-activation [B, C, H, W]}, logits [B, n_classes])``."""
        m = self.model
        h = m.maxpool(torch.relu(m.bn1(m.conv1(x))))
        values = {}
        for name, block in self.blocks.items():
            values[name] = self._block_preact(block, h)
            h = torch.relu(values[name])
        return values, m.fc(torch.flatten(m.avgpool(h), 1))

    def f_ab(self, a: str, b: str | None):
        """``F_ab`` from ``a``'s pre-activation to ``b``'s (None: the logits), by FX slicing, with every
        conv+BN pair folded into one conv (see :func:`fold_batchnorm`)."""
        from ..slicing import make_f_ab

        return fold_batchnorm(make_f_ab(self.model, a, b if b is not None else "logits"))

    def run_from(self, point: str, preact: torch.Tensor, to: str | None = None) -> torch.Tensor:
        """``F_ab``: from the pre-activation of ``point`` to that of ``to`` (or the logits if None).

        Differentiable (no ``no_grad``): GIG back-propagates through it.
        """
        start = self.points.index(point)
        stop = len(self.points) if to is None else self.points.index(to) + 1
        if stop <= start:
            raise ValueError(f"target {to!r} is not after {point!r}")
        h = torch.relu(preact)
        for name in self.points[start + 1:stop]:
            block = self.blocks[name]
            v = self._block_preact(block, h)
            if name == to:
                return v
            h = torch.relu(v)
        m = self.model
        return m.fc(torch.flatten(m.avgpool(h), 1))

    @staticmethod
    def _block_preact(block: nn.Module, h: torch.Tensor) -> torch.Tensor:
        branch = branch_modules(block)
        y = h
        for k, (conv, bn) in enumerate(branch):
            y = bn(conv(y))
            if k < len(branch) - 1:
                y = torch.relu(y)
        return y + (block.downsample(h) if block.downsample is not None else h)


def _is_torchvision_resnet(model: nn.Module) -> bool:
    """torchvision's ResNet layout with its own block classes (timm's ResNets name the same stages but
    their blocks differ: they go to the FX adapter)."""
    stages = ("layer1", "layer2", "layer3", "layer4")
    if not all(hasattr(model, s) for s in ("conv1", "bn1", "fc") + stages):
        return False
    return all(isinstance(block, (Bottleneck, BasicBlock)) for s in stages for block in getattr(model, s))


def get_adapter(model: nn.Module, points=None, class_token: str = "keep"):
    """Adapter for ``model``: :class:`ResNetAdapter` for torchvision-style ResNets (SRD available),
    :class:`~gig_fast.models.transformer.TransformerAdapter` for timm and torchvision vision transformers
    (``points``: block names; ``class_token`` "keep" or "drop"), else
    :class:`~gig_fast.models.fx_adapter.FXAdapter` (any FX-traceable classifier; ``points`` as there,
    default: the points the model names in ``gig_points`` or its residual blocks).

    Raises ValueError naming what is supported when the model cannot be traced.
    """
    if class_token not in CLASS_TOKEN:
        raise ValueError(f"class_token must be one of {CLASS_TOKEN}, got {class_token!r}")
    if is_transformer(model):
        return TransformerAdapter(model, points=points, class_token=class_token)
    if class_token != "keep":
        raise ValueError(f"class_token={class_token!r} applies to vision transformers; {type(model).__name__} "
                         "has no class token")
    if points is None and _is_torchvision_resnet(model):
        return ResNetAdapter(model)
    points = points if points is not None else getattr(model, "gig_points", None)
    try:
        if isinstance(points, str):  # a block container such as EfficientNet's "_blocks"
            return FXAdapter(model, blocks=points)
        return FXAdapter(model, points=points)
    except (fx.proxy.TraceError, NotImplementedError, TypeError) as e:
        raise ValueError(f"no adapter for {type(model).__name__}: it is not a torchvision-style ResNet or a "
                         f"timm/torchvision vision transformer, and torch.fx cannot trace it ({e})") from e
