"""The per-image store of a run: Parquet tables that DuckDB, pandas, polars or pyarrow query directly.

``graph.json`` keeps the class and pair graphs and a sample of the explained images; every explained
image's graph and the per-concept image rankings live here, in ``<out>/store/`` (schema:
``docs/graph_schema.md``, "Per-image store"):

* ``images.parquet``: one row per explained image: ``image``, ``label``, ``prediction``, ``class``.
* ``image_nodes.parquet``: each image's concepts per layer: ``image``, ``layer``, ``concept``,
  ``score``, ``rank`` (1 = strongest).
* ``image_edges.parquet``: each image's graph edges: ``image``, ``source_layer``, ``source``,
  ``target_layer``, ``target``, ``weight``, ``normalized`` (the same fields as ``graph.json`` edges).
* ``concept_images.parquet``: per layer and concept the ``RANK_DEPTH`` images that use it most:
  ``layer``, ``concept``, ``rank``, ``image``, ``class``, ``usage`` (Σ over the positions of the
  image of the concept's code value), ``peak`` (its largest code value) at ``peak_position``
  (``h·W + w`` at the layer's resolution: "where"), ``active`` (positions where it is coded).
  Sorted by ``layer``, ``concept``, ``rank``: a lookup reads one row group.
* ``pair_graphs.parquet`` (version 2): one row per class pair of the run: ``c1 < c2`` and ``graph``, the
  pair graph as compact JSON in ``graph.json``'s ``pair_graphs`` form (``graph.json`` keeps a sample:
  every pair of a 1,000-class run is thousands of graphs of ~900 edges). Sorted by ``c1``, ``c2``.
* ``store.json``: ``format``, ``version``, ``run_key``, row counts, ``rank_depth``.

:class:`ImageStoreWriter` takes the tables chunk by chunk (the images and their graphs are written as
they come; the rankings keep ``RANK_DEPTH`` rows per concept in memory, independent of the number of
images) and publishes the folder atomically on :meth:`ImageStoreWriter.close`. :class:`ImageStore`
answers the lookups a frontend needs.
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["ImageStore", "ImageStoreWriter", "ConceptRanking", "concept_usage", "STORE_FORMAT", "STORE_VERSION",
           "RANK_DEPTH", "TABLES"]

STORE_FORMAT, STORE_VERSION = "gig_fast.store", 2
READABLE_VERSIONS = (1, 2)  # version 1 has no pair_graphs table
RANK_DEPTH = 100  # images kept per concept in concept_images.parquet (a card shows 10-20)
# Row groups of ~64k rows: small enough that a concept lookup reads little, large enough that
# 50,000 images' tables stay a few hundred groups (each group costs a footer entry).
ROW_GROUP = 1 << 16
# A pair graph is ~900 edges (~70 KB of JSON) on the demo: groups of 64 pairs keep a lookup to a few MB.
PAIR_ROW_GROUP = 64
TABLES = ("images", "image_nodes", "image_edges", "concept_images", "pair_graphs")


def _schemas():
    import pyarrow as pa

    layer = pa.dictionary(pa.int16(), pa.string())
    return {
        "images": pa.schema([("image", pa.int64()), ("label", pa.int32()), ("prediction", pa.int32()),
                             ("class", pa.int32())]),
        "image_nodes": pa.schema([("image", pa.int64()), ("layer", layer), ("concept", pa.int32()),
                                  ("score", pa.float64()), ("rank", pa.int16())]),
        "image_edges": pa.schema([("image", pa.int64()), ("source_layer", layer), ("source", pa.int32()),
                                  ("target_layer", layer), ("target", pa.int32()), ("weight", pa.float64()),
                                  ("normalized", pa.float64())]),
        "concept_images": pa.schema([("layer", layer), ("concept", pa.int32()), ("rank", pa.int16()),
                                     ("image", pa.int64()), ("class", pa.int32()), ("usage", pa.float32()),
                                     ("peak", pa.float32()), ("peak_position", pa.int32()), ("active", pa.int32())]),
        "pair_graphs": pa.schema([("c1", pa.int32()), ("c2", pa.int32()), ("graph", pa.string())]),
    }


def concept_usage(idx: np.ndarray, val: np.ndarray, K: int) -> dict[str, np.ndarray]:
    """Per (image, concept) pair coded anywhere in a batch of images, how much and where it is used.

    Args:
        idx: int64 ``[B, P, s]`` padded concept indices (−1 = padding) of B images' P positions.
        val: float ``[B, P, s]`` their code values.
        K: concepts of the layer.
    Returns:
        ``row [n]`` (image row in the batch), ``concept [n]``, ``usage [n]`` (Σ_p u_pq), ``peak [n]``
        (max_p u_pq over the coded positions), ``peak_position [n]`` (its p, the first on ties) and
        ``active [n]`` (coded positions), n = distinct pairs, ordered by (row, concept).
    """
    B, P, s = idx.shape
    b, p, j = np.nonzero(idx >= 0)
    q = idx[b, p, j]
    v = val[b, p, j].astype(np.float64)
    key = b.astype(np.int64) * K + q
    order = np.lexsort((p, -v, key))  # per key: largest value first, then the first position
    key, v, p = key[order], v[order], p[order]
    first = np.ones(len(key), dtype=bool)
    first[1:] = key[1:] != key[:-1]
    starts = np.flatnonzero(first)
    usage = np.add.reduceat(v, starts) if len(starts) else np.zeros(0)
    active = np.diff(np.append(starts, len(key)))
    k = key[starts]
    return {"row": k // K, "concept": k % K, "usage": usage, "peak": v[starts], "peak_position": p[starts],
            "active": active}


class ConceptRanking:
    """The ``depth`` images with the largest usage of each concept of one layer, fed chunk by chunk.

    Memory is ``[K, depth]`` per field whatever the number of images. Ties keep the smaller image id.
    Only positive usage ranks (an image whose codes of q sum to ≤ 0 does not use q).
    """

    FIELDS = ("image", "class", "usage", "peak", "peak_position", "active")

    def __init__(self, K: int, depth: int = RANK_DEPTH):
        self.K, self.depth = K, depth
        self.usage = np.full((K, depth), -np.inf)
        self.image = np.full((K, depth), np.iinfo(np.int64).max, dtype=np.int64)
        self.cls = np.zeros((K, depth), dtype=np.int64)
        self.peak = np.zeros((K, depth))
        self.peak_position = np.zeros((K, depth), dtype=np.int64)
        self.active = np.zeros((K, depth), dtype=np.int64)

    def _fields(self):
        return (self.image, self.cls, self.usage, self.peak, self.peak_position, self.active)

    def add(self, concept, image, cls, usage, peak, peak_position, active) -> None:
        """Merge rows (one per (image, concept) pair, arrays of one length) into the ranking."""
        keep = (usage > 0) & (usage >= self.usage[concept, -1])  # could enter its concept's list
        if not keep.any():
            return
        new = [np.asarray(a)[keep] for a in (image, cls, usage, peak, peak_position, active)]
        touched = np.unique(concept[keep])
        slot = np.searchsorted(touched, concept[keep])
        old = [f[touched].ravel() for f in self._fields()]
        group = np.concatenate([np.repeat(np.arange(len(touched)), self.depth), slot])
        merged = [np.concatenate([o, n]) for o, n in zip(old, new)]
        order = np.lexsort((merged[0], -merged[2], group))  # concept, usage desc, image asc
        group = group[order]
        first = np.searchsorted(group, np.arange(len(touched)))
        rank = np.arange(len(group)) - first[group]
        sel = rank < self.depth
        for f, m in zip(self._fields(), merged):
            f[touched[group[sel]], rank[sel]] = m[order][sel]

    def rows(self) -> dict[str, np.ndarray]:
        """The ranking as columns ``concept``, ``rank`` (1-based), and :attr:`FIELDS`, by concept then rank."""
        filled = np.isfinite(self.usage)
        q, r = np.nonzero(filled)
        return {"concept": q, "rank": r + 1, "image": self.image[q, r], "class": self.cls[q, r],
                "usage": self.usage[q, r], "peak": self.peak[q, r], "peak_position": self.peak_position[q, r],
                "active": self.active[q, r]}


class ImageStoreWriter:
    """Writes a run's store folder chunk by chunk; nothing is visible until :meth:`close`.

    Args:
        folder: the store folder (``<out>/store``); an older store there is replaced on close.
        layers: analysed layers in forward order, with their number of concepts ``{layer: K}``.
        run_key: the run's key (``graph.json``'s ``run_key``).
        depth: images kept per concept in ``concept_images.parquet``.
    """

    def __init__(self, folder: str | os.PathLike, layers: dict[str, int], run_key: str, depth: int = RANK_DEPTH):
        import pyarrow.parquet as pq

        self.folder = Path(folder)
        self.tmp = self.folder.with_name(f".{self.folder.name}.tmp{os.getpid()}")
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.tmp.mkdir(parents=True)
        self.layers, self.run_key = dict(layers), run_key
        self.layer_names = list(self.layers) + ["classes"]
        self.schemas = _schemas()
        self.writers = {name: pq.ParquetWriter(self.tmp / f"{name}.parquet", self.schemas[name], compression="zstd")
                        for name in ("images", "image_nodes", "image_edges", "pair_graphs")}
        self.rankings = {layer: ConceptRanking(K, depth) for layer, K in self.layers.items()}
        self.depth = depth
        self.rows = dict.fromkeys(TABLES, 0)

    def _layer_codes(self, names) -> np.ndarray:
        index = {n: i for i, n in enumerate(self.layer_names)}
        try:
            return np.array([index[n] for n in names], dtype=np.int16)
        except KeyError as e:
            raise ValueError(f"unknown layer {e.args[0]!r}; the store's layers are {self.layer_names}") from None

    def _column(self, name: str, field: str, values):
        import pyarrow as pa

        typ = self.schemas[name].field(field).type
        if pa.types.is_dictionary(typ):
            return pa.DictionaryArray.from_arrays(pa.array(self._layer_codes(values), pa.int16()),
                                                  pa.array(self.layer_names, pa.string()))
        return pa.array(values if pa.types.is_string(typ) else np.asarray(values), typ)

    def _write(self, name: str, columns: dict) -> None:
        import pyarrow as pa

        table = pa.table({f: self._column(name, f, columns[f]) for f in self.schemas[name].names},
                         schema=self.schemas[name])
        self.writers[name].write_table(table, row_group_size=PAIR_ROW_GROUP if name == "pair_graphs" else ROW_GROUP)
        self.rows[name] += table.num_rows

    def add_graphs(self, graphs: list[dict]) -> None:
        """Add image graphs in the ``graph.json`` ``images[]`` form (ascending ids across calls)."""
        if not graphs:
            return
        self._write("images", {"image": [g["id"] for g in graphs], "label": [g["label"] for g in graphs],
                               "prediction": [g["prediction"] for g in graphs], "class": [g["class"] for g in graphs]})
        nodes = {k: [] for k in ("image", "layer", "concept", "score", "rank")}
        edges = {k: [] for k in ("image", "source_layer", "source", "target_layer", "target", "weight", "normalized")}
        for g in graphs:
            for layer, items in g["nodes"].items():
                for r, n in enumerate(items, 1):
                    for k, v in zip(nodes, (g["id"], layer, n["concept"], n["score"], r)):
                        nodes[k].append(v)
            for e in g["edges"]:
                row = (g["id"], e["source"][0], e["source"][1], e["target"][0], e["target"][1], e["weight"], e["normalized"])
                for k, v in zip(edges, row):
                    edges[k].append(v)
        self._write("image_nodes", nodes)
        self._write("image_edges", edges)

    def add_pair_graphs(self, graphs: list[dict]) -> None:
        """Add pair graphs in ``graph.json``'s ``pair_graphs`` form (``classes`` ascending across calls)."""
        if graphs:
            self._write("pair_graphs", {"c1": [g["classes"][0] for g in graphs], "c2": [g["classes"][1] for g in graphs],
                                        "graph": [json.dumps(g, separators=(",", ":")) for g in graphs]})

    def add_codes(self, layer: str, images: np.ndarray, classes: np.ndarray, idx: np.ndarray, val: np.ndarray) -> None:
        """Add one chunk's stage-3 codes of ``layer`` (``idx``/``val`` ``[B, P, s]`` of ``images [B]``,
        explained as ``classes [B]``) to that layer's concept ranking."""
        u = concept_usage(idx, val, self.layers[layer])
        self.rankings[layer].add(u["concept"], images[u["row"]], classes[u["row"]], u["usage"], u["peak"],
                                 u["peak_position"], u["active"])

    def close(self) -> Path:
        """Write the rankings and ``store.json``, then publish the folder (replacing an older one)."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        for w in self.writers.values():
            w.close()
        with pq.ParquetWriter(self.tmp / "concept_images.parquet", self.schemas["concept_images"],
                              compression="zstd") as w:
            for layer, ranking in self.rankings.items():
                cols = ranking.rows()
                cols["layer"] = [layer] * len(cols["concept"])
                table = pa.table({f: self._column("concept_images", f, cols[f])
                                  for f in self.schemas["concept_images"].names}, schema=self.schemas["concept_images"])
                # one concept's rows never straddle many groups: groups of whole concepts
                w.write_table(table, row_group_size=max(self.depth, (ROW_GROUP // 4 // self.depth) * self.depth))
                self.rows["concept_images"] += table.num_rows
        manifest = {"format": STORE_FORMAT, "version": STORE_VERSION, "run_key": self.run_key,
                    "layers": self.layers, "rank_depth": self.depth, "rows": self.rows}
        (self.tmp / "store.json").write_text(json.dumps(manifest, indent=1), encoding="utf-8")
        old = self.folder.with_name(f".{self.folder.name}.old{os.getpid()}")
        if self.folder.exists():
            os.replace(self.folder, old)
        os.replace(self.tmp, self.folder)
        shutil.rmtree(old, ignore_errors=True)
        return self.folder

    def abort(self) -> None:
        """Drop the unfinished store (the published one, if any, stays)."""
        for w in self.writers.values():
            try:
                w.close()
            except Exception:  # noqa: BLE001 — already failing; the folder is removed anyway
                pass
        shutil.rmtree(self.tmp, ignore_errors=True)


_COMPARE = {"=": "equal", "<": "less", "<=": "less_equal", ">": "greater", ">=": "greater_equal"}


def _may_match(group, names: list[str], filters) -> bool:
    """Whether a row group (its column statistics) can hold rows where every condition holds."""
    for col, op, value in filters:
        stats = group.column(names.index(col)).statistics
        if stats is None or not stats.has_min_max:
            continue
        lo, hi = stats.min, stats.max
        if ((op == "=" and not lo <= value <= hi) or (op in ("<", "<=") and (lo > value or (op == "<" and lo == value)))
                or (op in (">", ">=") and (hi < value or (op == ">" and hi == value)))):
            return False
    return True


@dataclass(frozen=True)
class StoreInfo:
    """``store.json``: ``run_key``, ``layers`` ({layer: K}), ``rank_depth``, ``rows`` per table."""
    run_key: str
    layers: dict
    rank_depth: int
    rows: dict


class ImageStore:
    """Read-only lookups in a store folder (each one reads only the row groups it needs).

    Raises ``FileNotFoundError`` when the folder or a table is missing and ``ValueError`` when
    ``store.json`` is not a store manifest of a version this code reads.
    """

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        manifest = self.folder / "store.json"
        if not manifest.is_file():
            raise FileNotFoundError(f"no per-image store at {self.folder} (store.json is missing)")
        try:
            meta = json.loads(manifest.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ValueError(f"{manifest} is not valid JSON: {e}") from None
        if meta.get("format") != STORE_FORMAT or meta.get("version") not in READABLE_VERSIONS:
            raise ValueError(f"{manifest} is not a {STORE_FORMAT} manifest of version "
                             f"{' or '.join(map(str, READABLE_VERSIONS))}")
        self.info = StoreInfo(meta["run_key"], meta["layers"], meta["rank_depth"], meta["rows"])
        self.tables = TABLES if meta["version"] >= 2 else TABLES[:-1]
        for name in self.tables:
            if not (self.folder / f"{name}.parquet").is_file():
                raise FileNotFoundError(f"the per-image store {self.folder} lacks {name}.parquet")
        self._files: dict = {}
        self._meta: dict = {}  # table → its Parquet footer (row-group statistics), read on first use

    def path(self, table: str) -> Path:
        """The Parquet file of ``table`` (one of :data:`TABLES`), e.g. for DuckDB's ``read_parquet``."""
        if table not in self.tables:
            raise ValueError(f"unknown table {table!r}; the store's tables are {list(self.tables)}")
        return self.folder / f"{table}.parquet"

    def _file(self, table: str):
        import pyarrow.parquet as pq

        if table not in self._files:
            self._files[table] = pq.ParquetFile(self.path(table))
        return self._files[table]

    def read(self, table: str, filters=None, columns=None):
        """A ``pyarrow.Table`` of ``table`` rows matching ``filters`` (a list of ``(column, op, value)``
        conditions that all hold, op one of ``= < <= > >=``, e.g. ``[("image", "=", 7)]``); only row
        groups whose statistics can match are read. The file's footer is parsed once per store: a
        lookup in ``concept_images`` of the demo takes ~3 ms this way against ~50-250 ms through
        ``pyarrow.parquet.read_table(filters=…)``, which parses it and plans a dataset scan each time."""
        import pyarrow.compute as pc
        import pyarrow.parquet as pq

        filters = list(filters or [])
        meta = self._metadata(table)
        names = meta.schema.names
        for col, op, _ in filters:
            if col not in names or op not in _COMPARE:
                raise ValueError(f"cannot filter {table} on {(col, op)}: columns {names}, ops {list(_COMPARE)}")
        groups = [g for g in range(meta.num_row_groups) if _may_match(meta.row_group(g), names, filters)]
        wanted = list(columns) if columns is not None else names
        t = pq.ParquetFile(self.path(table), metadata=meta).read_row_groups(
            groups, columns=sorted(set(wanted) | {c for c, _, _ in filters}, key=names.index))
        if filters:
            mask = None
            for col, op, value in filters:
                m = getattr(pc, _COMPARE[op])(t[col], value)
                mask = m if mask is None else pc.and_(mask, m)
            t = t.filter(mask)
        return t.select(wanted)

    def _metadata(self, table: str):
        import pyarrow.parquet as pq

        if table not in self._meta:
            self._meta[table] = pq.read_metadata(self.path(table))
        return self._meta[table]

    def top_images(self, layer: str, concept: int, n: int = 20):
        """The ``n`` (≤ ``rank_depth``) images that use ``concept`` of ``layer`` most, best first, as a
        ``pyarrow.Table`` of ``concept_images`` rows."""
        if layer not in self.info.layers:
            raise ValueError(f"unknown layer {layer!r}; valid: {', '.join(self.info.layers)}")
        if not 0 <= int(concept) < int(self.info.layers[layer]):
            raise ValueError(f"concept {concept} is out of range for {layer} (K = {self.info.layers[layer]})")
        t = self.read("concept_images", filters=[("layer", "=", layer), ("concept", "=", int(concept)),
                                                  ("rank", "<=", int(n))])
        return t.sort_by("rank")

    def pair_graph(self, c1: int, c2: int) -> dict | None:
        """The pair graph of classes ``c1 < c2`` in ``graph.json``'s form, or None when the run has none for
        them (not among its class pairs, or a version-1 store)."""
        if "pair_graphs" not in self.tables:
            return None
        t = self.read("pair_graphs", filters=[("c1", "=", int(c1)), ("c2", "=", int(c2))], columns=["graph"])
        return json.loads(t.column("graph")[0].as_py()) if t.num_rows else None

    def image_rows(self, image: int):
        """``(images row, image_nodes rows, image_edges rows)`` of one explained image (``pyarrow.Table``s;
        empty when the image is not in the store)."""
        f = [("image", "=", int(image))]
        return self.read("images", f), self.read("image_nodes", f), self.read("image_edges", f)
