"""F_ab's affine tail: the convolutions and sums after its last non-linearity, whose backward a concept
target does not need to run at every node.

A concept target is linear in F_ab's output, and the layers after F_ab's last ReLUs (a block's last
convolution, its downsample convolution and the residual sum; with BNs folded) are affine. So the
gradient that reaches those ReLUs' outputs — the tail's vector-Jacobian product with the target's seed —
is the same at every point of the path: it depends on the target alone. :func:`split_affine_tail` cuts
F_ab there into a head (input → the tensors the tail reads, "the boundary") and the affine tail;
:class:`TailAdjoints` computes each target's gradient at the boundary once per call, and every node's
T backwards start at the boundary instead of at the output. At ResNet-50's layer1.2 → layer2.0 the tail
(conv3 and the downsample) is 41 % of a Bottleneck's multiply-adds; the forward still runs whole (the
targets' values stay what F_ab computes). Measured (Intel Xeon, 2 threads, the same nodes and values):
ResNet-50 at 96 px, 8 images × 5 targets, 1.45× at layer3.5 → layer4.0 and 1.1× at layer1.2 → layer2.0
(where the downsample's boundary gradient, on every other position of 24 × 24, is copied to each row).
"""
from __future__ import annotations

import operator
import weakref
from dataclasses import dataclass

import torch
from torch import fx, nn

# layers that are affine maps of their input (a BN and a dropout only in eval mode, checked apart)
_AFFINE_MODULES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
                   nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.Flatten, nn.Identity)
_AFFINE_FUNCTIONS = {operator.add, torch.add, torch.flatten}
_AFFINE_METHODS = {"add", "flatten", "contiguous", "clone"}


@dataclass
class AffineTail:
    """F_ab cut after its last non-linearities: ``head(x) → boundary`` (a tuple of tensors) and the affine
    ``tail(*boundary) → F_ab(x)``."""
    head: fx.GraphModule
    tail: fx.GraphModule


_SPLITS: "weakref.WeakKeyDictionary[nn.Module, AffineTail | None]" = weakref.WeakKeyDictionary()


def split_affine_tail(f_ab) -> AffineTail | None:
    """The cut of an FX-traced F_ab (e.g. :func:`gig_fast.slicing.make_f_ab`, BNs folded or not) before
    its affine tail; None when F_ab is not a ``GraphModule`` or its tail holds no layer with weights
    (nothing to save). Cached per module (the graph must not change after the first call)."""
    if not isinstance(f_ab, fx.GraphModule):
        return None
    if f_ab not in _SPLITS:
        _SPLITS[f_ab] = _split(f_ab)
    return _SPLITS[f_ab]


def _is_affine(gm: fx.GraphModule, node: fx.Node) -> bool:
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        if isinstance(module, nn.modules.batchnorm._BatchNorm):  # running statistics: an affine map
            return not module.training and module.running_mean is not None
        if isinstance(module, nn.Dropout):  # the identity in eval mode
            return not module.training
        return isinstance(module, _AFFINE_MODULES)
    if node.op == "call_function":
        return node.target in _AFFINE_FUNCTIONS
    return node.op == "call_method" and node.target in _AFFINE_METHODS


def _split(gm: fx.GraphModule) -> AffineTail | None:
    nodes = list(gm.graph.nodes)
    output = next(n for n in nodes if n.op == "output")
    if not isinstance(output.args[0], fx.Node):
        return None
    tail: set[fx.Node] = set()
    for node in reversed(nodes):  # users come after a node: each is decided after all of its users
        if node.op == "output" or not node.users:
            continue
        if _is_affine(gm, node) and all(u in tail or u is output for u in node.users):
            tail.add(node)
    if output.args[0] not in tail:
        return None
    boundary = [n for n in nodes if n not in tail and any(u in tail for u in n.users)]
    # the tail reads tensors computed from the input only (no parameter fetched by get_attr, no size query)
    if any(n.op not in ("call_module", "call_function", "call_method") or n.target == "size" for n in boundary):
        return None
    if not any(n.op == "call_module" and any(True for _ in gm.get_submodule(n.target).parameters())
               for n in tail):
        return None

    head_graph, env = fx.Graph(), {}
    for node in nodes:
        if node not in tail and node.op != "output":
            env[node] = head_graph.node_copy(node, lambda x: env[x])
    head_graph.output(tuple(env[n] for n in boundary))
    tail_graph, env = fx.Graph(), {}
    for i, node in enumerate(boundary):
        env[node] = tail_graph.placeholder(f"boundary_{i}")
    for node in nodes:
        if node in tail:
            env[node] = tail_graph.node_copy(node, lambda x: env[x])
    tail_graph.output(env[output.args[0]])
    head = fx.GraphModule(gm, head_graph, class_name="F_ab_head")
    head.graph.eliminate_dead_code()
    head.recompile()
    return AffineTail(head, fx.GraphModule(gm, tail_graph, class_name="F_ab_tail"))


def _same_at_every_position(g: torch.Tensor) -> bool:
    """Whether a boundary gradient ``g [U, C, H, W]`` is the same at every position up to its backward's
    rounding: a convolution backend's edge and vector tiles may round the gradient behind a stride-1 1×1
    convolution differently (one ulp, 1.7e-16 relative in float64, at some positions on an AMD Zen 4
    host), which an exact comparison took for a field that varies."""
    tol = 8 * torch.finfo(g.dtype).eps * float(g.abs().max())
    return bool(((g - g[:, :, :1, :1]).abs() <= tol).all())


class TailAdjoints:
    """Each concept target's gradient at the boundary of :class:`AffineTail`, for the rows of a batch.

    ``units``: the targets' unit concept vectors, each ``[C_b]`` or ``[B, C_b]``. The gradient of
    ``Σ_positions ⟨Ω, u⟩`` (u the unit vector) at the boundary is the tail's transposed Jacobian applied
    to u at every position; the tail is affine, so it is computed once, on zeros, for every distinct
    vector. A boundary tensor whose gradient is the same at every position (behind a 1×1 convolution
    of stride 1) keeps one position and is expanded per row (no copy)."""

    def __init__(self, split: AffineTail, units: list, dtype: torch.dtype):
        self.split, self.dtype = split, dtype
        self.units, self.owner = [], []  # per target: distinct unit vectors [U, C_b], each image's one [B] or None
        for unit in units:
            unit = unit.to(dtype)
            if unit.dim() == 1:
                self.units.append(unit[None])
                self.owner.append(None)
            else:
                distinct, owner = torch.unique(unit, dim=0, return_inverse=True)
                self.units.append(distinct)
                self.owner.append(owner)
        self.fields = None  # per target, per boundary tensor: [U, ...] (filled on the first batch)

    def _compute(self, boundary: tuple) -> None:
        counts = [u.shape[0] for u in self.units]
        units = torch.cat(self.units)                                               # [ΣU, C_b]
        inputs = []
        for h in boundary:
            z = torch.zeros((units.shape[0],) + tuple(h.shape[1:]), dtype=self.dtype, device=h.device)
            if h.dim() == 4 and h.is_contiguous(memory_format=torch.channels_last):
                z = z.contiguous(memory_format=torch.channels_last)
            inputs.append(z.requires_grad_(True))
        with torch.enable_grad():
            out = self.split.tail(*inputs)
            seed = units.reshape(*units.shape, *([1] * (out.dim() - 2))).expand(out.shape)
            grads = torch.autograd.grad(out, inputs, seed, allow_unused=True)
        fields = []
        for g, z in zip(grads, inputs):
            g = torch.zeros_like(z) if g is None else g.detach()
            if g.dim() == 4 and _same_at_every_position(g):
                g = g[:, :, :1, :1].clone()
            fields.append(torch.split(g, counts))
        self.fields = [[f[t] for f in fields] for t in range(len(counts))]
        # for stacked_seeds: per boundary tensor every distinct field [ΣU, ...], and which one each
        # (target, image) takes, [T, B] (or [T, 1] when every target's field is shared by the images)
        self.tables = [torch.cat(f) for f in zip(*self.fields)]
        offsets = [sum(counts[:t]) for t in range(len(counts))]
        B = max((len(o) for o in self.owner if o is not None), default=1)
        self.pick = torch.stack([torch.full((B,), offsets[t], dtype=torch.int64, device=units.device)
                                 if o is None else o.to(units.device) + offsets[t] for t, o in enumerate(self.owner)])

    def seeds(self, t: int, boundary: tuple, image: torch.Tensor) -> list:
        """Target ``t``'s gradient at each boundary tensor for the rows of ``boundary`` (row i belongs to
        image ``image[i]``), in the boundary's dtypes."""
        if self.fields is None:
            self._compute(boundary)
        return [self._rows(t, j, image).expand(h.shape).to(h.dtype) for j, h in enumerate(boundary)]

    def stacked_seeds(self, boundary: tuple, image: torch.Tensor) -> list:
        """Every target's gradient at each boundary tensor (of ``boundary``'s shapes past the rows) for rows
        of images ``image [m]``: one ``[T, m, ...]`` per boundary tensor, expanded where the field is
        shared by rows or positions (no copy then). One gather per boundary tensor (a gather per target
        and tensor, then a stack, took 3.0 s of the demo's stage 4, 61 s under cProfile)."""
        if self.fields is None:
            self._compute(boundary)
        T, m = self.pick.shape[0], image.shape[0]
        pick = self.pick if self.pick.shape[1] == 1 else self.pick[:, image]  # [T, 1 or m]
        return [table[pick].expand(T, m, *h.shape[1:]).to(h.dtype) for table, h in zip(self.tables, boundary)]

    def _rows(self, t: int, j: int, image: torch.Tensor) -> torch.Tensor:
        """Target ``t``'s field at boundary tensor ``j``: ``[1, ...]`` if every image shares it, else one
        row per image of ``image``."""
        field = self.fields[t][j]
        return field if self.owner[t] is None else field[self.owner[t][image]]
