"""Slice a CNN at two analysed points, so GIG runs ``F_ab`` without recomputing the prefix (docs/design.md §1.1).

A *point* names a place in the network whose value is a layer's pre-activation embedding ``X^a``:

* a torchvision ResNet block, ``"layer1.0"`` … ``"layer4.2"``: the block output *before* its final ReLU,
  ``bn3(conv3(·)) + identity`` (``bn2(conv2(·)) + identity`` for BasicBlock) — the FX node
  ``"<block>.add"``; more generally any module whose forward has a residual sum ``<module>.add``;
* ``"logits"``: the model output (for a ResNet, the same as the node ``"fc"``);
* any node name of ``torchvision.models.feature_extraction.get_graph_node_names(model)`` (eval mode),
  e.g. ``"layer3.5.add"`` or ``"layer2.0.bn2"``, for any FX-traceable model.

The four functions are the whole API::

    preact_points(model)          -> ["layer1.0", ..., "layer4.2", "logits"]
    preactivation(model, a, x)    -> X^a            [B, C_a, H_a, W_a]
    make_f_ab(model, a, b)        -> F_ab: X^a ↦ X^b [B, C_b, H_b, W_b]  (or logits [B, n_classes])
    bn_shift(model, a)            -> β^a            [C_a]

The sliced modules share the parameters of ``model`` (no copies) and follow its train/eval mode at call
time: call ``model.eval()`` before GIG so the BNs use their running statistics.
"""
from __future__ import annotations

import operator
import re
import weakref
from typing import Callable

import torch
from torch import fx, nn

__all__ = ["preact_points", "preactivation", "make_f_ab", "bn_shift", "bn_shift_or_none"]

_LOGITS = "logits"
_BLOCK_ADD = re.compile(r"^(?P<block>.+)\.add(?:_\d+)?$")
_ADD_TARGETS = (operator.add, operator.iadd, torch.add)

# model → {key: traced artefact}; traces take ~0.1 s per model, and pipelines call these per batch.
_cache: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()


def _memo(model: nn.Module, key, build: Callable[[], object]):
    store = _cache.setdefault(model, {})
    if key not in store:
        store[key] = build()
    return store[key]


def _node_names(model: nn.Module) -> list[str]:
    """Qualified FX node names of the eval-mode graph, in forward order."""
    from torchvision.models.feature_extraction import get_graph_node_names

    def build():
        was_training = model.training
        try:
            return list(get_graph_node_names(model, suppress_diff_warning=True)[1])
        finally:
            model.train(was_training)

    return _memo(model, "names", build)


def _block_points(names: list[str]) -> list[str]:
    """Modules with a residual sum ``<module>.add``, in forward order."""
    blocks: list[str] = []
    for name in names:
        m = _BLOCK_ADD.match(name)
        if m and m.group("block") not in blocks:
            blocks.append(m.group("block"))
    return blocks


def preact_points(model: nn.Module) -> list[str]:
    """The named analysis points of ``model``: its residual blocks in forward order, then ``"logits"``.

    For a torchvision ResNet-50 these are ``layer1.0 … layer4.2`` (16 blocks) and ``logits``. Any FX
    node name is accepted too (see the module docstring).
    """
    return _block_points(_node_names(model)) + [_LOGITS]


def _resolve(model: nn.Module, point: str) -> str:
    """Point name → qualified FX node name, or ValueError listing the valid names."""
    if not isinstance(point, str):
        raise ValueError(f"a point must be a string name, got {type(point).__name__}")
    names = _node_names(model)
    if point == _LOGITS:
        return names[-1]
    adds = [n for n in names if (m := _BLOCK_ADD.match(n)) and m.group("block") == point]
    if adds:
        return adds[-1]  # the block's last residual sum is its output before the final ReLU
    if point in names and point != names[0]:
        return point
    raise ValueError(f"unknown point {point!r}; valid points: {preact_points(model)} "
                     f"(or any node name of get_graph_node_names(model), e.g. {names[1:6]} …)")


def _extractor(model: nn.Module, nodes: tuple[str, ...]):
    """A torchvision feature extractor returning ``{node: value}``; cached per model."""
    from torchvision.models.feature_extraction import create_feature_extractor

    def build():
        was_training = model.training
        try:
            return create_feature_extractor(model, {n: n for n in nodes}, suppress_diff_warning=True)
        finally:
            model.train(was_training)

    return _memo(model, ("extract",) + nodes, build)


def preactivation(model: nn.Module, point: str, x: torch.Tensor) -> torch.Tensor:
    """The pre-activation of ``point`` for an input batch (the forward stops there).

    Args:
        model: the network (an FX-traceable ``nn.Module``).
        point: a point name (``"layer3.5"``, ``"logits"``, or an FX node name).
        x: ``[B, 3, H, W]`` input images (whatever ``model`` takes).

    Returns:
        ``X^a``: ``[B, C_a, H_a, W_a]`` for a block (``[B, n_classes]`` for ``"logits"``).
    """
    node = _resolve(model, point)
    fe = _extractor(model, (node,))
    fe.train(model.training)
    return fe(x)[node]


def _graph_of(model: nn.Module, nodes: tuple[str, ...]) -> tuple[fx.Graph, dict[str, fx.Node]]:
    """The traced graph for the model's current mode, and the nodes named in ``nodes``."""
    fe = _extractor(model, nodes)
    graph = fe.train_graph if model.training else fe.eval_graph
    out = next(n for n in graph.nodes if n.op == "output")
    return graph, dict(out.args[0])


def make_f_ab(model: nn.Module, a: str, b: str) -> fx.GraphModule:
    """``F_ab``: the network from the pre-activation of point ``a`` to that of point ``b`` (or the logits).

    Only the nodes that ``b`` needs after ``a`` are kept, so the prefix up to ``a`` is never recomputed.
    The returned ``GraphModule`` shares ``model``'s parameters; its ``point_a``/``point_b`` attributes
    hold the resolved FX node names.

    Args:
        model: the network.
        a, b: point names (``"layer3.5"``, ``"layer4.0"``, ``"logits"``, or FX node names).

    Returns:
        a module mapping ``[B, C_a, H_a, W_a]`` → ``[B, C_b, H_b, W_b]`` (or ``[B, n_classes]``).

    Raises:
        ValueError: an unknown point; ``a == b``; or ``b`` that does not depend on the input through
        ``a`` alone (it comes before ``a``, or a skip connection bypasses ``a``).
    """
    na, nb = _resolve(model, a), _resolve(model, b)
    if na == nb:
        raise ValueError(f"points a={a!r} and b={b!r} are the same node {na!r}")

    def build():
        graph, named = _graph_of(model, (na, nb))
        node_a, node_b = named[na], named[nb]
        needed: set[fx.Node] = set()
        batch_queries: set[fx.Node] = set()
        stack = [node_b]
        while stack:  # everything b needs, stopping at a
            n = stack.pop()
            if n in needed or n in batch_queries or n is node_a:
                continue
            if _is_batch_size(n):  # `x.size(0)` of an earlier tensor: the batch size, read from X^a instead
                batch_queries.add(n)
                continue
            if n.op == "placeholder":
                raise ValueError(f"point {b!r} ({nb}) does not depend on the input through {a!r} ({na}) "
                                 f"alone: it comes before {a!r} or a connection bypasses it")
            needed.add(n)
            stack.extend(n.all_input_nodes)
        new = fx.Graph()
        x_a = new.placeholder("x_a")
        if any(_mutates_input(model, user) for user in node_a.users if user in needed):
            # e.g. the block's in-place ReLU: it would overwrite the caller's X^a (and the GIG path leaf)
            x_a = new.call_method("clone", (x_a,))
        env = {node_a: x_a}
        for n in graph.nodes:
            if n in batch_queries:
                env[n] = new.call_method("size", (x_a, 0))
            elif n in needed:
                env[n] = new.node_copy(n, lambda x: env[x])
        new.output(env[node_b])
        gm = fx.GraphModule(model, new, class_name="F_ab")
        gm.point_a, gm.point_b = na, nb
        return gm

    return _memo(model, ("f_ab", na, nb, model.training), build)


def _mutates_input(model: nn.Module, node: fx.Node) -> bool:
    """Whether ``node`` writes into its first argument (``ReLU(inplace=True)``, ``relu_``, ``add_`` …)."""
    if node.op == "call_module":
        return bool(getattr(model.get_submodule(node.target), "inplace", False))
    if node.op == "call_method":
        return node.target.endswith("_") and not node.target.endswith("__")
    if node.op == "call_function":
        name = getattr(node.target, "__name__", "")
        return bool(node.kwargs.get("inplace", False)) or (name.endswith("_") and not name.endswith("__")) \
            or node.target in (operator.iadd,)
    return False


def _is_batch_size(node: fx.Node) -> bool:
    """Whether ``node`` is ``t.size(0)`` (``t.size(dim=0)``): the batch size, the same for every tensor."""
    if node.op != "call_method" or node.target != "size":
        return False
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    return dim == 0


def _bn_of(model: nn.Module, node: fx.Node) -> nn.Module | None:
    if node.op == "call_module":
        mod = model.get_submodule(node.target)
        if isinstance(mod, nn.modules.batchnorm._BatchNorm):
            return mod
    return None


def _is_add(node: fx.Node) -> bool:
    return (node.op == "call_function" and node.target in _ADD_TARGETS) or \
        (node.op == "call_method" and node.target in ("add", "add_", "__add__", "__iadd__"))


def _shift(bn: nn.Module) -> torch.Tensor:
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError(f"{bn} tracks no running statistics, so its shift β is undefined in eval mode")
    mean, var = bn.running_mean.detach(), bn.running_var.detach()
    weight = bn.weight.detach() if bn.weight is not None else torch.ones_like(mean)
    bias = bn.bias.detach() if bn.bias is not None else torch.zeros_like(mean)
    return bias - weight * mean / torch.sqrt(var + bn.eps)


def _channels_of(model: nn.Module, node: fx.Node) -> int | None:
    if node.op == "call_module":
        mod = model.get_submodule(node.target)
        for attr in ("out_channels", "num_features", "out_features"):
            if hasattr(mod, attr):
                return int(getattr(mod, attr))
    return None


def _net_shift(model: nn.Module, node: fx.Node) -> torch.Tensor | None:
    """The net BN shift of ``node``'s value, or None when no BN feeds it.

    A BN output contributes its shift; a sum contributes the sum of its operands' net shifts (so the
    pre-activation ``bn3(·) + bn_ds(·)`` of a ResNet block with a downsample branch gets both shifts,
    and ``bn3(·) + identity`` gets bn3's alone: an activation from an earlier layer carries no shift of
    this point). Anything else (a conv, a ReLU, an input) contributes nothing.
    """
    bn = _bn_of(model, node)
    if bn is not None:
        return _shift(bn)
    if not _is_add(node):
        return None
    operands = [x for x in node.args if isinstance(x, fx.Node)]
    shifts = []
    for k, x in enumerate(operands):
        shift = _net_shift(model, x)
        if shift is not None:
            # torch.add(a, b, alpha=s) is a + s·b: the second operand's shift is scaled too
            scale = node.kwargs.get("alpha", 1) if k == 1 else 1
            shifts.append(shift * scale)
    return torch.stack(shifts).sum(0) if shifts else None


def bn_shift(model: nn.Module, point: str) -> torch.Tensor:
    """``β^a`` (the paper's μ_BN, Eq. 8): the net BN shift of the point's value (docs/design.md §1.1).

    Each BN contributes ``bn.bias − bn.weight · running_mean / sqrt(running_var + eps)``, its output
    where its input is zero ("no concept present"). A sum of BN outputs gets the sum of their shifts:
    at a ResNet block with a downsample branch (``layer1.0``, ``layer2.0`` … of a ResNet-50) the
    pre-activation is ``bn3(conv3(·)) + bn_ds(conv_ds(·))``, so β is ``bn3``'s shift plus the
    downsample BN's; at an identity block (``bn3(·) + x``) it is ``bn3``'s alone. For a BN node it is
    that BN's shift; zero where no BN feeds the point (a conv or linear output).

    Returns:
        ``[C_a]`` (detached, in the BN's dtype).

    Raises:
        ValueError: no BN, conv or linear module feeds the point (ConvNeXt's layer-scaled residual sums,
        LayerNorm blocks): such points need a data-driven β (``FXAdapter.baseline``).
    """
    shift = bn_shift_or_none(model, point)
    if shift is None:
        raise ValueError(f"cannot determine β for point {point!r} ({_resolve(model, point)}): no BatchNorm, conv "
                         f"or linear module feeds it; pass β yourself (e.g. the mean PFV: FXAdapter.baseline)")
    return shift


def bn_shift_or_none(model: nn.Module, point: str) -> torch.Tensor | None:
    """:func:`bn_shift`, or None where no BN, conv or linear module feeds the point."""
    node_name = _resolve(model, point)
    _, named = _graph_of(model, (node_name,))
    node = named[node_name]
    shift = _net_shift(model, node)
    if shift is not None:
        return shift.detach()
    if _is_add(node):
        operands = [x for x in node.args if isinstance(x, fx.Node)]
        node = operands[0] if operands else node
    channels = _channels_of(model, node)
    if channels is None:
        return None
    param = next(model.parameters(), None)
    return torch.zeros(channels, dtype=param.dtype if param is not None else torch.float32)
