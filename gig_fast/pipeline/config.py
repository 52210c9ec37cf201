"""Pipeline configuration: one dataclass, read from YAML/JSON, overridable by flags, hashed for resume."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..concepts.core import MODES as KMEANS_MODES
from ..data import MAX_IMAGE_PIXELS
from ..gig import ADAPTIVE, RULES
from ..ops import BACKENDS
from ..ops.sparse_code import DEFAULT_LAM_REL

__all__ = ["PipelineConfig", "load_config", "read_config_file", "demo_config"]

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

AUTOCAST = {None: None, "bf16": torch.bfloat16, "fp16": torch.float16}  # gig_autocast → torch dtype

# Fields left out of the run key, so a relaunch with another value resumes the same work folder (see
# .workdir): ``chunk_images`` keeps the folder's first value (chunk files are named by index); the batch
# sizes change only the float rounding of batched convolutions; ``device`` (its type) and ``backend``
# change numerics and may not change within a work folder (such a relaunch is refused); the rest changes
# no result.
_NOT_HASHED = {"out", "device", "backend", "progress", "batch_size", "gig_batch_size", "chunk_images", "loader_workers",
               "report_images", "report_crops", "graph_images", "graph_pairs", "error_nodes"}


# Options added after runs were made, with the value those runs behaved as (left out of the key there).
_ADDED_LATER = {"gig_autocast": None, "gig_tolerance": None, "max_image_pixels": MAX_IMAGE_PIXELS,
                "reduce_large_images": False,
                # results_version 2 runs made before it (none left this repository) all had ≤ 11 classes,
                # where 10 neighbours per class are every pair
                "pair_neighbours": 10}


# Bumped when the code computes different results (or work files) from the same config, so that a run
# never resumes from work files of an older method: 2 = β the net BN shift (bn3 + downsample BN), stage-4
# targets widened to the shared concepts, per-image graphs of the image's own concepts; 3 = the adaptive
# rule refines a fixed rule's incomplete images (composite trapezoid on nested nodes).
RESULTS_VERSION = 3


@dataclass
class PipelineConfig:
    """Everything a run depends on (docs/design.md §1). Defaults follow the paper where it fixes them.

    Model/data: ``model`` (``demo``, ``demo-vit``, ``efficientnet-lite0``, a torchvision name such as
    ``resnet50``/``vit_b_16``/``convnext_tiny``, ``torchvision:<name>`` or ``timm:<name>``: see
    :func:`gig_fast.models.load_model`), ``weights`` (a local ``.safetensors``/torch file, a torchvision
    weights name, or None), ``class_token`` (``keep`` | ``drop``: whether a transformer's class token is
    sampled into the concept dataset; it stays on the GIG path either way), ``dataset``
    (``fashion-mnist``, ``photos`` — the unlabelled photos that ship offline, explained for their
    predicted class — or an image folder), ``split``,
    ``image_size``/``channels``/``mean``/``std`` for folders and photos (``mean``/``std`` None: the
    model's own preprocessing, else ImageNet's), ``class_names`` (optional), ``max_image_pixels`` (larger
    images are skipped and listed, default PIL's limit) unless ``reduce_large_images`` (then they are
    downscaled as they load: JPEGs by the decoder).
    Stage 1: ``concept_images`` (images sampled for the PFV–iERF dataset), ``pfvs_per_image``,
    ``attribution`` (``srd`` | ``gradxinput``), ``ierf_dtype``, ``store_ierf`` (False: contributions
    only, no iERF maps — for benchmarks).
    Stage 2: ``layers`` (None = all points), ``k_factor`` (K = k_factor·C) or ``k`` (fixed),
    ``kmeans_mode`` (passed to the concept extractor), ``representatives`` (samples kept per concept;
    10, the paper's "top-10 nearest embeddings").
    Stage 3: ``explain_images`` (≥ ``per_class`` of each class), ``lam`` (λ relative to λ_max; None =
    the coder's default), ``code_method``, ``positive``.
    Stage 4: ``gig_rule`` (``adaptive``, default: each image's nodes where its path needs them; or a
    fixed rule), ``gig_steps`` (the adaptive rule's starting nodes, or the fixed rule's), ``gig_tolerance``
    (the completeness bar the adaptive rule stops at, or that sends a fixed rule's incomplete images to
    it; None = the fixed rule alone), ``gig_max_steps`` (most nodes per image of the adaptive rule),
    ``gig_shared_steps`` (Gauss–Legendre nodes of the shared-concept targets), ``gig_autocast`` (None | ``bf16`` | ``fp16``: F_ab in low
    precision; both see :func:`gig_fast.gig`), ``top_concepts`` (per class per layer), ``top_shared``
    (per pair of classes), ``pair_neighbours`` (the class pairs that get a pair graph and whose shared
    concepts stage 4 wires: each class with its ``pair_neighbours`` most similar classes, by the cosine
    of their classifier-level concept scores; None = every pair, n² of them), ``class_by`` (``label`` |
    ``prediction``), ``class_probability``.
    Execution: ``seed``, ``device``, ``backend``, ``batch_size``, ``gig_batch_size``, ``loader_workers``
    (processes decoding the images of stages 1 and 3; None = automatic: see
    :mod:`gig_fast.pipeline.image_loader`), ``chunk_images`` (checkpoint granularity), ``out``, ``progress``.
    Report (``report.html``, not hashed): ``report_images`` (explained images embedded with their
    picture and concept heat-maps for the image view), ``report_crops`` (nearest samples per concept).
    Outputs (not hashed): ``graph_images`` (per-image graphs kept in ``graph.json``, round-robin over
    classes; every image's graph is in the per-image store ``<out>/store/``), ``graph_pairs`` (pair
    graphs kept in ``graph.json``, round-robin over classes; every pair's is in the store),
    ``error_nodes`` (each layer's reconstruction residual as a node of the image and class graphs, its
    value ``T(F_ab(X)) − T(F_ab(X̃))``: :mod:`gig_fast.pipeline.errors`; a pass over the explained images
    after stage 4).
    """
    model: str = "demo"
    weights: str | None = None
    dataset: str = "fashion-mnist"
    split: str = "test"
    image_size: int = 224
    channels: int = 3
    mean: tuple | None = None
    std: tuple | None = None
    class_names: list | None = None
    class_token: str = "keep"
    max_image_pixels: int = MAX_IMAGE_PIXELS
    reduce_large_images: bool = False
    concept_images: int = 5000
    pfvs_per_image: int = 1
    attribution: str = "srd"
    ierf_dtype: str = "float16"
    store_ierf: bool = True
    layers: list | None = None
    k_factor: float = 8.0
    k: int | None = None
    kmeans_mode: str | None = None
    representatives: int = 10
    explain_images: int = 1000
    per_class: int = 100
    lam: float | None = None
    code_method: str = "lasso"
    positive: bool = False
    gig_steps: int = 5
    gig_rule: str = ADAPTIVE
    gig_tolerance: float | None = 0.01
    gig_max_steps: int = 64
    gig_shared_steps: int = 8
    gig_autocast: str | None = None
    top_concepts: int = 5
    top_shared: int = 3
    # Every pair of 1,000 classes is 499,500 pair graphs, and each class's stage-4 targets would grow by
    # every concept it shares with any of 999 others (up to K per layer: ~100× the GIG work of its top-5);
    # 10 neighbours keep every pair at up to 11 classes (the demo's 10: 45 pairs) and ≤ 10 per class beyond.
    pair_neighbours: int | None = 10
    class_by: str = "label"
    class_probability: bool = True
    seed: int = 0
    device: str = "cpu"
    backend: str | None = None
    batch_size: int = 256
    gig_batch_size: int | None = None
    loader_workers: int | None = None
    chunk_images: int = 500
    out: str = "gig_out"
    progress: bool = True
    report_images: int = 20
    report_crops: int = 10
    graph_images: int = 200
    graph_pairs: int = 200
    error_nodes: bool = True
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        for f in dataclasses.fields(self):  # numpy scalars → Python ones (config.json and the key are JSON)
            if isinstance(getattr(self, f.name), np.generic):
                setattr(self, f.name, getattr(self, f.name).item())
        if isinstance(self.layers, str):
            self.layers = [s.strip() for s in self.layers.split(",") if s.strip()]
        problems = _problems(self)
        if problems:
            raise ValueError("invalid configuration: " + "; ".join(problems))
        self.mean = tuple(self.mean) if self.mean is not None else None
        self.std = tuple(self.std) if self.std is not None else None
        for name in ("weights", "out"):  # a Path is fine; stored (config.json, the run key) as its string
            if isinstance(getattr(self, name), Path):
                setattr(self, name, str(getattr(self, name)))

    def preprocessing(self) -> dict:
        """``{image_size, channels, mean, std}`` for image files: the config's, with ``mean``/``std``
        defaulting to the model's own normalisation (EfficientNet-Lite0, timm models) or ImageNet's."""
        from ..models.efficientnet import EFFICIENTNET_LITE0_PREPROCESS
        from ..models.loading import model_preprocessing

        own = EFFICIENTNET_LITE0_PREPROCESS if self.model == "efficientnet-lite0" else model_preprocessing(self.model)
        return {"image_size": self.image_size, "channels": self.channels,
                "mean": self.mean or own.get("mean", IMAGENET_MEAN), "std": self.std or own.get("std", IMAGENET_STD)}

    def image_limits(self) -> dict:
        """``{max_pixels, reduce_large}``: what :func:`gig_fast.data.load_image` does with huge images."""
        return {"max_pixels": self.max_image_pixels, "reduce_large": self.reduce_large_images}

    def gig_options(self) -> dict:
        """The keyword arguments of :func:`gig_fast.gig` that this configuration sets (stage 4's rule)."""
        return {"steps": self.gig_steps, "rule": self.gig_rule, "batch_size": self.gig_batch_size,
                "autocast": AUTOCAST[self.gig_autocast], "tolerance": self.gig_tolerance,
                "max_steps": max(self.gig_max_steps, self.gig_steps)}

    def shared_gig_options(self) -> dict:
        """The options of stage 4's pass to the shared concepts (the pair graphs' edges): the fixed
        Gauss–Legendre rule with ``gig_shared_steps`` nodes, no completeness bar. There are 14–26 such
        targets per class on the demo, several with a span near 0 that no rule brings within a relative
        bar: the adaptive rule took 4–16× the nodes on the demo's layer4.1 → layer4.2 with its 64-node
        cap, and capped at 8 nodes it left more targets outside 1 % than the 8-node Gauss rule (44.5 %
        within against 64.8 % there, 92.2 % against 99.6 % at layer3.1 → layer3.2)."""
        return {**self.gig_options(), "rule": "gausslegendre", "steps": self.gig_shared_steps, "tolerance": None}

    def code_options(self) -> dict:
        """The keyword arguments of :func:`gig_fast.ops.sparse_code` that this configuration sets (stage 3)."""
        return {"lam": self.lam, "method": self.code_method, "positive": self.positive}

    def key(self) -> str:
        """Hash of every field that changes results (the run key for resuming)."""
        d = {k: v for k, v in dataclasses.asdict(self).items() if k not in _NOT_HASHED}
        d["results_version"] = RESULTS_VERSION
        if d["lam"] is None:  # the coder's default λ_rel: a run made under another default is another run
            d["lam"] = DEFAULT_LAM_REL
        for name, before in _ADDED_LATER.items():  # at the value that runs made before it behaved as,
            if d[name] == before:                  # an option added later is left out: those runs keep their key
                del d[name]
        return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def replace(self, **kw) -> "PipelineConfig":
        return dataclasses.replace(self, **kw)


# ------------------------------------------------------------------------------------ validation
# Every option is checked when a PipelineConfig is made, before any stage runs: a misspelt name or a value
# out of range fails in a second with every problem listed, not after an hour of stage 1.
_POSITIVE_INTS = ("image_size", "max_image_pixels", "concept_images", "explain_images", "pfvs_per_image", "representatives",
                  "gig_steps", "gig_max_steps", "gig_shared_steps", "top_concepts", "chunk_images", "batch_size",
                  "graph_images")
_NON_NEGATIVE_INTS = ("per_class", "top_shared", "seed", "report_images", "report_crops", "graph_pairs")
_BOOLS = ("reduce_large_images", "store_ierf", "positive", "class_probability", "progress", "error_nodes")
_STRINGS = ("model", "dataset", "split", "out")
_CHOICES = {"attribution": ("srd", "gradxinput"), "ierf_dtype": ("float16", "float32"),
            "code_method": ("lasso", "omp"), "gig_rule": (ADAPTIVE,) + RULES, "class_by": ("label", "prediction"),
            "kmeans_mode": (None,) + KMEANS_MODES, "backend": (None,) + BACKENDS,
            "gig_autocast": tuple(AUTOCAST), "class_token": ("keep", "drop")}


def _is_int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def _is_number(v) -> bool:
    return (_is_int(v) or isinstance(v, (float, np.floating))) and math.isfinite(float(v))


def _problems(cfg: "PipelineConfig") -> list[str]:
    """Every invalid option of ``cfg``, each as "<name> must be <what is valid>, got <value>" (empty: valid)."""
    out = []
    bad = lambda name, want: out.append(f"{name} must be {want}, got {getattr(cfg, name)!r}")  # noqa: E731
    for name in _POSITIVE_INTS:
        if not (_is_int(getattr(cfg, name)) and getattr(cfg, name) >= 1):
            bad(name, "an integer >= 1")
    for name in _NON_NEGATIVE_INTS:
        if not (_is_int(getattr(cfg, name)) and getattr(cfg, name) >= 0):
            bad(name, "an integer >= 0")
    for name in _BOOLS:
        if not isinstance(getattr(cfg, name), bool):
            bad(name, "true or false")
    for name in _STRINGS:
        if not isinstance(getattr(cfg, name), (str, Path)) or not str(getattr(cfg, name)):
            bad(name, "a non-empty string")
    for name, choices in _CHOICES.items():
        if getattr(cfg, name) not in choices:
            bad(name, "one of " + ", ".join("null" if c is None else repr(c) for c in choices))
    if cfg.weights is not None and not isinstance(cfg.weights, (str, Path)):
        bad("weights", "null or a file / weights name")
    if cfg.k is not None and not (_is_int(cfg.k) and cfg.k >= 1):
        bad("k", "null or an integer >= 1")
    if cfg.pair_neighbours is not None and not (_is_int(cfg.pair_neighbours) and cfg.pair_neighbours >= 1):
        bad("pair_neighbours", "null (every pair) or an integer >= 1")
    if not (_is_number(cfg.k_factor) and cfg.k_factor > 0):
        bad("k_factor", "a number > 0")
    if cfg.lam is not None and not (_is_number(cfg.lam) and cfg.lam > 0):
        bad("lam", "null or a number > 0 (a fraction of lambda_max)")
    if cfg.gig_tolerance is not None and not (_is_number(cfg.gig_tolerance) and cfg.gig_tolerance > 0):
        bad("gig_tolerance", "null or a number > 0")
    if cfg.gig_batch_size is not None and not (_is_int(cfg.gig_batch_size) and cfg.gig_batch_size >= 1):
        bad("gig_batch_size", "null or an integer >= 1")
    if cfg.loader_workers is not None and not (_is_int(cfg.loader_workers) and cfg.loader_workers >= 0):
        bad("loader_workers", "null (automatic) or an integer >= 0")
    if cfg.gig_rule in ("trapezoid", ADAPTIVE):
        for name in ("gig_steps", "gig_max_steps"):
            if _is_int(getattr(cfg, name)) and getattr(cfg, name) < 2:
                out.append(f"gig_rule {cfg.gig_rule!r} needs {name} >= 2")
    if cfg.gig_rule == ADAPTIVE and cfg.gig_tolerance is None:
        out.append("gig_rule 'adaptive' needs a gig_tolerance (it refines until that bar); null takes a fixed rule")
    if cfg.class_token == "drop" and cfg.store_ierf is False:
        out.append("class_token 'drop' needs store_ierf: true (stage 1 samples through the adapter then)")
    if cfg.code_method == "omp" and cfg.positive is True:
        out.append("positive: true needs code_method 'lasso' (OMP codes are signed)")
    if cfg.channels not in (1, 3) or isinstance(cfg.channels, bool):
        bad("channels", "1 (grey) or 3 (RGB)")
    for name in ("mean", "std"):
        v = getattr(cfg, name)
        if v is not None and not (isinstance(v, (list, tuple)) and v and all(_is_number(x) for x in v)
                                  and (name == "mean" or all(x > 0 for x in v))):
            bad(name, "null or a list of numbers" + (" > 0" if name == "std" else ""))
    if cfg.class_names is not None and not (isinstance(cfg.class_names, (list, tuple))
                                            and all(isinstance(c, str) for c in cfg.class_names)):
        bad("class_names", "null or a list of strings")
    if cfg.layers is not None and not (isinstance(cfg.layers, (list, tuple)) and cfg.layers
                                       and all(isinstance(p, str) for p in cfg.layers)):
        bad("layers", "null (all points) or a non-empty list of layer names")
    if not isinstance(cfg.extra, dict):
        bad("extra", "a mapping")
    if not isinstance(cfg.device, str) or not _valid_device(cfg.device):
        bad("device", "'cpu', 'cuda' or 'cuda:N'")
    if cfg.dataset == "fashion-mnist" and cfg.split not in ("train", "test"):
        bad("split", "'train' or 'test' for fashion-mnist")
    return out


def _valid_device(name: str) -> bool:
    try:
        return torch.device(name).type in ("cpu", "cuda")
    except (RuntimeError, ValueError):
        return False


def read_config_file(path: str | Path) -> dict:
    """The mapping of options in a YAML or JSON file; a syntax error names the file and the line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"config file {path}, line {e.lineno}, column {e.colno}: invalid JSON ({e.msg})") from None
    else:
        import yaml
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f", line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            what = getattr(e, "problem", None) or str(e).splitlines()[0]
            raise ValueError(f"config file {path}{where}: invalid YAML ({what})") from None
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ValueError(f"config file {path} must hold a mapping of options, got a {type(data).__name__}")
    return data


def load_config(path: str | Path | None = None, **overrides) -> PipelineConfig:
    """Read a YAML or JSON config file (unknown keys are an error) and apply non-None ``overrides``.

    Every option is validated here (:class:`PipelineConfig`), before any stage runs: a ValueError lists
    each invalid one."""
    data: dict = read_config_file(path) if path is not None else {}
    data.update({k: v for k, v in overrides.items() if v is not None})
    valid = {f.name for f in dataclasses.fields(PipelineConfig)}
    unknown = sorted(set(data) - valid)
    if unknown:
        raise ValueError(f"unknown config option(s) {unknown}; valid: {', '.join(sorted(valid))}")
    return PipelineConfig(**data)


def demo_config(arch: str = "resnet", **overrides) -> PipelineConfig:
    """The README demo on Fashion-MNIST test, sized for 2 CPU cores: ``arch="resnet"`` the trained demo
    ResNet, all 16 blocks; ``arch="vit"`` the trained demo ViT, all 4 blocks, gradient × input (SRD is
    written for conv blocks), output in ``gig_demo_vit``.

    ResNet concepts come from 30,000 PFVs per layer — the 10,000 test images, 3 per image by
    contribution — so that the median concept of every layer holds ≥ 10 of them at K = 8·C (layer4:
    2,048 concepts; the paper sampled 50,000): with 5,000 it was ~2.4 at layer4 and most "nearest
    samples" of a concept lay outside its cluster. Layer 4 has 2×2 positions, so 3 per image is close to
    all of them. The ViT keeps the 5,000 images × 1 token it was measured with (README: "Vision transformers and timm models").
    """
    base = dict(model="demo", dataset="fashion-mnist", split="test", concept_images=10000, pfvs_per_image=3,
                explain_images=1000, per_class=100, k_factor=8.0, kmeans_mode="fast",
                gig_batch_size=400, batch_size=250, chunk_images=500, out="gig_demo")
    # gig_batch_size: rows (images × α-points) per F_ab forward. On this 2-core CPU stage 4 of the demo took
    # 86 s at 400 against 125 s at 2,048 (side by side, idle; 112 s with the former one call per class)
    if arch == "vit":
        base.update(model="demo-vit", attribution="gradxinput", out="gig_demo_vit", concept_images=5000, pfvs_per_image=1)
    elif arch != "resnet":
        raise ValueError(f"demo arch must be 'resnet' or 'vit', got {arch!r}")
    base.update({k: v for k, v in overrides.items() if v is not None})
    return PipelineConfig(**base)
