"""``Run``: the public way into a finished run's output folder (the library-backend use).

    run = gig_fast.Run.open("gig_demo")
    run.classes[7], run.layers[-2]                    # ClassInfo / LayerInfo
    run.class_graph("Sneaker")                        # Graph (nodes, edges)
    run.pair_graph("Sneaker", "Ankle boot")           # PairGraph (shared concepts)
    run.concept("layer4.2", 17)                       # ConceptCard (vector, samples with iERF crops)
    run.top_images("layer4.2", 17, n=20)              # [ConceptUse]: which images use it most, where
    run.image_graph(123)                              # ImageGraph of an explained image (the store)
    run.explain(x), run.decompose(x, "layer4.2")      # a new image against the stored concepts
    run.intervene(x, [("layer3.2", 117, 0.0)])        # Intervention: remove a concept, see what changes
    run.bank("layer4.2")                              # ConceptBank (V, β, settings): reuse elsewhere

What it reads (``docs/graph_schema.md``): ``graph.json`` (class and pair graphs, concept facts),
``metrics.json``, the concept banks ``concepts/<layer>/``, the per-image store ``store/``, and for
pictures and heat-maps the run's work folder ``work-<run_key>/`` (stage-1 samples with their iERFs,
stage-3 codes). The model and the data set are opened from the run's configuration when a method
needs them (or pass the objects the run was given: ``Run.open(path, model=…, dataset=…)``).
"""
from __future__ import annotations

import io
import os
import threading
import warnings
from functools import cached_property
from pathlib import Path

import numpy as np
import torch

from ..concepts import ConceptBank
from ..data import load_image, open_dataset
from ..export import FORMATS, GraphContext, merge_graphs, neuronpedia_graph
from ..explorer.pictures import display_rgb, ierf_crop, png_bytes
from ..gig import ClassTarget, ConceptTarget, gig
from ..image_store import ImageStore
from ..interventions import Intervention, intervene
from ..models import DEMO_MEAN, DEMO_STD, get_adapter, load_model
from ..models.transformer import TransformerAdapter, position_grid
from ..ops import sparse_reconstruct
from ..ops.sparse_code import SparseCodeConvergenceWarning
from ..pipeline.config import PipelineConfig
from ..pipeline.errors import reconstruction, transition_errors
from ..pipeline.sample_index import SampleIndex, layer_index, load_layer_index, open_sample_index
from ..pipeline.samples import nearest_rows, stage1_files, stage1_samples
from ..pipeline.graph import READABLE_VERSIONS, error_entry, image_layer_graph
from ..pipeline.selection import CLASSES, image_top_concepts
from ..pipeline.files import load_json, load_npz, npz_member, npz_rows, save_json
from ..run_folder import (CODES, CONFIG_FILE, GRAPH_FILE, METRICS_FILE, STORE_DIR, bank_dir, chunk_files, concept_file,
                          work_dir)
from .types import (ClassInfo, ClassUse, ConceptCard, ConceptSample, ConceptUse, Decomposition, Edge, ErrorNode,
                    Explanation, Graph, ImageGraph, LayerInfo, Metrics, Node, PairGraph)

__all__ = ["Run", "NotFoundError"]


def _version() -> str:
    from .. import __version__  # the package's, set once it has finished importing

    return __version__


class _Upload(io.BytesIO):
    """The bytes of an uploaded image, named so in error messages (PIL quotes the file object)."""

    def __str__(self) -> str:
        return f"(an upload of {len(self.getbuffer())} bytes)"

    __repr__ = __str__


class NotFoundError(ValueError):
    """An unknown class, layer, concept or image (a ``ValueError``; the server answers 404)."""


class Run:
    """A finished run, opened read-only with :meth:`open`. Attributes: ``path`` (the output folder),
    ``key`` (run key), ``work`` (its work folder), ``config`` (:class:`~gig_fast.pipeline.PipelineConfig`),
    ``layers`` (:class:`LayerInfo` in forward order, then ``"classes"``), ``classes``
    (:class:`ClassInfo` by id), ``settings`` (graph settings: ``top_concepts``, ``class_by`` …)."""

    def __init__(self, path: Path, graph: dict, *, model=None, dataset=None, device: str = "cpu"):
        self.path = path
        self._graph = graph
        self.key: str = graph["run_key"]
        self.work = work_dir(path, self.key)
        stored = self.work / CONFIG_FILE
        if not stored.is_file():
            raise FileNotFoundError(f"{stored} does not exist: {path} is not a complete run folder")
        self.config = PipelineConfig(**load_json(stored)["config"])
        self.settings: dict = dict(graph["settings"])
        self.model_info: dict = dict(graph["model"])
        self.layers = [LayerInfo(lay["name"], int(lay["n_concepts"]), lay.get("channels"),
                                 tuple(lay["spatial"]) if lay.get("spatial") else None) for lay in graph["layers"]]
        self.classes = [ClassInfo(int(c["id"]), c["name"], int(c.get("n_images", 0))) for c in graph["classes"]]
        self.device = torch.device(device)
        self._model, self._dataset = model, dataset
        self._banks: dict[str, ConceptBank] = {}
        self._codes_index: dict[int, Path] | None = None
        self._token_grid: tuple[int, tuple[int, int]] | None = None
        # Held while the model runs (explain, decompose, recording a patch grid): its hooks are per model.
        self.model_lock = threading.RLock()
        self._index_meta, self.index_missing = open_sample_index(path, self.key)  # concept_samples/ or why not
        self._sample_index: dict[str, SampleIndex] = {}  # per layer: ~K·k·41 bytes (0.8 MB at K = 2,048, k = 10)
        self._index_locks = {lay.name: threading.RLock() for lay in self.layers}
        self._stage1: tuple[list[Path], np.ndarray] | None = None

    # -- opening -----------------------------------------------------------------------------------
    @classmethod
    def open(cls, path: str | os.PathLike, *, model: torch.nn.Module | None = None, dataset=None,
             device: str = "cpu") -> "Run":
        """Open the output folder of a finished run (``gig-fast run`` / ``demo`` / ``Pipeline.run()``).

        Args:
            path: the folder holding ``graph.json``.
            model, dataset: the objects the run was given, when it was not run from names in its
                configuration (else opened from the configuration on first use).
            device: where :meth:`explain` / :meth:`decompose` run the model.
        Raises:
            FileNotFoundError: no ``graph.json`` (or work folder) there.
            ValueError: ``graph.json`` is not a gig_fast graph.
        """
        path = Path(path)
        gpath = path / GRAPH_FILE
        if not gpath.is_file():
            raise FileNotFoundError(f"no graph.json in {path}; is it the output folder of a finished run?")
        try:
            graph = load_json(gpath)
        except ValueError as e:
            raise ValueError(f"{gpath} is not valid JSON: {e}") from None
        if not isinstance(graph, dict) or graph.get("schema") != "gig_fast.graph":
            raise ValueError(f"{gpath} is not a gig_fast graph (schema 'gig_fast.graph')")
        if graph.get("version", 1) not in READABLE_VERSIONS:
            raise ValueError(f"{gpath} is gig_fast.graph version {graph.get('version')}; this gig_fast reads versions "
                             f"{', '.join(map(str, READABLE_VERSIONS))} (a newer gig_fast wrote it)")
        return cls(path, graph, model=model, dataset=dataset, device=device)

    # -- names -------------------------------------------------------------------------------------
    @property
    def points(self) -> list[str]:
        """The analysed layers' names in forward order (without ``"classes"``)."""
        return [lay.name for lay in self.layers if lay.name != CLASSES]

    def layer(self, name: str) -> LayerInfo:
        """The :class:`LayerInfo` of an analysed layer (``ValueError`` listing the valid names)."""
        for lay in self.layers:
            if lay.name == name and name != CLASSES:
                return lay
        raise NotFoundError(f"unknown layer {name!r}; valid: {', '.join(self.points)}")

    def class_id(self, name_or_id: int | str) -> int:
        """A class id from its name or id (``ValueError`` naming the valid ones)."""
        if isinstance(name_or_id, (int, np.integer)) and 0 <= int(name_or_id) < len(self.classes):
            return int(name_or_id)
        for c in self.classes:
            if c.name == name_or_id:
                return c.id
        if isinstance(name_or_id, str) and name_or_id.isdigit() and int(name_or_id) < len(self.classes):
            return int(name_or_id)
        shown = ", ".join(c.name for c in self.classes[:20]) + (" …" if len(self.classes) > 20 else "")
        raise NotFoundError(f"unknown class {name_or_id!r}; valid: ids 0-{len(self.classes) - 1} or names ({shown})")

    def _concept_id(self, layer: str, concept: int) -> int:
        K = self.layer(layer).n_concepts
        if not isinstance(concept, (int, np.integer)) or not 0 <= int(concept) < K:
            raise NotFoundError(f"concept {concept!r} is out of range for {layer} (K = {K})")
        return int(concept)

    # -- concepts ----------------------------------------------------------------------------------
    def bank(self, layer: str) -> ConceptBank:
        """The :class:`~gig_fast.concepts.ConceptBank` of ``layer`` (``concepts/<layer>/``; runs made
        before banks existed: built from the work folder)."""
        self.layer(layer)
        if layer not in self._banks:
            folder = bank_dir(self.path, layer)
            if (folder / "bank.json").is_file():
                bank = ConceptBank.load(folder)
                if bank.run_key != self.key:
                    raise ValueError(f"the concept bank {folder} belongs to run {bank.run_key}, not {self.key}")
            else:
                c = load_npz(concept_file(self.work, layer))
                bank = ConceptBank(layer, torch.from_numpy(c["V"]), torch.from_numpy(c["beta"]),
                                   torch.from_numpy(c["sizes"]), coding=self.config.code_options(), run_key=self.key)
            self._banks[layer] = bank
        return self._banks[layer]

    def concept(self, layer: str, concept: int, samples: int = 10, pictures: bool = True) -> ConceptCard:
        """The card of one concept: vector, cluster size, its ``samples`` nearest stage-1 PFVs (with
        iERF, image and crop arrays when ``pictures`` and the run kept iERFs) and the classes using it."""
        q = self._concept_id(layer, concept)
        bank = self.bank(layer)
        facts = self._graph["concepts"][layer][q]
        uses = []
        for cid, g in self._graph["class_graphs"].items():
            for rank, n in enumerate(g["nodes"].get(layer, []), 1):
                if n["concept"] == q:
                    uses.append(ClassUse(int(cid), rank, float(n["normalized"])))
        near = self.concept_samples(layer, [q], samples, pictures=pictures)[q] if samples > 0 else []
        return ConceptCard(layer, q, int(facts["size"]), float(facts["norm"]), bank.V[q].clone(), near, uses)

    def concept_samples(self, layer: str, concepts: list[int], k: int = 10,
                        pictures: bool = True) -> dict[int, list[ConceptSample]]:
        """Per concept its ``k`` stage-1 PFVs nearest in cosine to the concept vector (``x − β``
        against ``v_q``; paper Fig. 1 "top 10 nearest embeddings"), nearest first (:meth:`nearest_rows`).
        ``pictures``: fill ``ierf``, ``picture`` and ``crop``."""
        qs = sorted({self._concept_id(layer, q) for q in concepts})
        if not qs:
            return {}
        rows, cos, member = self.nearest_rows(layer, qs, k)
        meta, maps = stage1_samples(self.work, layer, rows.ravel(), files=self._stage1_files())
        maps = maps if pictures else {}
        images = self.display_images([meta[r][0] for r in maps]) if maps else {}
        out: dict[int, list[ConceptSample]] = {}
        for qi, q in enumerate(qs):
            items = []
            for r, cv, mem in zip(rows[qi].tolist(), cos[qi].tolist(), member[qi].tolist()):
                img, pos, lab = meta[r]
                ierf = maps.get(r)
                pic = images.get(img) if ierf is not None else None
                crop = ierf_crop(pic, ierf) if pic is not None else None
                items.append(ConceptSample(img, pos, lab, float(cv), bool(mem),
                                           None if ierf is None else ierf.astype(np.float32), pic, crop))
            out[q] = items
        return out

    # -- the nearest samples, from concept_samples/ when the run has it -----------------------------
    def _stage1_files(self) -> tuple[list[Path], np.ndarray]:
        if self._stage1 is None:
            self._stage1 = stage1_files(self.work)
        return self._stage1

    def sample_index(self, layer: str, k: int = 1) -> SampleIndex | None:
        """``layer``'s nearest samples of every concept (at least ``k`` each): from ``concept_samples/``
        (written when the run ended), or built in memory by :meth:`build_sample_index`; None when
        neither has them (then :meth:`nearest_rows` streams the stage-1 files)."""
        idx = self._sample_index.get(layer)
        if idx is None and self._index_meta is not None and layer in self._index_meta["layers"]:
            with self._index_locks[layer]:
                idx = self._sample_index.get(layer) or load_layer_index(self.path, layer)
                self._sample_index[layer] = idx
        return idx if idx is not None and idx.k >= k else None

    def reload_sample_index(self) -> None:
        """Read ``concept_samples/`` again (after :func:`~gig_fast.pipeline.sample_index.write_sample_index`)."""
        self._index_meta, self.index_missing = open_sample_index(self.path, self.key)
        self._sample_index.clear()

    def build_sample_index(self, layer: str, k: int | None = None) -> SampleIndex:
        """Build ``layer``'s nearest samples of every concept in memory (``k``: default the run's
        ``report_crops``), for a run that has no ``concept_samples/``: one pass over its stage-1 files
        (seconds per layer), after which cards and views of ``layer`` read it. Top-1 crops are drawn
        when asked for."""
        k = max(int(k or self.config.report_crops), 1)
        with self._index_locks[self.layer(layer).name]:
            idx = self._sample_index.get(layer)
            if idx is None or idx.k < k:
                idx = layer_index(self, layer, k, crops=False)
                self._sample_index[layer] = idx
        return idx

    def nearest_rows(self, layer: str, concepts: list[int], k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(rows [Q, k] global stage-1 rows, cosines [Q, k], member [Q, k])`` of ``concepts``: read from
        the sample index when it holds ``k`` per concept, else one pass over the stage-1 files."""
        qs = [self._concept_id(layer, q) for q in concepts]
        idx = self.sample_index(layer, k)
        if idx is not None:
            return idx.rows[qs, :k], idx.cosine[qs, :k], idx.member[qs, :k]
        bank = self.bank(layer)
        labels = torch.from_numpy(np.array(npz_member(concept_file(self.work, layer), "labels")))
        return nearest_rows(self.work, layer, bank.V, bank.beta, labels, qs, k)

    def sample_meta(self, layer: str, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(image, position, label)`` int64 arrays shaped as ``rows`` (global stage-1 rows of ``layer``)."""
        meta, _ = stage1_samples(self.work, layer, rows, files=self._stage1_files())
        rows = np.asarray(rows, dtype=np.int64)
        table = np.array([meta[r] for r in rows.ravel().tolist()], dtype=np.int64).reshape(*rows.shape, 3)
        return table[..., 0], table[..., 1], table[..., 2]

    def sample_crop_pngs(self, layer: str, rows) -> dict[int, bytes]:
        """``{row: PNG}``: the iERF-with-context crop of each stage-1 sample (palette PNG, as the page
        embeds it); empty when the run kept no iERFs."""
        meta, maps = stage1_samples(self.work, layer, rows, files=self._stage1_files())
        if not maps:
            return {}
        pics = self.display_images([meta[r][0] for r in maps])
        return {r: png_bytes(ierf_crop(pics[meta[r][0]], m), palette=True) for r, m in maps.items()}

    # -- graphs ------------------------------------------------------------------------------------
    def class_graph(self, c: int | str) -> Graph:
        """The class's graph (top concepts per layer, GIG edges between them; ``graph.json``). A class
        without explained images has an empty graph."""
        g = self._graph["class_graphs"].get(str(self.class_id(c)))
        return Graph.from_dict(g) if g is not None else Graph([], [])

    def pair_graph(self, c1: int | str, c2: int | str) -> PairGraph:
        """The concepts shared by two classes and the edges that wire them (``graph.json``'s pair graph;
        empty when either class has no explained images or the pair is not among the run's class pairs:
        each class with its ``pair_neighbours`` most similar classes)."""
        a, b = sorted((self.class_id(c1), self.class_id(c2)))
        if a == b:
            raise ValueError("a class cannot be paired with itself")
        pg = self._graph["pair_graphs"].get(f"{a}-{b}")  # graph.json keeps a sample, the store every pair
        if pg is None and self.store is not None:
            pg = self.store.pair_graph(a, b)
        return PairGraph.from_dict(pg or {"classes": [a, b]})

    @cached_property
    def store(self) -> ImageStore | None:
        """The per-image store (``store/``), or None for a run written before it existed."""
        folder = self.path / self._graph.get("store", STORE_DIR)
        if not (folder / "store.json").is_file():
            return None
        store = ImageStore(folder)
        if store.info.run_key != self.key:
            raise ValueError(f"the per-image store {folder} belongs to run {store.info.run_key}, not {self.key}")
        return store

    @property
    def images_total(self) -> int:
        """Explained images of the run."""
        return int(self._graph.get("images_total", len(self._graph["images"])))

    def image_ids(self, class_id: int | str | None = None, offset: int = 0, limit: int | None = None) -> list[int]:
        """Explained image ids in ascending order (of one explained class when ``class_id`` is given)."""
        if self.store is None:
            ids = [g["id"] for g in self._graph["images"]
                   if class_id is None or g["class"] == self.class_id(class_id)]
        else:
            filters = None if class_id is None else [("class", "=", self.class_id(class_id))]
            ids = self.store.read("images", filters, columns=["image"]).column("image").to_pylist()
        return ids[offset: None if limit is None else offset + limit]

    def image_graph(self, image: int) -> ImageGraph:
        """The graph of an explained image (by dataset index), from the store (``ValueError`` when the
        image was not explained)."""
        if self.store is None:
            for g in self._graph["images"]:
                if g["id"] == int(image):
                    return ImageGraph(g["id"], g["label"], g["prediction"], g["class"], Graph.from_dict(g))
            raise NotFoundError(f"image {image} is not among the explained images of this run")
        meta, nodes, edges = self.store.image_rows(int(image))
        if meta.num_rows == 0:
            raise NotFoundError(f"image {image} is not among the {self.images_total} explained images of this run")
        m = meta.to_pylist()[0]
        by_layer: dict[str, list] = {}
        for n in sorted(nodes.to_pylist(), key=lambda n: n["rank"]):
            by_layer.setdefault(n["layer"], []).append({"concept": n["concept"], "score": n["score"]})
        order = [lay.name for lay in reversed(self.layers) if lay.name in by_layer]  # top-down, as graph.json
        graph = Graph.from_dict({"nodes": {k: by_layer[k] for k in order}, "errors": self.store.image_errors(int(image)),
                                 "edges": [{"source": [e["source_layer"], e["source"]], "target": [e["target_layer"], e["target"]],
                                            "weight": e["weight"], "normalized": e["normalized"]} for e in edges.to_pylist()]})
        return ImageGraph(m["image"], m["label"], m["prediction"], m["class"], graph)

    def top_images(self, layer: str, concept: int, n: int = 20) -> list[ConceptUse]:
        """The ``n`` explained images that use ``concept`` of ``layer`` most (largest Σ of its code
        values), best first, with where (peak position). ``n`` ≤ the store's ``rank_depth`` (100)."""
        q = self._concept_id(layer, concept)
        if self.store is None:
            raise ValueError("this run has no per-image store (written before it existed); rerun `gig-fast run`")
        if not 1 <= int(n) <= self.store.info.rank_depth:
            raise ValueError(f"n must be in 1..{self.store.info.rank_depth}, got {n}")
        rows = self.store.top_images(layer, q, int(n)).to_pylist()
        return [ConceptUse(r["rank"], r["image"], r["class"], r["usage"], r["peak"], r["peak_position"], r["active"])
                for r in rows]

    # -- per-image pictures from the work files ---------------------------------------------------
    def _explained_index(self) -> dict[int, tuple[Path, int]]:
        """``{image id: (stage-3 file, row)}`` of every explained image (read once)."""
        if self._codes_index is None:  # built whole, then published: another thread never sees a part
            index = {}
            for f in chunk_files(self.work / CODES):
                for r, i in enumerate(npz_member(f, "image").tolist()):
                    index[int(i)] = (f, r)
            self._codes_index = index
        return self._codes_index

    def _codes_file(self, image: int) -> tuple[Path, int]:
        index = self._explained_index()
        if int(image) not in index:
            raise NotFoundError(f"image {image} is not among the explained images of this run")
        return index[int(image)]

    def stored_codes(self, image: int, layer: str) -> Decomposition:
        """The stage-3 decomposition of an explained image at ``layer`` (as :meth:`decompose` computes
        it for a new image; ``rel_l2`` is NaN: the run keeps only its per-layer mean)."""
        lay = self.layer(layer)
        path, r = self._codes_file(image)
        # one row of the chunk's arrays (a memory map): the whole chunk is ~25 MB per layer on the demo
        idx, val = (torch.from_numpy(npz_rows(path, f"{layer}|{key}", [r])[0]) for key in ("idx", "val"))
        return Decomposition(layer, lay.spatial, idx, val, torch.full((idx.shape[0],), float("nan")), lay.n_concepts,
                             *self.position_grid(layer))

    def position_grid(self, layer: str) -> tuple[int, tuple[int, int]]:
        """``(prefix, (H, W))``: how ``layer``'s positions are drawn — a transformer's patch grid after its
        prefix (class) token, else no prefix and the layer's spatial grid."""
        lay = self.layer(layer)
        if not isinstance(self.adapter, TransformerAdapter):
            return 0, tuple(lay.spatial)
        if self._token_grid is None:  # the patch grid follows from an input's size: record one image
            x, _ = self.load_dataset_images([min(self._explained_index())])
            with self.model_lock:
                self.adapter.record(x.to(self.device))
                self._token_grid = position_grid(self.adapter, layer, lay.spatial)
        return self._token_grid

    def heat_map(self, image: int, layer: str, concept: int) -> np.ndarray:
        """float32 ``[H, W]``: the code value of ``concept`` at each position of ``layer`` in an explained
        image, on the layer's drawing grid (:meth:`position_grid`)."""
        return self.stored_codes(image, layer).heat_map(self._concept_id(layer, concept))

    def display_images(self, ids) -> dict[int, np.ndarray]:
        """``{id: float [H, W, 3] in [0, 1]}`` dataset images for display (min–max stretched)."""
        ids = sorted(set(int(i) for i in ids))
        out = {}
        for i in range(0, len(ids), 256):
            part = ids[i:i + 256]
            x, _ = self.load_dataset_images(part)
            out.update({img: display_rgb(x[j]) for j, img in enumerate(part)})
        return out

    # -- model and data ----------------------------------------------------------------------------
    @property
    def model(self) -> torch.nn.Module:
        """The run's model (loaded from its configuration on first use), on ``device``, eval mode."""
        if self._model is None:
            self._model = load_model(self.config.model, self.config.weights)
        return self._model.to(self.device).eval()

    @cached_property
    def adapter(self):
        """The model's adapter (analysed points, F_ab slices), as the run built it."""
        return get_adapter(self.model, class_token=self.config.class_token)

    @property
    def dataset(self):
        """The run's data set (opened from its configuration on first use)."""
        if self._dataset is None:
            pre = self.config.preprocessing()
            self._dataset, _ = open_dataset(self.config.dataset, self.config.split, size=pre["image_size"],
                                            channels=pre["channels"], mean=pre["mean"], std=pre["std"],
                                            **self.config.image_limits())
        return self._dataset

    def load_dataset_images(self, ids) -> tuple[torch.Tensor, torch.Tensor]:
        """``[B, C, H, W]`` preprocessed images and ``[B]`` labels for dataset indices ``ids``."""
        ids = np.asarray(ids, dtype=np.int64)
        ds = self.dataset
        if len(ids) and (ids.min() < 0 or ids.max() >= len(ds)):
            raise ValueError(f"image ids must be in 0..{len(ds) - 1}")
        if isinstance(ds, torch.utils.data.TensorDataset):
            return ds.tensors[0][ids].float(), ds.tensors[1][ids]
        items = [ds[int(i)] for i in ids]
        return torch.stack([it[0] for it in items]).float(), torch.tensor([int(it[1]) for it in items])

    def load_image(self, source: str | os.PathLike | bytes) -> torch.Tensor:
        """A new image preprocessed as the run's model expects: ``[C, H, W]`` float32.

        Args:
            source: an image file, its bytes (an upload), or ``photo:NAME`` for a photo that ships offline.
        Raises:
            ValueError: the bytes or file are not a readable image, or one larger than the run's
                ``max_image_pixels`` (or an unknown photo name).
            FileNotFoundError: no such file.
        """
        cfg = self.config
        if cfg.dataset == "fashion-mnist":
            kw = dict(size=28, channels=1, mean=(DEMO_MEAN,), std=(DEMO_STD,))
        else:
            pre = cfg.preprocessing()
            kw = dict(size=pre["image_size"], channels=pre["channels"], mean=pre["mean"], std=pre["std"])
        if isinstance(source, str) and source.startswith("photo:"):
            from ..data import OfflinePhotos
            return OfflinePhotos([source[len("photo:"):]], **kw)[0][0]
        if not isinstance(source, (bytes, bytearray)):
            if not Path(source).is_file():
                raise FileNotFoundError(f"cannot read image {source}: no such file")
            return load_image(source, **kw, **cfg.image_limits())  # huge images refused or reduced, by option
        try:
            return load_image(_Upload(source), **kw, **cfg.image_limits())
        except ValueError as e:
            raise ValueError(f"the uploaded bytes are not a readable image: {e}") from None

    def _check_image(self, image: torch.Tensor) -> torch.Tensor:
        if not isinstance(image, torch.Tensor) or image.dim() not in (3, 4) or (image.dim() == 4 and image.shape[0] != 1):
            raise ValueError(f"image must be a [C, H, W] (or [1, C, H, W]) tensor, got {getattr(image, 'shape', type(image))}")
        x = image[None] if image.dim() == 3 else image
        if not torch.isfinite(x).all():
            raise ValueError("image has non-finite values")
        return x.to(self.device, torch.float32)

    # -- a new image against the stored concepts ---------------------------------------------------
    def _record(self, image: torch.Tensor):
        x = self._check_image(image)
        try:
            with torch.no_grad():
                return self.adapter.record(x, keep="preact")
        except RuntimeError as e:  # wrong channels or size for the model
            raise ValueError(f"the model cannot take an image of shape {tuple(image.shape)}: {e}") from None

    def _code(self, X: torch.Tensor, layer: str):
        bank = self.bank(layer)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", SparseCodeConvergenceWarning)
            return bank.code(X)

    def decompose(self, image: torch.Tensor, layer: str) -> Decomposition:
        """Code one image's PFVs at ``layer`` on the stored concepts (docs/design.md §1.4).

        Args:
            image: ``[C, H, W]`` preprocessed (e.g. :meth:`load_image`).
            layer: an analysed layer.
        """
        lay = self.layer(layer)
        v = self._record(image).preact(layer)
        X = v.permute(0, 2, 3, 1).reshape(-1, v.shape[1])
        idx, val = self._code(X, layer)
        bank = self.bank(layer)
        V, beta = bank.V.to(X), bank.beta.to(X)
        recon = sparse_reconstruct(idx, val.to(X), V, beta)
        rel = (X - recon).norm(dim=1) / X.norm(dim=1).clamp_min(1e-12)
        return Decomposition(layer, tuple(v.shape[-2:]), idx.cpu(), val.float().cpu(), rel.float().cpu(), lay.n_concepts,
                             *self.position_grid(layer))

    def explain(self, image: torch.Tensor, target: int | str | None = None, top: int | None = None) -> Explanation:
        """The GIG graph of one image on the stored concepts (docs/design.md §1.5, paper Fig. 3).

        Codes every layer's PFVs, takes GIG from the last layer to the class (predicted unless
        ``target``), then from each layer to the ``top`` (default: the run's ``top_concepts``)
        strongest concepts of the layer above *for this image*, with the run's GIG settings.

        Args:
            image: ``[C, H, W]`` preprocessed (e.g. :meth:`load_image` or a dataset image).
            target: class id or name to explain (default: the prediction).
            top: concepts kept per layer.
        """
        cfg = self.config
        top = int(top or cfg.top_concepts)
        if top < 1:
            raise ValueError(f"top must be ≥ 1, got {top}")
        rec = self._record(image)
        pred = int(rec.logits.argmax(1))
        cls = pred if target is None else self.class_id(target)
        codes, banks = {}, {}
        for p in self.points:
            banks[p] = self.bank(p)
            v = rec.preact(p)
            X = v.permute(0, 2, 3, 1).reshape(-1, v.shape[1])
            idx, val = self._code(X, p)
            codes[p] = (idx.reshape(1, X.shape[0], -1), val.reshape(1, X.shape[0], -1).to(X))
        nodes, edges, errors, deltas = [], [], [], {}
        targets: list[int] = [cls]
        pts = self.points
        for i in range(len(pts) - 1, -1, -1):
            a = pts[i]
            b = CLASSES if i == len(pts) - 1 else pts[i + 1]
            if b == CLASSES:
                tgt = ClassTarget(cls, probability=cfg.class_probability)
            else:
                Vb = banks[b].V.to(self.device)
                tgt = [ConceptTarget(Vb[t]) for t in targets]
            f_ab = self.adapter.f_ab(a, None if b == CLASSES else b)
            res = gig(f_ab, codes[a], banks[a].V.to(self.device), banks[a].beta.to(self.device), tgt,
                      spatial=tuple(rec.preact(a).shape[-2:]), **cfg.gig_options())
            pc = res.per_concept.detach().double().cpu().reshape(len(targets), 1, -1)  # [T, 1, K_a]
            deltas[f"{a}->{b}"] = float(res.delta.detach().abs().max())
            # the same nodes and edges as stage 4's image pass (graph.json's images[] for a dataset image)
            sel, values = image_top_concepts(pc, min(top, pc.shape[-1]))
            entries, layer_edges = image_layer_graph(a, b, sel[0].tolist(), targets, values[0].numpy(), top)
            peak = max((abs(n["score"]) for n in entries), default=0.0) or 1.0
            nodes += [Node(a, n["concept"], n["score"], abs(n["score"]) / peak) for n in entries]
            edges += [Edge(a, e["source"][1], b, e["target"][1], e["weight"], e["normalized"]) for e in layer_edges]
            if cfg.error_nodes:  # as the pipeline's error pass: the residual's part of each target's change
                errors.append(self._error_node(a, b, rec.preact(a), codes[a], targets, layer_edges, f_ab))
            targets = sel[0].tolist()
        return Explanation(pred, cls, self.classes[cls].name if cls < len(self.classes) else str(cls),
                           Graph(nodes, edges, errors), deltas)

    def _error_node(self, a: str, b: str, X: torch.Tensor, codes, targets: list[int], layer_edges: list[dict], f_ab
                    ) -> ErrorNode:
        """The error node of layer a for one image (``X [1, C, H, W]``, its ``codes``) to its ``targets`` of b
        (:mod:`gig_fast.pipeline.errors`), normalised on the scale of the layer pair's ``layer_edges``."""
        V, beta = self.bank(a).V.to(X), self.bank(a).beta.to(X)
        H, W = X.shape[-2:]
        X_rec = reconstruction(codes[0], codes[1], V, beta, H, W)
        Vb = None if b == CLASSES else self.bank(b).V.to(X)
        own = torch.tensor([targets], dtype=torch.int64, device=X.device)
        error, _, _ = transition_errors(f_ab, X, X_rec, beta.reshape(1, -1, 1, 1).expand(1, -1, H, W), own,
                                        own[:, :0], Vb, self.config.class_probability)
        peak = max((abs(e["weight"]) for e in layer_edges), default=0.0)
        return ErrorNode.from_dict(a, error_entry(b, targets, error[0].double().cpu().numpy(), peak))

    # -- export ------------------------------------------------------------------------------------
    EXPORT_KINDS = ("image", "class", "pair")

    def export(self, kind: str, which, path: str | os.PathLike | None = None, *, format: str = "neuronpedia",
               probabilities: bool = True) -> dict:
        """An image, class or pair graph as the attribution-graph JSON that Neuronpedia's and circuit-tracer's
        graph viewers open (:mod:`gig_fast.export`, ``docs/export.md``).

        Args:
            kind: ``"image"`` (``which``: an explained image's dataset index), ``"class"`` (a class id or
                name) or ``"pair"`` (two classes: both class graphs and the edges of their shared concepts).
            path: where to write the JSON (atomically); None: only return it.
            format: ``"neuronpedia"`` (the one format so far).
            probabilities: the logit nodes' p — the image's softmax probability of its classes, or the mean
                over a class's explained images — by running the model on those images; False writes
                ``p=nan`` and needs neither model nor data.
        Returns:
            the JSON as a dict.
        """
        if format not in FORMATS:
            raise ValueError(f"unknown export format {format!r}; valid: {', '.join(FORMATS)}")
        if kind not in self.EXPORT_KINDS:
            raise ValueError(f"unknown graph kind {kind!r}; valid: {', '.join(self.EXPORT_KINDS)}")
        graph, ctx = getattr(self, f"_export_{kind}")(which, probabilities)
        ctx.info = {"description": ctx.prompt + f"; GIG concept graph of run {self.key}, {self.model_info.get('arch')} "
                                                f"on {self.model_info.get('dataset')}",
                    "generator": {"name": "gig_fast", "version": _version()}}
        out = neuronpedia_graph(graph, ctx)
        if path is not None:
            save_json(path, out)
        return out

    def _context(self, slug: str, prompt: str, probabilities: dict | None = None, **kw) -> GraphContext:
        return GraphContext(slug, str(self.model_info.get("arch")), prompt, self.points,
                            [c.name for c in self.classes], probabilities or {}, **kw)

    def _export_image(self, image, probabilities: bool):
        g = self.image_graph(int(image))
        names = {c.id: c.name for c in self.classes}
        probs = {}
        if probabilities:
            x, _ = self.load_dataset_images([g.id])
            with torch.no_grad():
                p = torch.softmax(self.model(x.to(self.device)).float(), dim=1)[0].cpu()
            probs = {c: float(p[c]) for c in range(len(p))}
        activations = {(n.layer, n.concept): float(self.stored_codes(g.id, n.layer).usage()[n.concept])
                       for n in g.graph.nodes}
        label = f"label {names[g.label]}, " if g.label >= 0 else ""
        return g.graph, self._context(f"image-{g.id}", f"image {g.id} ({label}explained as {names[g.explained_class]})",
                                      probs, activations=activations)

    def _class_probability(self, c: int) -> float:
        """The mean softmax probability of class ``c`` over its explained images (the model run on them)."""
        ids, total = self.image_ids(c), 0.0
        for i in range(0, len(ids), 64):
            x, _ = self.load_dataset_images(ids[i:i + 64])
            with torch.no_grad():
                total += float(torch.softmax(self.model(x.to(self.device)).float(), dim=1)[:, c].sum())
        return total / max(1, len(ids))

    def _export_class(self, which, probabilities: bool):
        c = self.class_id(which)
        name = self.classes[c].name
        probs = {c: self._class_probability(c)} if probabilities else {}
        return self.class_graph(c), self._context(f"class-{name}", f"the {self.classes[c].n_images} explained images "
                                                                   f"of class {name}", probs)

    def _export_pair(self, which, probabilities: bool):
        if not isinstance(which, (tuple, list)) or len(which) != 2:
            raise ValueError(f"a pair graph is named by two classes, got {which!r}")
        pg = self.pair_graph(*which)
        a, b = pg.classes
        graph = merge_graphs([self.class_graph(a), self.class_graph(b)], pg.edges)
        probs = {c: self._class_probability(c) for c in (a, b)} if probabilities else {}
        na, nb = self.classes[a].name, self.classes[b].name
        return graph, self._context(f"pair-{na}-{nb}", f"the explained images of classes {na} and {nb}", probs,
                                    pinned=[(s.layer, s.concept) for s in pg.shared])

    def intervene(self, image: torch.Tensor, edits, targets=None) -> Intervention:
        """Edit concepts inside the model for one image and compare before / after
        (:mod:`gig_fast.interventions`): ``X' = X + Σ (u' − u)·v_q`` at the edited positions, the
        reconstruction residual kept, the rest of the network run from there.

        Args:
            image: ``[C, H, W]`` preprocessed (e.g. :meth:`load_image` or a dataset image).
            edits: e.g. ``[("layer3.2", 117, 0.0)]`` (remove), ``("layer3.2", 117, 2.0)`` (scale),
                ``("layer3.2", 117, [1.5, 0.5], [3, 10])`` (add at positions 3 and 10), or
                :class:`~gig_fast.interventions.Edit` objects; applied in layer order.
            targets: later concepts to report: None (all), layer names or ``(layer, concept)`` pairs.
        Raises:
            EditError (a ``ValueError``): unknown layer, concept out of range, bad factor, vector of the
                wrong length, positions out of range.
        """
        rec = self._record(image)
        banks = {p: self.bank(p) for p in self.points}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", SparseCodeConvergenceWarning)
            return intervene(self.adapter, banks, rec.image, edits, targets, record=rec)

    # -- metrics -----------------------------------------------------------------------------------
    @cached_property
    def metrics(self) -> Metrics:
        """``metrics.json`` as :class:`Metrics`."""
        path = self.path / METRICS_FILE
        if not path.is_file():
            raise FileNotFoundError(f"no metrics.json in {self.path}")
        return Metrics.from_dict(load_json(path))

    def graph_dict(self) -> dict:
        """``graph.json`` as it was read (class and pair graphs, concept facts, the image sample)."""
        return self._graph

