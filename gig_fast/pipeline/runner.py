"""``Pipeline``: ties the stages together, holds the model, data and the run's work folder."""
from __future__ import annotations

import time
import warnings
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ..data import open_dataset
from ..models import FASHION_CLASSES, get_adapter, load_model
from ..run_folder import CODES, GRAPH_FILE, METRICS_FILE, bank_dir, chunk_files, work_dir
from . import distributed as dist
from .config import PipelineConfig
from .errors import error_nodes
from .graph import write_graph
from .run_metrics import collect_metrics
from .stages import attribute, concept_bank, decompose, extract_concepts, pfv_dataset
from .files import save_json
from .workdir import check_numerics, open_work, unreadable_ids

__all__ = ["Pipeline"]


def _dataset_labels(ds) -> np.ndarray:
    if isinstance(ds, torch.utils.data.TensorDataset):
        return ds.tensors[1].numpy().astype(np.int64)
    if hasattr(ds, "samples"):
        return np.array([lab for _, lab in ds.samples], dtype=np.int64)
    if hasattr(ds, "targets"):
        return np.asarray(ds.targets, dtype=np.int64)
    return np.array([int(ds[i][1]) for i in range(len(ds))], dtype=np.int64)


class Pipeline:
    """A GIG run: ``Pipeline(config).run()`` → the output folder (docs/design.md §1), with the stage files,
    ``graph.json`` and ``metrics.json``; :func:`gig_fast.report.publish` then writes its page
    (``report.html``).

    Args:
        config: a :class:`PipelineConfig` (or a dict of its fields).
        model: optional model object (overrides ``config.model``/``weights``).
        dataset: optional dataset yielding ``(image [C, H, W], label)`` (overrides ``config.dataset``).
        class_names: optional names (else from the config / dataset).

    Each stage is also a function of this object: :func:`pfv_dataset`, :func:`extract_concepts`,
    :func:`decompose`, :func:`attribute`, :func:`build_graph`.

    Under ``torchrun`` (``WORLD_SIZE`` > 1 in the environment) the constructor joins the process group
    (:mod:`.distributed`; gloo on the CPU, NCCL on ``cuda:LOCAL_RANK``) and ``rank``/``world`` say which
    share of the chunks this process computes; every rank builds the same ``Pipeline`` from the same
    config. In a single process ``rank = 0``, ``world = 1``.
    """

    def __init__(self, config: PipelineConfig | dict, model: torch.nn.Module | None = None, dataset=None,
                 class_names: list[str] | None = None):
        self.config = config if isinstance(config, PipelineConfig) else PipelineConfig(**config)
        cfg = self.config  # validated as it was made: every option's type, range and name
        if class_names is not None and not (isinstance(class_names, (list, tuple))
                                            and all(isinstance(c, str) for c in class_names)):
            raise ValueError(f"class_names must be a list of strings, got {class_names!r}")
        if dataset is None and cfg.dataset not in ("fashion-mnist", "photos") and not Path(cfg.dataset).is_dir():
            raise FileNotFoundError(f"dataset folder {cfg.dataset} does not exist")  # before loading a model
        self.device = torch.device(cfg.device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError("device 'cuda' requested but CUDA is not available")
        self.rank, self.world, self.device = dist.setup(self.device)
        self.model = (model if model is not None else load_model(cfg.model, cfg.weights))
        self.adapter = get_adapter(self.model, class_token=cfg.class_token)
        self.model.to(self.device)
        self.points = self.adapter.check_points(cfg.layers)
        self.dataset, self.skipped = self._open_dataset(dataset)
        if len(self.dataset) == 0:
            raise ValueError(f"dataset {cfg.dataset!r} is empty")
        self.labels = _dataset_labels(self.dataset)
        self.num_classes = self.adapter.num_classes
        if (self.labels < 0).any() and cfg.class_by == "label":
            raise ValueError(f"dataset {cfg.dataset!r} has unlabelled images: use class_by='prediction'")
        self.class_names = list(class_names or cfg.class_names or getattr(self.dataset, "classes", None)
                                or getattr(self.model, "class_names", None)
                                or (FASHION_CLASSES if cfg.dataset == "fashion-mnist" else
                                    [str(i) for i in range(self.num_classes)]))
        if len(self.class_names) < self.num_classes:
            self.class_names += [str(i) for i in range(len(self.class_names), self.num_classes)]
        if self.labels.max() >= self.num_classes:
            raise ValueError(f"dataset has label {self.labels.max()} but the model has {self.num_classes} classes")
        self.concept_ids, self.explain_ids = self._select_images()
        self.out = Path(cfg.out)
        self.work = work_dir(self.out, cfg.key())
        self.spatial = self._probe()
        # the work folder's record: may pin chunk_images (self.config), lists the unreadable images
        self.record = open_work(self, self._screen_images)
        self._drop_unreadable()
        self._stage1_index: dict = {}
        self._per_class: np.ndarray | None = None

    def _probe(self) -> dict[str, tuple[int, int]]:
        """``{point: (H, W)}`` from one image through the model; a model that cannot take the data's
        images (channels, size) is a ValueError that says so, before any stage runs."""
        for i in self.concept_ids[:10].tolist():  # the first image that loads (unreadable ones are screened later)
            try:
                x0, _ = self.load_images([i])
                break
            except ValueError:
                continue
        else:
            raise ValueError(f"none of the first selected images of {self.config.dataset!r} can be read")
        try:
            with torch.no_grad():
                rec = self.adapter.record(x0, keep="preact")
        except RuntimeError as e:
            want = next((m.in_channels for m in self.model.modules() if isinstance(m, torch.nn.Conv2d)), None)
            hint = (f"the model takes {want}-channel images but the data set's have {x0.shape[1]} (set channels: {want})"
                    if want is not None and want != x0.shape[1] else "check image_size and channels")
            raise ValueError(f"the model cannot run on the images of {self.config.dataset!r} "
                             f"({list(x0.shape[1:])}): {hint} — {str(e).splitlines()[0]}") from None
        return {p: tuple(rec.preact(p).shape[-2:]) for p in self.points}

    def _screen_images(self) -> dict:
        """The selected images the data set cannot decode (its ``check(i)``, e.g. a truncated JPEG):
        ``{"ids": [...], "skipped": [[path, reason], ...]}``; recorded in the work folder when it is made."""
        check = getattr(self.dataset, "check", None)
        if not callable(check):
            return {"ids": [], "skipped": []}
        ids = np.union1d(self.concept_ids, self.explain_ids).tolist()
        bad = [(i, why) for i in tqdm(ids, desc="checking images", disable=not self.config.progress, leave=False)
               if (why := check(i)) is not None]
        if bad:
            warnings.warn(f"{len(bad)} of the {len(ids)} selected images cannot be read and are skipped "
                          f"(listed in metrics.json), e.g. {bad[0][1]}", stacklevel=4)
        samples = getattr(self.dataset, "samples", None)
        return {"ids": [i for i, _ in bad],
                "skipped": [[str(samples[i][0]) if samples else str(i), why] for i, why in bad]}

    def _drop_unreadable(self) -> None:
        """Leave the images the work folder lists as unreadable out of both selections (and list them
        with the data set's own skipped files, for metrics.json)."""
        bad = unreadable_ids(self.record)
        if bad.size:
            self.concept_ids = np.setdiff1d(self.concept_ids, bad)
            self.explain_ids = np.setdiff1d(self.explain_ids, bad)
            self.skipped = self.skipped + [list(s) for s in self.record["unreadable"]["skipped"]]
        if not len(self.concept_ids) or not len(self.explain_ids):
            raise ValueError(f"no readable image left to {'sample concepts' if not len(self.concept_ids) else 'explain'} "
                             f"in {self.config.dataset!r} ({len(self.skipped)} unreadable skipped)")

    # -- data -------------------------------------------------------------------------------------
    def _open_dataset(self, dataset):
        cfg = self.config
        if dataset is not None:
            return dataset, list(getattr(dataset, "skipped", []))
        pre = cfg.preprocessing()
        return open_dataset(cfg.dataset, cfg.split, size=pre["image_size"], channels=pre["channels"],
                            mean=pre["mean"], std=pre["std"], **cfg.image_limits())

    def _select_images(self) -> tuple[np.ndarray, np.ndarray]:
        cfg = self.config
        n = len(self.dataset)
        rng = np.random.default_rng(cfg.seed)
        concept = rng.permutation(n)[:cfg.concept_images]
        if cfg.concept_images > n:
            warnings.warn(f"concept_images={cfg.concept_images} > dataset size {n}; using all {n}", stacklevel=3)
        order = np.random.default_rng(cfg.seed + 1).permutation(n)
        chosen: list[int] = []
        for c in range(self.num_classes):
            chosen += order[self.labels[order] == c][:cfg.per_class].tolist()
        taken = set(chosen)
        for i in order.tolist():
            if len(chosen) >= cfg.explain_images:
                break
            if i not in taken:
                chosen.append(i)
                taken.add(i)
        return np.sort(concept), np.array(sorted(chosen), dtype=np.int64)

    def load_images(self, ids) -> tuple[torch.Tensor, torch.Tensor]:
        """``[B, C, H, W]`` images on the device and ``[B]`` labels for dataset indices ``ids``."""
        ids = np.asarray(ids)
        if isinstance(self.dataset, torch.utils.data.TensorDataset):
            x, y = self.dataset.tensors[0][ids], self.dataset.tensors[1][ids]
        else:
            items = [self.dataset[int(i)] for i in ids]
            x = torch.stack([it[0] for it in items])
            y = torch.tensor([int(it[1]) for it in items])
        return x.to(self.device, torch.float32), y.to(self.device)

    def explained_class(self, x, y):
        """Class explained in stage 1: the label (``class_by='label'``) or None (the prediction)."""
        return y if self.config.class_by == "label" else None

    def stage1_index(self, point: str) -> dict:
        if point not in self._stage1_index:
            from .stages import load_pfvs
            d = load_pfvs(self, point)
            self._stage1_index[point] = {"image": d["image"], "position": d["position"]}
        return self._stage1_index[point]

    def explained_meta(self) -> dict[int, tuple[int, int]]:
        """``{image id: (label, prediction)}`` of every explained image (one entry per image: the
        pipeline itself streams the chunks instead)."""
        meta = {}
        for path in chunk_files(self.work / CODES):
            with np.load(path, allow_pickle=False) as z:
                for i, lab, pred in zip(z["image"].tolist(), z["label"].tolist(), z["prediction"].tolist()):
                    meta[i] = (lab, pred)
        return meta

    @property
    def explained_per_class(self) -> np.ndarray:
        """``[n_classes]`` explained images per class (by label, or by prediction with ``class_by``);
        computed once, after stage 3 for predictions (streamed over the code chunks)."""
        if self.config.class_by == "label":
            return np.bincount(self.labels[self.explain_ids], minlength=self.num_classes)
        if self._per_class is None:
            counts = np.zeros(self.num_classes, dtype=np.int64)
            for path in chunk_files(self.work / CODES):
                with np.load(path, allow_pickle=False) as z:
                    counts += np.bincount(z["prediction"], minlength=self.num_classes)
            self._per_class = counts
        return self._per_class

    # -- run --------------------------------------------------------------------------------------
    def _check_work(self) -> None:
        """Before computing in the work folder: the same backend and device type as when it was made."""
        check_numerics(self, self.record)

    def run(self) -> Path:
        """Run (or resume) every stage; write the concept banks, ``graph.json`` (with the per-image store)
        and ``metrics.json``. The page is a step of its own: :func:`gig_fast.report.publish` (``gig-fast
        run`` and ``gig-fast demo`` take it).

        Under ``torchrun`` every rank calls it: the chunks are shared out, rank 0 writes the shared
        files, and every rank returns once they exist.

        Returns the output folder.
        """
        from ..ops import use_backend
        import contextlib

        self._check_work()
        timings = {}
        ctx = use_backend(self.config.backend) if self.config.backend else contextlib.nullcontext()
        with ctx:
            for name, stage in (("stage1_pfv_dataset", pfv_dataset), ("stage2_concepts", extract_concepts),
                                ("stage3_decomposition", decompose), ("stage4_gig", attribute)):
                t0 = time.perf_counter()
                stage(self)
                timings[name] = round(time.perf_counter() - t0, 2)
            if self.config.error_nodes:  # each layer's reconstruction residual as a node (pipeline/errors.py)
                t0 = time.perf_counter()
                error_nodes(self)
                timings["stage4_error_nodes"] = round(time.perf_counter() - t0, 2)
            if dist.is_main():
                self._write_outputs(timings)
        dist.barrier()  # every rank returns with the outputs written
        return self.out

    def _write_outputs(self, timings: dict) -> None:
        """The concept banks (``concepts/<layer>/``), ``graph.json`` with the per-image store
        (``store/``) and ``metrics.json``, from the stage files."""
        t0 = time.perf_counter()
        for point in self.points:  # the concept banks first: graph.json marks a finished output folder
            concept_bank(self, point).save(bank_dir(self.out, point))
        write_graph(self, self.out / GRAPH_FILE)  # and the per-image store beside it
        timings["graph"] = round(time.perf_counter() - t0, 2)
        save_json(self.out / METRICS_FILE, collect_metrics(self, timings))

