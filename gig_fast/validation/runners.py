"""One runner per validation experiment: which images and layers it takes, and the units it computes
through the :class:`~gig_fast.validation.units.UnitStore` (each unit skipped when already saved).
:func:`run_experiment` runs one by name; :func:`count_units` sizes the progress bar."""
from __future__ import annotations

import numpy as np
import torch

from ..ops.sparse_code import DEFAULT_LAM_REL
from . import appendix as ap
from . import experiments as ex
from . import faithfulness as fa
from .baselines import dictionary_learning_codes, ours
from .units import baseline_fit, kmeans_clusters, our_decomposition, sweep_sae

__all__ = ["run_experiment", "count_units"]


def _round_robin(pipe) -> list[int]:
    """Every explained image, round-robin over classes (sorted ids within a class)."""
    ids = pipe.explain_ids
    by = [ids[pipe.labels[ids] == c].tolist() for c in range(pipe.num_classes)]
    out = []
    for r in range(max(len(b) for b in by)):
        out += [b[r] for b in by if r < len(b)]
    return out


def _balanced(pipe, n: int, skip: int = 0) -> np.ndarray:
    """``n`` explained images balanced over classes: the round-robin order's images ``skip … skip + n``
    (so ``_balanced(n)`` and ``_balanced(m, skip=n)`` are disjoint)."""
    order = _round_robin(pipe)
    if skip + n > len(order):
        raise ValueError(f"{skip + n} validation images requested ({skip} evaluated + {n} held out) but the run "
                         f"explains only {len(order)}")
    return np.array(sorted(order[skip:skip + n]), dtype=np.int64)


def _pixel_std(pipe) -> float:
    if pipe.config.dataset == "fashion-mnist":
        from ..models import DEMO_STD
        return float(DEMO_STD)
    return float(np.mean(pipe.config.preprocessing()["std"]))  # the model's own normalisation when unset


def _rows(X: torch.Tensor) -> torch.Tensor:
    """Every position of ``X [B, C, H, W]`` as PFV rows ``[B·H·W, C]``."""
    return X.permute(0, 2, 3, 1).reshape(-1, X.shape[1])


def _methods(opts, L, point: str) -> list[str]:
    """The methods compared at ``point``: ours, DL on the DL layers, the SAE on the baseline layers."""
    out = ["ours"]
    if "dictionary_learning" in opts.baselines and point in L["dl_layers"]:
        out.append("dictionary_learning")
    if "sae" in opts.baselines and point in L["baseline_layers"]:
        out.append("sae")
    return out


def _run_c_deletion(pipe, units, vwork, L, opts, bar):
    ids = _balanced(pipe, opts.images)
    held = _balanced(pipe, opts.importance_images, skip=opts.images)
    inputs, labels, _ = ex.layer_inputs(pipe, ids, L["layers"])
    h_inputs, h_labels, _ = ex.layer_inputs(pipe, held, L["layers"])
    res: dict = {"images": [int(i) for i in ids], "importance_images": [int(i) for i in held]}
    for point in L["layers"]:
        for m in _methods(opts, L, point):
            bar.set_postfix_str(f"C-deletion {m} {point}")

            def compute(m=m, point=point):
                dec = our_decomposition(pipe, point) if m == "ours" else baseline_fit(pipe, vwork, m, point, opts)
                importance = ex.class_importance(pipe, point, dec, h_inputs[point], h_labels)
                out = ex.c_deletion(pipe, point, dec, inputs[point], labels, importance, opts)
                return {**out, "fit": dec.info} if m != "ours" else out
            res.setdefault(m, {})[point] = units.get(f"c_deletion/{m}/{point}", compute)
            bar.update(1)
    return res


def _run_sparsity(pipe, units, vwork, L, opts, bar):
    ids = _balanced(pipe, opts.images)
    inputs, _, _ = ex.layer_inputs(pipe, ids, L["sparsity_layers"])
    res: dict = {}
    for point in L["sparsity_layers"]:
        rows = _rows(inputs[point])
        for m in _methods(opts, {**L, "baseline_layers": L["sparsity_layers"]}, point):
            levels = opts.sae_lambdas if m == "sae" else opts.lam_levels
            for level in levels:
                bar.set_postfix_str(f"sparsity {m} {point} {level:g}")

                def compute(m=m, point=point, level=float(level)):
                    if m == "ours":
                        dec = our_decomposition(pipe, point, lam=level)
                    elif m == "dictionary_learning":
                        # the fit's α is its relative λ times a typical ‖D₀(x − β)‖_∞: scale it to this level
                        base = baseline_fit(pipe, vwork, m, point, opts)
                        lam_fit = base.info.get("lam_rel", pipe.config.lam if pipe.config.lam is not None else DEFAULT_LAM_REL)
                        alpha = base.info["alpha"] * level / lam_fit
                        dec = dictionary_learning_codes(base.state["D"], base.bias, alpha, base.info)
                    else:
                        dec = sweep_sae(pipe, vwork, point, level, opts)
                    q = ex.decomposition_quality(dec, rows.to(dec.V.dtype))
                    return {**q, "level": level, "fit": {k: v for k, v in dec.info.items() if k != "loss_curve"}}
                r = units.get(f"sparsity/{m}/{point}/{float(level):g}", compute)
                res.setdefault(m, {}).setdefault(point, []).append(r)
                bar.update(1)
    return res


def _run_inter(pipe, units, L, opts, bar):
    from ..pipeline.selection import top_sets
    from ..pipeline.stages import load_concepts

    consecutive = list(zip(L["inter_layers"][:-1], L["inter_layers"][1:]))
    paper = list(zip(L["paper_points"][:-1], L["paper_points"][1:]))
    pts = sorted(set(L["inter_layers"]) | set(L["paper_points"]), key=pipe.points.index)
    ids = _balanced(pipe, opts.inter_images)
    inputs, labels, _ = ex.layer_inputs(pipe, ids, pts)
    out = {"inter_layer": {"images": [int(i) for i in ids]}, "inter_layer_paper": {"images": [int(i) for i in ids]}}
    for kind, pairs in (("inter_layer", consecutive), ("inter_layer_paper", paper)):
        for a, b in pairs:
            bar.set_postfix_str(f"inter-layer {a}→{b}")

            def compute(a=a, b=b):
                Vb = load_concepts(pipe, b)["V"].to(pipe.device)
                return ex.inter_layer(pipe, a, b, our_decomposition(pipe, a), inputs[a], labels, Vb, top_sets(pipe, b), opts)
            out[kind][f"{a}->{b}"] = units.get(f"inter_layer/{a}__{b}", compute)
            bar.update(1)
    return out


def _run_ablation(pipe, units, vwork, L, opts, bar):
    ids = _balanced(pipe, opts.images)
    inputs, _, _ = ex.layer_inputs(pipe, ids, L["ablation_layers"])
    res: dict = {}
    for point in L["ablation_layers"]:
        for f in opts.k_factors:
            bar.set_postfix_str(f"ablation {point} K={f}·C")

            def compute(point=point, f=f):
                K = max(1, int(round(float(f) * pipe.adapter.channels(point))))
                try:
                    c = kmeans_clusters(pipe, vwork, point, K)
                except ValueError as e:
                    return {"K": K, "skipped": str(e)}
                cfg = pipe.config
                dec = ours(c["V"].to(pipe.device), c["beta"].to(pipe.device), cfg.lam, cfg.code_method, cfg.positive)
                return ex.decomposition_quality(dec, _rows(inputs[point]))
            res.setdefault(point, {})[str(f)] = units.get(f"ablation/{point}/{f}", compute)
            bar.update(1)
    return res


def _run_noise(pipe, units, L, opts, bar):
    ids = _balanced(pipe, opts.noise_images)
    clean = ex.layer_inputs(pipe, ids, L["noise_layers"])
    noisy = ex.layer_inputs(pipe, ids, L["noise_layers"], opts.noise_sigma / _pixel_std(pipe), opts.seed)
    res: dict = {"sigma": opts.noise_sigma, "images": [int(i) for i in ids]}
    for point in L["noise_layers"]:
        bar.set_postfix_str(f"noise {point}")

        def compute(point=point):
            c = (clean[0][point], clean[1], clean[2])
            n = (noisy[0][point], noisy[1], noisy[2])
            return ex.noise_robustness(pipe, point, our_decomposition(pipe, point), c, n, opts)
        res[point] = units.get(f"noise/{point}", compute)
        bar.update(1)
    return res


def _attack_pairs(pipe, opts) -> list[tuple[int, int]]:
    """``(image, target)``: the first ``attack_images`` correctly classified evaluated images (round-robin
    over classes, so different classes first), each with its least likely class as the target."""
    ids = [i for i in _round_robin(pipe)[:max(opts.images, opts.attack_images)]]
    x, y = pipe.load_images(ids)
    with torch.no_grad():
        logits = pipe.model.eval()(x)
    pairs, seen = [], set()
    for i, img in enumerate(ids):
        if len(pairs) == opts.attack_images:
            break
        if int(logits[i].argmax()) == int(y[i]) and int(y[i]) not in seen:
            pairs.append((int(img), int(logits[i].argmin())))
            seen.add(int(y[i]))
    return pairs


def _run_attack(pipe, units, L, opts, bar):
    res: dict = {"eps": opts.attack_eps, "step_size": opts.attack_step_size, "steps": opts.attack_steps, "attacks": []}
    for img, target in _attack_pairs(pipe, opts):
        bar.set_postfix_str(f"attack image {img} → class {target}")
        r = units.get(f"attack/{img}/{target}", lambda img=img, target=target: ap.adversarial_graph(
            pipe, img, target, opts.attack_eps, opts.attack_step_size, opts.attack_steps))
        res["attacks"].append(r)
        bar.update(1)
    return res


def _run_decomposition(pipe, units, L, opts, bar):
    res: dict = {}
    for point in L["decomposition_layers"]:
        bar.set_postfix_str(f"decomposition {point}")
        res[point] = units.get(f"decomposition/{point}", lambda point=point: ap.pfv_decomposition(
            pipe, point, opts.decomposition_top, opts.decomposition_samples, opts.seed))
        bar.update(1)
    return res


def _trajectory_anchors(pipe, point: str, n: int) -> list[tuple[int, int, int]]:
    """``(class, concept, stage-1 row)``: the top concept at ``point`` of ``n`` classes spread over the
    classes, and its member nearest to the concept vector (the anchor followed across K)."""
    from ..pipeline.selection import top_sets
    from ..pipeline.stages import load_concepts

    reps = load_concepts(pipe, point)["representatives"]
    tops = top_sets(pipe, point)
    out, taken = [], set()
    for c in np.linspace(0, pipe.num_classes - 1, n).round().astype(int).tolist() if n else []:
        # the class's strongest concept that has a member and is not another anchor's already
        q = next((int(q) for q in tops[c] if int(reps[q, 0]) >= 0 and int(q) not in taken), None)
        if q is not None:
            out.append((c, q, int(reps[q, 0])))
            taken.add(q)
    return out


def _run_trajectory(pipe, units, vwork, L, opts, bar):
    from ..pipeline.stages import load_concepts

    point = L["trajectory_layer"]
    C = pipe.adapter.channels(point)
    Ks = sorted({max(1, int(round(float(f) * C))) for f in opts.trajectory_k_factors})
    res: dict = {"layer": point, "K": Ks, "anchors": []}
    for c, q, row in _trajectory_anchors(pipe, point, opts.trajectory_anchors):
        bar.set_postfix_str(f"trajectory {point} class {c}")

        def compute(row=row, c=c, q=q):
            clusters = {K: kmeans_clusters(pipe, vwork, point, K) for K in Ks}
            return {**ap.trajectory(pipe, point, clusters, row, opts.trajectory_points), "class": c, "concept": q,
                    "concept_K": int(load_concepts(pipe, point)["V"].shape[0]),
                    "class_name": pipe.class_names[c] if c < len(pipe.class_names) else str(c)}
        key = "_".join(str(K) for K in Ks)
        res["anchors"].append(units.get(f"trajectory/{point}/{row}/{key}", compute))
        bar.update(1)
    return res


def count_units(pipe, L, opts) -> int:
    n = 0
    if "c_deletion" in opts.experiments:
        n += sum(len(_methods(opts, L, p)) for p in L["layers"])
    if "sparsity" in opts.experiments:
        for p in L["sparsity_layers"]:
            ms = _methods(opts, {**L, "baseline_layers": L["sparsity_layers"]}, p)
            n += sum(len(opts.sae_lambdas if m == "sae" else opts.lam_levels) for m in ms)
    if "inter_layer" in opts.experiments:
        n += max(0, len(L["inter_layers"]) - 1) + max(0, len(L["paper_points"]) - 1)
    if "ablation" in opts.experiments:
        n += len(L["ablation_layers"]) * len(opts.k_factors)
    if "noise" in opts.experiments:
        n += len(L["noise_layers"])
    if "attack" in opts.experiments:
        n += opts.attack_images
    if "decomposition" in opts.experiments:
        n += len(L["decomposition_layers"])
    if "trajectory" in opts.experiments:
        n += opts.trajectory_anchors
    if "faithfulness" in opts.experiments:
        n += len(fa.graph_classes(pipe, opts.faithfulness_classes))
    return n


def run_experiment(name: str, pipe, units, vwork, L: dict, opts, bar) -> dict:
    """The results of experiment ``name`` (one of :data:`~gig_fast.validation.options.EXPERIMENTS`) as
    entries of ``validation.json``; ``L`` is :func:`~gig_fast.validation.options.resolve_layers`'s dict,
    ``bar`` the progress bar it advances by one per unit."""
    if name == "inter_layer":  # two entries: the consecutive transitions and the paper's chain
        return _run_inter(pipe, units, L, opts, bar)
    run = {"c_deletion": lambda: _run_c_deletion(pipe, units, vwork, L, opts, bar),
           "sparsity": lambda: _run_sparsity(pipe, units, vwork, L, opts, bar),
           "ablation": lambda: _run_ablation(pipe, units, vwork, L, opts, bar),
           "noise": lambda: _run_noise(pipe, units, L, opts, bar),
           "attack": lambda: _run_attack(pipe, units, L, opts, bar),
           "decomposition": lambda: _run_decomposition(pipe, units, L, opts, bar),
           "trajectory": lambda: _run_trajectory(pipe, units, vwork, L, opts, bar),
           "faithfulness": lambda: fa.run_faithfulness(pipe, units, opts, bar, our_decomposition)}[name]
    return {name: run()}
