"""The adaptive rule: each image's own nested trapezoid grid, bisected where a subinterval's exact
completeness gap is largest (:func:`adaptive_rule`), and the checks of its arguments."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .evaluation import Pass, accumulate, region, target_values, through_f_ab
from .rules import ADAPTIVE, RULES

START_NODES = 5         # nodes of the adaptive rule's starting grid when it refines a fixed rule's image
ADAPTIVE_MAX = 128      # the adaptive rule's default most nodes per image
_MIN_WIDTH = 2.0 ** -20  # subintervals narrower than this are not bisected
_MAX_ROUNDS = 40


def check_refinement(rule, steps, tolerance, max_steps) -> None:
    if tolerance is not None and (isinstance(tolerance, bool) or not isinstance(tolerance, (int, float))
                                  or not tolerance > 0):
        raise ValueError(f"tolerance must be None or a positive float, got {tolerance!r}")
    if max_steps is not None and (isinstance(max_steps, bool) or not isinstance(max_steps, (int, np.integer))
                                  or max_steps < 2):
        raise ValueError(f"max_steps must be None or an int >= 2, got {max_steps!r}")
    if rule == ADAPTIVE:
        if tolerance is None:
            raise ValueError("the adaptive rule refines until the completeness bar: it needs a tolerance "
                             "(e.g. 0.01); for a fixed rule pass rule='gausslegendre'")
        if steps < 2:
            raise ValueError(f"the adaptive rule starts from a grid of steps >= 2 nodes (both ends), got {steps}")
        if max_steps is not None and max_steps < steps:
            raise ValueError(f"max_steps={max_steps} is below the adaptive rule's starting grid of steps={steps} nodes")
    elif rule not in RULES:
        raise ValueError(f"unknown quadrature rule {rule!r}; choose one of {(ADAPTIVE,) + RULES}")


def completeness_bar(attr, value_1, value_0, tolerance, eps):
    """The completeness bar ``tolerance·|T(X(1)) − T(X(0))|`` plus a rounding floor (a few ulps of the
    magnitudes summed, so a target that barely changes is not refined forever). ``attr [T, n, P, s]``,
    values ``[T, n]``; returns ``[T, n]``."""
    floor = 4 * eps * (attr.abs().sum((2, 3)) + value_1.abs() + value_0.abs())
    return (tolerance * (value_1 - value_0).abs() + floor).clamp_min(torch.finfo(attr.dtype).tiny)


@dataclass
class _Grid:
    """One image's nodes in the adaptive rule, sorted by ``alpha [n]``, and per node (host numpy, float64:
    the rounds' bookkeeping is a few small operations per image and round, far cheaper in numpy than at
    torch's per-operation cost) the targets ``value [n, T]`` = T(X(α)), their α-derivatives ``slope
    [n, T]`` = ⟨∇T, U V⟩, ``size [n, T]`` = Σ|attributions of the node| and ``row [n]``: the node's row
    among every row the call evaluated (its attributions at weight 1 stay on the device)."""
    alpha: np.ndarray
    value: np.ndarray
    slope: np.ndarray
    size: np.ndarray
    row: np.ndarray

    @staticmethod
    def empty(T: int) -> "_Grid":
        return _Grid(np.zeros(0), np.zeros((0, T)), np.zeros((0, T)), np.zeros((0, T)), np.zeros(0, dtype=np.int64))

    def add(self, alpha, value, slope, size, row) -> None:
        """New nodes (``alpha [k]``, ``value/slope/size [k, T]``, ``row [k]``), merged in α order."""
        order = np.argsort(np.concatenate([self.alpha, alpha]), kind="stable")
        self.alpha = np.concatenate([self.alpha, alpha])[order]
        self.value = np.concatenate([self.value, value])[order]
        self.slope = np.concatenate([self.slope, slope])[order]
        self.size = np.concatenate([self.size, size])[order]
        self.row = np.concatenate([self.row, row])[order]

    def weights(self) -> np.ndarray:
        """Trapezoid weights of the sorted nodes ``[n]`` (float64): half of each neighbouring width."""
        h = np.diff(self.alpha)
        w = np.zeros(len(self.alpha))
        w[1:] += h / 2
        w[:-1] += h / 2
        return w

    def local_gaps(self) -> np.ndarray:
        """``[n − 1, T]``: each subinterval's trapezoid sum of the slopes minus T's exact change over it."""
        return np.diff(self.alpha)[:, None] * (self.slope[1:] + self.slope[:-1]) / 2 - np.diff(self.value, axis=0)


def adaptive_rule(run: Pass, UV, idx, val, images: list, start: int, max_steps: int, tolerance, eps):
    """The adaptive rule for the given images (indices into ``UV [B, P, C]`` and the codes).

    Each image starts from ``start`` equally spaced nodes on [0, 1] (both ends included) and the composite
    trapezoid rule on them. Every node is a full evaluation — T(X(α)) from the forward, ∇T from the
    backward — so each subinterval carries an exact completeness check: the trapezoid sum of the
    α-derivatives ⟨∇T, U V⟩ at its ends against T's change over it. Along the path F_ab is piecewise
    linear between ReLU switches, so T is linear and the check is exact to rounding on a subinterval
    without a switch; where switches lie, the gap is large. Rounds bisect the subintervals with the
    largest gaps (:func:`_choose`) until each target's total gap is within the bar or the image has
    ``max_steps`` nodes. A bisection costs one node: the new midpoint; every earlier node is kept with a
    new weight (the nodes are nested, unlike a Gauss rule's). All images' new nodes of a round share the
    batches through F_ab.

    Measured on ResNet-50 at 96 px (8 images × 5 concept targets, offline on 1,025 nodes per image):
    starting from 5 nodes, every pair within 1 % with 19 / 72 / 61 nodes per image on average at
    layer3.5 → logits / → layer4.0 / layer1.2 → layer2.0, where one fixed Gauss–Legendre rule for all
    images needs 128 / > 256 / > 128 nodes for the same share.

    Returns, for the images in the given order, ``attr [T, n, P, s]``, ``T(X(1))`` and ``T(X(0))`` ``[T, n]``,
    the nodes each used ``[n]`` (numpy int) and ``excess [n]`` (numpy): the worst target's ``|delta|`` over
    its :func:`completeness_bar` (≤ 1: complete).
    """
    T = len(run.targets)
    grids = {b: _Grid.empty(T) for b in images}
    pending = [(b, k / (start - 1)) for b in images for k in range(start)]
    projs = []  # every batch's attributions at weight 1, [T, rows, P, s]
    excess = {}
    for _ in range(_MAX_ROUNDS):
        if not pending:
            break
        touched = _evaluate_nodes(run, UV, idx, val, pending, grids, projs)
        pending = []
        for b in touched:
            grid = grids[b]
            local = grid.local_gaps()                       # [n − 1, T]
            v1, v0 = grid.value[-1], grid.value[0]
            size = grid.weights() @ grid.size
            bar = np.maximum(tolerance * np.abs(v1 - v0) + 4 * eps * (size + np.abs(v1) + np.abs(v0)), 1e-300)
            excess[b] = float((np.abs(local.sum(0)) / bar).max())
            if excess[b] > 1:
                room = max_steps - len(grid.alpha)
                pending += [(b, 0.5 * (lo + hi)) for lo, hi in _choose(grid.alpha, local, bar, room)]
    return _assemble(run, [grids[b] for b in images], projs) + (
        np.array([len(grids[b].alpha) for b in images]), np.array([excess[b] for b in images]))


def _assemble(run: Pass, grids: list, projs: list):
    """Each image's trapezoid sum of its nodes' attributions, one weighted ``index_add`` per batch:
    ``attr [T, n, P, s]``, ``T(X(1))`` and ``T(X(0))`` ``[T, n]`` for the ``n`` grids in order."""
    T, P, s = projs[0].shape[0], projs[0].shape[2], projs[0].shape[3]
    rows = sum(p.shape[1] for p in projs)
    weight, owner = np.zeros(rows), np.zeros(rows, dtype=np.int64)
    for j, grid in enumerate(grids):
        weight[grid.row], owner[grid.row] = grid.weights(), j
    device = run.V.device
    weight = torch.from_numpy(weight).to(device=device, dtype=run.acc)
    owner = torch.from_numpy(owner).to(device)
    attr = torch.zeros(T, len(grids), P, s, dtype=run.acc, device=device)
    r0 = 0
    for proj in projs:
        r1 = r0 + proj.shape[1]
        attr.index_add_(1, owner[r0:r1], proj * weight[None, r0:r1, None, None])
        r0 = r1
    ends = torch.from_numpy(np.stack([np.stack([g.value[-1], g.value[0]], 1) for g in grids], 2))  # [T, 2, n]
    ends = ends.to(device=device, dtype=run.acc)
    return attr, ends[:, 0], ends[:, 1]


def _choose(alpha, local, bar, room):
    """The fewest subintervals ``(lo, hi)`` of the sorted nodes ``alpha``, worst first, whose local gaps
    ``local [n − 1, T]`` leave less than half of ``bar [T]`` for every target if they were closed; at most
    ``room`` of them (host arrays: no read-backs)."""
    badness = (np.abs(local) / bar).max(1)
    rest = np.abs(local).sum(0)
    chosen = []
    for i in np.argsort(-badness, kind="stable").tolist():
        if len(chosen) >= room or bool((rest <= 0.5 * bar).all()):
            break
        lo, hi = alpha[i], alpha[i + 1]
        if hi - lo >= _MIN_WIDTH:
            chosen.append((lo, hi))
            rest = rest - np.abs(local[i])
    return chosen


def _evaluate_nodes(run: Pass, UV, idx, val, nodes, grids, projs) -> list:
    """Every node ``(image, α)`` through F_ab (``batch_size`` rows at most per batch, images mixed): its
    targets' values, α-derivatives and sizes merged into ``grids[image]``, its attributions at weight 1
    appended to ``projs`` (one ``[T, rows, P, s]`` per batch). Returns the images that got nodes.

    The attributions of all rows of a batch are one ``gig_accumulate`` call: the rows' positions stacked
    (``[n·P]`` positions, one node of weight 1), each with its own image's codes."""
    V = run.V
    P, C = UV.shape[1:]
    s, T = idx.shape[2], len(run.targets)
    image_np = np.array([b for b, _ in nodes])
    alpha_np = np.array([a for _, a in nodes], dtype=np.float64)
    image_all = torch.from_numpy(image_np).to(V.device)
    alpha_all = torch.from_numpy(alpha_np).to(V.device, V.dtype)
    one = torch.ones(1, dtype=run.acc, device=V.device)
    step = run.batch_size or len(nodes)
    host, first_row = [], sum(p.shape[1] for p in projs)
    for r0 in range(0, len(nodes), step):
        r1 = min(len(nodes), r0 + step)
        image, n = image_all[r0:r1], r1 - r0
        with region("gig.path"):
            path = torch.addcmul(run.beta, alpha_all[r0:r1, None, None], UV[image])  # [n, P, C]
        proj = torch.empty(T, n, P, s, dtype=run.acc, device=V.device)
        codes = idx[image], val[image]                                                  # [n, P, s]

        def project(grads, a, b):  # rows a:b of the batch, [T, b − a, P, C] → proj[:, a:b]
            proj[:, a:b] = accumulate(run, grads.reshape(T, 1, (b - a) * P, C), one, codes[0][a:b].reshape(-1, s),
                                      codes[1][a:b].reshape(-1, s)).reshape(T, b - a, P, s)

        out = through_f_ab(run, path, image, n, project)
        values = target_values(run, out, image, slice(0, n))                           # [T, n]
        projs.append(proj)
        # the few numbers the rounds decide on, in one read-back per batch: [3, T, n]
        host.append(torch.stack([values, proj.sum((2, 3)), proj.abs().sum((2, 3))]).to(torch.float64).cpu().numpy())
    host = np.concatenate(host, axis=2).transpose(0, 2, 1)                              # [3, nodes, T]
    order = np.argsort(image_np, kind="stable")
    touched, bounds = np.unique(image_np[order], return_index=True)
    for b, sel in zip(touched.tolist(), np.split(order, bounds[1:])):
        grids[b].add(alpha_np[sel], host[0, sel], host[1, sel], host[2, sel], first_row + sel)
    return touched.tolist()
