"""Pipeline configuration: one dataclass, read from YAML/JSON, overridable by flags, hashed for resume."""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..ops.sparse_code import DEFAULT_LAM_REL

__all__ = ["PipelineConfig", "load_config", "demo_config"]

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

AUTOCAST = {None: None, "bf16": torch.bfloat16, "fp16": torch.float16}  # gig_autocast → torch dtype

# Fields that do not change any result: excluded from the run key, so changing them resumes.
_NOT_HASHED = {"out", "device", "backend", "progress", "batch_size", "gig_batch_size", "chunk_images",
               "report_images", "report_crops"}


# Bumped when the code computes different results (or work files) from the same config, so that a run
# never resumes from work files of an older method: 2 = β the net BN shift (bn3 + downsample BN), stage-4
# targets widened to the shared concepts, per-image graphs of the image's own concepts.
RESULTS_VERSION = 2


@dataclass
class PipelineConfig:
    """Everything a run depends on (DESIGN.md §1). Defaults follow the paper where it fixes them.

    Model/data: ``model`` (``demo``, ``efficientnet-lite0`` or a torchvision ResNet name), ``weights``
    (file or torchvision name), ``dataset`` (``fashion-mnist``, ``photos`` — the unlabelled photos that
    ship offline, explained for their predicted class — or an image folder), ``split``,
    ``image_size``/``channels``/``mean``/``std`` for folders and photos (``mean``/``std`` None: the
    model's own preprocessing, else ImageNet's), ``class_names`` (optional).
    Stage 1: ``concept_images`` (images sampled for the PFV–iERF dataset), ``pfvs_per_image``,
    ``attribution`` (``srd`` | ``gradxinput``), ``ierf_dtype``, ``store_ierf`` (False: contributions
    only, no iERF maps — for benchmarks).
    Stage 2: ``layers`` (None = all points), ``k_factor`` (K = k_factor·C) or ``k`` (fixed),
    ``kmeans_mode`` (passed to the concept extractor), ``representatives`` (samples kept per concept;
    10, the paper's "top-10 nearest embeddings").
    Stage 3: ``explain_images`` (≥ ``per_class`` of each class), ``lam`` (λ relative to λ_max; None =
    the coder's default), ``code_method``, ``positive``.
    Stage 4: ``gig_steps``, ``gig_rule``, ``gig_tolerance`` (completeness bar of the adaptive
    refinement, None = the fixed rule), ``gig_autocast`` (None | ``bf16`` | ``fp16``: F_ab in low
    precision; both see :func:`gig_fast.gig`), ``top_concepts`` (per class per layer), ``top_shared``
    (per pair of classes), ``class_by`` (``label`` | ``prediction``), ``class_probability``.
    Execution: ``seed``, ``device``, ``backend``, ``batch_size``, ``gig_batch_size``,
    ``chunk_images`` (checkpoint granularity), ``out``, ``progress``.
    Report (``report.html``, not hashed): ``report_images`` (explained images embedded with their
    picture and concept heat-maps for the image view), ``report_crops`` (nearest samples per concept).
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
    gig_steps: int = 16
    gig_rule: str = "gausslegendre"
    gig_tolerance: float | None = 0.01
    gig_autocast: str | None = None
    top_concepts: int = 5
    top_shared: int = 3
    class_by: str = "label"
    class_probability: bool = True
    seed: int = 0
    device: str = "cpu"
    backend: str | None = None
    batch_size: int = 256
    gig_batch_size: int | None = None
    chunk_images: int = 500
    out: str = "gig_out"
    progress: bool = True
    report_images: int = 20
    report_crops: int = 10
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.attribution not in ("srd", "gradxinput"):
            raise ValueError(f"attribution must be 'srd' or 'gradxinput', got {self.attribution!r}")
        if self.class_by not in ("label", "prediction"):
            raise ValueError(f"class_by must be 'label' or 'prediction', got {self.class_by!r}")
        for name in ("concept_images", "explain_images", "pfvs_per_image", "gig_steps", "top_concepts",
                     "chunk_images", "batch_size"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be ≥ 1, got {getattr(self, name)}")
        if self.gig_tolerance is not None and not float(self.gig_tolerance) > 0:
            raise ValueError(f"gig_tolerance must be None or > 0, got {self.gig_tolerance!r}")
        if self.gig_autocast not in AUTOCAST:
            raise ValueError(f"gig_autocast must be one of {sorted(k for k in AUTOCAST if k)} or None, "
                             f"got {self.gig_autocast!r}")
        if self.k is None and self.k_factor <= 0:
            raise ValueError(f"k_factor must be > 0, got {self.k_factor}")
        if self.layers is not None and isinstance(self.layers, str):
            self.layers = [s.strip() for s in self.layers.split(",") if s.strip()]
        self.mean = tuple(self.mean) if self.mean is not None else None
        self.std = tuple(self.std) if self.std is not None else None

    def preprocessing(self) -> dict:
        """``{image_size, channels, mean, std}`` for image files: the config's, with ``mean``/``std``
        defaulting to the model's own normalisation (EfficientNet-Lite0) or ImageNet's."""
        from ..models.efficientnet import EFFICIENTNET_LITE0_PREPROCESS

        own = EFFICIENTNET_LITE0_PREPROCESS if self.model == "efficientnet-lite0" else {}
        return {"image_size": self.image_size, "channels": self.channels,
                "mean": self.mean or own.get("mean", IMAGENET_MEAN), "std": self.std or own.get("std", IMAGENET_STD)}

    def gig_options(self) -> dict:
        """The keyword arguments of :func:`gig_fast.gig` that this configuration sets (stage 4's rule)."""
        return {"steps": self.gig_steps, "rule": self.gig_rule, "batch_size": self.gig_batch_size,
                "autocast": AUTOCAST[self.gig_autocast], "tolerance": self.gig_tolerance}

    def code_options(self) -> dict:
        """The keyword arguments of :func:`gig_fast.ops.sparse_code` that this configuration sets (stage 3)."""
        return {"lam": self.lam, "method": self.code_method, "positive": self.positive}

    def key(self) -> str:
        """Hash of every field that changes results (the run key for resuming)."""
        d = {k: v for k, v in dataclasses.asdict(self).items() if k not in _NOT_HASHED}
        d["results_version"] = RESULTS_VERSION
        if d["lam"] is None:  # the coder's default λ_rel: a run made under another default is another run
            d["lam"] = DEFAULT_LAM_REL
        for name in ("gig_autocast", "gig_tolerance"):  # added later: None is what runs made before them did,
            if d[name] is None:                          # and those runs keep their key
                del d[name]
        return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def replace(self, **kw) -> "PipelineConfig":
        return dataclasses.replace(self, **kw)


def load_config(path: str | Path | None = None, **overrides) -> PipelineConfig:
    """Read a YAML or JSON config file (unknown keys are an error) and apply non-None ``overrides``."""
    data: dict = {}
    if path is not None:
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"config file {path} does not exist")
        text = path.read_text()
        if path.suffix.lower() == ".json":
            data = json.loads(text)
        else:
            import yaml
            data = yaml.safe_load(text) or {}
        if not isinstance(data, dict):
            raise ValueError(f"config file {path} must hold a mapping of options")
    data.update({k: v for k, v in overrides.items() if v is not None})
    valid = {f.name for f in dataclasses.fields(PipelineConfig)}
    unknown = sorted(set(data) - valid)
    if unknown:
        raise ValueError(f"unknown config option(s) {unknown}; valid: {', '.join(sorted(valid))}")
    return PipelineConfig(**data)


def demo_config(**overrides) -> PipelineConfig:
    """The README demo: the trained demo net on Fashion-MNIST test, all 16 blocks (sized for 2 CPU cores).

    Concepts come from 30,000 PFVs per layer — the 10,000 test images, 3 per image by contribution —
    so that the median concept of every layer holds ≥ 10 of them at K = 8·C (layer4: 2,048 concepts;
    the paper sampled 50,000): with 5,000 it was ~2.4 at layer4 and most "nearest samples" of a
    concept lay outside its cluster. Layer 4 has 2×2 positions, so 3 per image is close to all of them.
    """
    base = dict(model="demo", dataset="fashion-mnist", split="test", concept_images=10000, pfvs_per_image=3,
                explain_images=1000, per_class=100, k_factor=8.0, gig_steps=8, kmeans_mode="fast",
                gig_batch_size=2048, batch_size=250, chunk_images=500, out="gig_demo")
    base.update({k: v for k, v in overrides.items() if v is not None})
    return PipelineConfig(**base)
