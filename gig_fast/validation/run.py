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

from ..pipeline.store import load_json, load_npz, save_json, save_npz
from . import experiments as ex
from .baselines import METHODS, fit_dictionary_learning, fit_sae, load_decomposition, ours

__all__ = ["ValidationOptions", "validate", "PAPER_TABLE1_LAYERS", "PAPER_TABLE3_LAYERS"]

PAPER_TABLE1_LAYERS = ["layer1.1", "layer2.0", "layer2.2", "layer3.0", "layer3.2", "layer3.4", "layer4.0", "layer4.2"]
DEFAULT_BASELINE_LAYERS = ["layer1.1", "layer2.2", "layer3.2", "layer4.2"]  # one per stage: the 2-core budget
PAPER_TABLE3_LAYERS = ["layer1.2", "layer2.2", "layer3.0", "layer3.5", "layer4.2"]
_NOT_HASHED = {"progress"}
# the options each kind of unit depends on: a unit is keyed by these only, so changing (say) the
# inter-layer options reuses every finished C-Deletion unit
_GROUPS = {"c_deletion": ("images", "curve_concepts", "curve_steps", "seed"),
           "baseline": ("baseline_k_factor", "baseline_train", "dl_iter", "sae_steps", "sae_lambda", "seed"),
           "inter_layer": ("inter_images", "inter_targets", "inter_steps", "seed"),
           "ablation": ("images", "seed"),
           "noise": ("noise_sigma", "noise_images", "noise_top", "seed")}


@dataclass
class ValidationOptions:
    """What ``gig-fast validate`` runs; defaults sized for the demo on 2 CPU cores (≈10 min).

    C-Deletion / C-Insertion and Table 1: ``layers`` (None: the paper's Table-1 layers that are
    analysed, else all), ``images`` (validation images, balanced over classes, from the explained
    images; rel-L2 / l0 ratio are measured on all their PFVs at the layer), ``curve_concepts`` (top
    concepts edited, N), ``curve_steps``.
    Baselines: ``baselines`` (subset of ``dictionary_learning``, ``sae``), ``baseline_layers`` (None:
    :data:`DEFAULT_BASELINE_LAYERS` — one block per stage — among ``layers``), ``baseline_k_factor``
    (8), ``baseline_train`` (stage-1 PFVs used to fit; 0 = all), ``dl_iter`` (epochs), ``sae_steps``
    (Adam mini-batches of 256), ``sae_lambda``.
    Inter-layer: ``inter_layers`` (None: every analysed point; consecutive pairs), ``inter_images``,
    ``inter_targets`` (5 top target concepts per image, as the paper), ``inter_steps``.
    Ablation: ``k_factors``, ``ablation_layers`` (None: the paper's Table-3 layers that are analysed, else
    ``layers``). Noise (App. J): ``noise_sigma`` (pixel units in [0, 1]), ``noise_images``, ``noise_top``,
    ``noise_layers`` (None: ``layers``). ``experiments``: which of ``c_deletion``, ``inter_layer``,
    ``ablation``, ``noise`` to run. ``seed``, ``progress``.
    """
    layers: list | None = None
    images: int = 50
    curve_concepts: int = 20
    curve_steps: int = 20
    baselines: list = field(default_factory=lambda: ["dictionary_learning", "sae"])
    baseline_layers: list | None = None
    baseline_k_factor: float = 8.0
    baseline_train: int = 1000
    dl_iter: int = 2
    sae_steps: int = 600
    sae_lambda: float = 5.0
    inter_layers: list | None = None
    inter_images: int = 20
    inter_targets: int = 5
    inter_steps: int = 20
    k_factors: list = field(default_factory=lambda: [0.5, 1, 2, 4, 8])
    ablation_layers: list | None = None
    noise_sigma: float = 70 / 255
    noise_images: int = 50
    noise_top: int = 5
    noise_layers: list | None = None
    experiments: list = field(default_factory=lambda: ["c_deletion", "inter_layer", "ablation", "noise"])
    seed: int = 0
    progress: bool = True

    def __post_init__(self):
        for name in ("images", "curve_concepts", "curve_steps", "inter_images", "inter_targets", "inter_steps",
                     "noise_images", "noise_top", "sae_steps", "dl_iter"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"validation option {name} must be ≥ 1, got {getattr(self, name)}")
        for name in ("layers", "baseline_layers", "inter_layers", "ablation_layers", "noise_layers", "baselines",
                     "experiments"):
            v = getattr(self, name)
            if isinstance(v, str):
                setattr(self, name, [s.strip() for s in v.split(",") if s.strip()])
        bad = sorted(set(self.baselines) - set(METHODS[1:]))
        if bad:
            raise ValueError(f"unknown baseline(s) {bad}; valid: {', '.join(METHODS[1:])}")
        bad = sorted(set(self.experiments) - {"c_deletion", "inter_layer", "ablation", "noise"})
        if bad:
            raise ValueError(f"unknown experiment(s) {bad}; valid: c_deletion, inter_layer, ablation, noise")
        if any(float(f) <= 0 for f in self.k_factors) or self.noise_sigma < 0:
            raise ValueError("k_factors must be > 0 and noise_sigma ≥ 0")

    def key(self, run_key: str, group: str | None = None) -> str:
        """Hash of the options (all, or those of one unit ``group``) with the pipeline run key."""
        d = {k: v for k, v in dataclasses.asdict(self).items() if k not in _NOT_HASHED
             and (group is None or k in _GROUPS[group])}
        return hashlib.sha256(json.dumps([run_key, d], sort_keys=True, default=str).encode()).hexdigest()[:12]

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
        if group == "c_deletion" and not rest.startswith("ours/"):
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
    base = [p for p in DEFAULT_BASELINE_LAYERS if p in layers] or layers
    return {"layers": layers, "baseline_layers": pick(opts.baseline_layers, base),
            "inter_layers": pick(opts.inter_layers, list(pipe.points)),
            "ablation_layers": pick(opts.ablation_layers, paper3), "noise_layers": pick(opts.noise_layers, layers)}


def _balanced(pipe, n: int) -> np.ndarray:
    """``n`` explained images, round-robin over classes (sorted ids within a class)."""
    ids = pipe.explain_ids
    by = [ids[pipe.labels[ids] == c].tolist() for c in range(pipe.num_classes)]
    out = []
    for r in range(max(len(b) for b in by)):
        out += [b[r] for b in by if r < len(b)]
    return np.array(sorted(out[:n]), dtype=np.int64)


def _pixel_std(pipe) -> float:
    if pipe.config.dataset == "fashion-mnist":
        from ..models import DEMO_STD
        return float(DEMO_STD)
    return float(np.mean(pipe.config.preprocessing()["std"]))  # the model's own normalisation when unset


def _our_dec(pipe, point):
    from ..pipeline.stages import load_concepts

    c = load_concepts(pipe, point)
    cfg = pipe.config
    return ours(c["V"].to(pipe.device), c["beta"].to(pipe.device), cfg.lam, cfg.code_method, cfg.positive)


def _baseline(pipe, vwork: Path, name: str, point: str, opts):
    """Fit (or load the saved) baseline ``name`` at ``point`` on the stage-1 PFVs."""
    from ..pipeline.stages import load_pfvs
    from ..ops.sparse_code import DEFAULT_LAM_REL

    path = vwork / "models" / f"{name}-{opts.key(pipe.config.key(), 'baseline')}" / f"{point}.npz"
    if path.exists():
        return load_decomposition(name, load_npz(path))
    X = torch.from_numpy(load_pfvs(pipe, point)["pfv"])
    if opts.baseline_train and len(X) > opts.baseline_train:
        X = X[np.random.default_rng(opts.seed).choice(len(X), opts.baseline_train, replace=False)]
    K = max(1, int(round(opts.baseline_k_factor * pipe.adapter.channels(point))))
    beta = pipe.adapter.bn_shift(point).float()
    if name == "dictionary_learning":
        lam = pipe.config.lam if pipe.config.lam is not None else DEFAULT_LAM_REL
        dec = fit_dictionary_learning(X, beta, K, lam, opts.seed, opts.dl_iter)
    else:
        dec = fit_sae(X, K, opts.sae_lambda, opts.sae_steps, seed=opts.seed)
    save_npz(path, **dec.state)
    return dec


def _rows(X: torch.Tensor) -> torch.Tensor:
    """Every position of ``X [B, C, H, W]`` as PFV rows ``[B·H·W, C]``."""
    return X.permute(0, 2, 3, 1).reshape(-1, X.shape[1])


# ---------------------------------------------------------------------------------------------
def _run_c_deletion(pipe, units, vwork, L, opts, bar):
    ids = _balanced(pipe, opts.images)
    inputs, labels, _ = ex.layer_inputs(pipe, ids, L["layers"])
    res: dict = {"images": [int(i) for i in ids]}
    for point in L["layers"]:
        methods = ["ours"] + [m for m in opts.baselines if point in L["baseline_layers"]]
        for m in methods:
            bar.set_postfix_str(f"C-deletion {m} {point}")

            def compute(m=m, point=point):
                dec = _our_dec(pipe, point) if m == "ours" else _baseline(pipe, vwork, m, point, opts)
                return ex.c_deletion(pipe, point, dec, inputs[point], labels, opts)
            res.setdefault(m, {})[point] = units.get(f"c_deletion/{m}/{point}", compute)
            bar.update(1)
    return res


def _run_inter(pipe, units, L, opts, bar):
    from ..pipeline.stages import load_concepts, top_sets

    pts = L["inter_layers"]
    ids = _balanced(pipe, opts.inter_images)
    inputs, labels, _ = ex.layer_inputs(pipe, ids, pts)
    res: dict = {"images": [int(i) for i in ids]}
    for a, b in zip(pts[:-1], pts[1:]):
        bar.set_postfix_str(f"inter-layer {a}→{b}")

        def compute(a=a, b=b):
            Vb = load_concepts(pipe, b)["V"].to(pipe.device)
            return ex.inter_layer(pipe, a, b, _our_dec(pipe, a), inputs[a], labels, Vb, top_sets(pipe, b), opts)
        res[f"{a}->{b}"] = units.get(f"inter_layer/{a}__{b}", compute)
        bar.update(1)
    return res


def _run_ablation(pipe, units, L, opts, bar):
    from ..pipeline.stages import load_concepts, load_pfvs

    ids = _balanced(pipe, opts.images)
    inputs, _, _ = ex.layer_inputs(pipe, ids, L["ablation_layers"])
    res: dict = {}
    for point in L["ablation_layers"]:
        for f in opts.k_factors:
            bar.set_postfix_str(f"ablation {point} K={f}·C")

            def compute(point=point, f=f):
                X = torch.from_numpy(load_pfvs(pipe, point)["pfv"]).to(pipe.device)
                K = max(1, int(round(float(f) * pipe.adapter.channels(point))))
                return ex.ablation_point(pipe, point, K, X, _rows(inputs[point]), load_concepts(pipe, point))
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


def _n_units(L, opts) -> int:
    n = 0
    if "c_deletion" in opts.experiments:
        n += sum(1 + sum(p in L["baseline_layers"] for _ in opts.baselines) for p in L["layers"])
    if "inter_layer" in opts.experiments:
        n += max(0, len(L["inter_layers"]) - 1)
    if "ablation" in opts.experiments:
        n += len(L["ablation_layers"]) * len(opts.k_factors)
    if "noise" in opts.experiments:
        n += len(L["noise_layers"])
    return n


def validate(pipe, opts: ValidationOptions | None = None) -> dict:
    """Run every requested experiment on the pipeline's work folder (resuming) and write the outputs.

    Args:
        pipe: a :class:`~gig_fast.pipeline.Pipeline` whose stages have finished (``pipe.run()``).
        opts: :class:`ValidationOptions` (defaults if None).

    Returns:
        the ``validation.json`` content.
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
    runners = {"c_deletion": lambda b: _run_c_deletion(pipe, units, vwork, L, opts, b),
               "inter_layer": lambda b: _run_inter(pipe, units, L, opts, b),
               "ablation": lambda b: _run_ablation(pipe, units, L, opts, b),
               "noise": lambda b: _run_noise(pipe, units, L, opts, b)}
    with torch.no_grad(), tqdm(total=_n_units(L, opts), desc="validation", disable=not opts.progress) as bar:
        for name in ("c_deletion", "inter_layer", "ablation", "noise"):
            if name in opts.experiments:
                t = time.perf_counter()
                with torch.enable_grad():  # GIG needs gradients
                    result[name] = runners[name](bar)
                timings[name] = round(time.perf_counter() - t, 2)
    doc = {"schema": "gig_fast.validation", "version": 1, "run_key": pipe.config.key(),
           "validation_key": vkey, "options": dataclasses.asdict(opts), "layers": L,
           "score": "softmax probability of the image's label class" if pipe.config.class_probability
           else "logit of the image's label class",
           **result, "timings_s": {**timings, "total": round(time.perf_counter() - t0, 2)},
           "compute_s": {**units.compute_s, "total": round(sum(units.compute_s.values()), 2)}}
    write_outputs(pipe.out, doc)
    return doc
