"""An adapter for any FX-traceable CNN: analysed points named by FX node (or by block), via ``gig_fast.slicing``.

:class:`ResNetAdapter` walks a ResNet by hand (SRD needs every intermediate of a block). Other networks —
EfficientNet-Lite0, MobileNets, your own — are handled generically here: the network is traced once with
``torch.fx`` and

* a *point* is an FX node whose value is a layer's pre-activation embedding ``[B, C, H, W]``. Points are
  given by node name (``"_blocks.3.add"``), or as the outputs of the children of a block container
  (``blocks="_blocks"`` names the last node of each ``_blocks.i`` as the point ``"_blocks.i"``), or,
  by default, as the model's residual blocks (``slicing.preact_points``);
* ``record`` runs the forward once and returns every point's value and the logits;
* ``run_from`` is ``slicing.make_f_ab`` (the prefix up to the point is never recomputed);
* ``bn_shift`` is ``slicing.bn_shift`` (the net shift of the BNs feeding the point: a BN's shift, the sum of
  the shifts of the BN outputs summed at a residual sum); ``baseline`` falls back to the concept
  dataset's mean PFV where no BN feeds the point (ConvNeXt).

Attribution: gradient × input only (SRD's propagation rules are written for ResNet blocks).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import fx, nn

from .. import slicing
from .bn import ensure_eval, fold_batchnorm

__all__ = ["FXAdapter", "FXRecord", "container_points"]


@dataclass
class FXRecord:
    """One forward pass of an :class:`FXAdapter`: ``values[point]`` ``[B, C, H, W]`` and ``logits``."""
    image: torch.Tensor
    values: dict[str, torch.Tensor] = field(default_factory=dict)
    logits: torch.Tensor | None = None

    def preact(self, point: str) -> torch.Tensor:
        """``[B, C, H, W]`` pre-activation of a point."""
        return self.values[point]


def container_points(model: nn.Module, container: str) -> dict[str, str]:
    """``{"<container>.i": last FX node of child i}`` for each child of a block container, in order.

    The last node of a block is its output: the residual sum when the block has one, else the BN (or
    conv) that ends it — for EfficientNet's MBConv blocks ``_blocks.i.add`` or ``_blocks.i._bn2``.
    """
    try:
        children = [name for name, _ in model.get_submodule(container).named_children()]
    except AttributeError as e:
        raise ValueError(f"model has no block container {container!r}") from e
    names = slicing._node_names(model)
    points = {}
    for child in children:
        prefix = f"{container}.{child}."
        inside = [n for n in names if n.startswith(prefix)]
        if inside:
            points[f"{container}.{child}"] = inside[-1]
    if not points:
        raise ValueError(f"block container {container!r} has no traced children")
    return points


class FXAdapter:
    """Adapter for any FX-traceable classifier (see the module docstring).

    Args:
        model: the network; put in eval mode (with a warning if it was training).
        points: FX node names (a list) or ``{point name: FX node name}``; None → ``blocks`` or the
            model's residual blocks.
        blocks: a block container whose children's outputs are the points (``"_blocks"``).

    Attributes:
        points: analysed point names in forward order; ``nodes[point]`` is its FX node name.
    """

    supports_srd = False

    def __init__(self, model: nn.Module, points=None, blocks: str | None = None):
        self.model = ensure_eval(model)
        order = {n: i for i, n in enumerate(slicing._node_names(model))}
        if points is None and blocks is not None:
            nodes = container_points(model, blocks)
        elif points is None:
            nodes = {p: slicing._resolve(model, p) for p in slicing.preact_points(model)[:-1]}
        elif isinstance(points, dict):
            nodes = {p: slicing._resolve(model, n) for p, n in points.items()}
        else:
            nodes = {p: slicing._resolve(model, p) for p in points}
        if not nodes:
            raise ValueError(f"{type(model).__name__} has no analysis points (no residual blocks found): "
                             "pass FX node names as `points` (see gig_fast.slicing)")
        self.nodes = dict(sorted(nodes.items(), key=lambda kv: order[kv[1]]))
        self.points = list(self.nodes)
        self._output = list(order)[-1]
        self._channels: dict[str, int] = {}
        self._n_classes: int | None = None
        self._forward = _points_forward(model, tuple(self.nodes.values()), self._output)

    # -- naming -------------------------------------------------------------------------------
    def check_points(self, names) -> list[str]:
        """Validate point names (None → all) and return them in forward order."""
        if names is None:
            return list(self.points)
        names = [names] if isinstance(names, str) else list(names)
        unknown = [n for n in names if n not in self.nodes]
        if unknown:
            raise ValueError(f"unknown layer name(s) {unknown}; valid names: {', '.join(self.points)}")
        return sorted(set(names), key=self.points.index)

    def channels(self, point: str) -> int:
        """Number of channels C of a point's PFVs (known after the first :meth:`record`)."""
        if point not in self._channels:
            raise ValueError(f"channels of {point!r} are known after a first record(x) of this adapter")
        return self._channels[point]

    def bn_shift(self, point: str) -> torch.Tensor:
        """β ``[C]`` of a point: the net shift of the BNs feeding it (``slicing.bn_shift``; summed at a residual sum)."""
        return slicing.bn_shift(self.model, self.nodes[point]).detach().clone()

    def baseline(self, point: str, pfvs: torch.Tensor) -> torch.Tensor:
        """β ``[C]`` of the GIG path and of concept extraction, from the point's concept dataset ``pfvs [N, C]``:
        the BN shift (:meth:`bn_shift`; zero for a bare conv/linear output, docs/design.md §1.1), or, where no
        BN, conv or linear module feeds the point (ConvNeXt's layer-scaled residual sums, LayerNorm
        CNNs), the mean PFV of the concept dataset — the same choice as for transformers
        (:mod:`gig_fast.models.transformer`)."""
        shift = slicing.bn_shift_or_none(self.model, self.nodes[point])
        if shift is None:
            return pfvs.double().mean(0).to(pfvs.dtype)
        return shift.detach().clone().to(pfvs)

    @property
    def num_classes(self) -> int:
        if self._n_classes is None:
            linears = [m for m in self.model.modules() if isinstance(m, nn.Linear)]
            if not linears:
                raise ValueError("number of classes unknown before a first record(x): the model has no nn.Linear")
            self._n_classes = linears[-1].out_features
        return self._n_classes

    # -- forward ------------------------------------------------------------------------------
    def forward_points(self, x: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Differentiable forward: ``({point: [B, C, H, W]}, logits [B, n_classes])``."""
        out = self._forward(x)
        values = {p: out[n] for p, n in self.nodes.items()}
        logits = out[self._output]
        for p, v in values.items():
            if v.dim() != 4:
                raise ValueError(f"point {p!r} ({self.nodes[p]}) is not a [B, C, H, W] feature map (shape "
                                 f"{tuple(v.shape)}): gig_fast slices CNN feature maps by FX node, and vision "
                                 "transformers of timm's or torchvision's VisionTransformer classes by block; "
                                 f"the points {type(self.model).__name__} offers ({', '.join(self.points)}) are "
                                 "neither — pass FX node names whose value is a [B, C, H, W] map as `points` "
                                 "(torchvision.models.feature_extraction.get_graph_node_names lists them)")
            self._channels[p] = v.shape[1]
        self._n_classes = logits.shape[1]
        return values, logits

    @torch.no_grad()
    def record(self, x: torch.Tensor, keep: str = "preact") -> FXRecord:
        """Run the forward once: every point's pre-activation and the logits (``keep`` is accepted for
        compatibility with :class:`ResNetAdapter`; only pre-activations exist here)."""
        values, logits = self.forward_points(x)
        return FXRecord(image=x, values=values, logits=logits)

    def run_from(self, point: str, preact: torch.Tensor, to: str | None = None) -> torch.Tensor:
        """``F_ab`` from ``point``'s pre-activation to ``to``'s (or the logits); differentiable."""
        return slicing.make_f_ab(self.model, self.nodes[point], self.nodes[to] if to is not None else "logits")(preact)

    def f_ab(self, a: str, b: str | None):
        """The sliced module ``F_ab`` (``slicing.make_f_ab`` on the FX node names), conv+BN folded."""
        return fold_batchnorm(slicing.make_f_ab(self.model, self.nodes[a], self.nodes[b] if b is not None else "logits"))


def _points_forward(model: nn.Module, nodes: tuple[str, ...], output: str) -> fx.GraphModule:
    """A GraphModule returning ``{node: value}`` for ``nodes`` and the output node.

    Where a later in-place op would overwrite a point's value (``ReLU(inplace=True)`` after a residual
    sum), the network continues on a copy, so the returned pre-activation is never the post-ReLU map.
    """
    from torchvision.models.feature_extraction import create_feature_extractor

    was_training = model.training
    try:
        fe = create_feature_extractor(model, {n: n for n in nodes + (output,)}, suppress_diff_warning=True)
    finally:
        model.train(was_training)
    gm = fx.GraphModule(fe, fe.eval_graph)  # the adapter works in eval mode only
    out_node = next(n for n in gm.graph.nodes if n.op == "output")
    returned = dict(out_node.args[0])
    for name in nodes:
        node = returned[name]
        if any(slicing._mutates_input(model, user) for user in node.users):
            # the rest of the network reads a copy (and overwrites that one); the returned value stays
            # the pre-activation and on the gradient path to the logits
            with gm.graph.inserting_after(node):
                copy = gm.graph.call_method("clone", (node,))
            node.replace_all_uses_with(copy, delete_user_cb=lambda user: user is not copy and user is not out_node)
    out_node.args = (returned,)
    gm.recompile()
    return gm
