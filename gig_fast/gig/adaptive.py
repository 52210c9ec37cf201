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
class _Grids:
    """Every image's nodes in the adaptive rule, one row per image, each row sorted by ``alpha [n, N]``
    with its ``count [n]`` nodes first (the rest padding: α = +inf, zeros, row −1), and per node the
    targets ``value [n, N, T]`` = T(X(α)), their α-derivatives ``slope [n, N, T]`` = ⟨∇T, U V⟩, ``size
    [n, N, T]`` = Σ|attributions of the node| and ``row [n, N]``: the node's row among every row the call
    evaluated (its attributions at weight 1 stay on the device). Host numpy, float64: a round's
    bookkeeping is a few whole-array operations for all images (one image at a time, at numpy's
    per-call cost, it took ~10 % of the demo's stage 4)."""
    alpha: np.ndarray
    value: np.ndarray
    slope: np.ndarray
    size: np.ndarray
    row: np.ndarray
    count: np.ndarray

    @staticmethod
    def empty(n: int, T: int, width: int) -> "_Grids":
        return _Grids(np.full((n, width), np.inf), np.zeros((n, width, T)), np.zeros((n, width, T)),
                      np.zeros((n, width, T)), np.full((n, width), -1, dtype=np.int64), np.zeros(n, dtype=np.int64))

    def add(self, image, alpha, value, slope, size, row) -> None:
        """New nodes of images ``image [k]`` (this grid's rows, ascending), ``alpha [k]``,
        ``value/slope/size [k, T]``, ``row [k]``, each image's row re-sorted by α."""
        touched, first, added = np.unique(image, return_index=True, return_counts=True)
        slot = self.count[image] + np.arange(len(image)) - np.repeat(first, added)
        if slot.max() >= self.alpha.shape[1]:  # widen every row to the new most nodes
            grow = int(slot.max()) + 1 - self.alpha.shape[1]
            for name, fill in (("alpha", np.inf), ("value", 0.0), ("slope", 0.0), ("size", 0.0), ("row", -1)):
                a = getattr(self, name)
                setattr(self, name, np.concatenate([a, np.full((a.shape[0], grow) + a.shape[2:], fill, a.dtype)], 1))
        self.alpha[image, slot], self.value[image, slot], self.slope[image, slot] = alpha, value, slope
        self.size[image, slot], self.row[image, slot] = size, row
        self.count[touched] += added
        order = np.argsort(self.alpha[touched], axis=1, kind="stable")
        for name in ("alpha", "value", "slope", "size", "row"):
            a = getattr(self, name)
            a[touched] = np.take_along_axis(a[touched], order if a.ndim == 2 else order[:, :, None], 1)

    def weights(self, rows) -> np.ndarray:
        """Trapezoid weights ``[len(rows), N]`` of those rows' sorted nodes (float64, 0 at padding): half
        of each neighbouring width."""
        h = self.widths(rows)
        w = np.zeros(h.shape[:1] + (h.shape[1] + 1,))
        w[:, 1:] += h / 2
        w[:, :-1] += h / 2
        return w

    def widths(self, rows) -> np.ndarray:
        """``[len(rows), N − 1]`` each subinterval's width (0 past the last node)."""
        inside = _inside(self.count[rows], self.alpha.shape[1] - 1)
        return np.where(inside, np.diff(np.minimum(self.alpha[rows], 1.0), axis=1), 0.0)  # padding: +inf

    def local_gaps(self, rows) -> np.ndarray:
        """``[len(rows), N − 1, T]``: each subinterval's trapezoid sum of the slopes minus T's exact change
        over it (0 past the last node)."""
        h, slope = self.widths(rows), self.slope[rows]
        gaps = h[:, :, None] * (slope[:, 1:] + slope[:, :-1]) / 2 - np.diff(self.value[rows], axis=1)
        return np.where(_inside(self.count[rows], h.shape[1])[:, :, None], gaps, 0.0)

    def ends(self, rows) -> tuple[np.ndarray, np.ndarray]:
        """T(X(1)) and T(X(0)) ``[len(rows), T]`` of those rows."""
        return self.value[rows, self.count[rows] - 1], self.value[rows, 0]


def _inside(count, width) -> np.ndarray:
    """``[len(count), width]``: which subintervals lie between a row's first and last node."""
    return np.arange(width) < (count - 1)[:, None]


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
    T, n = len(run.targets), len(images)
    image_ids = np.asarray(images, dtype=np.int64)
    grids = _Grids.empty(n, T, start)
    pending = np.repeat(np.arange(n), start), np.tile(np.arange(start) / (start - 1), n)  # (grid row, α)
    projs = []  # every batch's attributions at weight 1, [T, rows, P, s]
    excess = np.zeros(n)
    for _ in range(_MAX_ROUNDS):
        if len(pending[0]) == 0:
            break
        first_row = sum(p.shape[1] for p in projs)
        host = _evaluate_nodes(run, UV, idx, val, image_ids[pending[0]], pending[1], projs)  # [3, nodes, T]
        touched = np.unique(pending[0])
        grids.add(pending[0], pending[1], host[0], host[1], host[2], first_row + np.arange(len(pending[0])))
        local = grids.local_gaps(touched)                                                   # [t, N − 1, T]
        v1, v0 = grids.ends(touched)
        size = np.einsum("in,int->it", grids.weights(touched), grids.size[touched])
        bar = np.maximum(tolerance * np.abs(v1 - v0) + 4 * eps * (size + np.abs(v1) + np.abs(v0)), 1e-300)
        excess[touched] = (np.abs(local.sum(1)) / bar).max(1)
        keep = excess[touched] > 1
        refine = touched[keep]
        pending = _choose(grids, refine, local[keep], bar[keep], max_steps - grids.count[refine])
    return _assemble(run, grids, projs) + (grids.count.copy(), excess)


def _assemble(run: Pass, grids: _Grids, projs: list):
    """Each image's trapezoid sum of its nodes' attributions, one weighted ``index_add`` per batch (the
    batches' attributions are scaled in place):
    ``attr [T, n, P, s]``, ``T(X(1))`` and ``T(X(0))`` ``[T, n]`` for the ``n`` grid rows in order."""
    T, P, s = projs[0].shape[0], projs[0].shape[2], projs[0].shape[3]
    n = len(grids.count)
    rows = sum(p.shape[1] for p in projs)
    everyone = np.arange(n)
    node = grids.row >= 0
    weight, owner = np.zeros(rows), np.zeros(rows, dtype=np.int64)
    weight[grids.row[node]] = grids.weights(everyone)[node]
    owner[grids.row[node]] = np.broadcast_to(everyone[:, None], node.shape)[node]
    device = run.V.device
    weight = torch.from_numpy(weight).to(device=device, dtype=run.acc)
    owner = torch.from_numpy(owner).to(device)
    attr = torch.zeros(T, n, P, s, dtype=run.acc, device=device)
    r0 = 0
    for proj in projs:
        r1 = r0 + proj.shape[1]
        attr.index_add_(1, owner[r0:r1], proj.mul_(weight[None, r0:r1, None, None]))  # proj is not read again
        r0 = r1
    v1, v0 = grids.ends(everyone)                                                          # [n, T]
    ends = torch.from_numpy(np.stack([v1.T, v0.T], 1)).to(device=device, dtype=run.acc)    # [T, 2, n]
    return attr, ends[:, 0], ends[:, 1]


def _choose(grids: _Grids, rows, local, bar, room):
    """For each grid row of ``rows`` the fewest subintervals, worst first, whose local gaps ``local [r, N − 1,
    T]`` leave less than half of ``bar [r, T]`` for every target if they were closed, at most ``room [r]``
    of them and none narrower than ``_MIN_WIDTH``. Returns their midpoints as ``(grid row [k],
    α [k])``, row by row, worst first (host arrays: no read-backs).

    The greedy walk of each row, as whole-array operations: the rows' subintervals sorted by badness
    (the worst target's gap over its bar), the gaps still open after each pick by a running sum (the
    same sequence of subtractions as one pick at a time), and each row's walk cut where it would stop."""
    if len(rows) == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0)
    h = grids.widths(rows)                                                               # [r, N − 1]
    inside = _inside(grids.count[rows], h.shape[1])
    badness = np.where(inside, (np.abs(local) / bar[:, None, :]).max(2), -np.inf)
    order = np.argsort(-badness, axis=1, kind="stable")                                # worst first
    eligible = np.take_along_axis(inside & (h >= _MIN_WIDTH), order, 1)                # [r, N − 1]
    closed = np.take_along_axis(np.abs(local), order[:, :, None], 1) * eligible[:, :, None]
    # rest[:, k]: each target's open gap before the k-th subinterval of the walk is considered
    rest = np.cumsum(np.concatenate([np.abs(local).sum(1)[:, None], -closed], 1), axis=1)[:, :-1]
    picked_before = np.cumsum(eligible, axis=1) - eligible
    stop = (picked_before >= room[:, None]) | (rest <= 0.5 * bar[:, None, :]).all(2)
    walk = np.where(stop.any(1), stop.argmax(1), stop.shape[1])                          # [r] where each stops
    chosen = eligible & (np.arange(stop.shape[1]) < walk[:, None])
    which, k = np.nonzero(chosen)
    i = order[which, k]
    lo, hi = grids.alpha[rows[which], i], grids.alpha[rows[which], i + 1]
    return rows[which], 0.5 * (lo + hi)


def _evaluate_nodes(run: Pass, UV, idx, val, image_np, alpha_np, projs) -> np.ndarray:
    """Every node (image ``image_np[i]``, α ``alpha_np[i]``) through F_ab (``batch_size`` rows at most per
    batch, images mixed): its attributions at weight 1 appended to ``projs`` (one ``[T, rows, P, s]`` per
    batch). Returns ``[3, nodes, T]`` (host float64): each node's target values, α-derivatives and sizes.

    The attributions of all rows of a batch are one ``gig_accumulate`` call: the rows' positions stacked
    (``[n·P]`` positions, one node of weight 1), each with its own image's codes."""
    V = run.V
    P, C = UV.shape[1:]
    s, T = idx.shape[2], len(run.targets)
    image_all = torch.from_numpy(image_np).to(V.device)
    alpha_all = torch.from_numpy(alpha_np).to(V.device, V.dtype)
    one = torch.ones(1, dtype=run.acc, device=V.device)
    step = run.batch_size or len(image_np)
    host = []
    for r0 in range(0, len(image_np), step):
        r1 = min(len(image_np), r0 + step)
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
    return np.concatenate(host, axis=2).transpose(0, 2, 1)                              # [3, nodes, T]
