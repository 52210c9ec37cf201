"""The work folder of a run, ``<out>/work-<config key>/``, and what a relaunch in it must agree with.

Its ``config.json`` is written once, when the folder is made, and records:

* ``key`` and ``config``: the run key and the whole configuration;
* ``numerics``: the op backend (``backend``, or ``GIG_FAST_BACKEND``) and the device type. They are not
  part of the key (a run on a GPU and one on the CPU are the same experiment) but they change float
  results: every backend's k-means draws the same random numbers (:mod:`gig_fast.ops.two_means`), so
  partitions agree up to float rounding and the numbering of clusters, not bit for bit. A relaunch with
  another value is therefore refused, with a message that says what to do, instead of mixing files
  computed both ways;
* ``dataset``: a fingerprint of the data set (its number of images and their names), which the image
  selection indexes: a relaunch on a changed folder is refused;
* ``unreadable``: the selected images that could not be decoded (skipped, and listed in metrics.json),
  so a relaunch skips the same ones without decoding them again.

``chunk_images`` is pinned too: work files are named by chunk index, so a relaunch with another value
keeps the folder's (with a warning that says how to rechunk). ``batch_size``/``gig_batch_size`` may
change between launches: every image draws its own samples (stages.py), so they change only the float
rounding of batched convolutions.
"""
from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path

import numpy as np
import torch

from ..ops import forced_backend
from ..run_folder import CONFIG_FILE, STAGE1, chunk_file, remove_stale_tmp
from . import distributed as dist
from .stages import chunk_ids
from .files import load_json, save_json

__all__ = ["open_work", "check_numerics", "numerics", "dataset_fingerprint", "unreadable_ids"]


def numerics(cfg) -> dict:
    """The settings of ``cfg`` that change float results but not the run key."""
    return {"backend": cfg.backend or forced_backend(), "device_type": torch.device(cfg.device).type}


def dataset_fingerprint(dataset) -> str:
    """A short hash of what the image selection indexes: the number of images and, where the data set
    lists them (``samples``: image folders, the offline photos), their names and labels."""
    samples = getattr(dataset, "samples", None)
    names = [f"{Path(str(p)).parent.name}/{Path(str(p)).name}\t{int(lab)}" for p, lab in samples] if samples else []
    return hashlib.sha256(json.dumps([len(dataset), names]).encode()).hexdigest()[:16]


def open_work(pipe, screen) -> dict:
    """Make or reopen ``pipe.work`` and return its record (``config.json``, see the module docstring).

    The main process deletes the temporary files that killed writers left behind and, for a new folder,
    calls ``screen()`` (→ ``{"ids": [...], "skipped": [[path, reason], ...]}``, the selected images that
    cannot be decoded) and writes the record; every rank then reads it. A relaunch keeps the folder's
    ``chunk_images`` (``pipe.config`` is replaced, with a warning); a changed data set or run key is a
    ValueError.
    """
    cfg, work = pipe.config, pipe.work
    run_file = work / CONFIG_FILE
    if dist.is_main():
        for folder, recursive in ((work, True), (pipe.out, False)):
            remove_stale_tmp(folder, recursive=recursive)
        if not run_file.exists():
            save_json(run_file, {"key": cfg.key(), "config": cfg.to_dict(), "numerics": numerics(cfg),
                                 "dataset": dataset_fingerprint(pipe.dataset), "unreadable": screen()})
    dist.barrier()  # the other ranks read rank 0's file
    record = load_json(run_file)
    if not isinstance(record, dict) or record.get("key") != cfg.key():
        raise ValueError(f"{run_file} belongs to another configuration (run key {record.get('key') if isinstance(record, dict) else None!r}, "
                         f"this one {cfg.key()!r}): remove {work} or use another out folder")
    stored = record.get("dataset")
    if stored is not None and stored != dataset_fingerprint(pipe.dataset):
        raise ValueError(f"the data set {cfg.dataset!r} changed since {work} was started (images added, removed, renamed "
                         f"or newly (un)readable): its selection of images would no longer match the work files. Restore the "
                         f"data set, or use another out folder to start afresh")
    first = record.get("config", {}).get("chunk_images", cfg.chunk_images)
    if first != cfg.chunk_images:
        warnings.warn(f"chunk_images={cfg.chunk_images} but {work} was chunked with chunk_images={first}: keeping "
                      f"{first} (its files are named by chunk index). To rechunk, start afresh in another out "
                      f"folder (results do not depend on chunk_images)", stacklevel=3)
        pipe.config = cfg.replace(chunk_images=first)
    return record


def check_numerics(pipe, record: dict) -> None:
    """Refuse to compute in ``pipe.work`` with another backend or device type than it was started with."""
    stored = record.get("numerics")
    if stored is None:  # made by an older gig_fast, which drew stage-1 samples per chunk, not per image
        n_chunks = len(chunk_ids(pipe.concept_ids, pipe.config.chunk_images))
        if not all(chunk_file(pipe.work / STAGE1, ci).exists() for ci in range(n_chunks)):
            raise ValueError(f"{pipe.work} was started by an older gig_fast that drew the stage-1 samples per chunk "
                             "(now per image): finishing its stage 1 would mix both. Use another out folder to "
                             "start afresh")
        return
    now = numerics(pipe.config)
    what = {"backend": ("backend", "the op backend (--backend, or GIG_FAST_BACKEND)"),
            "device_type": ("device", "the device type (--device)")}
    for name, (option, desc) in what.items():
        if stored.get(name) != now[name]:
            show = lambda v: "null (the default)" if v is None else repr(v)  # noqa: E731
            raise ValueError(f"{pipe.work} was started with {option}={show(stored.get(name))} and this launch has "
                             f"{option}={show(now[name])}: {desc} changes float results, so files computed both "
                             f"ways would be mixed. Relaunch with {option}={show(stored.get(name))} to resume, or "
                             f"use another out folder to start afresh")


def unreadable_ids(record: dict) -> np.ndarray:
    """The dataset indices of the selected images the record lists as unreadable."""
    return np.asarray((record.get("unreadable") or {}).get("ids", []), dtype=np.int64)
