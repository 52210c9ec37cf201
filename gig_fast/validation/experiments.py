"""The validation experiments on a finished (or resumed) pipeline run, one unit of work per function.

Each function takes the :class:`~gig_fast.pipeline.Pipeline`, the experiment's inputs and the
:class:`~gig_fast.validation.run.ValidationOptions`, and returns a JSON-ready dict; the driver saves
each result atomically as it finishes.
"""
from __future__ import annotations

import numpy as np
import torch

from ..gig import ClassTarget, ConceptTarget, gig
from ..pipeline.distributed import bisecting_kmeans
from .metrics import auc, class_score, concept_curve, edited_inputs, max_projection, reconstruction_quality, \
    step_counts, top_overlap

__all__ = ["layer_inputs", "flat_codes", "c_deletion", "inter_layer", "noise_robustness", "ablation_point",
           "on_grid", "curve_summary"]


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


def c_deletion(pipe, point: str, dec, X: torch.Tensor, labels: torch.Tensor, opts) -> dict:
    """C-Deletion / C-Insertion (paper §4.2.1) and reconstruction quality (Table 1) of one method at one layer.

    Class importance (Eq. 7): GIG of each concept to the softmax probability of the class, summed over the
    validation images of that class. For an image of class c, the ``opts.curve_concepts`` most important
    concepts for c are removed from (deletion) / inserted into (insertion, from the bias alone) every
    position's code in ``opts.curve_steps`` equal steps; the rest of the network runs from the edited
    reconstruction and the curve is the softmax probability of c. AUCs on x = fraction of those concepts.

    Args:
        X: ``[B, C, H, W]`` the layer's pre-activations of the validation images; labels: ``[B]``.
    """
    B, C, H, W = X.shape
    rows, idx, val = flat_codes(dec, X)
    K = dec.V.shape[0]
    recon = _reconstruct(idx, val, dec)
    quality = reconstruction_quality(rows, recon, (idx >= 0).sum(-1).reshape(-1), K)
    per_image = class_gig(pipe, point, dec, idx, val, labels, (H, W))  # [B, K]
    lab = labels.numpy()
    importance = np.stack([per_image[lab == c].sum(0) for c in range(pipe.num_classes)])  # [n_classes, K]
    N = min(opts.curve_concepts, K)
    counts = step_counts(N, opts.curve_steps)
    rest = pipe.adapter.f_ab(point, None)
    curves = {m: [] for m in ("deletion", "insertion")}
    for i in range(B):
        c = int(lab[i])
        order = torch.from_numpy(np.argsort(-importance[c], kind="stable")[:N].copy())
        score = lambda out, c=c: class_score(out, c, pipe.config.class_probability)  # noqa: E731
        for m in curves:
            cur = concept_curve(rest, idx[i], val[i], dec.V, dec.bias, order, counts, m, score, (H, W))
            curves[m].append(on_grid(cur, opts.curve_steps))
    d, ins = curve_summary(np.stack(curves["deletion"])), curve_summary(np.stack(curves["insertion"]))
    return {"deletion": d, "insertion": ins, "auc_difference": ins["auc"] - d["auc"], "quality": quality,
            "concepts": N, "steps": int(len(counts) - 1), "K": K}


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


def ablation_point(pipe, point: str, K: int, X_train: torch.Tensor, rows: torch.Tensor, stored: dict | None) -> dict:
    """Table 3: concepts with ``K`` clusters on the stage-1 PFVs ``X_train [N, C]``, coded on ``rows [M, C]``.

    ``stored`` (the pipeline's concepts) is reused when its K matches.
    """
    from .baselines import ours

    cfg = pipe.config
    beta = pipe.adapter.bn_shift(point).to(X_train)
    if K > X_train.shape[0]:
        return {"K": K, "skipped": f"K={K} > N={X_train.shape[0]} stage-1 PFVs"}
    if stored is not None and stored["V"].shape[0] == K:
        V = stored["V"].to(X_train)
    else:
        V, _ = bisecting_kmeans(X_train, K, beta, cfg.seed, cfg.kmeans_mode)
        V = V.to(X_train).detach()
    dec = ours(V, beta, cfg.lam, cfg.code_method, cfg.positive)
    idx, val = dec.encode(rows)
    recon = _reconstruct(idx, val.to(V.dtype), dec)
    return reconstruction_quality(rows, recon, (idx >= 0).sum(-1), K)
