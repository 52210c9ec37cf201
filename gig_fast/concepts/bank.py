"""Concept banks: one layer's concepts as a safetensors file and a small JSON of their metadata.

A bank extracted once can be shared and reused: coded against new images (:meth:`ConceptBank.code`),
loaded by another tool (safetensors has readers in Rust, JavaScript, C++ …), or compared across runs.
A bank folder holds two files:

* ``concepts.safetensors``: ``V [K, C]`` float32 (rows are concepts: cluster means of ``x − β``),
  ``beta [C]`` float32 (the layer's BN shift, the "no concept" point of docs/design.md §1.1) and ``sizes [K]``
  int64 (stage-1 PFVs per cluster). No pickle: loading runs no code.
* ``bank.json``: ``format`` (``"gig_fast.concept_bank"``), ``version``, ``layer``, ``K``, ``C``,
  ``model`` (``arch``, ``weights``), ``extraction`` (how the concepts were made: k-means settings,
  PFV sampling), ``coding`` (the sparse-coding settings that go with them: ``lam``, ``method``,
  ``positive``), ``run_key`` and ``sha256`` (of ``concepts.safetensors``: a flipped byte anywhere,
  which safetensors itself cannot see in the tensor data, fails the load).

``save`` then ``load`` gives bit-identical tensors and equal metadata.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..ops import sparse_code
from ..run_folder import atomic_open

__all__ = ["ConceptBank", "BANK_FORMAT", "BANK_VERSION", "TENSOR_FILE", "META_FILE"]

BANK_FORMAT, BANK_VERSION = "gig_fast.concept_bank", 1
TENSOR_FILE, META_FILE = "concepts.safetensors", "bank.json"


@dataclass
class ConceptBank:
    """The concepts of one analysed layer (docs/design.md §1.3) and how they were made.

    Attributes:
        layer: the analysed point's name (``"layer3.5"``, ``"_blocks.12"``).
        V: float32 ``[K, C]`` concept vectors (rows).
        beta: float32 ``[C]`` the layer's BN shift β (the decomposition's bias and the GIG baseline).
        sizes: int64 ``[K]`` stage-1 PFVs in each concept's cluster (zeros when unknown).
        model: ``{"arch", "weights"}`` of the network the concepts belong to.
        extraction: the settings that made them (``k``, ``k_factor``, ``kmeans_mode``, ``concept_images``,
            ``pfvs_per_image``, ``attribution``, ``seed``).
        coding: the sparse-coding settings to decompose PFVs on them (``lam``, ``method``, ``positive``).
        run_key: the run that extracted them (``graph.json``'s ``run_key``), or None.
    """
    layer: str
    V: torch.Tensor
    beta: torch.Tensor
    sizes: torch.Tensor | None = None
    model: dict = field(default_factory=dict)
    extraction: dict = field(default_factory=dict)
    coding: dict = field(default_factory=dict)
    run_key: str | None = None

    def __post_init__(self):
        if not isinstance(self.layer, str) or not self.layer:
            raise ValueError(f"layer must be a non-empty string, got {self.layer!r}")
        if not isinstance(self.V, torch.Tensor) or self.V.dim() != 2:
            raise ValueError(f"V must be a [K, C] tensor, got {getattr(self.V, 'shape', type(self.V))}")
        K, C = self.V.shape
        if not isinstance(self.beta, torch.Tensor) or tuple(self.beta.shape) != (C,):
            raise ValueError(f"beta must be a [C] = [{C}] tensor, got {getattr(self.beta, 'shape', type(self.beta))}")
        if self.sizes is None:
            self.sizes = torch.zeros(K, dtype=torch.int64)
        if tuple(self.sizes.shape) != (K,):
            raise ValueError(f"sizes must be a [K] = [{K}] tensor, got {tuple(self.sizes.shape)}")
        self.V = self.V.detach().to("cpu", torch.float32).contiguous()
        self.beta = self.beta.detach().to("cpu", torch.float32).contiguous()
        self.sizes = self.sizes.detach().to("cpu", torch.int64).contiguous()

    @property
    def K(self) -> int:
        """Number of concepts."""
        return int(self.V.shape[0])

    @property
    def C(self) -> int:
        """Channels of the layer."""
        return int(self.V.shape[1])

    def metadata(self) -> dict:
        """The content of ``bank.json`` without the file digest."""
        return {"format": BANK_FORMAT, "version": BANK_VERSION, "layer": self.layer, "K": self.K, "C": self.C,
                "model": self.model, "extraction": self.extraction, "coding": self.coding, "run_key": self.run_key}

    def save(self, folder: str | os.PathLike) -> Path:
        """Write ``concepts.safetensors`` and ``bank.json`` into ``folder`` (created), each atomically
        (tmp + rename; the JSON last, so a folder with a ``bank.json`` holds a finished bank).
        Returns the folder."""
        from safetensors.torch import save

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        # one metadata entry: safetensors writes its metadata map in hash order, so two keys could swap
        # places between saves and the same bank would not give the same bytes
        data = save({"V": self.V, "beta": self.beta, "sizes": self.sizes}, metadata={BANK_FORMAT: self.layer})
        with atomic_open(folder / TENSOR_FILE) as f:
            f.write(data)
        meta = {**self.metadata(), "sha256": hashlib.sha256(data).hexdigest()}
        with atomic_open(folder / META_FILE) as f:
            f.write(json.dumps(meta, indent=1, allow_nan=False).encode("utf-8"))
        return folder

    @classmethod
    def load(cls, folder: str | os.PathLike, *, verify: bool = True) -> "ConceptBank":
        """Read a bank folder written by :meth:`save`.

        Args:
            folder: the folder holding ``concepts.safetensors`` and ``bank.json``.
            verify: check the tensor file against the SHA-256 in ``bank.json`` (reads it whole once).
        Raises:
            FileNotFoundError: a file is missing.
            ValueError: a file is corrupted or truncated, or the two files disagree (the message names
                the file).
        """
        folder = Path(folder)
        meta_path, tensor_path = folder / META_FILE, folder / TENSOR_FILE
        for p in (meta_path, tensor_path):
            if not p.is_file():
                raise FileNotFoundError(f"concept bank {folder}: {p.name} is missing")
        meta = _read_metadata(meta_path)
        data = tensor_path.read_bytes()
        if verify and hashlib.sha256(data).hexdigest() != meta["sha256"]:
            raise ValueError(f"concept bank file {tensor_path} is corrupted or truncated: its SHA-256 does not "
                             f"match {meta_path.name} ({len(data)} bytes)")
        tensors = _read_tensors(tensor_path, data)
        bank = cls(layer=meta["layer"], V=tensors["V"], beta=tensors["beta"], sizes=tensors["sizes"],
                   model=meta.get("model") or {}, extraction=meta.get("extraction") or {},
                   coding=meta.get("coding") or {}, run_key=meta.get("run_key"))
        if (bank.K, bank.C) != (meta["K"], meta["C"]):
            raise ValueError(f"concept bank {folder}: {tensor_path.name} holds V {tuple(bank.V.shape)} but "
                             f"{meta_path.name} says K={meta['K']}, C={meta['C']}")
        return bank

    def code(self, X: torch.Tensor, **overrides):
        """Sparse codes of PFVs ``X [P, C]`` on this bank with its stored coding settings (docs/design.md §1.4):
        ``(idx [P, s] int64, −1 padded; val [P, s])``. ``overrides`` replace stored settings."""
        opts = {k: self.coding[k] for k in ("lam", "method", "positive") if k in self.coding}
        opts.update(overrides)
        V = self.V.to(X.device, X.dtype)
        return sparse_code(X, V, bias=self.beta.to(X.device, X.dtype), **opts)


def _read_metadata(path: Path) -> dict:
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"concept bank file {path} is not valid JSON (corrupted or truncated): {e}") from None
    if not isinstance(meta, dict) or meta.get("format") != BANK_FORMAT:
        raise ValueError(f"concept bank file {path} is not a gig_fast concept bank (format must be {BANK_FORMAT!r})")
    if meta.get("version") != BANK_VERSION:
        raise ValueError(f"concept bank file {path} has version {meta.get('version')!r}; this gig_fast reads "
                         f"version {BANK_VERSION}")
    missing = [k for k in ("layer", "K", "C", "sha256") if k not in meta]
    if missing:
        raise ValueError(f"concept bank file {path} lacks {missing}")
    return meta


def _read_tensors(path: Path, data: bytes) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load

    try:
        tensors = load(data)
    except (SafetensorError, ValueError, RuntimeError) as e:
        raise ValueError(f"concept bank file {path} is corrupted or truncated: {e}") from None
    missing = sorted({"V", "beta", "sizes"} - set(tensors))
    if missing:
        raise ValueError(f"concept bank file {path} lacks the tensor(s) {missing}")
    return tensors
