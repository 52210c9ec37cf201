"""The stage-1 PFV–iERF dataset read back from a work folder: rows numbered across the chunk files, the
rows nearest in cosine to given concepts, and the samples' metadata and iERF maps (for concept cards,
iERF crops and the appendix figures). Memory stays at one chunk of PFVs."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..run_folder import STAGE1, chunk_files

__all__ = ["stage1_files", "nearest_rows", "stage1_samples"]


def stage1_files(work: Path) -> tuple[list[Path], np.ndarray]:
    """The stage-1 chunk files in order and ``[files + 1]`` their first global rows (and the total)."""
    files = chunk_files(Path(work) / STAGE1)
    starts, n = [], 0
    for f in files:
        starts.append(n)
        with np.load(f, allow_pickle=False) as z:
            n += len(z["image"])
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


def stage1_samples(work: Path, layer: str, rows) -> tuple[dict[int, tuple[int, int, int]], dict[int, np.ndarray]]:
    """For global stage-1 ``rows`` of ``layer``: ``{row: (image, position, label)}`` and ``{row: iERF map
    [H, W]}`` (empty when the run kept no iERFs, ``store_ierf=False``)."""
    files, starts = stage1_files(work)
    meta: dict[int, tuple[int, int, int]] = {}
    maps: dict[int, np.ndarray] = {}
    wanted = sorted(set(int(r) for r in rows))
    for fi, f in enumerate(files):
        local = [r - int(starts[fi]) for r in wanted if starts[fi] <= r < starts[fi + 1]]
        if not local:
            continue
        with np.load(f, allow_pickle=False) as z:
            img, pos, lab = z["image"], z[f"{layer}|position"], z["label"]
            ierf = z[f"{layer}|ierf"] if f"{layer}|ierf" in z.files else None
        for r in local:
            row = r + int(starts[fi])
            meta[row] = (int(img[r]), int(pos[r]), int(lab[r]))
            if ierf is not None:
                maps[row] = ierf[r]
    return meta, maps
