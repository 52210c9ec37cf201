"""The stage-1 PFV–iERF dataset read back from a work folder: rows numbered across the chunk files, the
rows nearest in cosine to given concepts, and the samples' metadata and iERF maps (for concept cards,
iERF crops and the appendix figures). Memory stays at one chunk of PFVs; samples are read row by row
from memory maps of the chunk files (a crop needs one 28×28 iERF, not the chunk's 3,000)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .store import npz_member

__all__ = ["stage1_files", "nearest_rows", "stage1_samples"]


def stage1_files(work: Path) -> tuple[list[Path], np.ndarray]:
    """The stage-1 chunk files in order and ``[files + 1]`` their first global rows (and the total)."""
    files = sorted((Path(work) / "stage1").glob("chunk_*.npz"))
    starts, n = [], 0
    for f in files:
        starts.append(n)
        n += len(npz_member(f, "image"))
    return files, np.array(starts + [n])


def nearest_rows(work: Path, layer: str, V: torch.Tensor, beta: torch.Tensor, labels: torch.Tensor,
                 concepts: list[int], k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per concept the ``k`` stage-1 rows of ``layer`` nearest in cosine to its vector (``x − β`` against
    ``v_q``; paper Fig. 1 "top 10 nearest embeddings"), nearest first.

    Args: V ``[K, C]`` and beta ``[C]`` the layer's concepts, labels int64 ``[N]`` the stage-1 cluster of
    every row, concepts the ``Q`` concept ids.
    Returns: ``(rows [Q, k] global stage-1 rows, cosines [Q, k], member [Q, k] bool: in the concept's cluster)``.
    """
    files, _ = stage1_files(work)
    Vq = torch.nn.functional.normalize(V.double()[list(concepts)], dim=1)  # [Q, C]
    best_val = torch.empty(len(concepts), 0, dtype=torch.float64)
    best_row = torch.empty(len(concepts), 0, dtype=torch.long)
    start = 0
    for f in files:
        with np.load(f, allow_pickle=False) as z:
            X = torch.from_numpy(z[f"{layer}|pfv"]).double() - beta.double()
        cos = Vq @ torch.nn.functional.normalize(X, dim=1).T  # [Q, n]
        rows = torch.arange(start, start + X.shape[0]).expand(len(concepts), -1)
        start += X.shape[0]
        vals, pick = torch.topk(torch.cat([best_val, cos], 1), min(k, best_val.shape[1] + cos.shape[1]), dim=1)
        best_row = torch.gather(torch.cat([best_row, rows], 1), 1, pick)
        best_val = vals
    member = labels.long()[best_row] == torch.tensor(list(concepts))[:, None]
    return best_row.numpy(), best_val.numpy(), member.numpy()


def stage1_samples(work: Path, layer: str, rows, files=None) -> tuple[dict[int, tuple[int, int, int]], dict[int, np.ndarray]]:
    """For global stage-1 ``rows`` of ``layer``: ``{row: (image, position, label)}`` and ``{row: iERF map
    [H, W]}`` (empty when the run kept no iERFs, ``store_ierf=False``). ``files``: :func:`stage1_files`
    when the caller has it."""
    files, starts = files or stage1_files(work)
    meta: dict[int, tuple[int, int, int]] = {}
    maps: dict[int, np.ndarray] = {}
    wanted = np.unique(np.asarray(rows, dtype=np.int64).ravel())
    if wanted.size and (wanted[0] < 0 or wanted[-1] >= starts[-1]):
        raise ValueError(f"stage-1 rows must be in 0..{int(starts[-1]) - 1}")
    which = np.searchsorted(starts, wanted, side="right") - 1
    for fi in np.unique(which).tolist():
        glob = wanted[which == fi]
        local = glob - int(starts[fi])
        f = files[fi]
        img, pos, lab = (np.asarray(npz_member(f, key)[local]) for key in ("image", f"{layer}|position", "label"))
        try:
            ierf = np.asarray(npz_member(f, f"{layer}|ierf")[local])
        except KeyError:
            ierf = None
        for j, row in enumerate(glob.tolist()):
            meta[row] = (int(img[j]), int(pos[j]), int(lab[j]))
            if ierf is not None:
                maps[row] = ierf[j]
    return meta, maps
