"""The validation experiments on a finished (or resumed) pipeline run, one unit of work per function.

Each function takes the :class:`~gig_fast.pipeline.Pipeline`, the experiment's inputs and the
:class:`~gig_fast.validation.options.ValidationOptions`, and returns a JSON-ready dict; the driver saves
each result atomically as it finishes.
"""
from __future__ import annotations

import numpy as np
import torch

from ..gig import ClassTarget, ConceptTarget, gig
from .metrics import auc, class_score, curve_grid, edited_inputs, label_hits, max_projection, reconstruction_quality, \
    step_counts, top_overlap

__all__ = ["layer_inputs", "flat_codes", "class_gig", "class_importance", "c_deletion", "inter_layer",
           "noise_robustness", "decomposition_quality", "on_grid", "curve_summary"]


def on_grid(curve, steps: int) -> np.ndarray:
    """Resample a curve ``[n]`` (uniform on [0, 1]) onto ``steps + 1`` uniform points (linear)."""
    y = np.asarray(curve, dtype=np.float64)
    if y.size == steps + 1:
        return y
    if y.size == 1:
        return np.full(steps + 1, y[0])
    return np.interp(np.linspace(0, 1, steps + 1), np.linspace(0, 1, y.size), y)


def curve_summary(curves: np.ndarray) -> dict:
    """Mean curve and mean/std of the per-curve AUCs of ``curves [n, S+1]``."""
    a = auc(curves)
    return {"curve": [float(f"{v:.6g}") for v in curves.mean(0)], "auc": float(a.mean()),
            "auc_std": float(a.std()), "n": int(len(curves))}


@torch.no_grad()
def layer_inputs(pipe, ids, points, noise_std: float = 0.0, seed: int = 0) -> tuple[dict, torch.Tensor, torch.Tensor]:
    """Pre-activations ``{point: [B, C, H, W]}``, labels ``[B]`` and logits ``[B, n_classes]`` of images ``ids``.

    ``noise_std`` > 0 adds Gaussian noise of that std (in the model's normalised input units).
    """
    x, y = pipe.load_images(ids)
    if noise_std > 0:
        g = torch.Generator().manual_seed(seed)
        x = x + noise_std * torch.randn(x.shape, generator=g).to(x)
    rec = pipe.adapter.record(x, keep="preact")
    return {p: rec.preact(p).detach() for p in points}, y.cpu(), rec.logits.detach().cpu()


def flat_codes(dec, X: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Codes of every position of ``X [B, C, H, W]``: ``(rows [B·P, C], idx [B, P, s], val [B, P, s])``."""
    B, C, H, W = X.shape
    rows = X.permute(0, 2, 3, 1).reshape(-1, C)
    idx, val = dec.encode(rows)
    return rows, idx.reshape(B, H * W, -1), val.reshape(B, H * W, -1).to(dec.V.dtype)


def class_gig(pipe, point: str, dec, idx, val, labels, spatial) -> np.ndarray:
    """``[B, K]`` GIG of each concept of ``point`` to the softmax probability of each image's label (Eq. 7)."""
    cfg = pipe.config
    rest = pipe.adapter.f_ab(point, None)
    target = ClassTarget(torch.as_tensor(labels, dtype=torch.long), probability=cfg.class_probability)
    res = gig(rest, (idx, val), dec.V, dec.bias, target, spatial=spatial, **cfg.gig_options())
    return res.per_concept.detach().double().cpu().numpy()


def class_importance(pipe, point: str, dec, X: torch.Tensor, labels: torch.Tensor) -> np.ndarray:
    """``[n_classes, K]`` class importance of each concept (paper Eq. 7): GIG of the concept to the class
    score, summed over the images ``X [B, C, H, W]`` of that class (``labels [B]``)."""
    B, C, H, W = X.shape
    _, idx, val = flat_codes(dec, X)
    per_image = class_gig(pipe, point, dec, idx, val, labels, (H, W))  # [B, K]
    lab = labels.cpu().numpy()
    return np.stack([per_image[lab == c].sum(0) for c in range(pipe.num_classes)])


@torch.no_grad()
def _edited_logits(rest, idx, val, dec, orders, counts, mode, spatial, batch: int) -> torch.Tensor:
    """``[B, G, n_out]`` outputs of ``rest`` for every image's codes ``idx/val [B, P, s]`` edited at the
    ``counts [G]`` of its own order ``orders[b]``; ``batch`` images per forward pass."""
    out = []
    for i0 in range(0, idx.shape[0], batch):
        X = torch.cat([edited_inputs(idx[i], val[i], dec.V, dec.bias, orders[i], counts, mode, spatial)
                       for i in range(i0, min(i0 + batch, idx.shape[0]))])
        y = rest(X).detach().double().cpu()
        out.append(y.reshape(-1, len(counts), *y.shape[1:]))
    return torch.cat(out)


def _curves(values: np.ndarray, x: np.ndarray) -> dict:
    """Mean curve ``[G]`` over images of ``values [B, G]`` sampled at ``x [G]``, and its AUC (= mean AUC)."""
    a = auc(values, x)
    return {"x": [float(f"{v:.6g}") for v in x], "curve": [float(f"{v:.6g}") for v in values.mean(0)],
            "auc": float(a.mean()), "auc_std": float(a.std()), "n": int(len(values))}


def c_deletion(pipe, point: str, dec, X: torch.Tensor, labels: torch.Tensor, importance: np.ndarray, opts) -> dict:
    """C-Deletion / C-Insertion (paper §4.2.1, Fel et al. 2024) and reconstruction quality (Table 1) of one
    method at one layer.

    Concepts are ordered per class by ``importance [n_classes, K]`` (Eq. 7, computed on *other* images:
    :func:`class_importance` of the held-out split). For each evaluated image of class c the concepts
    are removed from (deletion) / inserted into (insertion, from the bias alone) every position's code
    in that order; the rest of the network runs from the edited reconstruction. Two scores:

    * ``accuracy`` (the paper's): the share of evaluated images predicted as their class, as concepts
      are edited until none / all remain; x = fraction of all K concepts, sampled at
      :func:`~gig_fast.validation.metrics.curve_grid` (one concept at a time over the first
      ``curve_concepts``, then ``accuracy_steps`` uniform steps); ``probability_all`` is the softmax
      probability of the class on the same curve.
    * ``probability`` (this suite's earlier score, kept): the softmax probability of the class over the
      top ``curve_concepts`` concepts only, in ``curve_steps`` steps; x = fraction of those N.

    Args:
        X: ``[B, C, H, W]`` the layer's pre-activations of the evaluated images; labels: ``[B]``.
    """
    B, C, H, W = X.shape
    rows, idx, val = flat_codes(dec, X)
    K = dec.V.shape[0]
    recon = _reconstruct(idx, val, dec)
    quality = reconstruction_quality(rows, recon, ((idx >= 0) & (val != 0)).sum(-1).reshape(-1), K)
    lab = labels.cpu().numpy()
    N = min(opts.curve_concepts, K)
    top_counts = step_counts(N, opts.curve_steps)
    grid = curve_grid(K, N, opts.curve_steps, opts.accuracy_steps)
    at_top = np.searchsorted(grid, top_counts)
    orders = [torch.from_numpy(np.argsort(-importance[int(c)], kind="stable").copy()) for c in lab]
    rest = pipe.adapter.f_ab(point, None)
    out: dict = {}
    for mode in ("deletion", "insertion"):
        logits = _edited_logits(rest, idx, val, dec, orders, grid, mode, (H, W), opts.curve_batch)  # [B, G, n]
        hits = np.stack([label_hits(logits[i], int(lab[i])).numpy() for i in range(B)])
        prob = np.stack([class_score(logits[i], int(lab[i])).numpy() for i in range(B)])
        out[mode] = {"accuracy": _curves(hits, grid / K), "probability_all": _curves(prob, grid / K),
                     "probability": {**_curves(prob[:, at_top], top_counts / max(N, 1)), "concepts": N}}
    res = {score: {"deletion": out["deletion"][score], "insertion": out["insertion"][score]}
           for score in ("accuracy", "probability_all", "probability")}
    for r in res.values():
        r["auc_difference"] = r["insertion"]["auc"] - r["deletion"]["auc"]
    return {**res, "quality": quality, "concepts": N, "grid": [int(g) for g in grid], "K": K,
            "reconstruction_accuracy": out["insertion"]["accuracy"]["curve"][-1], "images": int(B)}


def _reconstruct(idx, val, dec) -> torch.Tensor:
    from ..ops import sparse_reconstruct

    return sparse_reconstruct(idx.reshape(-1, idx.shape[-1]), val.reshape(-1, val.shape[-1]), dec.V, dec.bias)


@torch.no_grad()
def _inter_pair_curves(f_ab, idx, val, dec, v_t, orders: dict, counts, spatial) -> dict | None:
    """Normalised max-projection curves of one image and target for several source orders, or None if
    the max projection at the full reconstruction is not positive (nothing to normalise by)."""
    full = edited_inputs(idx, val, dec.V, dec.bias, orders["gig"][:0], np.array([0]), "deletion", spatial)
    ref = float(max_projection(f_ab(full), v_t)[0])
    if not ref > 1e-8:
        return None
    batches, keys = [], []
    for name, order in orders.items():
        for m in ("deletion", "insertion"):
            batches.append(edited_inputs(idx, val, dec.V, dec.bias, order, counts, m, spatial))
            keys.append((name, m))
    out = max_projection(f_ab(torch.cat(batches)), v_t).double().cpu().numpy() / ref
    n = len(counts)
    return {k: out[j * n:(j + 1) * n] for j, k in enumerate(keys)}


def inter_layer(pipe, a: str, b: str, dec, X: torch.Tensor, labels: torch.Tensor, Vb: torch.Tensor,
                tops: np.ndarray, opts) -> dict:
    """Inter-layer deletion / insertion (paper §4.2.3, Fig. 5) for the transition ``a → b``.

    For each validation image (class c) and each of the ``opts.inter_targets`` top concepts t of b for c,
    the concepts active in the image at a are removed / inserted in order of GIG(q → t) (descending) or
    in a random order, in ``opts.inter_steps`` equal steps; the score is the max over b's positions of
    the projection on v_t/‖v_t‖, divided by its value at the unedited reconstruction. Reports the mean
    curves, AUCs and ``deletion_auc_difference = AUC_random − AUC_GIG`` and
    ``insertion_auc_difference = AUC_GIG − AUC_random`` (both > 0 when GIG beats random).

    Args:
        X: ``[B, C_a, H_a, W_a]`` pre-activations at a; Vb: ``[K_b, C_b]``; tops: ``[n_classes, top]``.
    """
    B, C, H, W = X.shape
    _, idx, val = flat_codes(dec, X)
    f_ab = pipe.adapter.f_ab(a, b)
    rng = np.random.default_rng([opts.seed, B, H, W, C])
    curves: dict = {}
    skipped = 0
    for i in range(B):
        targets = tops[int(labels[i])][:opts.inter_targets]
        res = gig(f_ab, (idx[i:i + 1], val[i:i + 1]), dec.V, dec.bias, [ConceptTarget(Vb[t]) for t in targets],
                  spatial=(H, W), **pipe.config.gig_options())
        pc = res.per_concept.detach().double().cpu().numpy()[:, 0]  # [T, K]
        active = np.unique(idx[i][idx[i] >= 0].numpy())
        counts = step_counts(len(active), opts.inter_steps)
        for ti, t in enumerate(targets):
            orders = {"gig": torch.from_numpy(active[np.argsort(-pc[ti, active], kind="stable")].copy()),
                      "random": torch.from_numpy(rng.permutation(active))}
            got = _inter_pair_curves(f_ab, idx[i], val[i], dec, Vb[t], orders, counts, (H, W))
            if got is None:
                skipped += 1
                continue
            for k, cur in got.items():
                curves.setdefault(k, []).append(on_grid(cur, opts.inter_steps))
    if not curves:
        return {"pairs": 0, "skipped": skipped}
    out = {name: {m: curve_summary(np.stack(curves[(name, m)])) for m in ("deletion", "insertion")}
           for name in ("gig", "random")}
    out["deletion_auc_difference"] = out["random"]["deletion"]["auc"] - out["gig"]["deletion"]["auc"]
    out["insertion_auc_difference"] = out["gig"]["insertion"]["auc"] - out["random"]["insertion"]["auc"]
    out["pairs"], out["skipped"] = len(curves[("gig", "deletion")]), skipped
    return out


def noise_robustness(pipe, point: str, dec, clean: tuple, noisy: tuple, opts) -> dict:
    """App. J: do the top concepts survive Gaussian input noise?

    ``clean``/``noisy``: ``(X [B, C, H, W], labels [B], logits [B, n_classes])`` of the same images.
    Per image: share of its top-k concepts by GIG to its label (clean) that stay in the top-k with noise;
    per class: the same for the class-wide top-k (Eq. 7 sums). Chance level for a random top-k: k/K.
    """
    K = dec.V.shape[0]
    k = min(opts.noise_top, K)
    X0, lab, log0 = clean
    X1, _, log1 = noisy
    B, C, H, W = X0.shape
    g = []
    for X in (X0, X1):
        _, idx, val = flat_codes(dec, X)
        g.append(class_gig(pipe, point, dec, idx, val, lab, (H, W)))
    per_image = [top_overlap(g[0][i], g[1][i], k) for i in range(B)]
    lab_np = lab.numpy()
    classes = [c for c in range(pipe.num_classes) if (lab_np == c).any()]
    per_class = {str(c): top_overlap(g[0][lab_np == c].sum(0), g[1][lab_np == c].sum(0), k) for c in classes}
    return {"top": k, "K": K, "chance": k / K, "image_overlap": float(np.mean(per_image)),
            "class_overlap": float(np.mean(list(per_class.values()))), "class_overlap_per_class": per_class,
            "accuracy_clean": float((log0.argmax(1) == lab).float().mean()),
            "accuracy_noisy": float((log1.argmax(1) == lab).float().mean()), "images": int(B)}


def decomposition_quality(dec, rows: torch.Tensor) -> dict:
    """Rel-L2, l0 ratio (Table 1) and the mean number of active concepts per PFV of ``rows [M, C]``
    coded by ``dec``: one point of a sparsity–error curve, or one cell of Table 3."""
    idx, val = dec.encode(rows)
    recon = _reconstruct(idx, val.to(dec.V.dtype), dec)
    nnz = ((idx >= 0) & (val != 0)).sum(-1)
    return reconstruction_quality(rows.to(recon.dtype), recon, nnz, dec.V.shape[0])
