"""Atomic artifact writing (tmp + ``os.replace``) and safe loading (npz without pickle, JSON)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

__all__ = ["atomic_write_text", "atomic_write_parts", "save_json", "load_json", "save_npz", "load_npz"]


def _tmp(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` so that a reader (or a resumed run) never sees a partial file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp(path)
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_parts(path: str | Path, parts) -> None:
    """Like :func:`atomic_write_text` for text made of the strings of the iterable ``parts``, written as
    they come, so a large file (``graph.json`` of many images) is never held in memory whole."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp(path)
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            for part in parts:
                f.write(part)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)


def save_json(path: str | Path, obj, compact: bool = False) -> None:
    """Atomic JSON (no NaN); ``compact`` drops the indentation (large files such as graph.json)."""
    text = json.dumps(obj, separators=(",", ":"), allow_nan=False) if compact else json.dumps(obj, indent=1, allow_nan=False)
    atomic_write_text(path, text)


def load_json(path: str | Path):
    return json.loads(Path(path).read_text(encoding="utf-8"))


def save_npz(path: str | Path, **arrays) -> None:
    """Atomically save numpy-convertible arrays (tensors are moved to CPU numpy first)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp(path).with_suffix(".npz")
    out = {}
    for k, v in arrays.items():
        if hasattr(v, "detach"):
            v = v.detach().cpu().numpy()
        out[k] = np.asarray(v)
    with open(tmp, "wb") as f:
        np.savez(f, **out)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_npz(path: str | Path) -> dict[str, np.ndarray]:
    """Load every array of an npz file (``allow_pickle=False``: no code runs on load)."""
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}
