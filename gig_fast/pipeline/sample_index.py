"""The nearest stage-1 samples of every concept, computed once when a run is published (``concept_samples/``,
:func:`gig_fast.report.publish`), so
that a concept card, a node picture or a served view reads them instead of streaming the whole stage-1
PFV dataset (30,000 PFVs × 16 layers on the demo: ~10 s per view before).

Folder ``<run>/concept_samples/`` (published whole, atomically):

* ``concept_samples.json``: ``format`` (:data:`INDEX_FORMAT`), ``version`` (:data:`INDEX_VERSION`),
  ``run_key``, ``k`` (samples per concept), ``layers`` ({layer: K}), ``ierf`` (whether the run kept iERFs).
* ``<layer>.npz``, per concept ``q`` of the layer its ``k`` nearest stage-1 PFVs (``x − β`` against
  ``v_q`` in cosine, nearest first; :func:`~gig_fast.pipeline.samples.nearest_rows`): ``rows [K, k]``
  (global stage-1 rows), ``cosine [K, k]``, ``member [K, k]`` (in the concept's cluster), ``image``,
  ``position``, ``label [K, k]``, and the top-1 sample's iERF crop as PNG bytes: concept ``q``'s are
  ``crop_png[crop_offsets[q]:crop_offsets[q + 1]]`` (empty without iERFs).

A run written before this folder existed still opens: :class:`gig_fast.Run` then streams the stage-1
files per request (and ``gig-fast report --run DIR`` writes the folder).
"""
from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..run_folder import SAMPLES_DIR, SAMPLES_MANIFEST, layer_file
from .files import load_json, load_npz, save_json, save_npz

__all__ = ["INDEX_FORMAT", "INDEX_VERSION", "INDEX_FOLDER", "SampleIndex", "write_sample_index", "open_sample_index",
           "layer_index"]

INDEX_FORMAT, INDEX_VERSION = "gig_fast.concept_samples", 1
INDEX_FOLDER = SAMPLES_DIR


@dataclass(frozen=True)
class SampleIndex:
    """One layer's nearest samples of every concept (``[K, k]`` arrays, see the module docstring) and
    the top-1 crop PNGs."""
    rows: np.ndarray
    cosine: np.ndarray
    member: np.ndarray
    image: np.ndarray
    position: np.ndarray
    label: np.ndarray
    crop_png: np.ndarray
    crop_offsets: np.ndarray

    @property
    def k(self) -> int:
        return int(self.rows.shape[1])

    def top_crop(self, q: int) -> bytes | None:
        """The PNG of concept ``q``'s nearest sample's iERF crop (None when the run kept no iERFs)."""
        a, b = int(self.crop_offsets[q]), int(self.crop_offsets[q + 1])
        return self.crop_png[a:b].tobytes() if b > a else None


def layer_index(run, layer: str, k: int, crops: bool = True) -> SampleIndex:
    """Compute ``layer``'s :class:`SampleIndex` for every concept (one pass over the stage-1 files), with
    the top-1 crops when ``crops`` (``run``: a :class:`gig_fast.Run`)."""
    K = run.layer(layer).n_concepts
    rows, cos, member = run.nearest_rows(layer, list(range(K)), k)
    image, position, label = run.sample_meta(layer, rows)
    pngs = run.sample_crop_pngs(layer, rows[:, 0]) if crops else {}
    blobs = [pngs.get(int(r)) or b"" for r in rows[:, 0]]
    offsets = np.zeros(K + 1, dtype=np.int64)
    offsets[1:] = np.cumsum([len(b) for b in blobs])
    return SampleIndex(rows.astype(np.int64), cos.astype(np.float64), member.astype(bool), image, position, label,
                       np.frombuffer(b"".join(blobs), dtype=np.uint8), offsets)


def write_sample_index(run, k: int) -> Path:
    """Write ``<run>/concept_samples/`` for every analysed layer of ``run`` (a :class:`gig_fast.Run`),
    ``k`` nearest samples per concept; replaces an older folder. Returns the folder."""
    out = Path(run.path) / INDEX_FOLDER
    tmp = out.with_name(f".{INDEX_FOLDER}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    layers = {}
    for layer in run.points:
        idx = layer_index(run, layer, k)
        save_npz(layer_file(tmp, layer), **{f: getattr(idx, f) for f in SampleIndex.__dataclass_fields__})
        layers[layer] = int(idx.rows.shape[0])
    save_json(tmp / SAMPLES_MANIFEST, {"format": INDEX_FORMAT, "version": INDEX_VERSION, "run_key": run.key,
                                             "k": int(k), "layers": layers, "ierf": bool(run.config.store_ierf)})
    old = out.with_name(f".{INDEX_FOLDER}.old")
    shutil.rmtree(old, ignore_errors=True)
    if out.exists():
        out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)
    return out


def open_sample_index(path: Path, run_key: str) -> tuple[dict | None, str]:
    """``(manifest, "")`` of the ``concept_samples/`` folder of the run at ``path``, or ``(None, why)``
    when there is none usable (absent, another run's, another version)."""
    manifest = Path(path) / INDEX_FOLDER / SAMPLES_MANIFEST
    if not manifest.is_file():
        return None, f"no {INDEX_FOLDER}/ (written by runs made before it existed)"
    meta = load_json(manifest)
    if meta.get("format") != INDEX_FORMAT or meta.get("version") != INDEX_VERSION:
        return None, f"{manifest} is not a {INDEX_FORMAT} index of version {INDEX_VERSION}"
    if meta.get("run_key") != run_key:
        return None, f"{manifest} belongs to run {meta.get('run_key')}, not {run_key}"
    return meta, ""


def load_layer_index(path: Path, layer: str) -> SampleIndex:
    """The :class:`SampleIndex` of ``layer`` from the run folder ``path``."""
    z = load_npz(layer_file(Path(path) / INDEX_FOLDER, layer))
    return SampleIndex(**{f: z[f] for f in SampleIndex.__dataclass_fields__})
