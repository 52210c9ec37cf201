"""Saving and loading a run's files — JSON and npz, each written atomically
(:func:`gig_fast.run_folder.atomic_open`), read without pickle — and the checks that let a resumed run
trust its files: a damaged file is named, and a work file is recomputed.
"""
from __future__ import annotations

import functools
import json
import os
import warnings
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from ..run_folder import atomic_open

__all__ = ["atomic_write_text", "save_json", "load_json", "save_npz", "BackgroundWriter", "load_npz",
           "npz_member", "npz_rows", "npz_problem", "is_complete"]


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` so that a reader (or a resumed run) never sees a partial file."""
    with atomic_open(path, "w", encoding="utf-8") as f:
        f.write(text)


def save_json(path: str | Path, obj, compact: bool = False) -> None:
    """Atomic JSON (no NaN); ``compact`` drops the indentation (large files such as graph.json)."""
    text = json.dumps(obj, separators=(",", ":"), allow_nan=False) if compact else json.dumps(obj, indent=1, allow_nan=False)
    atomic_write_text(path, text)


def load_json(path: str | Path):
    """The JSON in ``path``; a damaged file is a ValueError that names it (a missing one FileNotFoundError)."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is damaged: not valid JSON ({e})") from None


def _as_numpy(arrays: dict) -> dict[str, np.ndarray]:
    return {k: np.asarray(v.detach().cpu().numpy() if hasattr(v, "detach") else v) for k, v in arrays.items()}


def save_npz(path: str | Path, **arrays) -> None:
    """Atomically save numpy-convertible arrays (tensors are moved to CPU numpy first)."""
    _write_npz(Path(path), _as_numpy(arrays))


def _write_npz(path: Path, out: dict[str, np.ndarray]) -> None:
    with atomic_open(path) as f:
        np.savez(f, **out)


class BackgroundWriter:
    """:func:`save_npz` on one background thread, so that a stage computes its next chunk while the last
    one is written (``np.savez`` + ``fsync``: stage-4 chunk files hold ``[classes, T, K]`` float64 sums,
    tens of MB each at K = 16,384). The arrays are copied to host numpy on the caller's thread; at most
    ``pending`` files wait behind the one being written (their arrays stay in memory until then);
    ``save(path, **arrays)`` writes one file (default :func:`save_npz`). Every
    file is still written atomically; leaving the ``with`` block waits for every write and raises the
    first failure (a failure also surfaces at the next :meth:`save_npz`).

        with BackgroundWriter() as writer:
            for ...:
                writer.save_npz(path, **arrays)
        # every file is on disk here
    """

    def __init__(self, save=None, pending: int = 1):
        self._save = save or save_npz  # the function that writes one file (its caller's, e.g. a test's wrapper)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="gig-write")
        self._futures: list = []
        self._pending = pending

    def save_npz(self, path: str | Path, **arrays) -> None:
        for f in [f for f in self._futures if f.done()]:
            f.result()  # a failed write raises here
        self._futures = [f for f in self._futures if not f.done()]
        while len(self._futures) > self._pending:
            self._futures.pop(0).result()
        self._futures.append(self._pool.submit(self._save, Path(path), **_as_numpy(arrays)))

    def wait(self) -> None:
        """Block until every submitted file is written; raise the first failure."""
        futures, self._futures = self._futures, []
        for f in futures:
            f.result()

    def __enter__(self) -> "BackgroundWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                self.wait()
            else:  # finish what was submitted (each file whole or absent); the body's error wins
                for f in self._futures:
                    f.exception()
        finally:
            self._pool.shutdown(wait=True)


def load_npz(path: str | Path) -> dict[str, np.ndarray]:
    """Load every array of an npz file (``allow_pickle=False``: no code runs on load); a damaged file is a
    ValueError that names it."""
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except (zipfile.BadZipFile, EOFError, ValueError, OSError, KeyError) as e:
        if isinstance(e, FileNotFoundError):
            raise
        raise ValueError(f"{path} is damaged: {type(e).__name__}: {e}") from None


@functools.lru_cache(maxsize=4096)  # ~200 bytes each: every array of a run's stage-1 and code files
def _npz_layout(path: str, key: str, mtime_ns: int, size: int):
    """``(offset, dtype, shape, fortran)`` of the uncompressed member ``key`` of the npz file ``path`` (None
    when compressed); ``mtime_ns`` and ``size`` make a rewritten file a new entry."""
    with zipfile.ZipFile(path) as zf:
        info = zf.getinfo(f"{key}.npy")
        if info.compress_type != zipfile.ZIP_STORED:
            return None
    with open(path, "rb") as f:
        f.seek(info.header_offset)
        local = f.read(30)  # the local file header: its name and extra field lengths may differ from the central one
        name_len, extra_len = int.from_bytes(local[26:28], "little"), int.from_bytes(local[28:30], "little")
        f.seek(info.header_offset + 30 + name_len + extra_len)
        version = np.lib.format.read_magic(f)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read_header(f)
        offset = f.tell()
    if dtype.hasobject:
        raise ValueError(f"{path}: array {key} holds Python objects; refusing to read it")
    return offset, dtype, shape, fortran


def _layout(path, key: str):
    st = os.stat(path)
    return _npz_layout(str(path), key, st.st_mtime_ns, st.st_size)


def npz_member(path: str | Path, key: str) -> np.ndarray:
    """Array ``key`` of the npz file ``path`` as a read-only memory map, so that reading a few rows
    reads only those (``np.savez`` stores members uncompressed: a 3,000-row stage-1 iERF array is
    ~5 MB, of which one crop needs 1.5 KB); a compressed member is loaded whole. ``KeyError`` when
    the file has no such array."""
    layout = _layout(path, key)
    if layout is None:
        with zipfile.ZipFile(path) as zf, zf.open(f"{key}.npy") as f:
            return np.lib.format.read_array(f, allow_pickle=False)
    offset, dtype, shape, fortran = layout
    return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape, order="F" if fortran else "C")


def npz_rows(path: str | Path, key: str, rows) -> np.ndarray:
    """``array[rows]`` of the npz member ``key`` (``rows``: int sequence), reading only those rows: one
    ``pread`` per row, no memory map (a map costs ~1 ms to set up; a view reads 2 rows of 32 arrays)."""
    rows = np.asarray(rows, dtype=np.int64)
    layout = _layout(path, key)
    if layout is None or layout[3] or not layout[2]:
        return np.asarray(npz_member(path, key)[rows])
    offset, dtype, shape, _ = layout
    if rows.size and (rows.min() < -shape[0] or rows.max() >= shape[0]):
        raise IndexError(f"rows out of range for {key} of {path} ({shape[0]} rows)")
    rows = rows % shape[0] if shape[0] else rows
    row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
    out = np.empty((rows.size, *shape[1:]), dtype=dtype)
    buf = out.reshape(rows.size, -1).view(np.uint8).reshape(rows.size, row_bytes) if row_bytes else None
    fd = os.open(path, os.O_RDONLY)
    try:
        for i, r in enumerate(rows.tolist()):
            buf[i] = np.frombuffer(os.pread(fd, row_bytes, offset + r * row_bytes), dtype=np.uint8)
    finally:
        os.close(fd)
    return out


def npz_problem(path: str | Path, required=()) -> str | None:
    """What is wrong with the npz file ``path`` (None: nothing): not a complete zip archive (a truncated
    write), an entry whose CRC does not match (bit rot), or a ``required`` array missing. Reads the whole
    file once: the price of trusting it on resume."""
    try:
        with zipfile.ZipFile(path) as z:
            bad = z.testzip()  # reads every entry and checks its CRC-32
            if bad is not None:
                return f"entry {bad} fails its CRC check"
            names = {n[:-4] for n in z.namelist() if n.endswith(".npy")}
    except (zipfile.BadZipFile, EOFError, OSError, ValueError) as e:
        return f"{type(e).__name__}: {e}"
    missing = [k for k in required if k not in names]
    return f"missing arrays {missing}" if missing else None


def is_complete(path: str | Path, required=()) -> bool:
    """Whether the work file ``path`` exists and is sound (:func:`npz_problem`). A damaged one gets a
    warning that names it and what is wrong, and False: the caller recomputes it (and overwrites it)."""
    path = Path(path)
    if not path.exists():
        return False
    problem = npz_problem(path, required)
    if problem is None:
        return True
    warnings.warn(f"work file {path} is damaged ({problem}); recomputing it", stacklevel=2)
    return False
