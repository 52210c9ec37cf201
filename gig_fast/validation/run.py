"""``validate``: run (or resume) the pipeline, then every validation experiment on its work folder.

Outputs in the run's ``out`` folder: ``validation.json``, ``validation.md`` (tables in the paper's
layout), ``validation_section.html`` (also inserted into ``report.html``) and ``validation_plots/*.png``.
Each unit of work (one method × layer, one transition, …) is saved atomically under
``work-<run key>/validation/units/<group>-<key of the group's options>/`` as it finishes and skipped
when the command is run again (with any options that leave the group's options unchanged).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ..ops.sparse_code import DEFAULT_LAM_REL
from ..pipeline.store import load_json, load_npz, save_json, save_npz
from . import appendix as ap
from . import experiments as ex
from . import faithfulness as fa
from .baselines import METHODS, dictionary_learning_codes, fit_dictionary_learning, fit_sae, load_decomposition, ours

__all__ = ["ValidationOptions", "validate", "PAPER_TABLE1_LAYERS", "PAPER_TABLE3_LAYERS", "PAPER_FIG5_POINTS",
           "EXPERIMENTS"]

PAPER_TABLE1_LAYERS = ["layer1.1", "layer2.0", "layer2.2", "layer3.0", "layer3.2", "layer3.4", "layer4.0", "layer4.2"]
DEFAULT_BASELINE_LAYERS = ["layer1.1", "layer2.2", "layer3.2", "layer4.2"]  # one per stage: the 2-core budget
# The paper has no dictionary learning past layer3.4 ("excessive computational time"); LARS fitting on
# the demo's 5,000 stage-1 PFVs took 10 s per epoch at layer2.2 (K = 512) and 207 s at layer4.2 (K = 2048).
DEFAULT_DL_LAYERS = ["layer1.1", "layer2.2", "layer3.2"]
PAPER_TABLE3_LAYERS = ["layer1.2", "layer2.2", "layer3.0", "layer3.5", "layer4.2"]
PAPER_FIG5_POINTS = ["layer1.2", "layer2.3", "layer3.0", "layer3.2", "layer3.5", "layer4.2"]  # Fig. 5's transitions
PAPER_FIG7_LAYERS = ["layer4.2", "layer3.5", "layer3.2", "layer3.0", "layer2.3", "layer1.2"]  # App. E, Figs. 7–9
EXPERIMENTS = ("c_deletion", "sparsity", "inter_layer", "ablation", "noise", "attack", "decomposition", "trajectory",
               "faithfulness")
_NOT_HASHED = {"progress", "curve_batch"}
# part of every unit key: raised when what a unit computes changes, so older unit files are not reused
# (2: held-out importance and accuracy curves, batch LARS dictionary learning, Templeton-trained SAE)
UNITS_VERSION = 2
# the options each kind of unit depends on: a unit is keyed by these only, so changing (say) the
# inter-layer options reuses every finished C-Deletion unit
_GROUPS = {"c_deletion": ("images", "importance_images", "curve_concepts", "curve_steps", "accuracy_steps", "seed"),
           "baseline": ("baseline_k_factor", "baseline_train", "dl_iter", "sae_steps", "sae_lambda", "sae_lr", "seed"),
           "sparsity": ("images", "sae_sweep_steps", "seed"),
           "inter_layer": ("inter_images", "inter_targets", "inter_steps", "seed"),
           "ablation": ("images", "seed"),
           "noise": ("noise_sigma", "noise_images", "noise_top", "seed"),
           "attack": ("attack_eps", "attack_step_size", "attack_steps", "seed"),
           "decomposition": ("decomposition_top", "decomposition_samples", "seed"),
           "trajectory": ("trajectory_points", "seed"),
           "faithfulness": ("faithfulness_images",)}


@dataclass
class ValidationOptions:
    """What ``gig-fast validate`` runs; defaults sized for the demo on 2 CPU cores (≈15 min).

    C-Deletion / C-Insertion and Table 1: ``layers`` (None: the paper's Table-1 layers that are
    analysed, else all), ``images`` (evaluated images, balanced over classes, from the explained
    images; rel-L2 / l0 ratio are measured on all their PFVs at the layer), ``importance_images``
    (other explained images, balanced: the Eq. 7 importance that orders the concepts), ``curve_concepts``
    (N: the top concepts of the probability curve, edited one at a time at the start of the accuracy
    curve), ``curve_steps``, ``accuracy_steps`` (uniform steps over all K), ``curve_batch`` (images per
    forward pass; not part of the results).
    Baselines: ``baselines`` (subset of ``dictionary_learning``, ``sae``), ``baseline_layers`` (None:
    one block per stage among ``layers``), ``dl_layers`` (None: layer1.1, 2.2, 3.2 among the baseline
    layers — the paper has none past layer3.4), ``baseline_k_factor`` (8), ``baseline_train`` (stage-1
    PFVs used to fit; 0 = all), ``dl_iter`` (most epochs), ``sae_steps`` (Adam mini-batches of 256),
    ``sae_lambda``, ``sae_lr``.
    Sparsity–error curves: ``sparsity_layers`` (None: the baseline layers), ``lam_levels`` (relative λ of
    our coder and of dictionary learning's Lasso-LARS coder), ``sae_lambdas`` (one SAE each, started from
    the ``sae_lambda`` one and trained ``sae_sweep_steps`` more steps).
    Inter-layer: ``inter_layers`` (None: every analysed point; consecutive pairs), ``paper_points``
    (None: the paper's Fig. 5 chain layer1.2 → 2.3 → 3.0 → 3.2 → 3.5 → 4.2 among the analysed points;
    [] for none), ``inter_images``, ``inter_targets`` (5 top target concepts per image, as the paper),
    ``inter_steps``.
    Ablation: ``k_factors``, ``ablation_layers`` (None: the paper's Table-3 layers that are analysed, else
    ``layers``). Noise (App. J): ``noise_sigma`` (pixel units in [0, 1]), ``noise_images``, ``noise_top``,
    ``noise_layers`` (None: ``layers``).
    Attack (App. J): ``attack_images`` (correctly classified evaluated images of different classes, each
    attacked towards its least likely class), ``attack_eps``, ``attack_step_size`` (pixel units),
    ``attack_steps``. Decomposition (App. E): ``decomposition_layers`` (None: the paper's Figs. 7–9 layers
    that are analysed), ``decomposition_top`` concepts, ``decomposition_samples`` crops per concept.
    Trajectory (App. I): ``trajectory_layer`` (None: layer3.5, else the middle analysed point),
    ``trajectory_k_factors``, ``trajectory_anchors`` (classes whose top concept anchors a trajectory),
    ``trajectory_points``.
    Faithfulness of the class graphs' edges (:mod:`.faithfulness`): ``faithfulness_images`` (the first N
    explained images of each class; the graph's edge weights sum over all of them, so the default 100 is
    the demo's ``per_class``), ``faithfulness_classes`` (None: every class with a graph).
    ``experiments``: which of :data:`EXPERIMENTS` to run. ``seed``, ``progress``.
    """
    layers: list | None = None
    images: int = 50
    importance_images: int = 50
    curve_concepts: int = 20
    curve_steps: int = 20
    accuracy_steps: int = 20
    curve_batch: int = 8
    baselines: list = field(default_factory=lambda: ["dictionary_learning", "sae"])
    baseline_layers: list | None = None
    dl_layers: list | None = None
    baseline_k_factor: float = 8.0
    baseline_train: int = 0
    dl_iter: int = 3
    sae_steps: int = 2000
    sae_lambda: float = 5.0
    sae_lr: float = 1e-3
    sparsity_layers: list | None = None
    lam_levels: list = field(default_factory=lambda: [0.02, 0.05, 0.1, 0.2, 0.35, 0.6])
    sae_lambdas: list = field(default_factory=lambda: [1.0, 2.0, 5.0, 10.0, 20.0])
    sae_sweep_steps: int = 500
    inter_layers: list | None = None
    paper_points: list | None = None
    inter_images: int = 20
    inter_targets: int = 5
    inter_steps: int = 20
    k_factors: list = field(default_factory=lambda: [0.5, 1, 2, 4, 8])
    ablation_layers: list | None = None
    noise_sigma: float = 70 / 255
    noise_images: int = 50
    noise_top: int = 5
    noise_layers: list | None = None
    attack_images: int = 3
    attack_eps: float = 0.1
    attack_step_size: float = 0.01
    attack_steps: int = 100
    decomposition_layers: list | None = None
    decomposition_top: int = 5
    decomposition_samples: int = 5
    trajectory_layer: str | None = None
    trajectory_k_factors: list = field(default_factory=lambda: [0.5, 2, 8])
    trajectory_anchors: int = 2
    trajectory_points: int = 8
    faithfulness_images: int = 100
    faithfulness_classes: list | None = None
    experiments: list = field(default_factory=lambda: list(EXPERIMENTS))
    seed: int = 0
    progress: bool = True

    def __post_init__(self):
        for name in ("images", "importance_images", "curve_concepts", "curve_steps", "accuracy_steps", "curve_batch",
                     "inter_images", "inter_targets", "inter_steps", "noise_images", "noise_top", "sae_steps",
                     "sae_sweep_steps", "dl_iter", "attack_steps", "decomposition_top", "decomposition_samples",
                     "trajectory_points", "faithfulness_images"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"validation option {name} must be ≥ 1, got {getattr(self, name)}")
        if self.trajectory_points < 2:
            raise ValueError(f"validation option trajectory_points must be ≥ 2, got {self.trajectory_points}")
        for name in ("layers", "baseline_layers", "dl_layers", "inter_layers", "paper_points", "ablation_layers",
                     "noise_layers", "baselines", "experiments", "decomposition_layers", "k_factors", "lam_levels",
                     "sae_lambdas", "trajectory_k_factors", "faithfulness_classes"):
            v = getattr(self, name)
            if isinstance(v, str):
                setattr(self, name, [s.strip() for s in v.split(",") if s.strip()])
        bad = sorted(set(self.baselines) - set(METHODS[1:]))
        if bad:
            raise ValueError(f"unknown baseline(s) {bad}; valid: {', '.join(METHODS[1:])}")
        bad = sorted(set(self.experiments) - set(EXPERIMENTS))
        if bad:
            raise ValueError(f"unknown experiment(s) {bad}; valid: {', '.join(EXPERIMENTS)}")
        for name in ("k_factors", "lam_levels", "sae_lambdas", "trajectory_k_factors"):
            if any(float(f) <= 0 for f in getattr(self, name)):
                raise ValueError(f"validation option {name} must hold values > 0, got {getattr(self, name)}")
        if self.noise_sigma < 0 or self.attack_eps < 0 or self.attack_step_size <= 0 or self.sae_lr <= 0:
            raise ValueError("need noise_sigma ≥ 0, attack_eps ≥ 0, attack_step_size > 0 and sae_lr > 0")
        if self.attack_images < 0 or self.trajectory_anchors < 0:
            raise ValueError("attack_images and trajectory_anchors must be ≥ 0")

    def key(self, run_key: str, group: str | None = None) -> str:
        """Hash of the options (all, or those of one unit ``group``) with the pipeline run key."""
        d = {k: v for k, v in dataclasses.asdict(self).items() if k not in _NOT_HASHED
             and (group is None or k in _GROUPS[group])}
        return hashlib.sha256(json.dumps([run_key, UNITS_VERSION, d], sort_keys=True, default=str).encode()).hexdigest()[:12]

    @classmethod
    def from_dict(cls, d: dict | None) -> "ValidationOptions":
        d = dict(d or {})
        valid = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - valid)
        if unknown:
            raise ValueError(f"unknown validation option(s) {unknown}; valid: {', '.join(sorted(valid))}")
        return cls(**d)


# ---------------------------------------------------------------------------------------------
class _Units:
    """Atomic per-unit JSON results under ``<work>/validation/units/<group>-<key>/``; ``get`` computes
    missing ones. A unit name is ``<group>/<method or layer>/...``; its key hashes the group's options."""

    def __init__(self, root: Path, opts: "ValidationOptions", run_key: str):
        self.root, self.opts, self.run_key = root, opts, run_key
        self.compute_s: dict[str, float] = {}  # per group: seconds the units took when computed

    def path(self, name: str) -> Path:
        group, rest = name.split("/", 1)
        key = self.opts.key(self.run_key, group)
        if group in ("c_deletion", "sparsity") and not rest.startswith("ours/"):
            key += "-" + self.opts.key(self.run_key, "baseline")
        return self.root / "units" / f"{group}-{key}" / f"{rest.replace('/', '__')}.json"

    def get(self, name: str, compute):
        p = self.path(name)
        if p.exists():
            res = load_json(p)
        else:
            t0 = time.perf_counter()
            res = compute()
            res["unit_seconds"] = round(time.perf_counter() - t0, 2)
            save_json(p, res)
        group = name.split("/", 1)[0]
        self.compute_s[group] = round(self.compute_s.get(group, 0.0) + res.get("unit_seconds", 0.0), 2)
        return res


def _check_layers(pipe, names, what: str) -> list[str]:
    bad = [n for n in names if n not in pipe.points]
    if bad:
        raise ValueError(f"unknown {what} {bad}: not analysed by this run; analysed points: {', '.join(pipe.points)}")
    return sorted(set(names), key=pipe.points.index)


def _resolve_layers(pipe, opts: ValidationOptions) -> dict:
    def pick(v, default):
        return _check_layers(pipe, v, "layer(s)") if v is not None else default
    paper1 = [p for p in PAPER_TABLE1_LAYERS if p in pipe.points] or list(pipe.points)
    layers = pick(opts.layers, paper1)
    paper3 = [p for p in PAPER_TABLE3_LAYERS if p in pipe.points] or layers
    base = pick(opts.baseline_layers, [p for p in DEFAULT_BASELINE_LAYERS if p in layers] or layers)
    dl = pick(opts.dl_layers, [p for p in DEFAULT_DL_LAYERS if p in base] or base[:-1] or base)
    traj = opts.trajectory_layer or ("layer3.5" if "layer3.5" in pipe.points else pipe.points[len(pipe.points) // 2])
    return {"layers": layers, "baseline_layers": base, "dl_layers": dl,
            "sparsity_layers": pick(opts.sparsity_layers, base),
            "inter_layers": pick(opts.inter_layers, list(pipe.points)),
            "paper_points": pick(opts.paper_points, [p for p in PAPER_FIG5_POINTS if p in pipe.points]),
            "ablation_layers": pick(opts.ablation_layers, paper3), "noise_layers": pick(opts.noise_layers, layers),
            "decomposition_layers": pick(opts.decomposition_layers,
                                         [p for p in PAPER_FIG7_LAYERS if p in pipe.points] or [pipe.points[-1]]),
            "trajectory_layer": _check_layers(pipe, [traj], "trajectory layer")[0]}


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


def _our_dec(pipe, point, lam=None):
    from ..pipeline.stages import load_concepts

    c = load_concepts(pipe, point)
    cfg = pipe.config
    return ours(c["V"].to(pipe.device), c["beta"].to(pipe.device), cfg.lam if lam is None else lam, cfg.code_method,
                cfg.positive)


def _train_pfvs(pipe, point: str, opts) -> torch.Tensor:
    from ..pipeline.stages import load_pfvs

    X = torch.from_numpy(load_pfvs(pipe, point)["pfv"])
    if opts.baseline_train and len(X) > opts.baseline_train:
        X = X[np.random.default_rng(opts.seed).choice(len(X), opts.baseline_train, replace=False)]
    return X


def _saved(path: Path, name: str, fit):
    """Load the baseline saved at ``path`` (npz + its info JSON) or fit it with ``fit()`` and save it."""
    if path.exists():
        info = load_json(path.with_suffix(".json")) if path.with_suffix(".json").exists() else {}
        return load_decomposition(name, load_npz(path), info)
    dec = fit()
    save_npz(path, **dec.state)
    save_json(path.with_suffix(".json"), dec.info)
    return dec


def _baseline(pipe, vwork: Path, name: str, point: str, opts):
    """Fit (or load the saved) baseline ``name`` at ``point`` on the stage-1 PFVs."""
    path = vwork / "models" / f"{name}-{opts.key(pipe.config.key(), 'baseline')}" / f"{point}.npz"

    def fit():
        X = _train_pfvs(pipe, point, opts)
        K = max(1, int(round(opts.baseline_k_factor * pipe.adapter.channels(point))))
        if name == "dictionary_learning":
            beta = _our_dec(pipe, point).bias.float().cpu()  # the pipeline's β, as stage 2 used
            lam = pipe.config.lam if pipe.config.lam is not None else DEFAULT_LAM_REL
            return fit_dictionary_learning(X, beta, K, lam, opts.seed, opts.dl_iter)
        return fit_sae(X, K, opts.sae_lambda, opts.sae_steps, lr=opts.sae_lr, seed=opts.seed)
    return _saved(path, name, fit)


def _sweep_sae(pipe, vwork: Path, point: str, lam: float, opts):
    """The SAE of the sparsity sweep at ``lam``: the baseline SAE itself at ``sae_lambda``, else one
    started from it and trained ``sae_sweep_steps`` more steps at ``lam``."""
    base = _baseline(pipe, vwork, "sae", point, opts)
    if float(lam) == float(opts.sae_lambda):
        return base
    key = opts.key(pipe.config.key(), "baseline") + "-" + opts.key(pipe.config.key(), "sparsity")
    path = vwork / "models" / f"sae-sweep-{key}" / f"{point}-lam{float(lam):g}.npz"
    return _saved(path, "sae", lambda: fit_sae(_train_pfvs(pipe, point, opts), base.V.shape[0], float(lam),
                                               opts.sae_sweep_steps, lr=opts.sae_lr, seed=opts.seed, init=base))


def _clusters(pipe, vwork: Path, point: str, K: int) -> dict:
    """Bisecting k-means with ``K`` clusters on the stage-1 PFVs (the pipeline's mode and seed):
    ``{"V": [K, C], "labels": [N], "beta": [C]}``; the pipeline's own concepts when K matches, else
    computed once and saved under the validation work folder."""
    from ..pipeline.distributed import bisecting_kmeans
    from ..pipeline.stages import load_concepts, load_pfvs

    stored = load_concepts(pipe, point)
    if stored["V"].shape[0] == K:
        return {k: stored[k] for k in ("V", "labels", "beta")}
    path = vwork / "models" / "clusters" / f"{point}-K{K}.npz"
    if path.exists():
        return {k: torch.from_numpy(v) for k, v in load_npz(path).items()}
    X = torch.from_numpy(load_pfvs(pipe, point)["pfv"]).to(pipe.device)
    if K > X.shape[0]:
        raise ValueError(f"K={K} > N={X.shape[0]} stage-1 PFVs at {point}")
    beta = stored["beta"].to(X)
    V, labels = bisecting_kmeans(X, K, beta, pipe.config.seed, pipe.config.kmeans_mode)
    out = {"V": V.detach().float().cpu(), "labels": labels.long().cpu(), "beta": beta.float().cpu()}
    save_npz(path, **out)
    return out


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


# ---------------------------------------------------------------------------------------------
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
                dec = _our_dec(pipe, point) if m == "ours" else _baseline(pipe, vwork, m, point, opts)
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
                        dec = _our_dec(pipe, point, lam=level)
                    elif m == "dictionary_learning":
                        # the fit's α is its relative λ times a typical ‖D₀(x − β)‖_∞: scale it to this level
                        base = _baseline(pipe, vwork, m, point, opts)
                        lam_fit = base.info.get("lam_rel", pipe.config.lam if pipe.config.lam is not None else DEFAULT_LAM_REL)
                        alpha = base.info["alpha"] * level / lam_fit
                        dec = dictionary_learning_codes(base.state["D"], base.bias, alpha, base.info)
                    else:
                        dec = _sweep_sae(pipe, vwork, point, level, opts)
                    q = ex.decomposition_quality(dec, rows.to(dec.V.dtype))
                    return {**q, "level": level, "fit": {k: v for k, v in dec.info.items() if k != "loss_curve"}}
                r = units.get(f"sparsity/{m}/{point}/{float(level):g}", compute)
                res.setdefault(m, {}).setdefault(point, []).append(r)
                bar.update(1)
    return res


def _run_inter(pipe, units, L, opts, bar):
    from ..pipeline.stages import load_concepts, top_sets

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
                return ex.inter_layer(pipe, a, b, _our_dec(pipe, a), inputs[a], labels, Vb, top_sets(pipe, b), opts)
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
                    c = _clusters(pipe, vwork, point, K)
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
            return ex.noise_robustness(pipe, point, _our_dec(pipe, point), c, n, opts)
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
    from ..pipeline.stages import load_concepts, top_sets

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
            clusters = {K: _clusters(pipe, vwork, point, K) for K in Ks}
            return {**ap.trajectory(pipe, point, clusters, row, opts.trajectory_points), "class": c, "concept": q,
                    "concept_K": int(load_concepts(pipe, point)["V"].shape[0]),
                    "class_name": pipe.class_names[c] if c < len(pipe.class_names) else str(c)}
        key = "_".join(str(K) for K in Ks)
        res["anchors"].append(units.get(f"trajectory/{point}/{row}/{key}", compute))
        bar.update(1)
    return res


def _n_units(pipe, L, opts) -> int:
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


def validate(pipe, opts: ValidationOptions | None = None) -> dict:
    """Run every requested experiment on the pipeline's work folder (resuming) and write the outputs.

    Args:
        pipe: a :class:`~gig_fast.pipeline.Pipeline` whose stages have finished (``pipe.run()``).
        opts: :class:`ValidationOptions` (defaults if None).

    Returns:
        the ``validation.json`` content (pictures, kept in ``validation_figures.json``, left out).
    """
    from .report import write_outputs

    opts = opts or ValidationOptions()
    if not (pipe.work / "config.json").exists() or not (pipe.out / "graph.json").exists():
        raise ValueError(f"missing pipeline outputs in {pipe.out} (work folder {pipe.work.name}): run the pipeline first")
    L = _resolve_layers(pipe, opts)
    vwork = pipe.work / "validation"
    vkey = opts.key(pipe.config.key())
    save_json(vwork / f"options-{vkey}.json", {"options": dataclasses.asdict(opts), "resolved_layers": L})
    units = _Units(vwork, opts, pipe.config.key())
    t0 = time.perf_counter()
    timings, result = {}, {}
    runners = {"c_deletion": lambda b: {"c_deletion": _run_c_deletion(pipe, units, vwork, L, opts, b)},
               "sparsity": lambda b: {"sparsity": _run_sparsity(pipe, units, vwork, L, opts, b)},
               "inter_layer": lambda b: _run_inter(pipe, units, L, opts, b),
               "ablation": lambda b: {"ablation": _run_ablation(pipe, units, vwork, L, opts, b)},
               "noise": lambda b: {"noise": _run_noise(pipe, units, L, opts, b)},
               "attack": lambda b: {"attack": _run_attack(pipe, units, L, opts, b)},
               "decomposition": lambda b: {"decomposition": _run_decomposition(pipe, units, L, opts, b)},
               "trajectory": lambda b: {"trajectory": _run_trajectory(pipe, units, vwork, L, opts, b)},
               "faithfulness": lambda b: {"faithfulness": fa.run_faithfulness(pipe, units, opts, b, _our_dec)}}
    with torch.no_grad(), tqdm(total=_n_units(pipe, L, opts), desc="validation", disable=not opts.progress) as bar:
        for name in EXPERIMENTS:
            if name in opts.experiments:
                t = time.perf_counter()
                with torch.enable_grad():  # GIG needs gradients
                    result.update(runners[name](bar))
                timings[name] = round(time.perf_counter() - t, 2)
    doc = {"schema": "gig_fast.validation", "version": 2, "run_key": pipe.config.key(),
           "validation_key": vkey, "options": dataclasses.asdict(opts), "layers": L,
           "score": "softmax probability of the image's label class" if pipe.config.class_probability
           else "logit of the image's label class",
           **result, "timings_s": {**timings, "total": round(time.perf_counter() - t0, 2)},
           "compute_s": {**units.compute_s, "total": round(sum(units.compute_s.values()), 2)}}
    return write_outputs(pipe.out, doc)
