"""An adapter for vision transformers: timm ``VisionTransformer`` (ViT, DeiT, …) and torchvision's ``vit_*``.

The pipeline's stages, ops and kernels take a point's PFVs as a ``[B, C, H, W]`` map whose ``H·W``
positions are its rows. A transformer's residual stream is a row of tokens ``[B, N, C]``; this adapter
hands it to them as a ``[B, C, 1, N]`` *token row* — positions are tokens in the model's own order
(the prefix tokens first: class token, distillation/register tokens; then the patch tokens row-major)
— so every stage, the sparse coder, ``sparse_reconstruct``/``gig_accumulate`` and the GIG engine run on
tokens unchanged (``spatial = (1, N)``), and nothing densifies. :meth:`TransformerAdapter.position_grid`
says how positions map back onto the image (``prefix`` tokens, then a ``[H_p, W_p]`` patch grid) for the
pictures.

* a *point* is a transformer block (``blocks.3`` in timm, ``encoder.layers.encoder_layer_3`` in
  torchvision); its PFVs are the block's output tokens, the residual stream after the block; the
  analysed points default to every block;
* ``F_ab`` (:meth:`TransformerAdapter.f_ab`) runs blocks a+1 … b — or to the head (final norm, pooling,
  classifier) — on the point's tokens; the embedding and blocks up to a are never recomputed;
* β, the "no concept" point of the GIG path and the centre of concept extraction: a ViT has no BN shift.
  The default (``baseline="mean"``) is the **mean token of the concept dataset** at that point (the mean
  of the stage-1 PFVs, so the k-means runs on centred vectors, as a BN shift centres a CNN's PFVs);
  ``baseline="zero"`` is the LayerNorm-invariant origin (every block's LayerNorm maps it, like any
  constant vector, to its bias alone). The effect of the choice on completeness was measured on the demo
  ViT: see the README section "Vision transformers and timm models";
* the class token (any prefix token) is a position of its own. ``class_token="keep"`` samples it into
  the concept dataset like any token; ``"drop"`` never samples it there, so the concepts describe image
  regions. Either way it stays a position of the GIG path (coded on the concepts): every later block
  reads it — a token-pooled head reads only it — so ``F_ab`` cannot run without it;
* attribution is gradient × input (SRD's rules are written for conv blocks); a token's iERF is its
  input-gradient × input map summed over each patch (:meth:`TransformerAdapter.ierf_map`): a map over the
  patch grid, drawn at input resolution.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
from torch import nn

from .bn import ensure_eval

__all__ = ["TransformerAdapter", "TokenRecord", "TokenSlice", "is_transformer", "position_grid", "CLASS_TOKEN",
           "BASELINES"]

CLASS_TOKEN = ("keep", "drop")
BASELINES = ("mean", "zero")


@dataclass
class TokenRecord:
    """One forward pass of a :class:`TransformerAdapter`: ``values[point]`` token rows ``[B, C, 1, N]``."""
    image: torch.Tensor
    values: dict[str, torch.Tensor] = field(default_factory=dict)
    logits: torch.Tensor | None = None

    def preact(self, point: str) -> torch.Tensor:
        """``[B, C, 1, N]`` tokens of a point (the residual stream after the block)."""
        return self.values[point]


def tokens_to_row(tokens: torch.Tensor) -> torch.Tensor:
    """``[B, N, C]`` tokens → ``[B, C, 1, N]`` token row (a view)."""
    return tokens.transpose(1, 2).unsqueeze(2)


def row_to_tokens(row: torch.Tensor) -> torch.Tensor:
    """``[B, C, 1, N]`` token row → ``[B, N, C]`` tokens (a view)."""
    if row.dim() != 4 or row.shape[2] != 1:
        raise ValueError(f"a token row is [B, C, 1, N], got shape {tuple(row.shape)}")
    return row.squeeze(2).transpose(1, 2)


class _TimmHead(nn.Module):
    """A timm ViT after its blocks: final norm, pooling (token / avg / attention), fc-norm, classifier."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model.forward_head(self.model.norm(tokens))


class _TorchvisionHead(nn.Module):
    """torchvision's ViT after its blocks: the encoder's LayerNorm, the class token, ``heads``."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model.heads(self.model.encoder.ln(tokens)[:, 0])


class TokenSlice(nn.Module):
    """``F_ab`` of a transformer: blocks a+1 … b on a token row, then b's tokens or the head's logits.

    Input ``[n, C, 1, N]`` (the GIG path's layout); output ``[n, C, 1, N]`` (b a block) or
    ``[n, n_classes]`` (the head). Shares the model's parameters.
    """

    def __init__(self, blocks: list[nn.Module], head: nn.Module | None):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.head = head

    def forward(self, row: torch.Tensor) -> torch.Tensor:
        tokens = row_to_tokens(row)
        for block in self.blocks:
            tokens = block(tokens)
        return tokens_to_row(tokens) if self.head is None else self.head(tokens)


@dataclass
class _Family:
    """How to walk one transformer family: its blocks, head, prefix tokens, patch size, width."""
    blocks: dict[str, nn.Module]
    head: nn.Module
    prefix: int
    patch: tuple[int, int]
    channels: int


def _timm_vit():
    try:
        from timm.models.vision_transformer import VisionTransformer
    except ImportError:  # timm is an optional import here: without it no model can be one of its ViTs
        return None
    return VisionTransformer


def _family(model: nn.Module) -> _Family | None:
    from torchvision.models.vision_transformer import VisionTransformer as TorchvisionViT

    timm_vit = _timm_vit()
    if timm_vit is not None and isinstance(model, timm_vit):
        patch = tuple(int(p) for p in model.patch_embed.patch_size)
        return _Family({f"blocks.{i}": b for i, b in enumerate(model.blocks)}, _TimmHead(model),
                       int(model.num_prefix_tokens), patch, int(model.embed_dim))
    if isinstance(model, TorchvisionViT):
        return _Family({f"encoder.layers.{name}": b for name, b in model.encoder.layers.named_children()},
                       _TorchvisionHead(model), 1, (model.patch_size, model.patch_size), int(model.hidden_dim))
    return None


def is_transformer(model: nn.Module) -> bool:
    """Whether :class:`TransformerAdapter` knows ``model``'s family (timm or torchvision ViTs)."""
    return _family(model) is not None


@contextlib.contextmanager
def _capture(blocks: dict[str, nn.Module]):
    """Forward hooks that turn each block's output into a token row on the network's own path.

    Yields ``{point: [B, C, 1, N]}``, filled by the forward. The hook returns the tokens *of the row*, so
    the row is on the gradient path (gradient × input reads its ``.grad``); the hooks always come off.
    """
    rows: dict[str, torch.Tensor] = {}

    def hook(name):
        def keep(module, inputs, output):
            if not isinstance(output, torch.Tensor) or output.dim() != 3:
                raise ValueError(f"block {name!r} returned {type(output).__name__} "
                                 f"{tuple(getattr(output, 'shape', ()))}, not tokens [B, N, C]")
            rows[name] = tokens_to_row(output)
            return row_to_tokens(rows[name])
        return keep

    handles = [block.register_forward_hook(hook(name)) for name, block in blocks.items()]
    try:
        yield rows
    finally:
        for h in handles:
            h.remove()


class TransformerAdapter:
    """Adapter for timm and torchvision vision transformers (see the module docstring).

    Args:
        model: a timm ``VisionTransformer`` (or subclass: DeiT, …) or a torchvision ``VisionTransformer``;
            put in eval mode (with a warning if it was training).
        points: block names (``blocks.3``); None → every block.
        class_token: ``"keep"`` (the prefix tokens are sampled into the concept dataset like any token)
            or ``"drop"`` (never sampled; still on the GIG path).
        baseline: β, ``"mean"`` (the concept dataset's mean token) or ``"zero"`` (the LayerNorm-invariant
            origin).

    Attributes:
        points: analysed point names in forward order; ``prefix`` the number of prefix tokens.
    """

    supports_srd = False

    def __init__(self, model: nn.Module, points=None, class_token: str = "keep", baseline: str = "mean"):
        family = _family(model)
        if family is None:
            raise ValueError(f"{type(model).__name__} is not a timm or torchvision VisionTransformer")
        if class_token not in CLASS_TOKEN:
            raise ValueError(f"class_token must be one of {CLASS_TOKEN}, got {class_token!r}")
        if baseline not in BASELINES:
            raise ValueError(f"baseline must be one of {BASELINES}, got {baseline!r}")
        self.model = ensure_eval(model)
        self._family = family
        self.class_token, self.baseline_kind = class_token, baseline
        self.prefix = family.prefix
        self.blocks = family.blocks
        self.points = list(self.blocks)
        if points is not None:
            self.points = self.check_points(points)
        self._grid: tuple[int, int] | None = None

    # -- naming -------------------------------------------------------------------------------
    def check_points(self, names) -> list[str]:
        """Validate point names (None → all blocks) and return them in forward order."""
        if names is None:
            return list(self.points)
        names = [names] if isinstance(names, str) else list(names)
        unknown = [n for n in names if n not in self.blocks]
        if unknown:
            raise ValueError(f"unknown layer name(s) {unknown}; valid names (the transformer blocks): "
                             f"{', '.join(self.blocks)}")
        return sorted(set(names), key=list(self.blocks).index)

    def channels(self, point: str) -> int:
        """Token width C of a point's PFVs (the embedding dimension)."""
        self.check_points(point)
        return self._family.channels

    @property
    def num_classes(self) -> int:
        return int(self.model.num_classes)

    def bn_shift(self, point: str) -> torch.Tensor:
        """β ``[C]`` where it needs no data (``baseline="zero"``); the mean-token β is
        :meth:`baseline` of the concept dataset (a run stores it in ``concepts/<layer>.npz``)."""
        if self.baseline_kind == "zero":
            return torch.zeros(self.channels(point), dtype=next(self.model.parameters()).dtype)
        raise ValueError(f"a transformer has no BN shift: β of {point!r} is the mean token of the concept "
                         "dataset (adapter.baseline(point, pfvs); a run stores it in concepts/<layer>.npz), "
                         "or build the adapter with baseline='zero'")

    def baseline(self, point: str, pfvs: torch.Tensor) -> torch.Tensor:
        """β ``[C]`` of a point from its concept dataset ``pfvs [N, C]`` (see the module docstring)."""
        if self.baseline_kind == "zero":
            return torch.zeros(pfvs.shape[1], dtype=pfvs.dtype, device=pfvs.device)
        return pfvs.double().mean(0).to(pfvs.dtype)

    def unsampled_prefix(self, point: str) -> int:
        """Leading positions of a point that stage 1 never samples (the prefix tokens with ``"drop"``)."""
        return self.prefix if self.class_token == "drop" else 0

    def position_grid(self, point: str) -> tuple[int, tuple[int, int]]:
        """``(prefix, (H_p, W_p))``: positions ``0 … prefix−1`` are the prefix tokens, the rest the patch
        grid row-major (known after a first :meth:`record`)."""
        if self._grid is None:
            raise ValueError("the patch grid is known after a first record(x) of this adapter")
        return self.prefix, self._grid

    # -- forward ------------------------------------------------------------------------------
    def forward_points(self, x: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Differentiable forward: ``({point: [B, C, 1, N]}, logits [B, n_classes])``; each row is on
        the path from the input to the logits."""
        ph, pw = self._family.patch
        with _capture({p: self.blocks[p] for p in self.points}) as rows:
            logits = self.model(x)
        grid = (x.shape[-2] // ph, x.shape[-1] // pw)
        n_tokens = rows[self.points[0]].shape[-1]
        if n_tokens != self.prefix + grid[0] * grid[1]:
            raise ValueError(f"{n_tokens} tokens for a {x.shape[-2]}×{x.shape[-1]} input: not {self.prefix} prefix "
                             f"tokens and a {grid[0]}×{grid[1]} grid of {ph}×{pw} patches")
        self._grid = grid
        return dict(rows), logits

    @torch.no_grad()
    def record(self, x: torch.Tensor, keep: str = "preact") -> TokenRecord:
        """Run the forward once: every point's token row and the logits (``keep`` as in the other
        adapters; only token rows exist here)."""
        values, logits = self.forward_points(x)
        return TokenRecord(image=x, values=values, logits=logits)

    def f_ab(self, a: str, b: str | None) -> TokenSlice:
        """``F_ab``: blocks after ``a`` up to ``b`` (None: up to the logits), on ``a``'s token row."""
        names = list(self.blocks)
        self.check_points(a)
        start = names.index(a) + 1
        if b is None:
            return TokenSlice([self.blocks[n] for n in names[start:]], self._family.head)
        self.check_points(b)
        stop = names.index(b) + 1
        if stop <= start:
            raise ValueError(f"target {b!r} is not after {a!r}")
        return TokenSlice([self.blocks[n] for n in names[start:stop]], None)

    def run_from(self, point: str, preact: torch.Tensor, to: str | None = None) -> torch.Tensor:
        """``F_ab`` from ``point``'s token row to ``to``'s (or the logits); differentiable."""
        return self.f_ab(point, to)(preact)

    def ierf_map(self, gxi: torch.Tensor) -> torch.Tensor:
        """A token's iERF from its input gradient × input ``gxi [B, H_in, W_in]`` (summed over channels):
        the sum over each patch, spread evenly over that patch's pixels (``[B, H_in, W_in]``, the same
        total), so the map is one value per patch of the token grid."""
        ph, pw = self._family.patch
        B, H, W = gxi.shape
        hp, wp = H // ph, W // pw
        per_patch = gxi[:, :hp * ph, :wp * pw].reshape(B, hp, ph, wp, pw).sum((2, 4))
        out = torch.zeros_like(gxi)
        out[:, :hp * ph, :wp * pw] = (per_patch / (ph * pw)).repeat_interleave(ph, 1).repeat_interleave(pw, 2)
        return out


def position_grid(adapter, point: str, spatial: tuple[int, int]) -> tuple[int, tuple[int, int]]:
    """``(prefix, (H, W))`` of a point's positions for drawing: a transformer's patch grid after its prefix
    tokens, else no prefix and the map's own ``spatial`` grid."""
    if isinstance(adapter, TransformerAdapter):
        return adapter.position_grid(point)
    return 0, tuple(spatial)
