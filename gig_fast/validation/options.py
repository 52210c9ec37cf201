"""The options of ``gig-fast validate`` (:class:`ValidationOptions`), the paper's default layers, and
which analysed layers each experiment runs on (:func:`resolve_layers`)."""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field

from .baselines import METHODS

__all__ = ["ValidationOptions", "resolve_layers", "EXPERIMENTS", "PAPER_TABLE1_LAYERS", "PAPER_TABLE3_LAYERS",
           "PAPER_FIG5_POINTS", "PAPER_FIG7_LAYERS", "DEFAULT_BASELINE_LAYERS", "DEFAULT_DL_LAYERS", "UNITS_VERSION"]

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


def _check_layers(pipe, names, what: str) -> list[str]:
    bad = [n for n in names if n not in pipe.points]
    if bad:
        raise ValueError(f"unknown {what} {bad}: not analysed by this run; analysed points: {', '.join(pipe.points)}")
    return sorted(set(names), key=pipe.points.index)


def resolve_layers(pipe, opts: ValidationOptions) -> dict:
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
